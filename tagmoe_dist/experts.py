"""Expert MLPs computed as grouped matrix multiplies over contiguous token blocks.

Notation: N rows (tokens in expert order), D hidden, F expert width, L local experts.
Weights are stored stacked, `w1_LDF` ([L, D, 2F] for SwiGLU: gate | up) and `w2_LFD`, so one
grouped GEMM covers all local experts and no per-expert module loop runs in the hot path.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tagmoe_dist.tensor_parallel import shard_ffn

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's CPU backward
    rejects expanded (stride-0) gradients such as the one of `y.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def grouped_mm(x_ND: torch.Tensor, w_LDF: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
    """y[rows of expert l] = x[rows of expert l] @ w[l], rows grouped by `counts_L` (GPU path)."""
    if _HAS_GROUPED_MM and x_ND.dtype == w_LDF.dtype and x_ND.shape[0] > 0:
        offs_L = torch.cumsum(counts_L, 0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x_ND, w_LDF, offs=offs_L))
    blocks = torch.split(x_ND, counts_L.tolist())
    return torch.cat([b @ w for b, w in zip(blocks, w_LDF.unbind(0))])


def swiglu(h_NF2: torch.Tensor) -> torch.Tensor:
    gate, up = h_NF2.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(h_NF: torch.Tensor) -> torch.Tensor:
    return F.gelu(h_NF, approximate="tanh")


def activation_fn(name: str):
    return swiglu if name == "swiglu" else gelu


def activation_backward(act, grad_NF: torch.Tensor, h_NH: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh applied to grad, for the fused expert kernels (no autograd graph kept)."""
    if act is gelu:
        return torch.ops.aten.gelu_backward(grad_NF, h_NH, approximate="tanh")
    assert act is swiglu, act
    gate, up = h_NH.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(grad_NF * up, gate), grad_NF * F.silu(gate)], -1)


def init_expert_weights(global_ids: Sequence[int], shape: Sequence[int], std: float,
                        base_seed: int, dtype=torch.float32) -> torch.Tensor:
    """Stacked weights for the given global experts. Each expert draws from its own generator
    seeded by (base_seed, expert id), so the global weights do not depend on the EP layout and
    each rank only materialises its own experts."""
    out = torch.empty((len(global_ids),) + tuple(shape), dtype=dtype)
    for i, e in enumerate(global_ids):
        g = torch.Generator().manual_seed(base_seed * 1_000_003 + e)
        out[i].normal_(0.0, std, generator=g)
    return out


def _sharded(w: torch.Tensor, kind: str, shard: Tuple[int, int], activation: str) -> torch.Tensor:
    rank, size = shard
    if size == 1:
        return w
    return shard_ffn(w, kind, rank, size, gated=activation == "swiglu").contiguous()


class GroupedExperts(nn.Module):
    """The experts of one rank: `len(global_ids)` MLPs, D -> F -> D."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, global_ids: Sequence[int],
                 activation: str = "swiglu", init_std: float = 0.02, base_seed: int = 0,
                 shard: Tuple[int, int] = (0, 1)):
        super().__init__()
        self.global_ids = list(global_ids)
        self.activation = activation
        self.act = activation_fn(activation)
        # shard = (rank, size) over the expert-tensor-parallel group: this rank holds an F-slice
        # of every expert (w1 column-parallel, w2 row-parallel), cut from the global init.
        self.shard = shard
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(_sharded(init_expert_weights(
            self.global_ids, (hidden_size, width), init_std, base_seed), "w1", shard, activation))
        self.w2 = nn.Parameter(_sharded(init_expert_weights(
            self.global_ids, (ffn_hidden_size, hidden_size), init_std, base_seed + 1), "w2", shard,
            activation))

    @property
    def num_local_experts(self) -> int:
        return len(self.global_ids)

    def forward(self, x_ND: torch.Tensor, counts_L) -> torch.Tensor:
        """x_ND rows grouped by local expert; counts_L a tensor, or a list of ints (host side)."""
        if x_ND.is_cuda and _HAS_GROUPED_MM:
            counts_t = torch.as_tensor(counts_L, device=x_ND.device)
            return grouped_mm(self.act(grouped_mm(x_ND, self.w1, counts_t)), self.w2, counts_t)
        # CPU: the fused per-expert BLAS kernel of dispatch/local.py, rows already in order
        from tagmoe_dist.dispatch.local import local_moe
        counts = counts_L if isinstance(counts_L, list) else counts_L.tolist()
        N = x_ND.shape[0]
        rows = torch.arange(N, device=x_ND.device)
        return local_moe(x_ND, self.w1, self.w2, x_ND.new_ones(N), rows, counts, self.act,
                         max(N, 1))


class DenseMLP(nn.Module):
    """A plain FFN (the shared expert, and the dense baseline): D -> F -> D."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 init_std: float = 0.02, shard: Tuple[int, int] = (0, 1)):
        super().__init__()
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.shard = shard      # (rank, size) over the tensor-parallel group, as in GroupedExperts
        self.w1 = nn.Parameter(_sharded(torch.randn(hidden_size, width) * init_std, "w1", shard,
                                        activation))
        self.w2 = nn.Parameter(_sharded(torch.randn(ffn_hidden_size, hidden_size) * init_std, "w2",
                                        shard, activation))
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.act(x_TD @ self.w1) @ self.w2
