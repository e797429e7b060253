"""ZeRO-3 checkpoints of EP models (checkpoint/zero3.py), real engines on gloo/CPU.

One 2-process run saves a training checkpoint at EP=2 (tagmoe_dist.checkpoint.engine.save), the
gathered global weights, and the losses of three more steps. Here, in the test process:
`consolidate` and `python -m tagmoe_dist.checkpoint export` rebuild exactly those weights,
`python -m tagmoe_dist.reshard` writes an EP=1 checkpoint, `to_universal` a DeepSpeed universal
one. A second 2-process run at EP=1 loads (a) the universal checkpoint with DeepSpeed's own
loader and continues with the same losses as the EP=2 run, optimizer state included, and (b) the
resharded weights-only checkpoint, whose first loss equals the EP=2 run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.test_zero3 import _assert_close, build_engine, gpt_config, train_steps

deepspeed = pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[1]
SAVE, MORE = 3, 3


def _gathered(model):
    """Global fp32 weights on every rank: ZeRO-3 partitions gathered, experts over the EP group."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from tagmoe_dist.integrations.zero3 import EXPERT_FAMILY
    out = {}
    for n, p in model.named_parameters():
        t = safe_get_full_fp32_param(p).clone()
        if getattr(p, "ds_zero_placement_family", None) == EXPERT_FAMILY and model.groups.ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(model.groups.ep_size)]
            dist.all_gather(parts, t, group=model.groups.ep_group)
            t = torch.cat(parts)
        out[n] = t
    return out


def _save_worker(rank, world, out_dir):
    from tagmoe_dist.checkpoint import engine as ckpt
    deepspeed.init_distributed(dist_backend="gloo")
    engine, model, schema = build_engine(gpt_config("task_aware"), 3, 2)
    train_steps(engine, schema, rank, 0, SAVE)
    ckpt.save(engine, Path(out_dir) / "run" / "checkpoints", SAVE)
    full = _gathered(model)
    ref = train_steps(engine, schema, rank, SAVE, SAVE + MORE)
    if rank == 0:
        torch.save(full, Path(out_dir) / "full.pt")
    (Path(out_dir) / f"ref{rank}.json").write_text(json.dumps(ref))


def _load_worker(rank, world, out_dir):
    from tagmoe_dist.checkpoint.zero3 import load_universal
    from tagmoe_dist.checkpoint import engine as ckpt
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = gpt_config("task_aware")
    engine, model, schema = build_engine(cfg, 3, 1, seed=7, checkpoint={"load_universal": True})
    load_universal(engine, Path(out_dir) / "universal", tag="uc")
    universal = train_steps(engine, schema, rank, SAVE, SAVE + MORE)
    engine.destroy()
    engine, model, schema = build_engine(cfg, 3, 1, seed=7)
    step = ckpt.load(engine, Path(out_dir) / "ep1" / "checkpoints", ep_size=1)
    resharded = train_steps(engine, schema, rank, SAVE, SAVE + 1)
    (Path(out_dir) / f"load{rank}.json").write_text(json.dumps(
        {"universal": universal, "resharded": resharded, "step": step}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_ckpt")
    run_distributed(_save_worker, 2, str(out))
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    from tagmoe_dist.checkpoint.zero3 import to_universal
    tag_dir = saved / "run" / "checkpoints" / f"step_{SAVE}"
    uc = saved / "universal"
    uc.mkdir()
    to_universal(tag_dir, uc / "uc")
    r = subprocess.run([sys.executable, "-m", "tagmoe_dist.reshard", "--src",
                        str(saved / "run" / "checkpoints"), "--dst",
                        str(saved / "ep1" / "checkpoints"), "--ep-size", "1",
                        "--reset-optimizer"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # weights only, as ZeRO 0-2 files (without --reset-optimizer: a universal checkpoint,
    # tests/test_zero3_train.py)
    assert "optimizer state NOT carried over" in r.stdout + r.stderr
    run_distributed(_load_worker, 2, str(saved))
    return saved


def test_consolidate_equals_gathered_weights(saved):
    from tagmoe_dist.checkpoint import consolidate
    full = torch.load(saved / "full.pt", weights_only=True)
    sd = consolidate(saved / "run" / "checkpoints")
    assert set(full) <= set(sd)
    assert sd["lm_head.weight"] is sd["wte.weight"]                     # tied, listed once by ZeRO-3
    for n, t in full.items():
        assert sd[n].shape == t.shape and torch.equal(sd[n], t), n
    assert sd["blocks.0.ffn.experts.w1"].shape[0] == 4                  # all experts, stacked


def test_export_cli(saved, tmp_path):
    out = tmp_path / "model.safetensors"
    r = subprocess.run([sys.executable, "-m", "tagmoe_dist.checkpoint", "export", "--ckpt",
                        str(saved / "run" / "checkpoints"), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file
    got = load_file(str(out))
    full = torch.load(saved / "full.pt", weights_only=True)
    for n, t in full.items():
        assert torch.equal(got[n], t), n


def test_resume_refuses_other_ep_size(saved):
    """A ZeRO-3 checkpoint is laid out for its EP size: the resume check reads it."""
    from tagmoe_dist.reshard import saved_layout
    tag_dir = saved / "run" / "checkpoints" / f"step_{SAVE}"
    assert saved_layout(tag_dir) == {"world_size": 2, "ep_size": 2}


def test_universal_checkpoint_loads_at_another_ep_size(loaded):
    for rank in range(2):
        ref = json.loads((loaded / f"ref{rank}.json").read_text())
        got = json.loads((loaded / f"load{rank}.json").read_text())
        _assert_close(got["universal"], ref)


def test_resharded_checkpoint_loads_at_another_ep_size(loaded):
    for rank in range(2):
        ref = json.loads((loaded / f"ref{rank}.json").read_text())
        got = json.loads((loaded / f"load{rank}.json").read_text())
        assert got["step"] == SAVE
        _assert_close(got["resharded"], ref[:1])
