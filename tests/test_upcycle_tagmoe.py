"""Upcycling a dense tagmoe_dist GPT (DeepSpeed checkpoint) into the MoE GPT (--format tagmoe).

The property: at step 0 the upcycled model's logits equal the dense model's (fp32, max |diff|
<= 1e-5 of the logits' largest magnitude) for plain and fine-grained upcycling, with top-k and
task-aware routers. The dense source is a real checkpoint of `python -m tagmoe_dist.train` (one process, one step); the MoE result is
checked in-process (consolidated weights into `GPT`) and through the trainer (`--resume` on 2
processes at EP=2, whose first logged loss must be the dense model's loss on the same batch).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tagmoe_dist.checkpoint import consolidate
from tagmoe_dist.data import SyntheticTextTasks, TaskCollator
from tagmoe_dist.models.gpt import GPT, GPTConfig, lm_loss
from tagmoe_dist.upcycle import UpcycleOptions, upcycle
from tagmoe_dist.upcycle.__main__ import main as cli_main
from tests.tolerance import REL_FP32, assert_rel_close, assert_rel_far

ROOT = Path(__file__).resolve().parents[1]
B = 2   # batch_size_per_rank of the runs below
DENSE = {
    "vocab_size": 260, "seq_len": 64, "n_layer": 2, "n_head": 2, "d_model": 32, "arch": "dense",
    "moe_every": 1, "task_schema": "configs/tasks/text_tasks.yaml",
    "moe": {"ffn_hidden_size": 16, "num_experts": 4, "top_k": 2, "router": "topk"},  # FFN width 32
    "train": {"seed": 0, "ep_size": 1, "steps": 1, "batch_size_per_rank": B, "eval_interval": 0,
              "log_interval": 1, "warmup_steps": 1, "lr": 1e-3, "min_lr": 1e-3},
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory) -> Path:
    """A dense GPT trained one step by the trainer (one process): <run>/checkpoints."""
    run = tmp_path_factory.mktemp("dense")
    cfg = dict(DENSE, train={**DENSE["train"], "log_dir": str(run)})
    (run / "dense.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "tagmoe_dist.train", "--config", str(run / "dense.yaml"),
                        "--deepspeed_config", "configs/deepspeed/zero2.json"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return run / "checkpoints"


def _batch():
    data = SyntheticTextTasks(10 ** 9, seq_len=64, seed=0)
    return TaskCollator(data.schema)([data[i] for i in range(B)])


def _logits(ckpt: Path, batch) -> torch.Tensor:
    cfg = GPTConfig.from_yaml(ckpt / "model_config.yaml")
    torch.manual_seed(123)          # other init than the checkpoint's: every weight must be loaded
    model = GPT(cfg).eval()
    model.load_state_dict(consolidate(ckpt))        # strict: the key set is GPT's own
    with torch.no_grad():
        return model(batch["input_ids"], task=batch["task_multi_hot"])


def _convert(src: Path, dst: Path, **kw) -> Path:
    kw.setdefault("num_experts", 4)
    kw.setdefault("top_k", 2)
    return upcycle(UpcycleOptions(src=src, dst=dst, format="tagmoe", **kw), progress=False)


def _with_moe_settings(src: Path, dst: Path, **moe) -> Path:
    """A copy of the dense checkpoint whose config carries extra `moe:` settings (the template of
    the upcycled model's MoE settings), e.g. task_conditioning."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_dir():
            (dst / p.name).symlink_to(p)
        elif p.suffix in (".yaml", ".json") or p.name == "latest":
            (dst / p.name).write_bytes(p.read_bytes())
    cfg = yaml.safe_load((dst / "model_config.yaml").read_text())
    cfg["moe"].update(moe)
    (dst / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kw,moe", [
    (dict(num_experts=4, top_k=2), {}),                                      # plain copies
    (dict(num_experts=8, top_k=4, granularity=2, ep_size=2), {}),            # fine-grained
    (dict(num_experts=8, top_k=4, granularity=4), {}),
    (dict(num_experts=4, top_k=2, granularity=2, router_init="zeros"), {}),  # every logit ties
    (dict(num_experts=8, top_k=2, router="task_aware"), {}),
    (dict(num_experts=8, top_k=4, granularity=2, router="task_aware"),
     {"router": "task_aware", "task_conditioning": "add"}),
    (dict(num_experts=4, top_k=2, granularity=2, router="task_aware"),
     {"router": "task_aware", "task_conditioning": "concat", "score_function": "sigmoid"}),
    (dict(num_experts=4, top_k=2, granularity=2, layers="every-other"), {}),  # block 1 only
], ids=["copies", "G2-ep2", "G4", "zeros-router", "tag", "tag-add", "tag-concat-sigmoid",
        "every-other"])
def test_upcycled_logits_equal_dense(dense_ckpt, tmp_path, kw, moe):
    src = _with_moe_settings(dense_ckpt, tmp_path / "src" / "checkpoints", **moe) if moe else dense_ckpt
    out = _convert(src, tmp_path / "moe" / "checkpoints", **kw)
    batch = _batch()
    dense, sparse = _logits(dense_ckpt, batch), _logits(out, batch)
    assert_rel_close(sparse, dense, REL_FP32)
    cfg = GPTConfig.from_yaml(out / "model_config.yaml")
    m = cfg.moe_config
    assert (cfg.arch, m.num_experts, m.top_k, m.norm_topk_prob) == ("moe", kw["num_experts"],
                                                                    kw["top_k"], True)
    assert m.ffn_hidden_size * kw.get("granularity", 1) == 32
    assert len(cfg.load_task_schema().tag_names) > 0
    meta = json.loads((out / "upcycle_metadata.json").read_text())
    assert meta["recipe"]["exact_at_init"] is True


def test_breaking_recipes_are_flagged_and_do_differ(dense_ckpt, tmp_path):
    batch = _batch()
    dense = _logits(dense_ckpt, batch)
    out = _convert(dense_ckpt, tmp_path / "d" / "checkpoints", num_experts=4, top_k=2,
                   drop_ratio=0.5)
    assert_rel_far(_logits(out, batch), dense, 1e-3)
    assert json.loads((out / "upcycle_metadata.json").read_text())["recipe"]["exact_at_init"] is False


def test_gelu_source(tmp_path):
    """A GELU FFN (no gate): slices of w1 columns / w2 rows, the factor G on w2. The source is
    written in DeepSpeed's main-file layout by hand (no second training run)."""
    cfg = GPTConfig.from_dict({**{k: v for k, v in DENSE.items() if k != "train"},
                               "moe": {**DENSE["moe"], "activation": "gelu"}})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    root = tmp_path / "gelu" / "checkpoints"
    (root / "step_1").mkdir(parents=True)
    torch.save({"module": model.state_dict(), "buffer_names": [], "dp_world_size": 1,
                "mp_world_size": 1, "shared_params": {"lm_head.weight": "wte.weight"}},
               root / "step_1" / "mp_rank_00_model_states.pt")
    (root / "latest").write_text("step_1")
    cfg.to_yaml(root / "model_config.yaml")
    out = _convert(root, tmp_path / "moe" / "checkpoints", num_experts=8, top_k=4, granularity=2)
    batch = _batch()
    with torch.no_grad():
        dense = model(batch["input_ids"])
    assert_rel_close(_logits(out, batch), dense, REL_FP32)
    with pytest.raises(ValueError, match="cube-root .* has no gate"):
        _convert(root, tmp_path / "x" / "checkpoints", granularity=2, scaling="cube-root")


# --------------------------------------------------------------------------- through the trainer


def test_trainer_resumes_upcycled_checkpoint_with_dense_loss(dense_ckpt, tmp_path):
    """train.py --resume at EP=2 on 2 processes: the weights-only checkpoint loads (DeepSpeed's
    strict module load plus per-expert files), training starts at step 0, and the first logged loss
    (rank 0's micro-batch, before any update) is the dense model's loss on that batch."""
    ckpt = _convert(dense_ckpt, tmp_path / "run" / "checkpoints", num_experts=8, top_k=4,
                    granularity=2, router="task_aware", ep_size=2)
    batch = _batch()
    dense_loss = lm_loss(_logits(dense_ckpt, batch), batch["labels"]).item()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tagmoe_dist.train", "--config", str(ckpt / "model_config.yaml"),
           "--deepspeed_config", "configs/deepspeed/zero2.json", "--resume", "--set", "steps=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "holds model weights only" in r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert_rel_close(rows[0]["loss"], dense_loss, REL_FP32, msg=f"{rows[0]['loss']} vs {dense_loss}")
    assert (ckpt / "latest").read_text().strip() == "step_2"
    # ZeRO's fp32 master copy was refreshed from the loaded weights: two Adam steps of lr 1e-3
    # moved every weight by a few 1e-3 at most (a stale master would put back the random init).
    # The bound is absolute on purpose: Adam's step is about lr per weight whatever its scale.
    trained, upcycled = consolidate(ckpt), consolidate(ckpt, "step_0")
    assert trained["blocks.0.ffn.experts.w1"].shape == (8, 32, 2 * 16)
    assert max((trained[k] - upcycled[k]).abs().max().item() for k in upcycled) <= 4e-3


# --------------------------------------------------------------------------- files and records


def test_records_hashes_options_and_refuses_overwrite(dense_ckpt, tmp_path):
    dst = tmp_path / "moe" / "checkpoints"
    _convert(dense_ckpt, dst, ep_size=2, seed=3)
    meta = json.loads((dst / "upcycle_metadata.json").read_text())
    tag = (dense_ckpt / "latest").read_text().strip()
    main = dense_ckpt / tag / "mp_rank_00_model_states.pt"
    assert meta["source"]["sha256"][f"{tag}/mp_rank_00_model_states.pt"] == \
        hashlib.sha256(main.read_bytes()).hexdigest()
    assert meta["options"]["seed"] == 3 and meta["options"]["format"] == "tagmoe"
    manifest = json.loads((dst / "step_0" / "tagmoe_manifest.json").read_text())
    assert manifest["weights_only"] is True and manifest["step"] == 0 and manifest["ep_size"] == 2
    assert set(manifest["files"]) == {p.name for p in (dst / "step_0").iterdir()} - {"tagmoe_manifest.json"}
    cfg = yaml.safe_load((dst / "model_config.yaml").read_text())
    assert cfg["train"]["ep_size"] == 2 and cfg["train"]["log_dir"] == str(dst.parent.resolve())
    with pytest.raises(ValueError, match="already exists; pass --force"):
        _convert(dense_ckpt, dst)
    _convert(dense_ckpt, dst, num_experts=8, top_k=2, force=True)
    assert len(list((dst / "step_0").glob("layer_0_expert_*"))) == 8
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".")], "temporary dirs left"


def test_cli(dense_ckpt, tmp_path, capsys):
    dst = tmp_path / "moe" / "checkpoints"
    args = ["--src", str(dense_ckpt), "--dst", str(dst), "--format", "tagmoe", "--num-experts", "4",
            "--top-k", "2", "--no-progress"]
    assert cli_main(args) == 0
    assert "--resume" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli_main(args[:5] + ["hf"] + args[6:])
    assert exc.value.code == 2
    assert "upcycles to --format tagmoe only" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def _megatron_like(dense_ckpt: Path, d: Path):
    d.mkdir(parents=True)
    (d / "latest_checkpointed_iteration.txt").write_text("100")


def _moe_source(dense_ckpt: Path, d: Path):
    _with_moe_settings(dense_ckpt, d)
    cfg = yaml.safe_load((d / "model_config.yaml").read_text())
    cfg["arch"] = "moe"
    (d / "model_config.yaml").write_text(yaml.safe_dump(cfg))


def _without_schema(dense_ckpt: Path, d: Path):
    _with_moe_settings(dense_ckpt, d)
    (d / "task_schema.yaml").unlink()


@pytest.mark.parametrize("make_src,kw,match", [
    (_megatron_like, {}, "looks like a Megatron-core checkpoint .* Supported sources: hf: .*tagmoe:"),
    (lambda dense, d: d.mkdir(parents=True), {}, "not a checkpoint this tool reads. Supported sources"),
    (_moe_source, {}, "holds an MoE GPT .* tagmoe_dist.reshard"),
    (_without_schema, dict(router="task_aware"), "--router task_aware needs a task schema"),
    (None, dict(layers="0"), "cannot be expressed by GPTConfig.moe_every"),
    (None, dict(layers="every-other", num_experts=4, top_k=2), "--top-k equal to --granularity"),
    (None, dict(granularity=3, num_experts=6, top_k=3), "--granularity 3 does not divide the dense FFN width 32"),
    (None, dict(dst_name="moe"), "name the directory 'checkpoints'"),
], ids=["megatron", "empty", "moe-source", "no-schema", "layers", "dense-width", "granularity",
        "dst-name"])
def test_bad_input_is_named(dense_ckpt, tmp_path, make_src, kw, match):
    src = dense_ckpt
    if make_src is not None:
        src = tmp_path / "src" / "checkpoints"
        make_src(dense_ckpt, src)
    dst = tmp_path / "out" / kw.pop("dst_name", "checkpoints")
    with pytest.raises(ValueError, match=match):
        _convert(src, dst, **kw)
    assert not dst.exists()


def test_hf_source_is_refused_for_tagmoe(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="Hugging Face checkpoint; it upcycles to --format hf only"):
        _convert(src, tmp_path / "o" / "checkpoints")
