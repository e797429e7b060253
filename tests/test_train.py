"""The training entry point end to end on real launchers' environments: resume reproduces the
uninterrupted loss trajectory exactly; SIGTERM writes a checkpoint; bad input fails fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["batch_size_per_rank=4", "eval_interval=0", "log_interval=1", "warmup_steps=2"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def _train(log_dir, steps, *extra, nproc=2, config="configs/models/tiny_tag.yaml", timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tagmoe_dist.train", "--config", config,
           "--deepspeed_config", "configs/deepspeed/zero2.json", *extra,
           "--set", f"steps={steps}", f"log_dir={log_dir}", *FAST]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _losses(log_dir):
    rows = [json.loads(l) for l in (Path(log_dir) / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_resume_reproduces_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = _train(a, 6, "--set", "checkpoint_interval=3")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train(b, 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (b / "checkpoints" / "latest").read_text().strip() == "step_3"
    r = _train(b, 6, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    la, lb = _losses(a), _losses(b)
    assert sorted(lb) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        assert la[s] == lb[s], f"step {s}: uninterrupted {la[s]!r} vs resumed {lb[s]!r}"
    assert la[6] < la[1], "the loss should fall"
    ck = b / "checkpoints"
    assert (ck / "model_config.yaml").is_file() and (ck / "task_schema.yaml").is_file()
    assert len(list((ck / "step_6").glob("layer_*_expert_*_model_states.pt"))) == 4 * 8


def test_sigterm_writes_checkpoint_and_resume_continues(tmp_path):
    """One process (plain python, no launcher): SIGTERM mid-run -> checkpoint -> exit 143
    (128 + SIGTERM: the run is unfinished, so schedulers must not read it as done)."""
    log_dir = tmp_path / "run"
    base = [sys.executable, "-m", "tagmoe_dist.train", "--config", "configs/models/tiny_tag.yaml",
            "--deepspeed_config", "configs/deepspeed/zero2.json"]
    cmd = base + ["--set", "steps=100000", f"log_dir={log_dir}", "ep_size=1", *FAST]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    steps_file = log_dir / "steps.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if steps_file.exists() and len(steps_file.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    tag = (log_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.split("_")[1])
    assert stopped_at >= 3 and "stopped by signal" in err + out
    r = subprocess.run(base + ["--resume", "--set", f"steps={stopped_at + 2}",
                                                f"log_dir={log_dir}", "ep_size=1", *FAST],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(_losses(log_dir)) == stopped_at + 2


@pytest.mark.parametrize("extra,msg", [
    (["--set", "ep_size=3"], "train.ep_size=3 does not divide the 2 processes"),
    (["--set", "stepz=3"], "unknown train.* key"),
])
def test_bad_config_fails_on_every_rank_before_waiting(tmp_path, extra, msg):
    t0 = time.time()
    r = _train(tmp_path / "x", 2, *extra, timeout=120)
    assert r.returncode != 0
    assert msg in r.stderr
    assert time.time() - t0 < 120


def test_log_interval_zero_is_refused():
    from tagmoe_dist.models.gpt import GPTConfig
    from tagmoe_dist.train import load_train_config
    cfg = GPTConfig.from_yaml(str(ROOT / "configs/models/tiny_tag.yaml"))
    with pytest.raises(ValueError, match="train.log_interval must be >= 1, got 0"):
        load_train_config(cfg, ["log_interval=0"])


def test_vocab_smaller_than_the_tokenizer_fails_before_waiting(tmp_path):
    import yaml
    cfg = yaml.safe_load((ROOT / "configs/models/tiny_tag.yaml").read_text())
    cfg["vocab_size"] = 200
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(tmp_path / "x", 2, config=str(tmp_path / "small.yaml"), timeout=120)
    assert r.returncode != 0 and "vocab_size=200 is smaller than the tokenizer's 260" in r.stderr
    assert "IndexError" not in r.stderr and "deepspeed.initialize" not in r.stderr, r.stderr[-2000:]


def test_console_shows_what_was_learned_without_warning_noise(tmp_path):
    """The main job's console: the real launcher's name, per-task exact match at each
    evaluation, greedy answers to held-out prompts at the end, no repeated FutureWarning."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tagmoe_dist.train", "--config", "configs/models/tiny_tag.yaml",
           "--deepspeed_config", "configs/deepspeed/zero2.json", "--set", "steps=4",
           f"log_dir={tmp_path / 'run'}", *FAST, "eval_interval=2", "eval_samples_per_task=4"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stdout + r.stderr                 # messages go through tqdm.write (stdout)
    assert "launch: 2 processes via torchrun" in err
    assert err.count("| exact match copy ") == 2, err[-3000:]          # steps 2 and 4
    assert "answers to held-out prompts (greedy decoding):" in err
    answers = [ln for ln in err.splitlines() if ln.startswith("  ") and " -> " in ln]
    assert sorted({ln.split()[0] for ln in answers}) == sorted(
        ["copy", "reverse", "sort", "shift", "add"]) and len(answers) == 10, answers
    assert "FutureWarning" not in err and "is deprecated" not in err, err[-3000:]


def test_trains_on_users_jsonl_with_per_task_eval(tmp_path):
    lines = []
    for i in range(40):
        if i % 2:
            lines.append({"text": "abc" * (i % 7 + 1), "task": {"scope": "sequence_transform",
                                                                 "type": ["order_preserving"]}})
        else:
            lines.append({"text": f"{i}+{i}={2 * i}", "task": {"scope": "arithmetic"}})
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    log_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tagmoe_dist.train", "--config", "configs/models/tiny_tag.yaml",
           "--deepspeed_config", "configs/deepspeed/zero2.json",
           "--set", "steps=4", f"log_dir={log_dir}", "ep_size=1", f"data={path}",
           f"eval_data={path}", "eval_interval=2", "batch_size_per_rank=4", "log_interval=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "eval step 4:" in out and "scope=arithmetic" in out, out[-2000:]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "oops"}\n')
    r = subprocess.run(cmd + [f"data={bad}"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and f"{bad}:2" in r.stderr, r.stderr[-2000:]


def test_optimizer_from_deepspeed_config(tmp_path):
    """The optimizer may come from the DeepSpeed JSON instead of the client AdamW: the MoE
    parameter groups are passed either way, and training runs under ZeRO-2 with EP=2."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tagmoe_dist.train", "--config", "configs/models/tiny_tag.yaml",
           "--deepspeed_config", "configs/deepspeed/zero2_adamw.json",
           "--set", "steps=2", f"log_dir={tmp_path}", *FAST]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_losses(tmp_path)) == [1, 2]
