"""Variable-split all-to-all over the expert-parallel group.

Uses `all_to_all_single` (gloo supports uneven splits in that form; the list form is NCCL-only).
The backward of an all-to-all is the all-to-all with input and output splits swapped; the fused
pipeline (dispatch/overlap.py) issues those itself, chunk by chunk.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


def all_to_all_counts(counts_SL: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Exchange per-destination token counts: rank r sends counts_SL[s] to rank s and receives
    what every rank s will send it. Returns recv_counts_SL (rows = source ranks)."""
    recv_SL = torch.empty_like(counts_SL)
    dist.all_to_all_single(recv_SL, counts_SL.contiguous(), group=group)
    return recv_SL


def all_to_all_start(x: torch.Tensor, output_splits: List[int], input_splits: List[int],
                     group: dist.ProcessGroup):
    """Start an uneven all-to-all of rows; returns (output buffer, work). The caller waits on
    `work` before reading the buffer. Not differentiable by itself: the fused pipeline in
    dispatch/overlap.py runs the reverse exchange in its own backward."""
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                                  input_split_sizes=input_splits, group=group, async_op=True)
    return out, work
