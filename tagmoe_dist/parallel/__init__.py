"""Process groups (groups.py), the adapters that read them from DeepSpeed or Megatron-core
(hosts.py), and tensor / sequence-parallel regions of the MoE layer (tensor.py)."""

from tagmoe_dist.parallel.groups import DEFAULT_TIMEOUT, ParallelGroups

__all__ = ["DEFAULT_TIMEOUT", "ParallelGroups"]
