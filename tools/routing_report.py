#!/usr/bin/env python
"""Routing report of a trained model on the built-in eval sets: task x expert heat maps per MoE
layer (PNG), routing entropy, load balance, task-expert mutual information, and expert load /
MI over training when the run recorded them.

    # a model saved by tools/compare_routers.py --save (config and history found beside it)
    python tools/routing_report.py runs/cmp/ckpt/text_tag_s0.pt --out runs/report
    # a DeepSpeed checkpoint of python -m tagmoe_dist.train (model_config.yaml found beside it)
    python tools/routing_report.py runs/tiny_tag/checkpoints --out runs/report_ds
    # any of them with an explicit model YAML
    python tools/routing_report.py model.pt --config configs/models/dit_tag.yaml --out rep
    # a DiT: also draw 2 generated / edited samples per task
    python tools/routing_report.py runs/cmp/ckpt/image_tag_s0.pt --out rep --samples 2

The workload follows the model: image tasks for a DiT, text tasks for a GPT. Writes
heatmap_layer<i>.png, load_over_time_layer<i>.png, mi_over_time.png and routing.json under
--out, and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagmoe_lab.benchmark.report import routing_report, summary_markdown  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a .pt state dict, or a DeepSpeed checkpoint directory")
    ap.add_argument("--config", default=None, help="model YAML (default: the one beside the checkpoint)")
    ap.add_argument("--out", required=True, help="output directory for PNGs and routing.json")
    ap.add_argument("--eval-per-task", type=int, default=64)
    ap.add_argument("--prefix", default="", help="file name prefix of every output")
    ap.add_argument("--samples", type=int, default=0,
                    help="DiT: also draw this many generated / edited eval samples per task")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        s = routing_report(args.checkpoint, args.out, args.config, args.eval_per_task,
                           prefix=args.prefix, samples=args.samples)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
