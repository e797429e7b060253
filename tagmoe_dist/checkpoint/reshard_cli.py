"""Command line of resharding: python -m tagmoe_dist.reshard --help."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

_EPILOG = """\
Example: a run trained at EP=2 on 2 processes, continued at EP=1 (expert data parallel 2):
  python -m tagmoe_dist.reshard --src runs/a/checkpoints --dst runs/b/checkpoints --ep-size 1
  python -m torch.distributed.run --nproc_per_node 2 -m tagmoe_dist.train \\
      --config runs/b/checkpoints/model_config.yaml --deepspeed_config configs/deepspeed/zero2.json --resume

Model weights never depend on the EP size (expert files are named by global expert id); the ZeRO
optimizer partitions do, and DeepSpeed loads a mismatched layout silently, scrambling the experts
at the first step. This tool rewrites the partitions exactly (ZeRO stage 1/2), writes a
DeepSpeed universal checkpoint for a ZeRO-3 source (resume it with a ZeRO-3 config, e.g.
configs/deepspeed/zero3.json), or, with --reset-optimizer, keeps only the weights.
See docs/upcycling.md and docs/deepspeed.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tagmoe_dist.reshard",
        description="Rewrite a tagmoe_dist.train (DeepSpeed ZeRO 1/2/3) checkpoint for another "
                    "expert-parallel size, so that train.py --resume continues it there.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, metavar="DIR",
                   help="checkpoints directory (holding 'latest'), one of its step_N directories, "
                        "or the run directory")
    p.add_argument("--dst", required=True, metavar="DIR",
                   help="new checkpoints directory, named 'checkpoints' (the trainer resumes from "
                        "<log_dir>/checkpoints); must not exist unless --force")
    p.add_argument("--ep-size", required=True, type=int, metavar="P",
                   help="expert-parallel size to resume with; divides the world size and every "
                        "layer's number of experts")
    p.add_argument("--world-size", type=int, default=None, metavar="W",
                   help="processes to resume on (default: the checkpoint's)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_100 (default: 'latest')")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="write the weights only; the trainer then restarts Adam from zero "
                        "moments (recorded in the manifest)")
    p.add_argument("--force", action="store_true", help="replace an existing --dst")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from tagmoe_dist.checkpoint.reshard import reshard
    try:
        reshard(args.src, args.dst, args.ep_size, world_size=args.world_size, tag=args.tag,
                reset_optimizer=args.reset_optimizer, force=args.force,
                log=lambda msg: print(msg, file=sys.stderr))
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
