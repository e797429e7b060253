"""`python -m tagmoe_dist.reshard`: the command line of `tagmoe_dist.checkpoint.reshard`, kept at
this name; the code lives in the checkpoint package."""

from tagmoe_dist.checkpoint import zero
from tagmoe_dist.checkpoint.reshard import reshard, saved_layout

__all__ = ["reshard", "saved_layout", "zero"]
