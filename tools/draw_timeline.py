#!/usr/bin/env python
"""Draw a PNG timeline from a torch profiler chrome trace of one MoE step.

    python tools/bench_overlap.py --chunks 4 --trace /tmp/overlap.json
    python tools/draw_timeline.py /tmp/overlap.json docs/img/overlap_timeline.png

One lane per thread: the compute thread (expert GEMMs, activations, gathers/scatters) and the
communication threads (gloo's all-to-alls run on the backend's own threads). Overlap shows as
communication bars under compute bars at the same time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

KINDS = [  # (label, colour, op names)
    ("expert GEMM", "#1f77b4", {"aten::mm", "aten::addmm_", "aten::addmm"}),
    ("activation", "#2ca02c", {"aten::gelu", "aten::gelu_backward", "aten::silu",
                                "aten::silu_backward", "aten::mul"}),
    ("gather / scatter", "#9467bd", {"aten::index_select", "aten::index_add_"}),
    ("all-to-all", "#ff7f0e", {"gloo:all_to_all", "nccl:all_to_all"}),
]


def load_events(path: str):
    with open(path, encoding="utf-8") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def lanes(events):
    by_tid = defaultdict(list)
    for e in events:
        for label, colour, names in KINDS:
            if e["name"] in names:
                by_tid[e["tid"]].append((float(e["ts"]), float(e["dur"]), label, colour))
    return by_tid


def draw(path_in: str, path_out: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    events = load_events(path_in)
    if not events:
        raise ValueError(f"{path_in}: no complete ('X') events; is it a torch profiler chrome trace?")
    t0 = min(float(e["ts"]) for e in events)
    by_tid = lanes(events)
    # compute thread first (the one with GEMMs), then communication threads
    order = sorted(by_tid, key=lambda t: (not any(k == "expert GEMM" for *_, k, _ in by_tid[t]), t))
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(order)))
    for row, tid in enumerate(order):
        for ts, dur, _, colour in by_tid[tid]:
            ax.broken_barh([((ts - t0) / 1e3, dur / 1e3)], (row - 0.35, 0.7), facecolors=colour,
                           linewidth=0)
    names = ["compute thread" if any(k == "expert GEMM" for *_, k, _ in by_tid[t])
             else f"comm thread {i}" for i, t in enumerate(order)]
    ax.set_yticks(range(len(order)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title or "one overlapped MoE step (forward + backward)")
    ax.legend(handles=[Patch(color=c, label=l) for l, c, _ in KINDS], loc="upper center",
              bbox_to_anchor=(0.5, -0.35), ncol=len(KINDS), frameon=False)
    fig.tight_layout()
    fig.savefig(path_out, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="chrome trace JSON (torch.profiler export_chrome_trace)")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    draw(a.trace, a.out, a.title)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
