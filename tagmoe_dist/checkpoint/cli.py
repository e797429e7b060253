"""Command line of the checkpoint tools: python -m tagmoe_dist.checkpoint export --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from tagmoe_dist.checkpoint.export import consolidate, save_safetensors, save_torch


def main(argv=None, exporters: Optional[Dict[str, Callable]] = None) -> int:
    """exporters: {format: fn(args) -> exit code} for `export --format` other than ours; the
    entry point (__main__.py) passes the Hugging Face one (this package never imports hosts)."""
    exporters = dict(exporters or {})
    ap = argparse.ArgumentParser(prog="python -m tagmoe_dist.checkpoint",
                                 description="Tools for DeepSpeed checkpoints of tagmoe_dist models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="consolidate a checkpoint (all expert-parallel ranks) into "
                                       "one global fp32 state dict file",
                        description=consolidate.__doc__)
    ex.add_argument("--ckpt", required=True, help="checkpoint root (the directory holding 'latest'), "
                                                  "one of its step_N directories, or the run directory")
    ex.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_100 (default: 'latest')")
    ex.add_argument("--out", required=True, help="output file: .safetensors or .pt; with "
                                                 "--format hf, a directory")
    ex.add_argument("--format", choices=("tagmoe", *exporters), default="tagmoe",
                    help="tagmoe: our key names (default); hf: a Hugging Face model directory "
                         "of the source family (runs of hf: models, docs/hf.md)")
    ex.add_argument("--force", action="store_true", help="--format hf: replace an existing --out")
    args = ap.parse_args(argv)
    if args.format != "tagmoe":
        return exporters[args.format](args)

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        ap.error(f"--out {out}: use a .safetensors or .pt file name")
    ckpt = Path(args.ckpt).resolve()
    if ckpt == out.resolve() or ckpt in out.resolve().parents:
        ap.error(f"--out {out} lies inside --ckpt {args.ckpt}; write the export outside the "
                 "checkpoint it reads")
    try:
        sd = consolidate(args.ckpt, args.tag)
        (save_safetensors if out.suffix == ".safetensors" else save_torch)(sd, out)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    numel = sum(v.numel() for v in sd.values() if isinstance(v, torch.Tensor))
    print(f"wrote {out}: {len(sd)} tensors, {numel:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
