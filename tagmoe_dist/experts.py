"""The expert math: this rank's expert MLPs, their weights, and the kernel that computes them.

Notation: T rows of the input, N rows in expert order, D hidden, F expert width, H the first
projection's width (2F for SwiGLU: gate | up), L local experts.
Weights are stored stacked, `w1` [L, D, H] and `w2` [L, F, D] (+ optional biases `b1` [L, H],
`b2` [L, D]), so one kernel call covers all local experts and no per-expert module loop runs in
the hot path. Which kernel computes them is `MoEConfig.expert_kernel` (kernels/__init__.py).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from tagmoe_dist.kernels import select_kernel
from tagmoe_dist.kernels.activations import activation_fn
from tagmoe_dist.kernels.base import ExpertKernel, ExpertWeights, expert_rows
from tagmoe_dist.parallel.tensor import shard_ffn


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
                 shard: Tuple[int, int] = (0, 1), bias: bool = False, kernel: str = "auto"):
        super().__init__()
        self.global_ids = list(global_ids)
        self.activation = activation
        self.kernel_name = kernel
        # shard = (rank, size) over the expert-tensor-parallel group: this rank holds an F-slice
        # of every expert (w1 column-parallel, w2 row-parallel), cut from the global init.
        self.shard = shard
        if bias and shard[1] > 1:
            raise ValueError("MoEConfig.expert_mlp_bias is not supported with expert tensor "
                             "parallelism (expert_tensor_parallel_size > 1); use one or the other")
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(_sharded(init_expert_weights(
            self.global_ids, (hidden_size, width), init_std, base_seed), "w1", shard, activation))
        self.w2 = nn.Parameter(_sharded(init_expert_weights(
            self.global_ids, (ffn_hidden_size, hidden_size), init_std, base_seed + 1), "w2", shard,
            activation))
        # biases start at zero (as nn.Linear's would after upcycling a bias-free model)
        self.b1 = nn.Parameter(torch.zeros(len(self.global_ids), width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(len(self.global_ids), hidden_size)) if bias else None
        self._kernel_cache = {}

    @property
    def num_local_experts(self) -> int:
        return len(self.global_ids)

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w1, self.w2, self.b1, self.b2, self.activation)

    def kernel_for(self, x_TD: torch.Tensor) -> ExpertKernel:
        """The kernel that computes these experts on tensors like x_TD (chosen once per device,
        dtype and weight dtype; parameters may move after construction)."""
        key = (x_TD.device.type, x_TD.dtype, self.w1.dtype)
        if key not in self._kernel_cache:
            self._kernel_cache[key] = select_kernel(self.kernel_name, self.weights(), x_TD)
        return self._kernel_cache[key]

    def forward(self, x_TD: torch.Tensor, token_N: torch.Tensor, w_N: torch.Tensor,
                counts_L: torch.Tensor, counts: Optional[List[int]] = None,
                max_rows: int = 1 << 14) -> torch.Tensor:
        """y_TD[t] = sum over rows r with token_N[r] = t of w_N[r] * expert_e(r)(x_TD[t]), rows
        sorted by expert with counts_L[e] rows each (kernels/base.py): gather, expert MLPs and
        weighted combine in one fused, differentiable call."""
        return expert_rows(self.kernel_for(x_TD), x_TD, self.weights(), w_N, token_N, counts_L,
                           counts, max_rows)


class DenseMLP(nn.Module):
    """A plain FFN (the shared expert, and the dense baseline): D -> F -> D."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 init_std: float = 0.02, shard: Tuple[int, int] = (0, 1), bias: bool = False):
        super().__init__()
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.shard = shard      # (rank, size) over the tensor-parallel group, as in GroupedExperts
        if bias and shard[1] > 1:
            raise ValueError("a biased dense MLP cannot be tensor-parallel sharded here")
        self.w1 = nn.Parameter(_sharded(torch.randn(hidden_size, width) * init_std, "w1", shard,
                                        activation))
        self.w2 = nn.Parameter(_sharded(torch.randn(ffn_hidden_size, hidden_size) * init_std, "w2",
                                        shard, activation))
        self.b1 = nn.Parameter(torch.zeros(width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = x_TD @ self.w1
        y = self.act(h if self.b1 is None else h + self.b1) @ self.w2
        return y if self.b2 is None else y + self.b2
