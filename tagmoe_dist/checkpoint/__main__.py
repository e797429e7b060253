"""python -m tagmoe_dist.checkpoint export --help"""

import sys

from tagmoe_dist.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
