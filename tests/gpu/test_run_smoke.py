"""The GPU validation command on CPU, so that its scripts cannot rot: `bash tests/gpu/run.sh`
refuses to run without CUDA (non-zero exit, a message), and `--cpu-smoke` runs every step (layer
vs float64 reference at EP 1 and 2, hygiene, Megatron parity, the benchmark with every peer) on
CPU with gloo at tiny shapes and writes the reports."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "tests" / "gpu" / "run.sh"


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run.sh would run")
def test_refuses_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(RUN), "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "out").exists()          # nothing written before the refusal


def test_bad_argument_is_refused():
    proc = subprocess.run(["bash", str(RUN), "--cpu-smok"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--cpu-smok'" in proc.stderr


def test_cpu_smoke_runs_every_step(tmp_path):
    pytest.importorskip("megatron.core")
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(RUN), "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                          env=_env(TAGMOE_GPU_BENCH_ARGS="--shapes qwen3"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("layer_ep1", "layer_ep2", "hygiene_ep1", "hygiene_ep2", "megatron_parity"):
        report = json.loads((out / f"{name}.json").read_text())
        assert report["ok"] is True, (name, report)
    layer = json.loads((out / "layer_ep2.json").read_text())
    assert layer["ep"] == 2 and len(layer["cases"]) == 2
    assert all(c["max_rel_err"] < 3e-2 for c in layer["cases"])
    bench = json.loads((out / "bench.json").read_text())
    impls = {r["impl"]: r for r in bench["results"]}
    assert set(impls) == {"tagmoe", "megatron", "autoep", "hf", "hf-grouped_mm"}
    assert all(r["ms"] > 0 for r in impls.values()), impls
    assert "| qwen3 |" in proc.stdout and "x Megatron" in proc.stdout
