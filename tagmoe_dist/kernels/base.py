"""The expert-kernel interface: one operation, several implementations behind it.

Notation: T rows of the input, D hidden, N rows through the experts (sorted by expert), L local
experts, H first-projection width (2F for SwiGLU), F expert width.

The operation ("rows through experts"):

    y_TD[t] = sum over rows r with token_N[r] = t of  w_N[r] * expert_e(r)(x_TD[t])
    expert_e(x) = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]          (biases optional)

with rows sorted by expert, `counts_L[e]` rows each. At EP = 1 `token_N` are the tokens of the
sorted choices and `w_N` their combine weights: the kernel is dispatch, experts and combine fused.
Inside the expert-parallel pipeline (dispatch/overlap.py) each chunk calls it with the received
rows, `token_N` the regroup permutation and unit weights, so its output is in send order.

A kernel is stateless and has two methods, `forward` and `backward`, with no autograd inside:
the local path wraps them in `ExpertRows` (an autograd Function); the expert-parallel pipeline
calls them per chunk from its own autograd Function. Weight gradients of several calls (the
chunks of one backward) accumulate into one `ExpertGrads`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

import torch


@dataclasses.dataclass
class ExpertWeights:
    """The stacked weights of this rank's experts (one tensor per role, [L, ...])."""

    w1_LDH: torch.Tensor
    w2_LFD: torch.Tensor
    b1_LH: Optional[torch.Tensor] = None
    b2_LD: Optional[torch.Tensor] = None
    activation: str = "swiglu"

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.w1_LDH, self.w2_LFD, self.b1_LH, self.b2_LD) if t is not None)

    @property
    def has_bias(self) -> bool:
        return self.b1_LH is not None

    @classmethod
    def of(cls, tensors, activation: str, has_bias: bool) -> "ExpertWeights":
        if has_bias:
            return cls(*tensors, activation=activation)
        return cls(tensors[0], tensors[1], activation=activation)


class ExpertGrads:
    """Weight gradients accumulated over the kernel calls of one backward pass.

    `seen_L` marks experts that received rows in some call; `finish()` zeroes the others (the
    buffers start uninitialised: kernels write an expert's gradient with its first GEMM and
    accumulate after, instead of zero-filling every buffer first)."""

    def __init__(self, weights: ExpertWeights):
        self.w1 = torch.empty_like(weights.w1_LDH)
        self.w2 = torch.empty_like(weights.w2_LFD)
        self.b1 = torch.empty_like(weights.b1_LH) if weights.has_bias else None
        self.b2 = torch.empty_like(weights.b2_LD) if weights.has_bias else None
        self.seen_L = torch.zeros(weights.w1_LDH.shape[0], dtype=torch.uint8,
                                  device=weights.w1_LDH.device)
        # host-side kernels track the same on the host (reading seen_L would sync on GPU)
        self.host_seen: List[bool] = [False] * weights.w1_LDH.shape[0]
        # the caller sets `last` before the final call of a backward; a kernel that zeroes the
        # unseen experts itself on that call sets `done`, and finish() then has nothing to do
        self.last, self.done = True, False
        self.calls = 0                     # kernel calls so far in this backward

    def mark_host_seen(self) -> None:
        """Copy `host_seen` into `seen_L` (host-side kernels call it after their loop)."""
        ids = [l for l, s in enumerate(self.host_seen) if s]
        if ids:
            self.seen_L[torch.tensor(ids, device=self.seen_L.device)] = 1

    def finish(self) -> Tuple[torch.Tensor, ...]:
        if self.done:
            return tuple(g for g in (self.w1, self.w2, self.b1, self.b2) if g is not None)
        # torch.where, not masked assignment: no host sync, and garbage (even NaN) is replaced
        seen = self.seen_L.bool()
        out = []
        for g in (self.w1, self.w2, self.b1, self.b2):
            if g is not None:
                out.append(torch.where(seen.view((-1,) + (1,) * (g.dim() - 1)), g, 0))
        return tuple(out)


class ExpertKernel:
    """Interface of an expert kernel (see the module docstring for the operation)."""

    name = "abstract"

    def supports(self, weights: ExpertWeights, x_TD: torch.Tensor) -> Optional[str]:
        """None if this kernel can run on these tensors, else the reason it cannot."""
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, weights: ExpertWeights, w_N: torch.Tensor,
                token_N: torch.Tensor, counts_L: torch.Tensor, counts: Optional[List[int]],
                max_rows: int) -> Tuple[torch.Tensor, Any]:
        """Returns (y_TD, state for backward). `counts_L`: rows per expert (a tensor on the
        input's device); `counts`: the same as host ints when the caller already has them
        (kernels that need host sizes use them; None means not known without a sync)."""
        raise NotImplementedError

    def backward(self, state: Any, gy_TD: torch.Tensor, grads: ExpertGrads
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (gx_TD, gw_N) and accumulates the weight gradients into `grads`."""
        raise NotImplementedError


class ExpertRows(torch.autograd.Function):
    """Autograd around one kernel call: the fused local path (EP = 1)."""

    @staticmethod
    def forward(ctx, kernel: ExpertKernel, activation: str, has_bias: bool, counts: Optional[List[int]],
                max_rows: int, x_TD, w_N, token_N, counts_L, *weight_tensors):
        weights = ExpertWeights.of(weight_tensors, activation, has_bias)
        y_TD, ctx.state = kernel.forward(x_TD, weights, w_N, token_N, counts_L, counts, max_rows)
        ctx.kernel, ctx.weights = kernel, weights
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD):
        grads = ExpertGrads(ctx.weights)
        gx_TD, gw_N = ctx.kernel.backward(ctx.state, gy_TD.contiguous(), grads)
        ctx.state = None
        return (None, None, None, None, None, gx_TD, gw_N, None, None) + grads.finish()


def expert_rows(kernel: ExpertKernel, x_TD: torch.Tensor, weights: ExpertWeights, w_N: torch.Tensor,
                token_N: torch.Tensor, counts_L: torch.Tensor, counts: Optional[List[int]] = None,
                max_rows: int = 1 << 14) -> torch.Tensor:
    """The operation of the module docstring, differentiable in x, w_N and the weights."""
    return ExpertRows.apply(kernel, weights.activation, weights.has_bias, counts, max_rows,
                            x_TD, w_N, token_N, counts_L, *weights.tensors())
