"""Device hygiene of the hot path on CUDA: tests/test_device_hygiene.py's check (forward +
backward of a task-aware layer with a shared expert and the grouped_mm kernel, under the modes
that record device-less tensor factories and host syncs), run on a GPU in bfloat16 with
`torch.cuda.set_sync_debug_mode`: "error" at EP = 1 (any synchronising CUDA call raises), "warn"
at EP > 1, where the one allowed sync (the token-count exchange) must be the only one.

    torchrun --standalone --nproc_per_node N tests/gpu/check_hygiene.py
    torchrun --standalone --nproc_per_node 2 tests/gpu/check_hygiene.py --cpu-smoke  # gloo, CPU

Prints one JSON line (rank 0); exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tagmoe_dist as tm  # noqa: E402
from tests.test_device_hygiene import SCHEMA, HygieneMode, SyncMode, _BackwardUnder  # noqa: E402
from tests.gpu import launch  # noqa: E402


def check(device, world) -> dict:
    groups = tm.ParallelGroups.build(ep_size=world) if world > 1 else tm.ParallelGroups.single()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = tm.MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=4 * world, top_k=2,
                       router="task_aware", expert_kernel="grouped_mm", num_shared_experts=1,
                       z_loss_coeff=1e-3)
    torch.manual_seed(0)
    layer = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA).to(device=device, dtype=dtype)
    x = torch.randn(3, 5, 64, device=device, dtype=dtype, requires_grad=True)
    task = SCHEMA.to_multi_hot(torch.tensor([[0, 1], [2, -1], [-1, 0]])).to(device)
    layer(x, task=task).sum().backward()        # warm-up: one-time set-up is not the hot path
    mode, sync = HygieneMode(), SyncMode()
    cuda_syncs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if world == 1 else "warn")
        try:
            with mode, sync:
                y = layer(x, task=task)
            with sync, _BackwardUnder(mode):
                y.float().sum().backward()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
    cuda_syncs = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message).lower()]
    host = mode.syncs + sync.syncs
    allowed = 1 if world > 1 else 0
    ok = not mode.factories and len(host) <= allowed and len(cuda_syncs) <= allowed
    return {"ok": ok, "factories_without_device": mode.factories, "host_syncs": host,
            "cuda_sync_warnings": cuda_syncs, "allowed": allowed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU (no CUDA sync mode)")
    a = ap.parse_args()
    started = launch.init(a.cpu_smoke, "check_hygiene.py")
    if started is None:
        return 2
    device, backend, rank, world = started
    try:
        res = check(device, world)
    except Exception as e:       # e.g. set_sync_debug_mode("error") raising at a sync
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
    flag = torch.tensor([0 if res["ok"] else 1], device=device)
    dist.all_reduce(flag)
    if rank == 0:
        print(json.dumps({"check": "device hygiene", "ep": world, "backend": backend,
                          "rank0": res, "ok": int(flag.item()) == 0}))
    dist.destroy_process_group()
    return int(flag.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
