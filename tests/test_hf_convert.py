"""tm.hf.from_pretrained: the converted model's logits equal the source's, for every family, at
EP=1 and EP=2 (gloo, 2 processes), for router topk and task_aware; bad input is refused before
anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import hf_models as H
from tests.dist_utils import run_distributed
from tests.tolerance import REL_FP32, rel_diff

pytest.importorskip("transformers")

SCHEMA = str(Path(__file__).resolve().parents[1] / "configs/tasks/text_tasks.yaml")
ROUTERS = ("topk", "task_aware")
REL_TOL = REL_FP32


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_src")
    return {fam: str(H.save(fam, root / fam, seed=i)) for i, fam in enumerate(H.FAMILIES)}


def _rel_err(want, got):
    return rel_diff(got, want)


def _check_family(src: str, fam: str, groups, seed: int) -> None:
    import tagmoe_dist as tm
    from tagmoe_dist.tasks import TaskSchema
    from transformers import AutoModelForCausalLM
    schema = TaskSchema.from_yaml(SCHEMA)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(0, 101, (3, 11), generator=g)
    task_BN = torch.zeros(3, schema.num_tags)
    task_BN[0, 0] = task_BN[1, 1] = 1.0          # sample 2 has no descriptor
    with torch.no_grad():
        want = ref(ids_BS).logits
    for router in ROUTERS:
        torch.manual_seed(0)
        model = tm.hf.from_pretrained(src, moe=dict(router=router, overlap_chunks=1),
                                      task_schema=schema if router == "task_aware" else None,
                                      groups=groups, upcycle=H.UPCYCLE.get(fam))
        layers = tm.hf.moe_layers(model)
        assert layers and all(l.experts.num_local_experts * groups.ep_size == l.cfg.num_experts
                              for l in layers)
        model.eval()
        with torch.no_grad():
            got = model(ids_BS).logits
        err = _rel_err(want, got)
        assert err <= REL_TOL, (fam, router, "eval", err)
        # training mode with task ids: the alignment loss enters backward, the logits are unchanged
        model.train()
        with tm.hf.tasks(model, task_BN):
            got = model(ids_BS).logits
        err = _rel_err(want, got)
        assert err <= REL_TOL, (fam, router, "train", err)
        if router == "task_aware":
            assert "loss" in tm.hf.last_align(model)


def _worker(rank, world, dirs):
    from tagmoe_dist.parallel import ParallelGroups
    groups = ParallelGroups.build(ep_size=world)
    for i, (fam, src) in enumerate(sorted(dirs.items())):
        _check_family(src, fam, groups, seed=100 * rank + i)


def test_equivalence_ep1(model_dirs):
    from tagmoe_dist.parallel import ParallelGroups
    for i, (fam, src) in enumerate(sorted(model_dirs.items())):
        _check_family(src, fam, ParallelGroups.single(), seed=i)


def test_equivalence_ep2(model_dirs):
    run_distributed(_worker, 2, model_dirs)


def test_built_model_and_generate(model_dirs):
    import tagmoe_dist as tm
    src = H.build("qwen2_moe")
    ids_BS = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        want = src(ids_BS).logits
        gen_want = src.generate(ids_BS, max_new_tokens=4, do_sample=False)
    model = tm.hf.from_pretrained(src).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    # aux_loss_reduction="mean" (the default) averages over the model's MoE layers
    layers = [m for m in model.modules() if isinstance(m, tm.MoELayer)]
    assert len(layers) > 1 and all(m.num_moe_layers == len(layers) for m in layers)
    with torch.no_grad():
        assert _rel_err(want, model(ids_BS).logits) <= REL_TOL
        gen = model.generate(ids_BS, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, gen_want)


def test_import_does_not_load_transformers():
    import subprocess
    import sys
    code = "import sys, tagmoe_dist; assert 'transformers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------------------ bad input


def test_directory_without_config(tmp_path):
    import tagmoe_dist as tm
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="has no config.json"):
        tm.hf.from_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    import tagmoe_dist as tm
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: MoE sources "
                                         r"\['mixtral', 'qwen2_moe', 'qwen3_moe'\]"):
        tm.hf.from_pretrained(tmp_path)


def test_experts_not_divisible_by_ep(model_dirs):
    import tagmoe_dist as tm
    from tagmoe_dist.integrations.hf.convert import build_moe_config, check_ep
    from transformers import AutoConfig
    cfg = build_moe_config(AutoConfig.from_pretrained(model_dirs["mixtral"]), "mixtral", None, None)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel "
                                         "size 4"):
        check_ep(cfg, 4)
    with pytest.raises(ValueError, match="upcycle.num_experts"):
        tm.hf.from_pretrained(model_dirs["llama"], upcycle=dict(num_experts=0, top_k=1))


def test_bad_overrides(model_dirs):
    import tagmoe_dist as tm
    with pytest.raises(ValueError, match="moe.num_experts: fixed by the source"):
        tm.hf.from_pretrained(model_dirs["mixtral"], moe=dict(num_experts=8))
    with pytest.raises(ValueError, match="needs upcycle="):
        tm.hf.from_pretrained(model_dirs["llama"])
    with pytest.raises(ValueError, match="drop upcycle="):
        tm.hf.from_pretrained(model_dirs["mixtral"], upcycle=dict(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="needs task_schema="):
        tm.hf.from_pretrained(model_dirs["mixtral"], moe=dict(router="task_aware"))
    with pytest.raises(ValueError, match="moe: .*router='bogus'"):
        tm.hf.from_pretrained(model_dirs["mixtral"], moe=dict(router="bogus"))
