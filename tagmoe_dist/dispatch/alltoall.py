"""Variable-split all-to-all over the expert-parallel group, with autograd.

Uses `all_to_all_single` (gloo supports uneven splits in that form; the list form is NCCL-only).
The backward of an all-to-all is the all-to-all with input and output splits swapped.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def all_to_all_counts(counts_SL: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Exchange per-destination token counts: rank r sends counts_SL[s] to rank s and receives
    what every rank s will send it. Returns recv_counts_SL (rows = source ranks)."""
    recv_SL = torch.empty_like(counts_SL)
    dist.all_to_all_single(recv_SL, counts_SL.contiguous(), group=group)
    return recv_SL


def _a2a(x: torch.Tensor, output_splits: List[int], input_splits: List[int],
         group: dist.ProcessGroup, async_op: bool = False):
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                                  input_split_sizes=input_splits, group=group, async_op=async_op)
    return out, work


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        out, _ = _a2a(x, output_splits, input_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_in, _ = _a2a(grad_out, input_splits, output_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int],
               group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Rows x[sum(input_splits[:s]) : ... + input_splits[s]] go to rank s; returns the rows
    received, grouped by source rank. Differentiable."""
    if group is None:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


class AsyncAllToAll:
    """An all-to-all started now and waited for later, differentiable through `wait()`.

    Used by the overlap schedule: start chunk i+1's exchange, compute chunk i, then wait.
    Forward: `start` launches the collective; `wait` returns the received tensor attached to the
    graph. Backward runs the reverse exchange synchronously inside the autograd engine.
    """

    def __init__(self, x: torch.Tensor, output_splits: List[int], input_splits: List[int],
                 group: dist.ProcessGroup):
        self.x, self.splits, self.group = x, (output_splits, input_splits), group
        with torch.no_grad():
            self.out, self.work = _a2a(x.detach(), output_splits, input_splits, group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return _AttachAllToAll.apply(self.x, self.out, self.splits, self.group)


class _AttachAllToAll(torch.autograd.Function):
    """Returns the already-received buffer; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, received, splits, group):
        ctx.splits, ctx.group = splits, group
        return received

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_in, _ = _a2a(grad_out, input_splits, output_splits, ctx.group)
        return grad_in, None, None, None
