#!/usr/bin/env python
"""Thin wrapper: same as `python -m tagmoe_dist.upcycle` (see --help)."""

import sys

from tagmoe_dist.upcycle.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
