"""Checkpoint integrity and run safety (docs/reliability.md), through the commands users run:
the trainer on 2 gloo processes (torchrun), `python -m tagmoe_dist.checkpoint export`,
`python -m tagmoe_dist.reshard`.

One reference run writes step_2 and step_4; every test works on its own copy and damages it the
way a crash, a second run, a full disk or an attacker would.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tagmoe_dist.checkpoint import consolidate, manifest as mf
from tagmoe_dist.checkpoint.files import MAIN_FILE, MANIFEST, expert_file
from tests.test_train import FAST, ROOT, _env, _losses, _train

CONFIG = "configs/models/tiny_tag.yaml"


def _run(*args, timeout=300, preexec_fn=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def _export(*args, **kw):
    return _run("-m", "tagmoe_dist.checkpoint", "export", *args, **kw)


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reliability") / "ref"
    r = _train(run, 4, "--set", "checkpoint_interval=2", "seed=3")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture
def run(reference, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    return copy


def _flip(path: Path, offset_from_end: int = 4096, n: int = 16) -> None:
    """Change n bytes in place (same size): what a second writer or a bad disk leaves."""
    data = bytearray(path.read_bytes())
    at = len(data) - offset_from_end
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ item 3: content hashes
def test_export_refuses_changed_bytes_and_latest_falls_back(run, tmp_path):
    ck = run / "checkpoints"
    good2 = consolidate(ck, "step_2")
    victim = ck / "step_4" / expert_file(1, 3)
    _flip(victim)
    r = _export("--ckpt", str(ck), "--tag", "step_4", "--out", str(tmp_path / "a.pt"))
    assert r.returncode == 1 and str(victim) in r.stderr and "does not match" in r.stderr, r.stderr
    assert not (tmp_path / "a.pt").exists()
    # without --tag: 'latest' names the damaged step_4 -> the newest intact step, with a message
    r = _export("--ckpt", str(ck), "--out", str(tmp_path / "b.pt"))
    assert r.returncode == 0, r.stderr
    assert "using step_2" in r.stderr and str(victim) in r.stderr, r.stderr
    assert _same(torch.load(tmp_path / "b.pt", weights_only=True), good2)


def test_resume_skips_a_damaged_latest_and_reproduces_the_run(reference, run):
    """16 flipped bytes in an expert file of step_4: resume continues from step_2, and steps 3-4
    reproduce the reference exactly; the rewritten step_4 is whole again."""
    ck = run / "checkpoints"
    _flip(ck / "step_4" / expert_file(0, 5))
    r = _train(run, 4, "--resume", config=str(ck / "model_config.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "using step_2" in r.stderr and "does not match" in r.stderr, r.stderr[-3000:]
    ref, got = _losses(reference), _losses(run)
    assert got[3] == ref[3] and got[4] == ref[4], (ref, got)
    assert (ck / "latest").read_text() == "step_4"
    mf.check(ck / "step_4")
    assert _same(consolidate(ck), consolidate(reference / "checkpoints"))


def test_empty_latest_falls_back_to_newest_intact_step(run, tmp_path):
    ck = run / "checkpoints"
    (ck / "latest").write_text("")
    r = _export("--ckpt", str(ck), "--out", str(tmp_path / "m.pt"))
    assert r.returncode == 0, r.stderr
    assert "is empty; using step_4" in r.stderr, r.stderr
    assert _same(torch.load(tmp_path / "m.pt", weights_only=True), consolidate(ck, "step_4"))


def test_manifest_lists_sizes_and_hashes_of_every_file(run):
    tag_dir = run / "checkpoints" / "step_4"
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    names = sorted(p.name for p in tag_dir.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == names
    for name in names:
        entry = manifest["files"][name]
        assert entry["bytes"] == (tag_dir / name).stat().st_size
        assert entry[manifest["hash"]] == mf.file_hash(tag_dir / name, manifest["hash"])
    assert manifest["step"] == 4 and manifest["config"]["train"]["seed"] == 3


# ------------------------------------------------------------------ item 10: export / reshard errors
def test_export_accepts_a_step_directory(run, tmp_path):
    ck = run / "checkpoints"
    r = _export("--ckpt", str(ck / "step_2"), "--out", str(tmp_path / "s.pt"))
    assert r.returncode == 0, r.stderr
    assert _same(torch.load(tmp_path / "s.pt", weights_only=True), consolidate(ck, "step_2"))


@pytest.mark.parametrize("with_manifest", [True, False], ids=["ours", "foreign"])
def test_export_names_a_truncated_expert_file(run, tmp_path, with_manifest):
    ck = run / "checkpoints"
    victim = ck / "step_4" / expert_file(2, 1)
    victim.write_bytes(victim.read_bytes()[:1000])
    if not with_manifest:     # a DeepSpeed checkpoint from elsewhere: nothing to compare with
        (ck / "step_4" / MANIFEST).unlink()
        (ck / "model_config.yaml").unlink()
    r = _export("--ckpt", str(ck), "--tag", "step_4", "--out", str(tmp_path / "t.pt"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and str(victim) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_reshard_refuses_a_half_written_step(run, tmp_path):
    """A save killed midway: files there, one cut short, no manifest yet."""
    step = run / "checkpoints" / "step_4"
    (step / MANIFEST).unlink()
    optim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:2000])
    r = _run("-m", "tagmoe_dist.reshard", "--src", str(step), "--dst",
             str(tmp_path / "new" / "checkpoints"), "--ep-size", "1")
    assert r.returncode == 2, r.stderr
    assert "not written completely" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_outputs_never_land_inside_their_source(run):
    ck = run / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ck.rglob("*")}
    r = _run("-m", "tagmoe_dist.reshard", "--src", str(run), "--dst", str(ck), "--ep-size", "1",
             "--force")
    assert r.returncode == 2 and "choose an output directory" in r.stderr, r.stderr
    r = _export("--ckpt", str(ck), "--out", str(ck / "step_4" / MAIN_FILE))
    assert r.returncode == 2 and "lies inside --ckpt" in r.stderr, r.stderr
    assert {p: p.stat().st_mtime_ns for p in ck.rglob("*")} == before


def test_outputs_follow_the_umask(run, tmp_path):
    dst = tmp_path / "new" / "checkpoints"
    r = _run("-m", "tagmoe_dist.reshard", "--src", str(run), "--dst", str(dst), "--ep-size", "1",
             preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755
    # the resharded config carries the run's effective settings (--set seed=3)
    assert yaml.safe_load((dst / "model_config.yaml").read_text())["train"]["seed"] == 3


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_full_disk_names_the_path(run, tmp_path):
    """The file system refuses more bytes (here RLIMIT_FSIZE; a full disk fails the same call)."""
    out = tmp_path / "out" / "model.pt"
    r = _export("--ckpt", str(run / "checkpoints"), "--out", str(out), preexec_fn=_limit_file_size)
    assert r.returncode == 1, r.stderr
    assert f"writing {out} failed" in r.stderr and "disk" in r.stderr, r.stderr
    assert list(out.parent.iterdir()) == []        # no temporary file left behind


def test_full_disk_during_training_names_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tagmoe_dist.train", "--config", CONFIG,
           "--deepspeed_config", "configs/deepspeed/zero2.json",
           "--set", "steps=2", f"log_dir={run}", *FAST]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size)
    assert r.returncode != 0
    assert f"writing {run / 'checkpoints' / 'step_2'} failed" in r.stderr, r.stderr[-3000:]
    assert not (run / "checkpoints" / "latest").exists()
    assert not (run / "checkpoints" / "step_2" / MANIFEST).exists()


# ------------------------------------------------------------------ item 8: no code from files
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(tag_dir: Path, marker: Path) -> None:
    """Add a pickled os.system call to the main file and re-sign the manifest, as anyone who can
    write the directory could."""
    main = tag_dir / MAIN_FILE
    state = torch.load(main, weights_only=False)
    state["extra"] = _Payload(marker)
    torch.save(state, main)
    old = json.loads((tag_dir / MANIFEST).read_text())
    mf.write(tag_dir, **{k: v for k, v in old.items() if k not in ("files", "hash")})


def test_no_command_runs_code_from_a_checkpoint(run, tmp_path):
    ck = run / "checkpoints"
    marker = tmp_path / "pwned"
    _plant(ck / "step_4", marker)
    r = _export("--ckpt", str(ck), "--tag", "step_4", "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 1 and "weights_only" in r.stderr and "posix.system" in r.stderr, r.stderr
    r = _run("-m", "tagmoe_dist.reshard", "--src", str(ck / "step_4"), "--dst",
             str(tmp_path / "r" / "checkpoints"), "--ep-size", "1")
    assert r.returncode == 2 and "weights_only" in r.stderr, r.stderr
    r = _train(run, 5, "--resume", config=str(ck / "model_config.yaml"))
    assert r.returncode != 0 and "weights_only" in r.stderr, r.stderr[-3000:]
    assert not marker.exists()


# ------------------------------------------------------------------ item 4: reruns
def test_fresh_run_into_a_used_log_dir_stops_and_overwrite_replaces(run):
    ck = run / "checkpoints"
    before = mf.check(ck / "step_4")
    steps_before = (run / "steps.jsonl").read_text()
    r = _train(run, 2, timeout=120)
    assert r.returncode != 0
    assert "--resume" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert mf.check(ck / "step_4") == before and (run / "steps.jsonl").read_text() == steps_before
    # --overwrite: a new run; with keep_last=2 only the two newest checkpoints stay
    r = _train(run, 3, "--overwrite", "--set", "checkpoint_interval=1", "keep_last=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_2", "step_3"]
    assert (ck / "latest").read_text() == "step_3" and sorted(_losses(run)) == [1, 2, 3]


# ------------------------------------------------------------------ item 6: effective configuration
def test_checkpoint_carries_the_effective_config_and_resume_names_differences(run):
    ck = run / "checkpoints"
    saved = yaml.safe_load((ck / "model_config.yaml").read_text())["train"]
    assert saved["seed"] == 3 and saved["steps"] == 4 and saved["warmup_steps"] == 2
    assert Path(saved["log_dir"]).name == "ref" and saved["batch_size_per_rank"] == 4
    # the original YAML without --set seed=3: refused, naming the setting and both values
    r = _train(run, 6, "--resume", timeout=180)
    assert r.returncode != 0
    assert "train.seed: checkpoint 3, now 0" in r.stderr, r.stderr[-3000:]
    assert f"--config {ck / 'model_config.yaml'}" in r.stderr


def test_resume_with_another_model_names_the_field_not_reshard(run, tmp_path):
    cfg = yaml.safe_load((run / "checkpoints" / "model_config.yaml").read_text())
    cfg["moe"]["ffn_hidden_size"] = 2 * cfg["moe"]["ffn_hidden_size"]
    path = tmp_path / "wider.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _train(run, 6, "--resume", config=str(path), timeout=180)
    assert r.returncode != 0
    assert "moe.ffn_hidden_size" in r.stderr and "reshard" not in r.stderr, r.stderr[-3000:]


def test_resume_at_another_world_size_names_world_size(run):
    r = _train(run, 6, "--resume", "--set", "ep_size=1", nproc=1,
               config=str(run / "checkpoints" / "model_config.yaml"), timeout=180)
    assert r.returncode != 0
    assert "--ep-size 1 --world-size 1" in r.stderr, r.stderr[-3000:]


# ------------------------------------------------------------------ item 7: non-finite values
@pytest.mark.parametrize("where", ["set", "yaml"])
def test_non_finite_settings_are_refused(tmp_path, where):
    if where == "set":
        r = _train(tmp_path / "x", 2, "--set", "min_lr=nan", timeout=120)
        msg = "train.min_lr=nan"
    else:
        cfg = yaml.safe_load((ROOT / CONFIG).read_text())
        cfg["moe"]["aux_loss_coeff"] = float("nan")
        path = tmp_path / "nan.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert "aux_loss_coeff: .nan" in path.read_text()
        r = _train(tmp_path / "x", 2, config=str(path), timeout=120)
        msg = "aux_loss_coeff=nan"
    assert r.returncode != 0 and msg in r.stderr and "not a finite number" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_diverging_run_stops_and_never_checkpoints_nan(tmp_path):
    run = tmp_path / "run"
    r = _train(run, 6, "--set", "lr=1e30", "checkpoint_interval=1")
    assert r.returncode != 0, r.stderr[-3000:]
    assert "non-finite" in r.stderr and "loss per rank" in r.stderr, r.stderr[-3000:]
    ck = run / "checkpoints"
    tag = (ck / "latest").read_text() if (ck / "latest").exists() else None
    for tag_dir in ck.glob("step_*"):
        weights = consolidate(ck, tag_dir.name)
        assert all(torch.isfinite(v).all() for v in weights.values()), tag_dir
    assert tag is None or int(tag.split("_")[1]) < 6


# ------------------------------------------------------------------ engine.save on its own
def _nan_save_worker(rank, world, out_dir):
    from tagmoe_dist.checkpoint import engine as ckpt
    from tagmoe_dist.integrations import deepspeed as tds
    from tests.test_deepspeed import _train as step, batch, build, deepspeed, ds_config
    deepspeed.init_distributed(dist_backend="gloo")
    model = tds.prepare_model(build(tds.parallel_groups(2), seed=0))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=tds.optimizer_param_groups(model),
                                      config=ds_config(2, optimizer={"type": "AdamW", "params": {
                                          "lr": 1e-2, "torch_adam": True}}))
    root = Path(out_dir) / "ckpt"
    step(engine, batch(1, rank))
    ckpt.save(engine, root, 1, keep_last=1)
    step(engine, batch(2, rank))
    if rank == 1:                       # one rank's expert goes NaN: every rank must refuse
        with torch.no_grad():
            model.moe.experts.w1.view(-1)[0] = float("nan")
    try:
        ckpt.save(engine, root, 2, keep_last=1)
    except ckpt.NonFiniteError as e:
        Path(out_dir, f"refused{rank}").write_text(str(e))


def test_save_refuses_nan_weights_on_every_rank(tmp_path):
    from tests.dist_utils import run_distributed
    run_distributed(_nan_save_worker, 2, str(tmp_path))
    for rank in range(2):
        assert "step 2: the model weights hold NaN" in (tmp_path / f"refused{rank}").read_text()
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text() == "step_1" and not (root / "step_2").exists()
    mf.check(root / "step_1")           # keep_last=1 never removes the step 'latest' names
