"""ParallelGroups: the process groups an MoE layer talks over, built once and passed in.

Layout for `build(ep_size=P)` on a world of W ranks (W divisible by P), expert-parallel groups
are contiguous blocks of ranks and expert-data-parallel groups are strided, as in DeepSpeed:

    W=4, P=2:   ep groups  [0,1] [2,3]        edp groups [0,2] [1,3]

Every group is created with a timeout so that a lost peer fails the job instead of hanging it.
Adapters that read host globals (DeepSpeed's `groups`, Megatron's `parallel_state`) live in
`hosts.py` beside this file and return this same object.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Optional[dist.ProcessGroup] = None      # experts are sharded over this group
    edp_group: Optional[dist.ProcessGroup] = None     # replicas of the same experts (grad reduction)
    dp_group: Optional[dist.ProcessGroup] = None      # all data-parallel ranks (dense grads, bias stats)
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None      # tensor parallel (attention / dense)
    etp_size: int = 1
    etp_rank: int = 0
    etp_group: Optional[dist.ProcessGroup] = None     # expert tensor parallel
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Optional[dist.ProcessGroup] = None
    sequence_parallel: bool = False

    def __post_init__(self):
        assert 0 <= self.ep_rank < self.ep_size
        assert 0 <= self.tp_rank < self.tp_size and 0 <= self.etp_rank < self.etp_size
        assert 0 <= self.pp_rank < self.pp_size

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, no communication."""
        return cls()

    @classmethod
    def build(cls, ep_size: int = 1, timeout: timedelta = DEFAULT_TIMEOUT,
              backend: Optional[str] = None) -> "ParallelGroups":
        """Split the default world into expert-parallel and expert-data-parallel groups.

        Must be called by every rank in the same order (new_group is collective).
        """
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
        if not dist.is_available() or not dist.is_initialized():
            if ep_size != 1:
                raise ValueError(f"ep_size={ep_size} needs torch.distributed to be initialised first "
                                 "(torch.distributed.init_process_group, or launch with torchrun / "
                                 "deepspeed); use ep_size=1 for a single process")
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % ep_size != 0:
            raise ValueError(f"ep_size={ep_size} does not divide the world size {world}; "
                             f"choose an ep_size among {[d for d in range(1, world + 1) if world % d == 0]}")
        ep_group = edp_group = None
        # new_group is collective over the whole world: every rank creates every group.
        for start in range(0, world, ep_size):
            ranks = list(range(start, start + ep_size))
            g = dist.new_group(ranks, timeout=timeout, backend=backend)
            if rank in ranks:
                ep_group = g
        for offset in range(ep_size):
            ranks = list(range(offset, world, ep_size))
            g = dist.new_group(ranks, timeout=timeout, backend=backend)
            if rank in ranks:
                edp_group = g
        dp_group = dist.new_group(list(range(world)), timeout=timeout, backend=backend)
        return cls(ep_size=ep_size, ep_rank=rank % ep_size,
                   ep_group=ep_group if ep_size > 1 else None,
                   edp_group=edp_group, dp_group=dp_group)

    @classmethod
    def from_deepspeed(cls, ep_size: int = 1) -> "ParallelGroups":
        """Reuse DeepSpeed's expert-parallel and expert-data-parallel groups (after
        deepspeed.init_distributed), so DeepSpeed's engine reduces expert gradients over the
        same groups our all-to-all uses."""
        from tagmoe_dist.parallel.hosts import deepspeed_groups
        return cls(**deepspeed_groups(ep_size))

    @classmethod
    def from_megatron(cls, sequence_parallel: bool = False) -> "ParallelGroups":
        """Megatron-core's TP, PP, DP, EP, expert-TP and expert-DP groups (after
        `parallel_state.initialize_model_parallel`); `sequence_parallel` is
        TransformerConfig.sequence_parallel, which parallel_state does not hold."""
        from tagmoe_dist.parallel.hosts import megatron_groups
        return cls(**megatron_groups(sequence_parallel=sequence_parallel))

    @property
    def edp_size(self) -> int:
        return 1 if self.edp_group is None else dist.get_world_size(self.edp_group)

    @property
    def dp_size(self) -> int:
        return 1 if self.dp_group is None else dist.get_world_size(self.dp_group)

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds (contiguous block, DeepSpeed's layout)."""
        if num_experts % self.ep_size != 0:
            raise ValueError(f"MoEConfig.num_experts={num_experts} is not divisible by ep_size="
                             f"{self.ep_size}; pick num_experts as a multiple of ep_size")
        n = num_experts // self.ep_size
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)
