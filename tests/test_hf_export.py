"""`python -m tagmoe_dist.checkpoint export --format hf`: the exported directory loads with
transformers as the source family (dense sources as their MoE counterpart), its logits equal the
trained model's, `generate` runs; the export is the same from EP=2, from the checkpoint resharded
to EP=1, and the alignment head goes to a side file; bad input is refused before any write."""

from __future__ import annotations

import contextlib

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import hf_models as H
from tests.tolerance import REL_FP32, rel_diff
from tests.test_hf_train import FAST, ROOT, _env, _run

pytest.importorskip("transformers")

EXPORTED = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "MixtralForCausalLM",
            "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM"}


def _export(ckpt, out, *extra):
    cmd = [sys.executable, "-m", "tagmoe_dist.checkpoint", "export", "--ckpt", str(ckpt),
           "--format", "hf", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _trained_model(ckpt):
    """The trained model as the trainer holds it (EP=1): converted source + checkpoint weights."""
    import tagmoe_dist as tm
    from tagmoe_dist.checkpoint import consolidate
    from tagmoe_dist.integrations.hf.training import HFModelConfig
    cfg = HFModelConfig.from_yaml(Path(ckpt) / "model_config.yaml")
    model = tm.hf.from_pretrained(cfg.hf, moe=cfg.moe, task_schema=cfg.load_task_schema(),
                                  upcycle=cfg.upcycle)
    sd = {k[len("lm."):]: v for k, v in consolidate(ckpt).items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()


@contextlib.contextmanager
def _stable_topk():
    """torch.topk with exact ties broken towards the lower index, as tagmoe routes them. The
    exported weights are what is checked here; which tied expert torch.topk picks is its own
    unspecified order (the exporter warns about tied router rows: test below)."""
    real = torch.topk

    def topk(x, k, dim=-1, largest=True, sorted=True):
        v, i = torch.sort(x, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk((v.narrow(dim, 0, k), i.narrow(dim, 0, k)))
    torch.topk = topk
    try:
        yield
    finally:
        torch.topk = real


def _check_export(ckpt, out, family, tol=REL_FP32):
    from transformers import AutoModelForCausalLM
    exported, loading = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert type(exported).__name__ == EXPORTED[family]
    assert not any(loading.values()), loading          # no missing / unexpected / mismatched key
    model = _trained_model(ckpt).float()
    ids_BS = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), _stable_topk():
        want = model(ids_BS).logits
        got = exported.float().eval()(ids_BS).logits
    assert rel_diff(got, want) <= tol, family
    gen = exported.generate(ids_BS[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long),
                            max_new_tokens=5, do_sample=False)
    assert gen.shape == (2, 9)
    meta = json.loads((Path(out) / "tagmoe_metadata.json").read_text())
    assert meta["source"]["model_type"] == family and meta["sha256"]
    assert (Path(out) / "tokenizer_config.json").is_file()
    assert (Path(out) / "generation_config.json").is_file()
    return meta


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    H.write_chat_data(root / "chat.jsonl")
    return root


def _trained(root, family, nproc, *extra, ds="zero2", upcycle=None, router="task_aware",
             name=None):
    name = name or family
    src = H.make_user_dir(family, root / name, seed=3)
    yaml_path = H.write_yaml(root / f"{name}.yaml", src, root / "chat.jsonl", router=router,
                             upcycle=upcycle if upcycle is not None else H.UPCYCLE.get(family))
    log_dir = root / f"run_{name}"
    r = _run(yaml_path, ds, log_dir, 3, "--set", f"ep_size={nproc}", *extra, nproc=nproc)
    assert r.returncode == 0, r.stderr[-4000:]
    return log_dir / "checkpoints"


def test_export_from_ep2_and_resharded_checkpoint(root):
    ckpt = _trained(root, "mixtral", 2)
    out = root / "export_ep2"
    r = _export(ckpt, out)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = _check_export(ckpt, out, "mixtral")
    side = root / "export_ep2.tagmoe_alignment.safetensors"
    assert side.is_file() and meta["dropped"]["alignment_file"] == side.name
    from safetensors import safe_open
    with safe_open(str(side), "pt") as f:
        assert "tag_embed" in f.keys()
    for shard in meta["sha256"]:
        if shard.endswith(".safetensors") and shard.startswith("model"):
            with safe_open(str(out / shard), "pt") as f:
                assert not any("tagmoe" in k or "alignment" in k for k in f.keys())
    # resharded to EP=1: the same export, tensor for tensor
    resharded = root / "resharded" / "checkpoints"
    r = subprocess.run([sys.executable, "-m", "tagmoe_dist.reshard", "--src", str(ckpt), "--dst",
                        str(resharded), "--ep-size", "1"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out1 = root / "export_ep1"
    assert _export(resharded, out1).returncode == 0
    from safetensors.torch import load_file
    a = load_file(str(out / "model-00001-of-00001.safetensors"))
    b = load_file(str(out1 / "model-00001-of-00001.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and training resumes from it at EP=1 (reshard wrote the run's config for the new size)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tagmoe_dist.train", "--config", str(resharded / "model_config.yaml"),
         "--deepspeed_config", "configs/deepspeed/zero2.json", "--resume",
         "--set", "steps=4", *FAST], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (resharded / "latest").read_text().strip() == "step_4"
    # never over an existing directory without --force
    before = sorted(p.name for p in out.iterdir())
    r = _export(ckpt, out)
    assert r.returncode == 1 and "already exists; pass --force" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    assert _export(ckpt, out, "--force").returncode == 0


def test_export_from_zero3_checkpoint(root):
    """ZeRO-3 (configs/deepspeed/zero3.json, EP=2 on 2 processes) writes partitions, not the main
    and expert files: the export gathers them, loads as Mixtral with the trained model's logits,
    and equals, tensor for tensor, the export of the same weights laid out as ZeRO 0-2 files."""
    ckpt = _trained(root, "mixtral", 2, ds="zero3", name="mixtral_zero3")
    from tagmoe_dist.checkpoint import resolve_tag, zero3
    assert zero3.is_zero3(resolve_tag(ckpt, None))
    out = root / "export_zero3"
    r = _export(ckpt, out)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = _check_export(ckpt, out, "mixtral")
    assert meta["checkpoint"]["zero_stage"] == 3 and meta["checkpoint"]["step"] == 3
    assert (root / "export_zero3.tagmoe_alignment.safetensors").is_file()
    # the same weights as ZeRO 0-2 files (what reshard writes from ZeRO-3): the same export
    as_zero2 = root / "zero3_as_zero2" / "checkpoints"
    tag = resolve_tag(ckpt, None).name
    zero3.write_zero2_weights(resolve_tag(ckpt, None), as_zero2 / tag)
    (as_zero2 / "latest").write_text(tag)
    for f in ("model_config.yaml", "task_schema.yaml"):
        if (ckpt / f).is_file():
            (as_zero2 / f).write_bytes((ckpt / f).read_bytes())
    out2 = root / "export_zero3_as_zero2"
    r = _export(as_zero2, out2)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file
    a = load_file(str(out / "model-00001-of-00001.safetensors"))
    b = load_file(str(out2 / "model-00001-of-00001.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out2 / "tagmoe_metadata.json").read_text())["checkpoint"]["zero_stage"] \
        == "0-2"


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "qwen2", "mistral"])
def test_export_each_family(root, family):
    ckpt = _trained(root, family, 1, router="topk")
    out = root / f"export_{family}"
    r = _export(ckpt, out)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_export(ckpt, out, family)
    assert not (root / f"export_{family}.tagmoe_alignment.safetensors").exists()
    # fine-grained upcycling (qwen2: granularity 2) copies router rows; rows that training left
    # exactly equal are reported, since transformers' tie order is not ours
    from tagmoe_dist.checkpoint import consolidate
    from tagmoe_dist.integrations.hf.export import tied_router_rows
    tied = [tied_router_rows(v) for k, v in consolidate(ckpt).items() if k.endswith("router.weight")]
    assert ("identical router rows" in r.stderr) == any(tied), (tied, r.stderr[-2000:])


def test_export_bf16_upcycled_llama(root):
    ckpt = _trained(root, "llama", 2, ds="zero2_bf16")
    out = root / "export_llama"
    assert _export(ckpt, out).returncode == 0
    meta = _check_export(ckpt, out, "llama")    # the same bf16 weights, both computed in fp32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert meta["target"]["model_type"] == "mixtral"


def test_refuses_router_the_family_cannot_express(root, tmp_path):
    src = H.make_user_dir("mixtral", tmp_path / "mixtral", seed=3)
    yaml_path = H.write_yaml(tmp_path / "m.yaml", src, root / "chat.jsonl", router="topk")
    import yaml
    d = yaml.safe_load(yaml_path.read_text())
    d["moe"]["expert_bias"] = True
    ckpt = tmp_path / "fake" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    r = _export(ckpt, out)
    assert r.returncode == 1 and "moe.expert_bias=True" in r.stderr and "Mixtral" in r.stderr
    assert not out.exists()
    from tagmoe_dist.config import MoEConfig
    from tagmoe_dist.integrations.hf.export import blocking_option
    base = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, norm_topk_prob=True)
    assert "norm_topk_prob=False" in blocking_option(base.replace(norm_topk_prob=False), "mixtral")
    assert blocking_option(base.replace(norm_topk_prob=False), "qwen3_moe") is None
    assert "sigmoid" in blocking_option(base.replace(score_function="sigmoid"), "qwen2_moe")
    assert "capacity_factor" in blocking_option(base.replace(capacity_factor=1.0), "qwen3_moe")
