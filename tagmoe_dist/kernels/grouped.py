"""The grouped-GEMM expert kernel: `torch.nn.functional.grouped_mm` (CUDA; also CPU in torch
2.13), the operation of kernels/base.py as a handful of device ops with no host sync.

Notation: T rows of the input, D hidden, N rows sorted by expert, H first-projection width (2F
for SwiGLU), F expert width, L experts.

    x_ND = x_TD[token_N]                       gather
    h_NH = grouped_mm(x_ND, w1) (+ b1[e])      one GEMM over all experts, groups given by offsets
    s_NF = act(h_NH) * w_N                     the combine weight in the narrow F space
    y_ND = grouped_mm(s_NF, w2) (+ w_N b2[e])
    y_TD = index_add(token_N, y_ND)            combine

Group offsets come from `counts_L` on the device (a cumsum), so nothing reads sizes on the
host. The backward uses the k-grouped form for weight gradients: grouped_mm(x_ND.T, gh_NH)
gives [L, D, H] in one call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tagmoe_dist.kernels.activations import activation_backward, activation_fn
from tagmoe_dist.kernels.base import ExpertGrads, ExpertKernel, ExpertWeights

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _aligned(t: torch.Tensor) -> bool:
    # grouped_mm needs 16-byte aligned row strides
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]) and t.stride(-1) == 1


class _State:
    def __init__(self, x_ND, h_NH, a_NF, weights, w_N, token_N, offs_L, expert_N, T):
        self.x_ND, self.h_NH, self.a_NF, self.weights = x_ND, h_NH, a_NF, weights
        self.w_N, self.token_N, self.offs_L, self.expert_N, self.T = w_N, token_N, offs_L, expert_N, T


class GroupedMMKernel(ExpertKernel):
    name = "grouped_mm"

    def supports(self, weights: ExpertWeights, x_TD: torch.Tensor) -> Optional[str]:
        if not HAS_GROUPED_MM:
            return "torch.nn.functional.grouped_mm needs torch >= 2.9"
        if x_TD.dtype != weights.w1_LDH.dtype:
            return f"input dtype {x_TD.dtype} differs from the expert weights' {weights.w1_LDH.dtype}"
        D, H, F_ = weights.w1_LDH.shape[1], weights.w1_LDH.shape[2], weights.w2_LFD.shape[1]
        per16 = 16 // x_TD.element_size()
        if D % per16 or H % per16 or F_ % per16:
            return (f"grouped_mm needs hidden and expert widths that are multiples of {per16} for "
                    f"{x_TD.dtype} (16-byte rows), got D={D}, H={H}, F={F_}")
        return None

    def forward(self, x_TD, weights: ExpertWeights, w_N, token_N, counts_L, counts, max_rows):
        T, N = x_TD.shape[0], token_N.shape[0]
        offs_L = torch.cumsum(counts_L, 0).to(torch.int32)
        x_ND = x_TD.index_select(0, token_N)
        h_NH = F.grouped_mm(x_ND, weights.w1_LDH, offs=offs_L)
        expert_N = None
        if weights.has_bias:
            L = counts_L.shape[0]
            expert_N = torch.repeat_interleave(torch.arange(L, device=counts_L.device), counts_L,
                                               output_size=N)
            h_NH = h_NH + weights.b1_LH.index_select(0, expert_N)
        a_NF = activation_fn(weights.activation)(h_NH)
        w_N1 = w_N.to(a_NF.dtype)[:, None]
        y_ND = F.grouped_mm((a_NF * w_N1).contiguous(), weights.w2_LFD, offs=offs_L)
        if weights.has_bias:
            y_ND = y_ND + w_N1 * weights.b2_LD.index_select(0, expert_N)
        y_TD = x_TD.new_zeros(x_TD.shape).index_add_(0, token_N, y_ND)
        return y_TD, _State(x_ND, h_NH, a_NF, weights, w_N, token_N, offs_L, expert_N, T)

    def backward(self, st: _State, gy_TD, grads: ExpertGrads):
        wts, offs_L = st.weights, st.offs_L
        gy_ND = gy_TD.index_select(0, st.token_N)
        w_N1 = st.w_N.to(st.a_NF.dtype)[:, None]
        ga_NF = F.grouped_mm(gy_ND, wts.w2_LFD.transpose(1, 2), offs=offs_L)
        # d y / d w_N = (a @ w2 + b2) . gy = a . (gy @ w2^T) + b2 . gy
        gw_N = torch.linalg.vecdot(ga_NF, st.a_NF)
        if wts.has_bias:
            gw_N = gw_N + torch.linalg.vecdot(gy_ND, wts.b2_LD.index_select(0, st.expert_N))
        s_NF = (st.a_NF * w_N1).contiguous()
        gw2 = F.grouped_mm(s_NF.t(), gy_ND, offs=offs_L)
        gh_NH = activation_backward(wts.activation, ga_NF * w_N1, st.h_NH).contiguous()
        gw1 = F.grouped_mm(st.x_ND.t(), gh_NH, offs=offs_L)
        gx_ND = F.grouped_mm(gh_NH, wts.w1_LDH.transpose(1, 2), offs=offs_L)
        gx_TD = gy_TD.new_zeros((st.T, gy_TD.shape[1])).index_add_(0, st.token_N, gx_ND)
        new = {"w1": gw1, "w2": gw2}
        if wts.has_bias:
            L = wts.b1_LH.shape[0]
            new["b1"] = gh_NH.new_zeros(L, gh_NH.shape[1]).index_add_(0, st.expert_N, gh_NH)
            new["b2"] = gy_ND.new_zeros(L, gy_ND.shape[1]).index_add_(0, st.expert_N, gy_ND * w_N1)
        # an expert with no rows in this call contributes exact zeros (whatever grouped_mm
        # leaves in an empty group); the first call of a backward writes, later calls add
        has_rows_L = torch.diff(offs_L, prepend=offs_L.new_zeros(1)) > 0
        for name, g in new.items():
            g = torch.where(has_rows_L.view((-1,) + (1,) * (g.dim() - 1)), g, 0)
            acc = getattr(grads, name)
            acc.copy_(g) if grads.calls == 0 else acc.add_(g)
        grads.calls += 1
        grads.done = grads.last
        return gx_TD, gw_N
