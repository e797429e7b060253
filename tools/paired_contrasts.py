#!/usr/bin/env python
"""Paired differences a − b per seed, with 95% percentile bootstrap intervals, from the
results.json of tools/compare_routers.py (any pair of its variants, mean and worst-task loss).

    python tools/paired_contrasts.py docs/data/cmp18_text.json tag-dense topk-dense
    python tools/paired_contrasts.py docs/data/cmp18_image.json tag-dense topk-dense
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagmoe_lab.benchmark.stats import paired  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.json written by compare_routers.py --out")
    ap.add_argument("pairs", nargs="+", metavar="A-B", help="variant pairs, e.g. tag-dense")
    args = ap.parse_args(argv)
    blob = json.loads(Path(args.results).read_text())
    print("| workload | a − b | loss | mean [95% CI] | seeds a wins |\n|---|---|---|---|---|")
    for workload, data in blob.items():
        runs = data["runs"]
        variants = {r["variant"] for r in runs}
        for pair in args.pairs:
            a, _, b = pair.partition("-")
            if not {a, b} <= variants:
                raise SystemExit(f"{pair}: {workload} has variants {sorted(variants)}")
            for key in ("mean", "worst"):
                def by(v):
                    return {r["seed"]: r[key][1] if key == "worst" else r[key] for r in runs
                            if r["variant"] == v}
                p = paired(by(a), by(b))
                print(f"| {workload} | {a} − {b} | {key} | {p['mean']:+.4f} [{p['lo']:+.4f}, "
                      f"{p['hi']:+.4f}] | {p['wins']}/{p['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
