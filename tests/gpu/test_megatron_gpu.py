"""GPU check (not in CI): Megatron-core GPTModel with our MoE spec on one GPU with NCCL
(TP = PP = EP = 1): forward and backward, and router="topk" against Megatron's own
MoELayer/TopKRouter at the same weights (tests/gpu/megatron_parity.py).

Run it where a GPU is:  python tests/gpu/test_megatron_gpu.py   (prints a JSON report; part of
`bash tests/gpu/run.sh`); `--cpu-smoke` runs the same script on CPU with gloo.
Under pytest it runs that script in a subprocess, and is skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and NCCL; run `python tests/gpu/test_megatron_gpu.py` "
                           "on a GPU machine (e.g. under the device tool)")
def test_megatron_gpt_on_gpu_matches_megatron_moe():
    pytest.importorskip("megatron.core")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"], report


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import argparse
    import torch.distributed as dist
    ap = argparse.ArgumentParser(description="Megatron GPTModel with our MoE spec vs Megatron's MoELayer")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="on CPU with gloo, Megatron's CUDA calls under the test shim tests/megatron_cpu.py")
    smoke = ap.parse_args().cpu_smoke
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    if smoke:
        from tests.megatron_cpu import patch
        patch()
        device, backend = "cpu", "gloo"
    else:
        if not torch.cuda.is_available():
            print("test_megatron_gpu.py: no CUDA device (use --cpu-smoke on CPU)", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(0)
        device, backend = "cuda", "nccl"
    dist.init_process_group(backend, rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from tests.gpu import megatron_parity
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    report = {"check": "Megatron GPTModel parity", "torch": torch.__version__, "ok": False,
              "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    try:
        diffs = megatron_parity.compare(device)
        report["max_diff_logits"] = diffs["logits"]
        report["max_rel_diff_grads"] = max(v for k, v in diffs.items() if k.startswith("grad"))
        report["max_diff_logs"] = max(v for k, v in diffs.items() if k.startswith("log"))
        report.update(megatron_parity.task_aware_smoke(device))
        report["ok"] = True
    except Exception as e:  # report, then fail
        report["error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
