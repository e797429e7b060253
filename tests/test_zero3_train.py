"""The training entry point under ZeRO-3 (configs/deepspeed/zero3.json), 2 processes, EP=2:
SIGTERM to one rank writes a checkpoint on every rank and exits 143 (128 + SIGTERM), and `--resume` continues
with exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
SET = ["batch_size_per_rank=2", "eval_interval=0", "log_interval=1", "warmup_steps=2",
       f"steps={STEPS}", "heartbeat_timeout_s=0"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def _config(tmp_path) -> Path:
    """configs/models/tiny_tag.yaml, smaller (the point here is the checkpoint, not the model)."""
    cfg = yaml.safe_load((ROOT / "configs/models/tiny_tag.yaml").read_text())
    cfg.update(n_layer=2, d_model=32, seq_len=64)
    cfg["moe"].update(ffn_hidden_size=32, num_experts=4, align_dim=16, align_hidden=16)
    path = tmp_path / "tiny_tag_small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(log_dir, *extra):
    return [sys.executable, "-m", "tagmoe_dist.train", "--config", str(Path(log_dir).parent / "tiny_tag_small.yaml"),
            "--deepspeed_config", "configs/deepspeed/zero3.json", *extra,
            "--set", f"log_dir={log_dir}", *SET]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log_dir, *extra):
    """Both ranks as torchrun would start them, as separate processes we can signal one by one."""
    port = _port()
    return [subprocess.Popen(_cmd(log_dir, *extra), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port)))
            for r in range(2)]


def _wait(procs, timeout=300, code=0):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == code, err[-3000:]
    return outs


def _losses(log_dir):
    rows = [json.loads(l) for l in (Path(log_dir) / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_sigterm_checkpoint_and_bit_exact_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _config(tmp_path)
    _wait(_start(a))
    procs = _start(b)
    steps_file = b / "steps.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if steps_file.exists() and len(steps_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), "finished before the signal"
    procs[1].send_signal(signal.SIGTERM)        # one rank only: the ranks agree on stopping
    outs = _wait(procs, code=128 + signal.SIGTERM)   # checkpoint written, then exit as signalled
    tag = (b / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag.split("_")[1])
    assert 2 <= stopped < STEPS and "stopped by signal" in "".join(o + e for o, e in outs)
    files = {p.name for p in (b / "checkpoints" / tag).iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= files
    _wait(_start(b, "--resume"))
    la, lb = _losses(a), _losses(b)
    assert sorted(lb) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert la[s] == lb[s], f"step {s}: uninterrupted {la[s]!r} vs resumed {lb[s]!r}"


def test_hugging_face_mixtral_zero3_equals_zero2(tmp_path):
    """A Hugging Face Mixtral converted to tagmoe_dist MoE layers (integrations/hf): built whole
    (`zero3_init = False`: from_pretrained cannot run under zero.Init), partitioned by the engine
    with the same placement; 4 steps under ZeRO-3 equal ZeRO-2's."""
    import pytest
    pytest.importorskip("transformers")
    from tests import hf_models as H
    data = H.write_chat_data(tmp_path / "chat.jsonl")
    config = H.write_yaml(tmp_path / "mixtral.yaml", H.make_user_dir("mixtral", tmp_path / "mix"),
                          data)
    losses = {}
    for ds in ("zero2", "zero3"):
        log_dir = tmp_path / ds
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tagmoe_dist.train", "--config", str(config),
               "--deepspeed_config", f"configs/deepspeed/{ds}.json",
               "--set", f"log_dir={log_dir}", "steps=4", "batch_size_per_rank=4",
               "eval_interval=0", "log_interval=1", "warmup_steps=2"]
        r = subprocess.run(cmd, cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[ds] = _losses(log_dir)
    assert sorted(losses["zero3"]) == [1, 2, 3, 4]
    for s in range(1, 5):
        a, b = losses["zero2"][s], losses["zero3"][s]
        assert abs(a - b) <= 1e-6 * abs(a), (s, a, b)


def test_bf16_zero3_tracks_zero2(tmp_path):
    """configs/deepspeed/zero3_bf16.json against zero2_bf16.json, 6 steps on 2 processes (EP=2):
    the first losses agree to 1e-5 and the rest to bf16's resolution (ZeRO-3 builds the weights
    in bf16 under zero.Init, so its fp32 masters start from bf16-rounded values, and gradients are
    reduced in another order); then export reads the ZeRO-3 bf16 checkpoint's fp32 masters.
    Found with it: the orthogonal tag targets were drawn with torch.randn, which zero.Init turns
    bf16, and CPU QR has no bf16."""
    _config(tmp_path)
    losses = {}
    for ds in ("zero2_bf16", "zero3_bf16"):
        log_dir = tmp_path / ds
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *_cmd(log_dir)[1:]]
        cmd[cmd.index("configs/deepspeed/zero3.json")] = f"configs/deepspeed/{ds}.json"
        cmd[cmd.index(f"steps={STEPS}")] = "steps=6"
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[ds] = _losses(log_dir)
    a, b = losses["zero2_bf16"], losses["zero3_bf16"]
    print("bf16 ZeRO-2:", a, "\nbf16 ZeRO-3:", b)
    assert sorted(b) == list(range(1, 7))
    assert abs(a[1] - b[1]) <= 1e-5 * abs(a[1]), (a[1], b[1])
    for s in range(2, 7):      # one bf16 unit in the last place, relative (measured: ~1e-4)
        assert abs(a[s] - b[s]) <= 2 ** -8 * abs(a[s]), (s, a[s], b[s])
    out = tmp_path / "export.safetensors"
    r = subprocess.run([sys.executable, "-m", "tagmoe_dist.checkpoint", "export", "--ckpt",
                        str(tmp_path / "zero3_bf16" / "checkpoints"), "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file
    sd = load_file(str(out))
    assert all(t.dtype == torch.float32 for t in sd.values() if t.is_floating_point())
    assert any(k.endswith("experts.w1") for k in sd)


def test_reshard_zero3_to_universal_resumes_at_another_ep_size(tmp_path):
    """`python -m tagmoe_dist.reshard` of a ZeRO-3 checkpoint keeps the optimizer: it writes a
    DeepSpeed universal checkpoint, which the trainer resumes at EP=1 (ZeRO-3, DeepSpeed's
    universal loader) with the losses of the uninterrupted EP=2 run; export reads it; a ZeRO-2
    config is refused before anything is built."""
    from tagmoe_dist.checkpoint import consolidate
    from tests.tolerance import REL_FP32, rel_diff
    _config(tmp_path)
    ref = tmp_path / "ref"
    procs = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = _cmd(ref, "--set", "checkpoint_interval=3")[1:]
    cmd[cmd.index(f"steps={STEPS}")] = "steps=6"
    r = subprocess.run(procs + cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    dst = tmp_path / "ep1" / "checkpoints"
    r = subprocess.run([sys.executable, "-m", "tagmoe_dist.reshard", "--src",
                        str(ref / "checkpoints"), "--tag", "step_3", "--dst", str(dst),
                        "--ep-size", "1"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "universal checkpoint" in r.stderr
    manifest = json.loads((dst / "step_3" / "tagmoe_manifest.json").read_text())
    assert manifest["universal"] and manifest["ep_size"] == 1
    assert any(name.startswith("zero/") for name in manifest["files"])      # hashed too
    want = consolidate(ref / "checkpoints", "step_3")
    got = consolidate(dst)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    def resume(ds):
        return subprocess.run(
            procs + ["-m", "tagmoe_dist.train", "--config", str(dst / "model_config.yaml"),
                     "--deepspeed_config", f"configs/deepspeed/{ds}.json", "--resume"],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    r = resume("zero2")
    assert r.returncode != 0 and "resume it with a ZeRO-3 DeepSpeed config" in r.stderr
    r = resume("zero3")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(ref), _losses(dst.parent)
    assert sorted(b) == [4, 5, 6], (a, b)
    print("uninterrupted EP=2:", a, "\nresumed EP=1 from universal:", b)
    for s in (4, 5, 6):          # step 5 and 6 also need the Adam moments that went EP=2 -> 1
        assert rel_diff(b[s], a[s]) <= REL_FP32, (s, a[s], b[s])
    end_a, end_b = consolidate(ref / "checkpoints", "step_6"), consolidate(dst)
    assert max(rel_diff(end_b[k], end_a[k]) for k in end_a) <= REL_FP32
