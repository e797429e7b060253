"""python -m tagmoe_dist.reshard --help (the code: tagmoe_dist/checkpoint/reshard_cli.py)."""

import sys

from tagmoe_dist.checkpoint.reshard_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
