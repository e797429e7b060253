"""Expert MLPs computed as grouped matrix multiplies over contiguous token blocks.

Notation: N rows (tokens in expert order), D hidden, F expert width, L local experts.
Weights are stored stacked, `w1_LDF` ([L, D, 2F] for SwiGLU: gate | up) and `w2_LFD`, so one
grouped GEMM covers all local experts and no per-expert module loop runs in the hot path.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """y[rows of expert l] = x[rows of expert l] @ w[l], rows grouped by `counts_L`."""
    if _HAS_GROUPED_MM and x_ND.dtype == w_LDF.dtype and x_ND.shape[0] > 0:
        offs_L = torch.cumsum(counts_L, 0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x_ND, w_LDF, offs=offs_L))
    # Fallback: one matmul per expert (empty blocks still touch w so every expert gets a grad).
    blocks = torch.split(x_ND, counts_L.tolist())
    return torch.cat([b @ w for b, w in zip(blocks, w_LDF.unbind(0))])


def swiglu(h_NF2: torch.Tensor) -> torch.Tensor:
    gate, up = h_NF2.chunk(2, dim=-1)
    return F.silu(gate) * up


def activation_fn(name: str):
    return swiglu if name == "swiglu" else (lambda h: F.gelu(h, approximate="tanh"))


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


class GroupedExperts(nn.Module):
    """The experts of one rank: `len(global_ids)` MLPs, D -> F -> D."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, global_ids: Sequence[int],
                 activation: str = "swiglu", init_std: float = 0.02, base_seed: int = 0):
        super().__init__()
        self.global_ids = list(global_ids)
        self.activation = activation
        self.act = activation_fn(activation)
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(init_expert_weights(self.global_ids, (hidden_size, width),
                                                   init_std, base_seed))
        self.w2 = nn.Parameter(init_expert_weights(self.global_ids, (ffn_hidden_size, hidden_size),
                                                   init_std, base_seed + 1))

    @property
    def num_local_experts(self) -> int:
        return len(self.global_ids)

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        h_NF = self.act(grouped_mm(x_ND, self.w1, counts_L))
        return grouped_mm(h_NF, self.w2, counts_L)


class DenseMLP(nn.Module):
    """A plain FFN (the shared expert, and the dense baseline): D -> F -> D."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 init_std: float = 0.02):
        super().__init__()
        width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(torch.randn(hidden_size, width) * init_std)
        self.w2 = nn.Parameter(torch.randn(ffn_hidden_size, hidden_size) * init_std)
        self.act = activation_fn(activation)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.act(x_TD @ self.w1) @ self.w2
