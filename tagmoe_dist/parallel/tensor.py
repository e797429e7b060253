"""Tensor and sequence parallelism for the MoE layer: region functions with autograd, the pure
index math of weight and token shards, and the plan an MoE layer follows over a TP group.

Notation: T tokens, D hidden, F expert width, H first-projection width (2F for SwiGLU: gate | up),
K top-k, P ranks of the tensor-parallel (TP) group.

Region functions (every collective names its `group=`; Megatron-core's mappings.py has the same
four, but reads its groups from global state):
    copy_to_region          forward identity      backward all-reduce
    reduce_from_region      forward all-reduce    backward identity
    gather_sequence         forward all-gather    backward reduce-scatter
    reduce_scatter_sequence forward reduce-scatter backward all-gather
    scatter_sequence        forward split         backward all-gather
    gather_replicated       forward all-gather    backward split
The backward of each is its forward's adjoint under one convention: a tensor is either
*replicated* (every rank holds the whole value, and the whole gradient) or a *partial sum* (the
value, or the gradient, is the sum over ranks).

How an MoE layer uses a TP group of P ranks (`TensorParallelMoE`):
  1. Every rank gets all T tokens of its TP group: with sequence parallelism an all-gather of the
     [S/P, B, D] shards, otherwise they are already replicated.
  2. The router runs replicated (identical logits, choices and auxiliary losses on every rank).
  3. The expert work is split P ways, and each rank computes a *partial* y_TD:
       expert-tensor-parallel size == P: each rank holds an F-shard of every expert
         (column-parallel first projection, row-parallel second: act() is elementwise, so
         act(x W1[:, f]) W2[f, :] summed over the shards f is the full MLP);
       expert-tensor-parallel size == 1: each rank dispatches a contiguous 1/P of the tokens to
         whole experts (over EP when EP > 1) and leaves zeros elsewhere.
     The shared expert is F-sharded over the group in both cases.
  4. The partial outputs are summed once, after the combine (the combine is linear in the expert
     outputs): an all-reduce, or a reduce-scatter back to the sequence shards with SP.
Gradients: the expert inputs and the combine weights receive partial-sum gradients, so both pass
through `copy_to_region` (all-reduce in backward); everything replicated (router, aux losses)
gets whole gradients on every rank, so replicated parameters need no TP reduction by the host.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# pure index math (no process group)


def split_sizes(n: int, parts: int) -> List[int]:
    """Sizes of `parts` contiguous near-equal pieces of n (the first n % parts are one longer)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def token_slice(n: int, rank: int, parts: int) -> Tuple[int, int]:
    """[start, stop) of rank's piece of n tokens split into `parts` contiguous pieces."""
    sizes = split_sizes(n, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _check_divisible(width: int, size: int, what: str) -> None:
    if width % size != 0:
        raise ValueError(f"{what}={width} is not divisible by the expert-tensor-parallel size "
                         f"{size}; pick a width that is a multiple of it")


def shard_columns(w: torch.Tensor, rank: int, size: int, gated: bool) -> torch.Tensor:
    """Rank's column shard of a first projection w [..., H] (column-parallel).

    gated (SwiGLU, H = 2F, gate | up): the gate and up halves are sharded separately, so the shard
    is [gate_f | up_f] and `swiglu` (which splits its input in two) works on it unchanged."""
    if not gated:
        _check_divisible(w.shape[-1], size, "ffn width")
        return w.chunk(size, dim=-1)[rank]
    gate, up = w.chunk(2, dim=-1)
    _check_divisible(gate.shape[-1], size, "ffn width")
    return torch.cat([gate.chunk(size, dim=-1)[rank], up.chunk(size, dim=-1)[rank]], dim=-1)


def shard_rows(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank's row shard of a second projection w [..., F, D] (row-parallel)."""
    _check_divisible(w.shape[-2], size, "ffn width")
    return w.chunk(size, dim=-2)[rank]


def unshard_columns(parts: Sequence[torch.Tensor], gated: bool) -> torch.Tensor:
    """Inverse of `shard_columns` given every rank's shard, in rank order."""
    if not gated:
        return torch.cat(list(parts), dim=-1)
    halves = [p.chunk(2, dim=-1) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=-1)


def unshard_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(parts), dim=-2)


def shard_ffn(w: torch.Tensor, kind: str, rank: int, size: int, gated: bool) -> torch.Tensor:
    """Shard of an FFN weight: kind "w1" (first projection, columns) or "w2" (second, rows)."""
    return shard_columns(w, rank, size, gated) if kind == "w1" else shard_rows(w, rank, size)


def gather_ffn(w: torch.Tensor, kind: str, gated: bool, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole FFN weight from every rank's shard (a collective over `group`; no autograd)."""
    parts = [torch.empty_like(w) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, w.contiguous(), group=group)
    return unshard_columns(parts, gated) if kind == "w1" else unshard_rows(parts)


# ---------------------------------------------------------------------------------------------
# collectives along dim 0 (no autograd)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] * size,) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[0] % size != 0:
        raise ValueError(f"sequence parallelism needs the sequence length ({x.shape[0]}) to be "
                         f"divisible by the tensor-parallel size {size}")
    out = x.new_empty((x.shape[0] // size,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[0] % size != 0:
        raise ValueError(f"sequence parallelism needs the sequence length ({x.shape[0]}) to be "
                         f"divisible by the tensor-parallel size {size}")
    return x.chunk(size, dim=0)[rank].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


# ---------------------------------------------------------------------------------------------
# region functions with autograd


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group), None


class _GatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group), None


class _EnterSequenceParallel(torch.autograd.Function):
    """One all-gather, two views of its result: `x_rep` for replicated use (its gradient is whole
    on every rank: backward takes this rank's shard) and `x_part` for split work (its gradient is
    a partial sum: backward reduce-scatters). The gradients of both are added."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        full = _all_gather(x, group)
        return full, full.view_as(full)

    @staticmethod
    def backward(ctx, g_rep, g_part):
        g = None
        if g_part is not None:
            g = _reduce_scatter(g_part, ctx.group)
        if g_rep is not None:
            rep = _split(g_rep, ctx.group)
            g = rep if g is None else g + rep
        return g, None


def _dim0(fn, x, group, dim):
    if dim == 0:
        return fn(x, group)
    return fn(x.movedim(dim, 0), group).movedim(0, dim)


def copy_to_region(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Identity; backward all-reduces (x feeds work whose gradient is a partial sum)."""
    return x if group is None else _Copy.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """All-reduce of partial sums; backward identity."""
    return x if group is None else _Reduce.apply(x, group)


def gather_sequence(x, group, dim: int = 0):
    """All-gather along `dim`; backward reduce-scatter (the consumer's gradient is partial)."""
    return x if group is None else _dim0(_GatherSequence.apply, x, group, dim)


def gather_replicated(x, group, dim: int = 0):
    """All-gather along `dim`; backward split (the consumer's gradient is whole on every rank)."""
    return x if group is None else _dim0(_GatherReplicated.apply, x, group, dim)


def reduce_scatter_sequence(x, group, dim: int = 0):
    """Reduce-scatter of partial sums along `dim`; backward all-gather."""
    return x if group is None else _dim0(_ReduceScatterSequence.apply, x, group, dim)


def scatter_sequence(x, group, dim: int = 0):
    """This rank's piece along `dim` of a replicated tensor; backward all-gather."""
    return x if group is None else _dim0(_ScatterSequence.apply, x, group, dim)


def enter_sequence_parallel(x, group):
    """(x_rep, x_part): the gathered sequence for replicated and for split work (dim 0)."""
    return _EnterSequenceParallel.apply(x, group)


# ---------------------------------------------------------------------------------------------
# the plan of an MoE layer over a TP group


class TensorParallelMoE:
    """Steps 1-4 of the module docstring for one MoE layer. Build with `maybe` (None without TP)."""

    def __init__(self, groups, input_layout: str):
        self.group, self.size, self.rank = groups.tp_group, groups.tp_size, groups.tp_rank
        self.split_tokens = groups.etp_size == 1
        self.sequence_parallel = groups.sequence_parallel
        if self.sequence_parallel and input_layout == "bsh":
            raise ValueError("sequence parallelism shards the first dimension (the sequence, as in "
                             "Megatron-core): set MoEConfig.input_layout='sbh' (or 'th')")

    @staticmethod
    def maybe(groups, input_layout: str) -> Optional["TensorParallelMoE"]:
        check_groups(groups)
        return TensorParallelMoE(groups, input_layout) if groups.tp_size > 1 else None

    def enter(self, x: torch.Tensor):
        """(x for the router, x for the split expert work): step 1."""
        if self.sequence_parallel:
            return enter_sequence_parallel(x, self.group)
        return x, copy_to_region(x, self.group)

    def expert_inputs(self, xp_TD: torch.Tensor, route):
        """This rank's share of the expert work: step 3. The combine weights' gradient is a
        partial sum, like the expert inputs'."""
        weights_TK = copy_to_region(route.topk_weights_TK, self.group)
        if not self.split_tokens:
            return xp_TD, dataclasses.replace(route, topk_weights_TK=weights_TK)
        a, b = token_slice(xp_TD.shape[0], self.rank, self.size)
        ids_TK = route.topk_ids_TK[a:b]
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=route.counts_E.shape[0])
        keep_TK = None if route.keep_TK is None else route.keep_TK[a:b]
        return xp_TD[a:b], dataclasses.replace(
            route, topk_ids_TK=ids_TK, topk_weights_TK=weights_TK[a:b], keep_TK=keep_TK,
            probs_TE=route.probs_TE[a:b], counts_E=counts_E, losses={})

    def expert_outputs(self, y_TD: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The partial y over all T tokens (zeros outside this rank's slice when split by token)."""
        if not self.split_tokens:
            return y_TD
        a, b = token_slice(num_tokens, self.rank, self.size)
        return F.pad(y_TD, (0, 0, a, num_tokens - b))

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the partial outputs: step 4."""
        if self.sequence_parallel:
            return reduce_scatter_sequence(y, self.group)
        return reduce_from_region(y, self.group)


def check_groups(groups) -> None:
    """The TP layouts the MoE layer supports (user errors as ValueError)."""
    if groups.tp_size > 1 and groups.tp_group is None:
        raise ValueError(f"ParallelGroups.tp_size={groups.tp_size} needs a tp_group")
    if groups.etp_size not in (1, groups.tp_size):
        raise ValueError(f"expert-tensor-parallel size {groups.etp_size} must be 1 or the "
                         f"tensor-parallel size {groups.tp_size}: the MoE layer splits expert work "
                         "over the group whose ranks hold the same tokens (the TP group)")
    if groups.etp_size > 1:
        if groups.etp_group is None:
            raise ValueError(f"ParallelGroups.etp_size={groups.etp_size} needs an etp_group")
        if (dist.get_process_group_ranks(groups.etp_group)
                != dist.get_process_group_ranks(groups.tp_group)):
            raise ValueError("the expert-tensor-parallel group must hold the same ranks as the "
                             "tensor-parallel group (Megatron-core's default when "
                             "expert_tensor_parallel_size == tensor_model_parallel_size)")
