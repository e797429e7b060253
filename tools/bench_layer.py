#!/usr/bin/env python
"""Forward+backward time and peak memory of one MoE layer: tagmoe_dist vs DeepSpeed-MoE vs the
dense floor (a dense FFN of width k*F, the same multiply-adds per token).

    python tools/bench_layer.py                 # EP=1 and EP=2, all shapes
    python tools/bench_layer.py --ep 1 --runs 5

Each (implementation, shape, EP) runs in its own process group of fresh processes, so peak RSS
is per variant. One thread per process; 4096 tokens per rank, hidden 256, GELU experts, no token
dropping; median of --runs timed steps after --warmup steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = [("coarse", 8, 2, 512), ("fine", 32, 8, 128), ("fine", 64, 8, 64)]
TOKENS, HIDDEN = 4096, 256


# ---------------------------------------------------------------- one measurement (child side)
def _build(impl, E, K, F, ep):
    import torch.nn as nn
    if impl == "dense":
        return nn.Sequential(nn.Linear(HIDDEN, K * F), nn.GELU(approximate="tanh"),
                             nn.Linear(K * F, HIDDEN)), None
    if impl == "tagmoe":
        import tagmoe_dist as tm
        cfg = tm.MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=F, num_experts=E, top_k=K,
                           activation="gelu", norm_topk_prob=K > 1,
                           expert_kernel=os.environ.get("BENCH_EXPERT_KERNEL", "auto"))
        return tm.MoELayer(cfg, groups=tm.ParallelGroups.build(ep_size=ep)), None
    from deepspeed.moe.layer import MoE
    expert = nn.Sequential(nn.Linear(HIDDEN, F), nn.GELU(approximate="tanh"), nn.Linear(F, HIDDEN))
    kw = dict(top2_2nd_expert_sampling=False) if K == 2 else {}
    return MoE(HIDDEN, expert, num_experts=E, ep_size=ep, k=K, capacity_factor=1.0,
               drop_tokens=False, use_rts=False, **kw), "deepspeed"


def child(impl, E, K, F, ep, runs, warmup):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if ep > 1 or impl == "deepspeed":
        import torch.distributed as dist
        from datetime import timedelta
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
        if impl == "deepspeed":
            import deepspeed
            deepspeed.init_distributed(dist_backend="gloo")
    layer, kind = _build(impl, E, K, F, ep)
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    g = torch.randn(1, TOKENS, HIDDEN)

    def step():
        out = layer(x)
        y = out[0] if kind == "deepspeed" else out
        y.backward(g)
    times = []
    for i in range(warmup + runs):
        if ep > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[warmup:])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"ms": med * 1000, "peak_mb": peak_mb}))


# ---------------------------------------------------------------- orchestration
def measure(impl, E, K, F, ep, runs, warmup):
    from tagmoe_dist.ports import free_port
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port("127.0.0.1")), WORLD_SIZE=str(max(ep, 1)))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".torch_extensions"))
    if impl == "deepspeed":
        # a build killed midway leaves a lock on which DeepSpeed's init waits forever: say so
        from pathlib import Path
        from tagmoe_dist.launch import check_extension_locks
        check_extension_locks(roots=[Path(env["TORCH_EXTENSIONS_DIR"])])
    procs = []
    for r in range(ep if (ep > 1 or impl == "deepspeed") else 1):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--child", impl, str(E), str(K), str(F), str(ep),
             str(runs), str(warmup)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (o, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"{impl} E={E} K={K} F={F} ep={ep} failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2], help="expert-parallel sizes")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--impl", nargs="+", default=["tagmoe", "deepspeed", "dense"])
    ap.add_argument("--kernel", default="auto", choices=["auto", "native", "grouped_mm", "torch"],
                    help="MoEConfig.expert_kernel of the tagmoe layer")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ["BENCH_EXPERT_KERNEL"] = a.kernel      # read by the child processes
    if a.child:
        impl, *nums = a.child
        return child(impl, *map(int, nums))
    print(f"one MoE layer, forward+backward, {TOKENS} tokens/rank, hidden {HIDDEN}, GELU experts, "
          f"dropless, 1 thread/process, median of {a.runs}, tagmoe expert_kernel={a.kernel}")
    hdr = ("| shape | E | k | F | EP | " + " | ".join(f"{i} ms | {i} peak MB" for i in a.impl) +
           " | tagmoe/deepspeed | tagmoe/floor | deepspeed/floor |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for ep in a.ep:
        for name, E, K, F in SHAPES:
            res = {}
            for impl in a.impl:
                if impl == "dense" and ep > 1:
                    res[impl] = res_dense[(E, K, F)] if (E, K, F) in res_dense else measure(impl, E, K, F, 1, a.runs, a.warmup)
                else:
                    res[impl] = measure(impl, E, K, F, ep, a.runs, a.warmup)
                if impl == "dense":
                    res_dense[(E, K, F)] = res[impl]
            cells = " | ".join(f"{res[i]['ms']:.1f} | {res[i]['peak_mb']:.0f}" for i in a.impl)

            def ratio(p, q):
                return f"{res[p]['ms'] / res[q]['ms']:.2f}" if p in res and q in res else "-"
            print(f"| {name} | {E} | {K} | {F} | {ep} | {cells} | {ratio('tagmoe', 'deepspeed')} | "
                  f"{ratio('tagmoe', 'dense')} | {ratio('deepspeed', 'dense')} |", flush=True)


res_dense: dict = {}

if __name__ == "__main__":
    main()
