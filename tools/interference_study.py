#!/usr/bin/env python
"""The pre-registered interference study of docs/results.md (issue 18): every variant of the
interference workload and of its negative control, seeds 0..19, one process, one thread.

    python tools/interference_study.py --out runs/intf_study --jobs 2
    python tools/interference_study.py --out runs/intf_study --analyse-only     # tables again

Seeds start in order (--jobs of them at once, each in its own single-thread process); each seed
trains every variant of both workloads on that seed's batches, then `results.json` is rewritten
(temp name + rename, seeds in order), so an interrupted study keeps whole seeds. Stopping rule: no new seed starts after --max-minutes. The analysis (results.md,
img/intf_contrasts.png) is the one fixed in the pre-registration: paired differences per seed,
95% percentile bootstrap intervals (10,000 resamples, generator seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagmoe_lab.benchmark.compare import Budget, train_run  # noqa: E402
from tagmoe_lab.benchmark.stats import paired  # noqa: E402
from tagmoe_lab.benchmark.workloads import get_workload  # noqa: E402

BUDGET = Budget(steps=250, batch_size=64, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                eval_per_task=64, eval_batch_size=64, log_every=25)
VARIANTS = {"interference": ["dense", "topk", "tag", "tag_literal", "tag_l001", "tag_l02",
                             "tag_flat", "oracle"],
            "control": ["dense", "topk", "tag", "oracle"]}
# (name, a, b, hypothesis): a - b, negative = a better
CONTRASTS = {"interference": [("H0", "oracle", "topk"), ("H1/H3", "tag", "topk"),
                              ("H2", "tag", "tag_literal"), ("H5", "tag", "tag_flat"),
                              ("H6", "tag_l001", "topk"), ("H6", "tag_l02", "topk"),
                              ("-", "tag_literal", "topk"), ("-", "tag", "dense"),
                              ("-", "topk", "dense")],
             "control": [("C1", "tag", "topk"), ("C2", "oracle", "topk"), ("-", "topk", "dense")]}


def run_seed(seed: int, done=frozenset()) -> list:
    """Every variant of both workloads on one seed's batches (one process, one thread)."""
    torch.set_num_threads(1)
    rows = []
    for name, variants in VARIANTS.items():
        wl = get_workload(name)
        batches, evals = None, None
        for v in variants:
            if (name, v, seed) in done:
                continue
            if batches is None:
                batches = wl.train_batches(seed, BUDGET.steps, BUDGET.batch_size)
                evals = wl.eval_batches(BUDGET.eval_per_task, BUDGET.eval_batch_size)
            r = train_run(wl, v, seed, BUDGET, batches, evals)
            last = r.history[-1]
            rows.append({
                "workload": name, "variant": v, "seed": seed, "task_loss": r.task_loss,
                "mean": r.mean_loss, "worst": list(r.worst), "mi_per_layer": r.mi_per_layer,
                "align_acc": r.align_acc, "target_min_dist": last.get("target_min_dist"),
                "align_loss_last": last.get("align_loss"), "seconds": r.seconds,
                "active_params": r.active_params})
            print(f"[{name}] seed {seed} {v:11s} mean {r.mean_loss:.4f} worst {r.worst[1]:.4f} "
                  f"MI {r.mi:.3f} ({r.seconds:.1f}s)", flush=True)
    return rows


def run(out: Path, seeds, max_minutes: float, jobs: int = 1) -> dict:
    """Seeds in order, `jobs` at a time (each its own process and thread: the numbers do not
    depend on jobs). Stopping rule: no new seed starts after max_minutes."""
    import concurrent.futures as cf
    import multiprocessing as mp
    path = out / "results.json"
    blob = json.loads(path.read_text()) if path.exists() else {"budget": vars(BUDGET), "runs": []}
    done = frozenset((r["workload"], r["variant"], r["seed"]) for r in blob["runs"])
    t0 = time.perf_counter()
    pending, todo = {}, list(seeds)
    pool = cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) if jobs > 1 else None

    def submit():
        while todo and len(pending) < jobs:
            if (time.perf_counter() - t0) / 60 > max_minutes:
                print(f"stopping rule: {max_minutes} min passed, no new seed from {todo[0]}",
                      flush=True)
                todo.clear()
                return
            seed = todo.pop(0)
            pending[seed] = pool.submit(run_seed, seed, done) if pool else run_seed(seed, done)

    try:
        submit()
        while pending:
            seed = min(pending)
            rows = pending.pop(seed)
            rows = rows.result() if pool else rows
            blob["runs"].extend(rows)
            blob["runs"].sort(key=lambda r: (r["seed"], list(VARIANTS).index(r["workload"]),
                                             VARIANTS[r["workload"]].index(r["variant"])))
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(blob, indent=1))
            os.replace(tmp, path)
            print(f"seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
            submit()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    blob["wall_seconds"] = blob.get("wall_seconds", 0.0) + time.perf_counter() - t0
    blob["jobs"] = jobs
    path.write_text(json.dumps(blob, indent=1))
    return blob


def _by(blob, name, variant, key):
    return {r["seed"]: (key(r) if callable(key) else r[key]) for r in blob["runs"]
            if r["workload"] == name and r["variant"] == variant}


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def _ci(p):
    return f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]"


def analyse(blob: dict) -> str:
    md = []
    for name, variants in VARIANTS.items():
        present = [v for v in variants if _by(blob, name, v, "mean")]
        if not present:
            continue
        seeds = sorted(_by(blob, name, present[0], "mean"))
        tasks = list(next(r["task_loss"] for r in blob["runs"] if r["workload"] == name))
        md.append(f"### {name} workload ({len(seeds)} seeds: {seeds[0]}..{seeds[-1]})\n")
        md.append("| variant | mean loss | worst task | MI per layer | align acc | target min 1−cos | s/run |")
        md.append("|---|---|---|---|---|---|---|")
        for v in present:
            rs = [r for r in blob["runs"] if r["workload"] == name and r["variant"] == v]
            L = len(rs[0]["mi_per_layer"])
            mi = " / ".join(_ms([r["mi_per_layer"][i] for r in rs]) for i in range(L)) or "–"
            md.append(f"| {v} | {_ms([r['mean'] for r in rs])} | {_ms([r['worst'][1] for r in rs])} | "
                      f"{mi} | {_ms([r['align_acc'] for r in rs])} | "
                      f"{_ms([r['target_min_dist'] for r in rs])} | "
                      f"{statistics.fmean(r['seconds'] for r in rs):.1f} |")
        md.append("\nPer-task loss (mean ± std over seeds):\n")
        md.append("| variant | " + " | ".join(tasks) + " |")
        md.append("|---|" + "---|" * len(tasks))
        for v in present:
            md.append(f"| {v} | " + " | ".join(
                _ms(list(_by(blob, name, v, lambda r, t=t: r["task_loss"][t]).values())) for t in tasks) + " |")
        md.append("\nPaired differences a − b per seed (negative = a better), mean [95% bootstrap "
                  "interval], and the seeds on which a wins:\n")
        md.append("| hyp. | a − b | Δ mean loss | wins | Δ worst-task loss | wins | Δ MI (mean over layers) |")
        md.append("|---|---|---|---|---|---|---|")
        for hyp, a, b in CONTRASTS[name]:
            if a not in present or b not in present:
                continue
            pm = paired(_by(blob, name, a, "mean"), _by(blob, name, b, "mean"))
            pw = paired(_by(blob, name, a, lambda r: r["worst"][1]), _by(blob, name, b, lambda r: r["worst"][1]))
            mi = lambda r: statistics.fmean(r["mi_per_layer"]) if r["mi_per_layer"] else None  # noqa: E731
            ma, mb = _by(blob, name, a, mi), _by(blob, name, b, mi)
            dmi = (_ci(paired(ma, mb)) if None not in ma.values() and None not in mb.values()
                   and ma and mb else "–")
            md.append(f"| {hyp} | {a} − {b} | {_ci(pm)} | {pm['wins']}/{pm['n']} | {_ci(pw)} | "
                      f"{pw['wins']}/{pw['n']} | {dmi} |")
        if "tag" in present and "topk" in present:
            md.append("\nPer task, tag − topk:\n")
            md.append("| task | " + " | ".join(tasks) + " |")
            md.append("|---|" + "---|" * len(tasks))
            md.append("| Δ [95% CI] | " + " | ".join(_ci(paired(
                _by(blob, name, "tag", lambda r, t=t: r["task_loss"][t]),
                _by(blob, name, "topk", lambda r, t=t: r["task_loss"][t]))) for t in tasks) + " |")
        md.append("")
    # difference in differences: does TAG's effect exist only where tasks interfere?
    d = {}
    for name in VARIANTS:
        a, b = _by(blob, name, "tag", "mean"), _by(blob, name, "topk", "mean")
        d[name] = {s: a[s] - b[s] for s in set(a) & set(b)}
    if d.get("interference") and d.get("control"):
        p = paired(d["interference"], d["control"])
        md.append(f"Difference in differences (tag − topk on interference) − (tag − topk on control), "
                  f"paired by seed: {_ci(p)} over {p['n']} seeds.\n")
    if "wall_seconds" in blob:
        md.append(f"Wall time of the study: {blob['wall_seconds'] / 60:.1f} min "
                  f"({len(blob['runs'])} runs).\n")
    return "\n".join(md)


def contrast_plot(blob: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows = []
    for name in VARIANTS:
        for hyp, a, b in CONTRASTS[name]:
            A, B = _by(blob, name, a, "mean"), _by(blob, name, b, "mean")
            if A and B:
                rows.append((f"{name[:5]}: {a} − {b}", paired(A, B)))
    fig = Figure(figsize=(6.5, 0.35 * len(rows) + 1.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, p) in enumerate(rows):
        ax.plot([p["lo"], p["hi"]], [i, i], color="k")
        ax.plot([p["mean"]], [i], "o", color="C0")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("paired Δ mean eval loss (95% bootstrap interval); < 0: a better", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0-19", help="a range a-b or a comma-separated list")
    ap.add_argument("--max-minutes", type=float, default=40.0)
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds trained at once, one process and one thread each (2 on a 2-core "
                         "machine); the numbers are the same for any value")
    ap.add_argument("--analyse-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "-" in args.seeds:
        a, b = args.seeds.split("-")
        seeds = list(range(int(a), int(b) + 1))
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
    if args.analyse_only:
        blob = json.loads((out / "results.json").read_text())
    else:
        blob = run(out, seeds, args.max_minutes, args.jobs)
    md = analyse(blob)
    (out / "results.md").write_text(md)
    print(md)
    print(f"wrote {contrast_plot(blob, out / 'img' / 'intf_contrasts.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
