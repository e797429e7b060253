"""Draw the package's layers and the imports between them (docs/img/architecture.png).

The graph is parsed from the source with ast (tests/test_architecture.py's parser, the same one
the test that forbids cycles uses), aggregated to one box per concept, so the picture cannot
drift from the code:

    python tools/draw_architecture.py [--out docs/img/architecture.png]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_architecture import import_graph  # noqa: E402

# rows bottom (0) to top; each box: (label, module prefixes)
ROWS = [
    [("config / tasks", ("tagmoe_dist.config", "tagmoe_dist.tasks")),
     ("parallel/", ("tagmoe_dist.parallel",)), ("kernels/", ("tagmoe_dist.kernels",)),
     ("paths / ports", ("tagmoe_dist.paths", "tagmoe_dist.ports"))],
    [("gating/", ("tagmoe_dist.gating",))],
    [("dispatch/", ("tagmoe_dist.dispatch",))],
    [("experts.py", ("tagmoe_dist.experts",))],
    [("layer.py", ("tagmoe_dist.layer",))],
    [("integrations/", ("tagmoe_dist.integrations", "tagmoe_dist.task_context")),
     ("models/", ("tagmoe_dist.models",)), ("data/", ("tagmoe_dist.data",)),
     ("checkpoint/", ("tagmoe_dist.checkpoint",)), ("upcycle/", ("tagmoe_dist.upcycle",)),
     ("training/ analysis launch", ("tagmoe_dist.training", "tagmoe_dist.analysis",
                                    "tagmoe_dist.faults", "tagmoe_dist.launch"))],
    [("train.py / CLIs", ("tagmoe_dist.train", "tagmoe_dist.__main__"))],
]


def box_of(mod: str):
    for r, row in enumerate(ROWS):
        for c, (label, prefixes) in enumerate(row):
            if any(mod == p or mod.startswith(p + ".") for p in prefixes):
                return r, c
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img/architecture.png")
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = defaultdict(int)
    for mod, deps in import_graph().items():
        src = box_of(mod)
        for d in deps:
            dst = box_of(d)
            if src and dst and src != dst:
                edges[(src, dst)] += 1
    pos = {}
    for r, row in enumerate(ROWS):
        for c, _ in enumerate(row):
            pos[(r, c)] = ((c + 0.5) / len(row), r)
    fig, ax = plt.subplots(figsize=(11, 7))
    for (src, dst), n in edges.items():
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        up = y1 > y0
        # curved, so an edge that skips a row does not run through the box between
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color="red" if up else "0.55",
                                    lw=0.6 + 0.15 * min(n, 8), alpha=0.8, shrinkA=12, shrinkB=12,
                                    connectionstyle=f"arc3,rad={0.5 if y0 == y1 else 0.18}"))
    for (r, c), (x, y) in pos.items():
        label = ROWS[r][c][0]
        ax.text(x, y, label, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round,pad=0.4", fc="#dbe9f6" if r <= 4 else "#fdebd0", ec="0.3"))
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.6, len(ROWS) - 0.4)
    ax.axis("off")
    ax.set_title("tagmoe_dist: imports point down (grey); an upward import (red) would be a defect.\n"
                 "Blue: the core (an MoE layer and what it is made of). Orange: hosts, models, "
                 "files, entry points.", fontsize=9)
    ups = [(s, d) for (s, d) in edges if pos[d][1] > pos[s][1]]
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}: {len(edges)} box-to-box import edges, {len(ups)} pointing up")
    return 1 if ups else 0


if __name__ == "__main__":
    raise SystemExit(main())
