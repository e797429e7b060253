"""Correctness of the MoE layer on GPUs (NCCL) against the same layer on CPU in float64.

    torchrun --standalone --nproc_per_node N tests/gpu/check_layer.py [--json out.json]
    torchrun --standalone --nproc_per_node 2 tests/gpu/check_layer.py --cpu-smoke   # gloo, CPU

EP = N (one GPU per rank). Every rank builds the layer from the same seed (so the global weights
do not depend on EP), runs forward and backward on its own tokens, and rank 0 compares with a
single-process float64 reference on CPU loaded with the gathered global weights: outputs, input
gradients, every parameter gradient (expert gradients summed over all ranks' tokens, the others
per rank). Cases: routers (topk, task_aware) x capacity (none, 1.0) x shared expert (off, on) x
expert kernel (grouped_mm, torch) x dtype (float32, bfloat16). Errors are relative Frobenius
norms ||got - want|| / ||want||; limits: 1e-4 in float32 (TF32 off), 3e-2 in bfloat16. A case
that raises is reported with its error and fails the run. Prints one JSON line (rank 0), exits 1
if any case fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tagmoe_dist as tm  # noqa: E402
from tests.gpu import launch  # noqa: E402

SCHEMA = tm.TaskSchema.from_dict({"levels": {"scope": ["local", "global"],
                                             "type": {"values": ["a", "b", "c"], "multi": True}}})
LIMITS = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def cases(smoke: bool):
    grid = itertools.product(("topk", "task_aware"), (None, 1.0), (False, True),
                             ("grouped_mm", "torch"), (torch.float32, torch.bfloat16))
    all_cases = [dict(router=r, capacity=c, shared=s, kernel=k, dtype=d) for r, c, s, k, d in grid]
    if smoke:     # two corners of the grid: the script's logic, not the coverage
        return [all_cases[0], all_cases[-1]]
    return all_cases


def _name(c) -> str:
    return (f"{c['router']} cap={c['capacity']} shared={int(c['shared'])} {c['kernel']} "
            f"{str(c['dtype']).replace('torch.', '')}")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _gather(t: torch.Tensor, world: int):
    if world == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return parts


def run_case(c, groups, device, rank, world, shape):
    B, S, D, F, E, K = shape
    cfg = tm.MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=K,
                       router=c["router"], capacity_factor=c["capacity"],
                       num_shared_experts=1 if c["shared"] else 0, expert_kernel=c["kernel"],
                       aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    torch.manual_seed(0)
    layer = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA).to(device=device, dtype=c["dtype"])
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(world, B, S, D, generator=g)
    cot_all = torch.randn(world, B, S, D, generator=g)
    task_all = torch.stack([torch.randint(-1, 2, (world, B), generator=g),
                            torch.randint(-1, 3, (world, B), generator=g)], -1)
    # the values the device run sees (rounded to its dtype), also given to the reference
    x_all, cot_all = x_all.to(c["dtype"]).double(), cot_all.to(c["dtype"]).double()
    x = x_all[rank].to(device=device, dtype=c["dtype"]).requires_grad_()
    task = SCHEMA.to_multi_hot(task_all[rank]).to(device)
    y = layer(x, task=task)
    (y.float() * cot_all[rank].to(device=device, dtype=torch.float32)).sum().backward()

    full = {k: v.double().cpu() for k, v in layer.full_state_dict().items()}
    got = {"y": [t.cpu() for t in _gather(y.detach().float(), world)],
           "dx": [t.cpu() for t in _gather(x.grad.float(), world)]}
    for name, p in layer.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        parts = [t.cpu() for t in _gather(grad.float(), world)]
        got[name] = torch.cat(parts, 0) if name.startswith("experts.") else parts
    if rank != 0:
        return None

    ref = tm.MoELayer(cfg.replace(expert_kernel="torch"), task_schema=SCHEMA).double()
    ref.load_full_state_dict(full)
    errs = {}
    expert_sum = {}
    for r in range(world):
        ref.zero_grad()
        xr = x_all[r].clone().requires_grad_()
        yr = ref(xr, task=SCHEMA.to_multi_hot(task_all[r]).double())
        (yr * cot_all[r]).sum().backward()
        errs[f"y[{r}]"] = _rel(got["y"][r], yr.detach())
        errs[f"dx[{r}]"] = _rel(got["dx"][r], xr.grad)
        for name, p in ref.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if name.startswith("experts."):
                expert_sum[name] = expert_sum.get(name, 0) + grad
            elif grad.norm() > 0:
                errs[f"grad {name}[{r}]"] = _rel(got[name][r], grad)
    for name, grad in expert_sum.items():
        errs[f"grad {name}"] = _rel(got[name], grad)
    worst = max(errs, key=errs.get)
    return {"case": _name(c), "ep": world, "max_rel_err": errs[worst], "worst": worst,
            "ok": errs[worst] <= LIMITS[c["dtype"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU, two cases, tiny shapes")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args()
    started = launch.init(a.cpu_smoke, "check_layer.py", bind_device=True)
    if started is None:
        return 2
    device, backend, rank, world = started
    if backend == "nccl":       # the float64 reference is compared with true fp32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    groups = tm.ParallelGroups.build(ep_size=world) if world > 1 else tm.ParallelGroups.single()
    # B, S, D, F, E, K: widths multiples of 16 (grouped_mm rows), 8 experts for EP up to 8
    shape = (2, 16, 32, 16, 4 * max(2, world), 2) if a.cpu_smoke else (4, 64, 256, 128, 16, 4)
    results = []
    for c in cases(a.cpu_smoke):
        try:
            res = run_case(c, groups, device, rank, world, shape)
        except Exception as e:       # report the case, go on with the others
            res = {"case": _name(c), "ep": world, "ok": False,
                   "error": f"{type(e).__name__}: {e}"[:500]}
        if res is not None:
            results.append(res)
    ok = True
    if rank == 0:
        ok = all(r["ok"] for r in results)
        report = {"check": "layer vs float64 CPU reference", "ep": world, "backend": backend,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "ok": ok, "cases": results}
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        print(json.dumps(report))
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    dist.destroy_process_group()
    return int(flag.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
