"""GPU check (not in CI): Megatron-core GPTModel with our MoE spec on one GPU with NCCL
(TP = PP = EP = 1): forward and backward, and router="topk" against Megatron's own
MoELayer/TopKRouter at the same weights (tests/gpu/megatron_parity.py).

Run it where a GPU is:  python tests/gpu/test_megatron_gpu.py   (prints a JSON report)
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
    import torch.distributed as dist
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from tests.gpu import megatron_parity
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "ok": False}
    try:
        diffs = megatron_parity.compare("cuda")
        report["max_rel_diff_logits"] = diffs["logits"]
        report["max_rel_diff_grads"] = max(v for k, v in diffs.items() if k.startswith("grad"))
        report["max_rel_diff_logs"] = max(v for k, v in diffs.items() if k.startswith("log"))
        report.update(megatron_parity.task_aware_smoke("cuda"))
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
