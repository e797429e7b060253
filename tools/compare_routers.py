#!/usr/bin/env python
"""Dense vs top-k MoE vs TAG-MoE (same active parameters, steps, data, lr schedule) on the
built-in multi-task workloads, over several seeds; prints markdown tables of per-task eval loss
(mean ± std), mean over tasks, worst task, and task-expert mutual information.

    python tools/compare_routers.py                               # both workloads, seeds 0,1,2
    python tools/compare_routers.py --workload text --seeds 0 --steps 200
    python tools/compare_routers.py --out runs/cmp --save --tensorboard --plots

Variant models: configs/models/cmp_text_{dense,topk,tag}.yaml and dit_{dense,topk,tag}.yaml;
`--config tag=path.yaml` swaps one (e.g. for an alignment-loss sweep). One process, one thread.
With --out: results.md, results.json, and (--plots) per-task bars and seed-0 heat maps under
out/img; --save writes every model (state_dict .pt + config + routing history) under out/ckpt
for tools/routing_report.py; --tensorboard logs under out/tb.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagmoe_lab.benchmark import Budget, VARIANTS, compare, get_workload  # noqa: E402
from tagmoe_lab.benchmark import plots, summary  # noqa: E402

# Per-workload defaults: the whole default run (both workloads, 3 seeds x 3 variants) took 444 s on
# the shared 2-core box (docs/results.md); the image DiT needs ~1000 steps at lr 4e-3 to learn its tasks.
DEFAULTS = {"text": dict(steps=1000, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=50),
            "image": dict(steps=1000, batch_size=32, lr=4e-3, min_lr=4e-4, warmup_steps=50)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["text", "image", "both"], default="both")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of dense,topk,tag")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default per workload)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--eval-per-task", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=None, help="routing-history interval (steps)")
    ap.add_argument("--config", action="append", default=[], metavar="VARIANT=YAML",
                    help="use this model YAML for a variant (the active-parameter check still applies)")
    ap.add_argument("--out", default=None, help="directory for results.md / results.json / img/")
    ap.add_argument("--save", action="store_true", help="save every trained model under out/ckpt")
    ap.add_argument("--tensorboard", action="store_true", help="TensorBoard logs under out/tb")
    ap.add_argument("--plots", action="store_true", help="PNG plots under out/img")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    variants = [v for v in args.variants.split(",") if v]
    overrides = {}
    for item in args.config:
        if "=" not in item:
            raise SystemExit(f"--config expects VARIANT=YAML, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = v
    out = Path(args.out) if args.out else None
    if (args.save or args.tensorboard or args.plots) and out is None:
        raise SystemExit("--save / --tensorboard / --plots need --out DIR")
    names = ["text", "image"] if args.workload == "both" else [args.workload]
    md, blob, t0 = [], {}, time.perf_counter()
    for name in names:
        given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                 "warmup_steps": args.warmup_steps, "log_every": args.log_every}
        kw = {**DEFAULTS[name], **{k: v for k, v in given.items() if v is not None}}
        kw.setdefault("log_every", max(1, kw["steps"] // 20))
        budget = Budget(eval_per_task=args.eval_per_task, **kw)
        base = get_workload(name)
        workload = get_workload(name, {**base.configs, **overrides})
        print(f"== {name}: {budget}", flush=True)
        results = compare(workload, seeds, budget, variants,
                          tb_dir=out / "tb" if args.tensorboard else None,
                          ckpt_dir=out / "ckpt" if args.save else None,
                          log=lambda s: print(s, flush=True))
        table = summary.markdown(results, f"{name} workload")
        print("\n" + table, flush=True)
        md.append(table)
        blob[name] = {"budget": dataclasses.asdict(budget), "configs": workload.configs,
                      "runs": [{"variant": r.variant, "seed": r.seed, "task_loss": r.task_loss,
                                "mean": r.mean_loss, "worst": list(r.worst), "mi": r.mi,
                                "mi_per_layer": r.mi_per_layer, "align_acc": r.align_acc,
                                "active_params": r.active_params, "total_params": r.total_params,
                                "seconds": r.seconds} for r in results]}
        if args.plots:
            for p in plots.comparison_plots(results, workload.task_names, out / "img", name):
                print(f"wrote {p}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("\n".join(md))
        (out / "results.json").write_text(json.dumps(blob, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
