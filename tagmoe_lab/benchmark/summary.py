"""Markdown tables of a router comparison: per-task evaluation loss (mean ± std over seeds), the
mean over tasks, the worst task, task-expert mutual information, and TAG - top-k per seed."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Dict, List, Sequence

from tagmoe_lab.benchmark.compare import RunResult
from tagmoe_lab.benchmark.stats import bootstrap_ci


def _mean_std(xs: Sequence[float]) -> tuple:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: Sequence[float], digits: int = 4) -> str:
    m, s = _mean_std(xs)
    return "–" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def by_variant(results: Sequence[RunResult]) -> Dict[str, List[RunResult]]:
    out: Dict[str, List[RunResult]] = {}
    for r in results:
        out.setdefault(r.variant, []).append(r)
    return out


def loss_table(results: Sequence[RunResult]) -> str:
    """Rows: variants; columns: tasks, mean over tasks, worst task (per seed), MI (nats)."""
    groups = by_variant(results)
    tasks = list(results[0].task_loss)
    seeds = sorted({r.seed for r in results})
    head = ["variant"] + tasks + ["mean", "worst task", "MI task;expert"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for v, rs in groups.items():
        worst_names = Counter(r.worst[0] for r in rs).most_common(1)[0][0]
        cells = [v] + [_fmt([r.task_loss[t] for r in rs]) for t in tasks]
        cells += [_fmt([r.mean_loss for r in rs]),
                  f"{_fmt([r.worst[1] for r in rs])} ({worst_names})",
                  _fmt([r.mi for r in rs], 3)]
        lines.append(f"| {' | '.join(cells)} |")
    return (f"Per-task evaluation loss (mean ± std over seeds {seeds}; lower is better). "
            "'worst task' is each seed's highest task loss, with the task that was most often "
            "worst; MI is I(task; expert) in nats from evaluation routing, mean over MoE layers.\n\n"
            + "\n".join(lines))


def paired_table(results: Sequence[RunResult], a: str = "tag", b: str = "topk") -> str:
    """Per seed, a - b on the mean and the worst task (negative = a better): the seeds share
    data and evaluation sets, so the paired difference has less spread than either variant."""
    groups = by_variant(results)
    if a not in groups or b not in groups:
        return ""
    rb = {r.seed: r for r in groups[b]}
    rows, d_mean, d_worst = [], [], []
    for r in sorted(groups[a], key=lambda r: r.seed):
        if r.seed not in rb:
            continue
        o = rb[r.seed]
        dm, dw = r.mean_loss - o.mean_loss, r.worst[1] - o.worst[1]
        d_mean.append(dm)
        d_worst.append(dw)
        rows.append(f"| {r.seed} | {dm:+.4f} | {dw:+.4f} | {r.mi - o.mi:+.3f} |")
    wins = sum(d < 0 for d in d_mean), sum(d < 0 for d in d_worst)
    lines = ["| seed | Δ mean | Δ worst | Δ MI |", "|---|---|---|---|"] + rows
    lines.append(f"| all | {_fmt(d_mean)} | {_fmt(d_worst)} | |")
    ci = [bootstrap_ci(d) for d in (d_mean, d_worst)]
    lines.append("| 95% bootstrap interval of the mean | " + " | ".join(
        f"[{lo:+.4f}, {hi:+.4f}]" for _, lo, hi in ci) + " | |")
    return (f"{a} − {b} per seed (negative loss = {a} better): {a} wins the mean on {wins[0]}/"
            f"{len(d_mean)} seeds and the worst task on {wins[1]}/{len(d_worst)}.\n\n"
            + "\n".join(lines))


def routing_table(results: Sequence[RunResult]) -> str:
    """MI per MoE layer, load entropy (nats, log E = uniform), alignment accuracy, time."""
    lines = ["| variant | MI per layer | load entropy (mean over layers) | align acc | train s/run |",
             "|---|---|---|---|---|"]
    from tagmoe_dist.analysis import routing_entropy
    for v, rs in by_variant(results).items():
        if rs[0].routing_LKE is None:
            lines.append(f"| {v} | – | – | – | {statistics.fmean(r.seconds for r in rs):.0f} |")
            continue
        L = rs[0].routing_LKE.shape[0]
        per_layer = " / ".join(f"{statistics.fmean(r.mi_per_layer[i] for r in rs):.3f}" for i in range(L))
        ent = [statistics.fmean(routing_entropy(r.routing_LKE[i].sum(0)) for i in range(L)) for r in rs]
        acc = [r.align_acc for r in rs if r.align_acc is not None]
        lines.append(f"| {v} | {per_layer} | {_fmt(ent, 3)} | {_fmt(acc, 3) if acc else '–'} | "
                     f"{statistics.fmean(r.seconds for r in rs):.0f} |")
    return "\n".join(lines)


def pairs(results: Sequence[RunResult]) -> List[tuple]:
    """(TAG variant, its top-k baseline): tag<suffix> vs topk<suffix> when that exists, else
    vs topk; and the paper-literal tag_literal vs the collapse-safe tag."""
    names = set(by_variant(results))
    out = []
    for v in sorted(names):
        if v.startswith("tag"):
            base = "topk" + v[3:] if "topk" + v[3:] in names else "topk"
            if base in names:
                out.append((v, base))
    if {"tag", "tag_literal"} <= names:
        out.append(("tag", "tag_literal"))
    return out


def markdown(results: Sequence[RunResult], title: str = "") -> str:
    parts = [f"### {title}" if title else "", loss_table(results)]
    parts += [paired_table(results, a, b) for a, b in pairs(results)]
    parts.append(routing_table(results))
    return "\n\n".join(p for p in parts if p) + "\n"
