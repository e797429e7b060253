#!/usr/bin/env python
"""Communication/computation overlap of one MoE layer with EP=2, on two "hosts" joined by a
rate-limited link (tagmoe_lab.netns: Linux network namespaces; loopback fallback, said so).

    python tools/bench_overlap.py                          # link rate chosen so comm ~ compute
    python tools/bench_overlap.py --rate-mbit 400 --chunks 2 4 8 auto --runs 9
    python tools/bench_overlap.py --trace /tmp/overlap.json   # + a profiler trace of one step

Measured on each rank, forward + backward, medians over --runs rounds (the variants are
interleaved round by round, so slow phases of a shared machine hit all of them alike):

  communication  the layer's own exchanges with its actual split sizes: counts, dispatch and
                 combine all-to-alls, and their transposes in the backward
  compute        the local experts on the rows this rank actually received
  sequential     MoELayer with overlap_chunks=1
  overlap N      MoELayer with overlap_chunks=N (N in --chunks, "auto" included)

overlap efficiency = overlapped / max(communication, compute) (1.0 = communication fully hidden;
target <= 1.15); speedup = sequential / overlapped. Whether overlap_chunks > 1 is implemented is
detected by counting the all-to-alls a step issues: a layer that ignores the field issues as
many as with overlap_chunks=1, and the table says so. The planner (tagmoe_lab.planner) predicts
each row from rates measured in the same namespaces (measure_rates), and the table gives its
relative error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ------------------------------------------------------------------------------ child (one rank)
def _count_all_to_alls():
    """Wrap all_to_all_single to count the exchanges a step issues (tool-local instrumentation)."""
    import torch.distributed as dist
    orig = dist.all_to_all_single
    counter = [0]

    def counted(*a, **k):
        counter[0] += 1
        return orig(*a, **k)
    dist.all_to_all_single = counted
    return counter


def child(a: dict) -> None:
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    import tagmoe_dist as tm
    from tagmoe_lab import planner

    torch.set_num_threads(a["threads"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    groups = tm.ParallelGroups.build(ep_size=2)
    counter = _count_all_to_alls()
    T, D, F, E, K = a["tokens"], a["hidden"], a["ffn"], a["experts"], a["top_k"]
    base = tm.MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=K,
                        activation=a["activation"], norm_topk_prob=K > 1, aux_loss_coeff=0.0)

    def build(chunks):
        torch.manual_seed(0)                           # same weights for every variant
        return tm.MoELayer(base.replace(overlap_chunks=chunks), groups=groups)

    gen = torch.Generator().manual_seed(1000 + rank)   # different tokens on each rank
    x = torch.randn(1, T, D, generator=gen)
    gy = torch.randn(1, T, D, generator=gen)

    # 1. the layer's actual dispatch volume: its router's choices on these tokens -> split sizes
    #    (computed here from the routing, so this tool does not depend on dispatcher internals)
    seq = build(1)
    S, L = 2, E // 2
    group = groups.ep_group
    with torch.no_grad():
        route = seq.router(x.view(-1, D))
        ids = route.topk_ids_TK if route.keep_TK is None else route.topk_ids_TK[route.keep_TK]
        send_SL = torch.bincount(ids.reshape(-1), minlength=E).view(S, L)
    recv_SL = torch.empty_like(send_SL)
    dist.all_to_all_single(recv_SL, send_SL, group=group)
    in_s, out_s = send_SL.sum(1).tolist(), recv_SL.sum(1).tolist()
    counts_L = recv_SL.sum(0).tolist()
    send_buf, recv_buf = torch.randn(sum(in_s), D, generator=gen), torch.empty(sum(out_s), D)
    x_RD = torch.randn(sum(out_s), D, generator=gen, requires_grad=True)
    g_RD = torch.randn(x_RD.shape, generator=gen)

    def comm_step():
        # what a step exchanges: counts; dispatch and combine; their transposes in the backward
        dist.all_to_all_single(torch.empty_like(send_SL), send_SL, group=group)
        for _ in range(2):
            dist.all_to_all_single(recv_buf, send_buf, out_s, in_s, group=group)
            dist.all_to_all_single(send_buf, recv_buf, in_s, out_s, group=group)

    rows_R = torch.arange(x_RD.shape[0])
    ones_R, counts_t = torch.ones(x_RD.shape[0]), torch.tensor(counts_L)

    def compute_step():
        seq.experts(x_RD, rows_R, ones_R, counts_t, counts_L).backward(g_RD)

    def layer_step(layer):
        def step():
            xi = x.clone().requires_grad_(True)
            layer(xi).backward(gy)
            return xi
        return step

    variants = {"communication": comm_step, "compute": compute_step, "sequential": layer_step(seq)}
    layers = {"sequential": seq}
    for ch in a["chunks"]:
        name = f"overlap {ch}"
        layers[name] = build(ch)
        variants[name] = layer_step(layers[name])

    # 2. correctness and collectives per step of every layer variant
    ref_y = ref_gx = None
    info = {}
    for name, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        counter[0] = 0
        y = layer(xi)
        y.backward(gy)
        calls = counter[0]
        if ref_y is None:
            ref_y, ref_gx = y.detach(), xi.grad
        info[name] = {"a2a_calls": calls,
                      "max_abs_diff_y": float((y.detach() - ref_y).abs().max()),
                      "max_abs_diff_grad_x": float((xi.grad - ref_gx).abs().max())}
    # a step = 1 count exchange + (dispatch + combine) * chunks, forward and backward
    for v in info.values():
        v["chunks_used"] = max(1, round((v["a2a_calls"] - 1) / 4))

    # 3. rates of this system, for the planner (agreed over the group)
    rates = planner.measure_rates(groups, D, F, rows=min(T * K // L, 4096), a2a_bytes=a["probe_bytes"],
                                  activation=a["activation"], reps=a["probe_reps"])

    # 4. timing, interleaved round by round
    times = {n: [] for n in variants}
    for i in range(a["warmup"] + a["runs"]):
        for name, fn in variants.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= a["warmup"]:
                times[name].append(dt)

    # 5. optional profiler trace of one overlapped step
    if a.get("trace"):
        from torch.profiler import ProfilerActivity, profile
        name = f"overlap {a['chunks'][0]}" if a["chunks"] else "sequential"
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            variants[name]()
        root, ext = os.path.splitext(a["trace"])
        prof.export_chrome_trace(a["trace"] if rank == 0 else f"{root}.rank{rank}{ext or '.json'}")

    sizes = torch.tensor([sum(in_s) - in_s[rank], sum(out_s)], dtype=torch.float64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    res = {"rank": rank, "times": times, "info": info,
           "send_rows_remote_max": sizes[0].item(), "recv_rows_max": sizes[1].item(),
           "rates": {"alpha_s": rates.intra.latency_s, "beta_Bps": rates.intra.bandwidth_Bps,
                     "flops": rates.flops, "mem_bandwidth_Bps": rates.mem_bandwidth_Bps,
                     "chunk_overhead_s": rates.chunk_overhead_s,
                     "beta_curve": [list(p) for p in rates.intra.curve],
                     "pair_curve": [list(p) for p in rates.intra.pair_curve]}}
    print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ parent
def auto_rate_mbit(a) -> tuple:
    """A link rate at which the step's communication takes about as long as its expert compute:
    time the experts' forward + backward on T*K rows here, divide the step's bytes by it."""
    import torch
    from tagmoe_dist.experts import GroupedExperts
    torch.set_num_threads(a.threads)
    L = a.experts // 2
    ex = GroupedExperts(a.hidden, a.ffn, range(L), a.activation)
    rows = a.tokens * a.top_k
    x = torch.randn(rows, a.hidden, requires_grad=True)
    counts = [rows // L] * (L - 1) + [rows - rows // L * (L - 1)]
    ts = []
    for _ in range(4):
        t0 = time.perf_counter()
        ex(x, torch.arange(rows), torch.ones(rows), torch.tensor(counts), counts).sum().backward()
        ts.append(time.perf_counter() - t0)
    compute_s = statistics.median(ts[1:])
    step_bytes = 4 * rows * a.hidden * 4 / 2          # 4 exchanges, half the rows leave the rank
    rate = max(10, round(step_bytes * 8 / compute_s / 1e6 / 10) * 10)
    return rate, compute_s, step_bytes


def predict(res: dict, a, curve: bool = True) -> dict:
    """Planner predictions of every row from the rates measured in the namespaces: with the
    measured beta-by-size and two-in-flight curves, or (curve=False) the plain alpha-beta model
    with one beta (the largest probe's, about the layer's own message size)."""
    from tagmoe_lab import planner
    r = res["rates"]
    link = planner.Link(r["alpha_s"], r["beta_Bps"],
                        tuple(map(tuple, r["beta_curve"])) if curve else (),
                        tuple(map(tuple, r["pair_curve"])) if curve else ())
    rates = planner.Rates(flops=r["flops"], intra=link, mem_bandwidth_Bps=r["mem_bandwidth_Bps"],
                          chunk_overhead_s=r["chunk_overhead_s"])
    send = res["send_rows_remote_max"] * a.hidden * 4
    rows = res["recv_rows_max"]
    kw = dict(activation=a.activation, ep=2, tokens=a.tokens, num_experts=a.experts)
    one = planner.moe_layer_cost(send, rows, a.hidden, a.ffn, rates, 1, **kw)
    out = {"communication": one.comm_s, "compute": one.compute_s, "sequential": one.sequential_s}
    auto_n = planner.choose_chunks(send, rows, a.hidden, a.ffn, rates, a.activation, 2)
    info = res["info"]
    for ch in a.chunks:
        n = info[f"overlap {ch}"]["chunks_used"]      # what the layer did ("auto": its choice)
        out[f"overlap {ch}"] = planner.moe_layer_cost(send, rows, a.hidden, a.ffn, rates, n, **kw).overlapped_s
    out["auto_chunks"] = auto_n
    return out


def report(results: list, a, isolated: bool, reason, rate) -> dict:
    # the step is as slow as its slowest rank: median per rank, max over ranks
    names = list(results[0]["times"])
    med = {n: max(statistics.median(r["times"][n]) for r in results) for n in names}
    info = results[0]["info"]
    pred = predict(results[0], a)
    pred1 = predict(results[0], a, curve=False)
    comm, comp, seq = med["communication"], med["compute"], med["sequential"]
    implemented = any(v["chunks_used"] > 1 for k, v in info.items() if k != "sequential")
    rr = results[0]["rates"]
    print(f"\nMoE layer EP=2: {a.tokens} tokens/rank, D={a.hidden}, E={a.experts}, k={a.top_k}, "
          f"F={a.ffn}, {a.activation}; fp32, {a.threads} thread(s)/rank; forward+backward, "
          f"median of {a.runs} (max over ranks)")
    print("link: " + (f"network namespaces, {rate:g} Mbit/s per direction (tbf)" if isolated else
                      f"LOOPBACK FALLBACK, no bandwidth limit ({reason}): communication is not "
                      "comparable to compute and the efficiency column is meaningless"))
    print(f"measured rates: alpha {rr['alpha_s'] * 1e3:.2f} ms, beta {rr['beta_Bps'] * 8 / 1e6:.0f} Mbit/s, "
          f"expert MLP {rr['flops'] / 1e9:.1f} GFLOP/s, gather {rr['mem_bandwidth_Bps'] / 1e9:.1f} GB/s, "
          f"per-chunk overhead {rr['chunk_overhead_s'] * 1e6:.0f} us; dispatch rows sent "
          f"{results[0]['send_rows_remote_max']:.0f}, received {results[0]['recv_rows_max']:.0f}")
    if not implemented and a.chunks:
        print("NOTE: overlap_chunks > 1 is NOT implemented in this MoELayer: every overlap variant "
              "issued the same all-to-alls as overlap_chunks=1 (the field is ignored), so its rows "
              "measure the sequential path")
    print()
    print("| variant | chunks used | measured ms | overlap efficiency | speedup vs sequential | "
          "planner ms | planner error | planner, one beta: ms | error | max abs diff y / grad x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for n in names:
        m = med[n]
        eff = spd = "-"
        if n.startswith("overlap") or n == "sequential":
            eff = f"{m / max(comm, comp):.2f}"
            spd = f"{seq / m:.2f}"
        p, p1 = pred[n], pred1[n]
        err, err1 = (p - m) / m, (p1 - m) / m
        used = info[n]["chunks_used"] if n in info else "-"
        diff = (f"{info[n]['max_abs_diff_y']:.1e} / {info[n]['max_abs_diff_grad_x']:.1e}"
                if n in info else "-")
        print(f"| {n} | {used} | {m * 1e3:.1f} | {eff} | {spd} | "
              f"{p * 1e3:.1f} | {err:+.0%} | {p1 * 1e3:.1f} | {err1:+.0%} | {diff} |")
        rows[n] = {"ms": m * 1e3, "chunks_used": used, "planner_ms": p * 1e3, "planner_rel_error": err,
                   "planner_one_beta_ms": p1 * 1e3, "planner_one_beta_rel_error": err1,
                   "all_ms_rank0": [t * 1e3 for t in results[0]["times"][n]]}
    print(f"\nmax(communication, compute) = {max(comm, comp) * 1e3:.1f} ms; target: overlap "
          f"efficiency <= 1.15. planner's choice for 'auto': {pred['auto_chunks']} chunks (beta curve), "
          f"{pred1['auto_chunks']} (one beta)")
    for key, what in (("beta_curve", "one exchange"), ("pair_curve", "two in flight, aggregate")):
        if rr.get(key):
            print(f"beta, {what} (KiB per peer: Mbit/s): " + ", ".join(
                f"{int(b) >> 10}: {bps * 8 / 1e6:.0f}" for b, bps in rr[key]))
    return {"isolated": isolated, "fallback_reason": reason, "rate_mbit": rate, "args": vars(a),
            "rates": rr, "rows": rows, "overlap_implemented": implemented,
            "planner_auto_chunks": pred["auto_chunks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate-mbit", default="auto", help="link rate, Mbit/s, or 'auto' (comm ~ compute)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512, help="expert width F")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    ap.add_argument("--chunks", nargs="*", default=["2", "4", "auto"], help="overlap_chunks values")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--probe-bytes", type=int, nargs="+", default=[1 << 17, 1 << 19, 1 << 21, 1 << 22],
                    help="all-to-all sizes (bytes per peer) measure_rates times: a beta curve")
    ap.add_argument("--probe-reps", type=int, default=11, help="repetitions of each measure_rates probe")
    ap.add_argument("--trace", default=None, help="chrome trace of one overlapped step (rank 0; "
                                                   "rank 1 as <name>.rank1.json)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-netns", action="store_true", help="loopback, no shaping (for a smoke run)")
    ap.add_argument("--require-netns", action="store_true", help="fail instead of falling back")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return 0
    a.chunks = [c if c == "auto" else int(c) for c in a.chunks]
    if a.experts % 2:
        ap.error("--experts must be even (EP=2)")
    from tagmoe_lab.netns import NetnsCluster, NetnsUnavailable
    if a.rate_mbit == "auto":
        rate, comp, nbytes = auto_rate_mbit(a)
        print(f"--rate-mbit auto: experts fwd+bwd take ~{comp * 1e3:.0f} ms here and a step "
              f"exchanges ~{nbytes / 1e6:.1f} MB per rank (4 all-to-alls of half the T*k rows), so "
              f"{rate} Mbit/s makes communication ~ compute: the regime where overlap matters")
    else:
        rate = float(a.rate_mbit)
    payload = {k: getattr(a, k) for k in ("tokens", "hidden", "ffn", "experts", "top_k", "activation",
                                          "chunks", "runs", "warmup", "threads", "probe_bytes", "probe_reps",
                                          "trace")}
    if a.trace:
        payload["trace"] = os.path.abspath(a.trace)
    env = {"OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(payload)]
    try:
        cluster = NetnsCluster(2, rate_mbit=rate, fallback=not a.require_netns, loopback=a.no_netns)
        with cluster as c:
            res = c.run(cmd, env=env, timeout=a.timeout, cwd=ROOT)
    except NetnsUnavailable as e:
        print(f"network namespaces unavailable: {e}", file=sys.stderr)
        return 3
    if not res.ok:
        for r in res.ranks:
            print(f"--- rank {r.rank} exit {r.returncode}\n{r.stderr[-4000:]}", file=sys.stderr)
        return 1
    results = [json.loads(line[7:]) for r in res.ranks for line in r.stdout.splitlines()
               if line.startswith("RESULT ")]
    out = report(sorted(results, key=lambda r: r["rank"]), a, res.isolated, res.fallback_reason,
                 rate if res.isolated else None)
    if a.trace:
        print(f"profiler trace of one '{'overlap ' + str(a.chunks[0]) if a.chunks else 'sequential'}' "
              f"step: {a.trace} (open in chrome://tracing or https://ui.perfetto.dev)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
