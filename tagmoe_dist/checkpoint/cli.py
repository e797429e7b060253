"""Command line of the checkpoint tools: python -m tagmoe_dist.checkpoint export --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tagmoe_dist.checkpoint.export import consolidate, save_safetensors, save_torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tagmoe_dist.checkpoint",
                                 description="Tools for DeepSpeed checkpoints of tagmoe_dist models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="consolidate a checkpoint (all expert-parallel ranks) into "
                                       "one global fp32 state dict file",
                        description=consolidate.__doc__)
    ex.add_argument("--ckpt", required=True, help="checkpoint root (the directory holding 'latest')")
    ex.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_100 (default: 'latest')")
    ex.add_argument("--out", required=True, help="output file: .safetensors or .pt")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        ap.error(f"--out {out}: use a .safetensors or .pt file name")
    try:
        sd = consolidate(args.ckpt, args.tag)
        (save_safetensors if out.suffix == ".safetensors" else save_torch)(sd, out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    numel = sum(v.numel() for v in sd.values() if isinstance(v, torch.Tensor))
    print(f"wrote {out}: {len(sd)} tensors, {numel:,} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
