"""`python -m tagmoe_dist.reshard`: a checkpoint saved at one expert-parallel size resumes at another
with the same model and optimizer state, tested through the trainer.

Runs (2 processes, ZeRO-2, constant learning rate so that a run's length does not change it):
  ref  EP=2, steps 1-4, checkpoints at step 2 and 4
  A    ref@2 resharded to EP=1 (expert data parallel 2), resumed for step 3
  B    A@3 (written by DeepSpeed at EP=1) resharded back to EP=2, resumed for step 4
  raw  ref@2 resumed at EP=1 without resharding: DeepSpeed accepts it silently and the first step
       scrambles the experts (the reason for this tool)
Offline: resharding to the same layout reproduces every file, and EP 2 -> 1 -> 2 and
2 -> 4 (4 processes) -> 2 round-trip exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tagmoe_dist.checkpoint import consolidate, zero
from tagmoe_dist.checkpoint.reshard import reshard, saved_layout
from tagmoe_dist.reshard.__main__ import main as cli_main
from tests.tolerance import REL_FP32, rel_diff

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
MOE = {
    "vocab_size": 260, "seq_len": 64, "n_layer": 2, "n_head": 2, "d_model": 32, "arch": "moe",
    "moe_every": 1, "task_schema": "configs/tasks/text_tasks.yaml",
    "moe": {"ffn_hidden_size": 16, "num_experts": 4, "top_k": 2, "router": "task_aware",
            "align_dim": 16, "align_hidden": 16},
    "train": {"seed": 0, "ep_size": 2, "steps": 4, "batch_size_per_rank": 2, "eval_interval": 0,
              "log_interval": 1, "warmup_steps": 1, "lr": 3e-3, "min_lr": 3e-3,
              "weight_decay": 0.1},
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def _train(config: Path, *sets, resume=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tagmoe_dist.train", "--config", str(config),
           "--deepspeed_config", "configs/deepspeed/zero2.json",
           *(["--resume"] if resume else []), "--set", *sets]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(run: Path):
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _max_rel_diff(a: dict, b: dict) -> float:
    """The largest per-tensor max|a - b| / max|b| (float64)."""
    assert set(a) == set(b)
    return max(rel_diff(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    ref = root / "ref"
    cfg = dict(MOE, train={**MOE["train"], "log_dir": str(ref)})
    (root / "moe.yaml").write_text(yaml.safe_dump(cfg))
    _train(root / "moe.yaml", "checkpoint_interval=2", resume=False)

    a = reshard(ref / "checkpoints", root / "a" / "checkpoints", ep_size=1, tag="step_2", log=str)
    _train(a / "model_config.yaml", "steps=3")
    b = reshard(a, root / "b" / "checkpoints", ep_size=2, log=str)
    _train(b / "model_config.yaml", "steps=4")

    raw = root / "raw" / "checkpoints"
    raw.mkdir(parents=True)
    (raw / "step_2").symlink_to(ref / "checkpoints" / "step_2")
    (raw / "latest").write_text("step_2")
    # Unguarded, DeepSpeed resumes EP=2 optimizer partitions in an EP=1 engine without a word
    # and the first step writes other experts' fp32 master values into the experts (seen with
    # DeepSpeed 0.19.8: differences up to 0.14 on weights below 0.09). The trainer refuses.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tagmoe_dist.train", "--config", str(root / "moe.yaml"),
           "--deepspeed_config", "configs/deepspeed/zero2.json", "--resume",
           "--set", "steps=3", "ep_size=1", f"log_dir={raw.parent}"]
    mismatched = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=300)
    return dict(root=root, ref=ref / "checkpoints", a=a, b=b, raw=raw, mismatched=mismatched)


def test_resharded_optimizer_resumes_like_the_uninterrupted_run(runs):
    ref, a, b = _losses(runs["ref"].parent), _losses(runs["a"].parent), _losses(runs["b"].parent)
    assert sorted(ref) == [1, 2, 3, 4] and sorted(a) == [3] and sorted(b) == [4]
    # Step 3 is the forward of the step-2 weights at EP=1; step 4 also needs the Adam state that
    # went EP=2 -> 1 (step 3 at EP=1) -> 2.
    assert rel_diff(a[3], ref[3]) <= REL_FP32 and rel_diff(b[4], ref[4]) <= REL_FP32, (ref, a, b)
    assert _max_rel_diff(consolidate(runs["b"]), consolidate(runs["ref"], "step_4")) <= REL_FP32
    manifest = json.loads((runs["a"] / "step_2" / "tagmoe_manifest.json").read_text())
    assert manifest["weights_only"] is False and manifest["ep_size"] == 1
    assert manifest["resharded_from"]["ep_size"] == 2
    assert saved_layout(runs["a"] / "step_3") == {"world_size": 2, "ep_size": 1}


def test_resume_refuses_a_mismatched_ep_layout(runs):
    """Resuming an EP=2 checkpoint at EP=1 is refused (DeepSpeed would scramble the experts'
    optimizer state silently), and the message gives the reshard command."""
    r = runs["mismatched"]
    assert r.returncode != 0
    assert "saved at ep_size=2 on 2 processes" in r.stderr
    assert "python -m tagmoe_dist.reshard" in r.stderr
    assert not (runs["raw"].parent / "steps.jsonl").exists() or \
        3 not in _losses(runs["raw"].parent)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same(x, y, where=""):
    if isinstance(x, dict):
        assert list(x) == list(y), where
        for k in x:
            _assert_same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_same(u, v, f"{where}[{i}]")
    elif torch.is_tensor(x):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), where
    else:
        assert repr(x) == repr(y), where


def _same_checkpoint(d1: Path, d2: Path):
    names = sorted(p.name for p in d1.iterdir() if p.suffix == ".pt")
    assert names == sorted(p.name for p in d2.iterdir() if p.suffix == ".pt")
    for name in names:
        _assert_same(_load(d1 / name), _load(d2 / name), name)


def test_same_layout_reproduces_deepspeeds_files(runs, tmp_path):
    out = reshard(runs["ref"], tmp_path / "same" / "checkpoints", ep_size=2, tag="step_2", log=str)
    _same_checkpoint(runs["ref"] / "step_2", out / "step_2")


@pytest.mark.parametrize("path", [[(1, None)], [(4, 4)], [(1, 4), (4, 4)], [(2, 4), (1, 4)]],
                         ids=["ep1", "ep4-w4", "ep1-w4-ep4", "w4-ep2-ep1"])
def test_round_trips_are_exact(runs, tmp_path, path):
    src = runs["ref"]
    for i, (ep, world) in enumerate(path):
        src = reshard(src, tmp_path / str(i) / "checkpoints", ep_size=ep, world_size=world,
                      tag="step_2" if i == 0 else None, log=str)
        layout = saved_layout(src / "step_2")
        assert layout == {"world_size": world or 2, "ep_size": ep}
    back = reshard(src, tmp_path / "back" / "checkpoints", ep_size=2, world_size=2, log=str)
    _same_checkpoint(runs["ref"] / "step_2", back / "step_2")


def test_reset_optimizer_writes_weights_only(runs, tmp_path):
    messages = []
    out = reshard(runs["ref"], tmp_path / "w" / "checkpoints", ep_size=1, tag="step_2",
                  reset_optimizer=True, log=messages.append)
    assert any("WARNING: optimizer state NOT carried over" in m for m in messages)
    manifest = json.loads((out / "step_2" / "tagmoe_manifest.json").read_text())
    assert manifest["weights_only"] is True and "Adam restarts" in manifest["note"]
    assert not list((out / "step_2").glob("*optim_states.pt"))
    assert _max_rel_diff(consolidate(out), consolidate(runs["ref"], "step_2")) == 0.0
    cfg = yaml.safe_load((out / "model_config.yaml").read_text())
    assert cfg["train"]["ep_size"] == 1 and cfg["train"]["log_dir"] == str(out.parent.resolve())


def test_partition_math_matches_deepspeed_rules():
    # 10 values over 4 ranks: padded to 16 (a multiple of 2*4), partitions of 4, the last 2 padded.
    assert zero.partition_size(10, 4) == 4
    assert [zero.partition_padding(10, 4, i) for i in range(4)] == [0, 0, 2, 4]
    assert zero.fragments([3, 5, 2], 4, 0) == [(0, 0, 3), (1, 3, 1)]    # (param, start, numel)
    assert zero.fragments([3, 5, 2], 4, 1) == [(1, 0, 4)]
    assert zero.fragments([3, 5, 2], 4, 2) == [(2, 0, 2)] and zero.fragments([3, 5, 2], 4, 3) == []
    assert zero.group_ranks(4, 2) == [[0, 2], [1, 3]] and zero.group_ranks(4, None) == [[0, 1, 2, 3]]


def test_max_group_size_split_is_undone_and_redone():
    t = {n: {zero.FP32: torch.zeros(4, 3)} for n in "abc"}
    grp = zero.GroupState({"name": "ep_size_1", "moe": True}, list("abc"), t, {}, [])
    pieces = zero.split_group(grp, max_group_size=24)          # 12 values each at EP=1
    assert [p.names for p in pieces] == [["a", "b"], ["c"]]
    assert [g.names for g in zero.merge_split_groups(pieces, max_group_size=24)] == [list("abc")]
    at_ep2 = zero.split_group(zero.with_ep_size(grp, 2), max_group_size=24)   # 6 values each
    assert [p.names for p in at_ep2] == [list("abc")] and at_ep2[0].hyper["name"] == "ep_size_2"


def test_errors_are_named(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="does not divide the world size 2"):
        reshard(runs["ref"], tmp_path / "x" / "checkpoints", ep_size=4, log=str)
    with pytest.raises(ValueError, match="MoE layer 0 has 4 experts, not divisible by --ep-size 3"):
        reshard(runs["ref"], tmp_path / "x" / "checkpoints", ep_size=3, world_size=3, log=str)
    with pytest.raises(ValueError, match="name the directory 'checkpoints'"):
        reshard(runs["ref"], tmp_path / "x" / "ckpt", ep_size=1, log=str)
    stage0 = tmp_path / "stage0" / "checkpoints"
    (stage0 / "step_2").mkdir(parents=True)
    for p in (runs["ref"] / "step_2").iterdir():
        if "optim_states" not in p.name and p.suffix == ".pt":
            (stage0 / "step_2" / p.name).symlink_to(p)
    (stage0 / "latest").write_text("step_2")
    with pytest.raises(ValueError, match="no ZeRO stage 1/2 optimizer files .* --reset-optimizer"):
        reshard(stage0, tmp_path / "y" / "checkpoints", ep_size=1, log=str)
    dst = tmp_path / "z" / "checkpoints"
    args = ["--src", str(runs["ref"]), "--dst", str(dst), "--ep-size", "1", "--tag", "step_2"]
    assert cli_main(args) == 0 and (dst / "latest").read_text() == "step_2"
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2 and "already exists; pass --force" in capsys.readouterr().err
