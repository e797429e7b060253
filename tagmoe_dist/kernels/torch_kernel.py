"""The plain PyTorch expert kernel: the fallback that runs anywhere (no C compiler, any dtype,
any device), and the readable statement of what the native kernel computes.

Notation: T rows of the input, D hidden, N rows sorted by expert, C rows of one chunk, H
first-projection width (2F for SwiGLU), F expert width, L experts.

Same algorithm as the native CPU kernel (kernels/native_kernel.py): chunks of whole experts of
about `max_rows` rows are gathered into one reused buffer that stays in cache, pushed through
their experts, scaled by the combine weight in the narrow F space, and scattered back. Only the
[N, H] pre-activations and [N, F] activations are kept for backward; the backward gathers the
input rows again rather than keeping an [N, D] copy.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from tagmoe_dist.kernels.activations import activation_backward, activation_fn
from tagmoe_dist.kernels.base import ExpertGrads, ExpertKernel, ExpertWeights
from tagmoe_dist.kernels.chunks import expert_chunks


def _mm_into(out, a, b, first: bool):
    """out = a @ b on an expert's first block, out += a @ b after (no zero-fill of gradients)."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


class _State:
    def __init__(self, x_TD, weights, w_N, token_N, chunks, rows, saved_h, saved_a):
        self.x_TD, self.weights, self.w_N, self.token_N = x_TD, weights, w_N, token_N
        self.chunks, self.rows, self.saved_h, self.saved_a = chunks, rows, saved_h, saved_a


class TorchKernel(ExpertKernel):
    name = "torch"

    def supports(self, weights: ExpertWeights, x_TD: torch.Tensor) -> Optional[str]:
        return None

    def forward(self, x_TD, weights: ExpertWeights, w_N, token_N, counts_L, counts, max_rows):
        counts = counts if counts is not None else counts_L.tolist()
        act = activation_fn(weights.activation)
        w1_LDH, w2_LFD, b1_LH, b2_LD = weights.w1_LDH, weights.w2_LFD, weights.b1_LH, weights.b2_LD
        T, D = x_TD.shape
        y_TD = x_TD.new_zeros(T, D)
        chunks = expert_chunks(counts, max_rows)
        rows = max(stop - start for start, stop, _ in chunks)
        xbuf_RD, ybuf_RD = x_TD.new_empty(rows, D), x_TD.new_empty(rows, D)   # reused, cached
        sbuf_RF = x_TD.new_empty(rows, w2_LFD.shape[1])
        saved_h, saved_a = [], []
        # Per-expert views made once (one op each) rather than indexed per block: with 64
        # experts the Python-side indexing would otherwise cost as much as a GEMM.
        w1_L, w2_L = w1_LDH.unbind(0), w2_LFD.unbind(0)
        for start, stop, pieces in chunks:
            C, tok_C, w_C = stop - start, token_N[start:stop], w_N[start:stop]
            ids, sizes = [p[0] for p in pieces], [p[2] for p in pieces]
            x_CD = torch.index_select(x_TD, 0, tok_C, out=xbuf_RD[:C])
            h_CH = x_TD.new_empty(C, w1_LDH.shape[-1])
            for l, x_nD, h_nH in zip(ids, x_CD.split(sizes), h_CH.split(sizes)):
                if b1_LH is None:
                    torch.mm(x_nD, w1_L[l], out=h_nH)
                else:
                    torch.addmm(b1_LH[l], x_nD, w1_L[l], out=h_nH)
            a_CF = act(h_CH)
            # the combine weight is applied in the narrow F space, before the second GEMM
            s_CF = torch.mul(a_CF, w_C[:, None], out=sbuf_RF[:C])
            y_CD = ybuf_RD[:C]
            for l, s_nF, y_nD, w_n in zip(ids, s_CF.split(sizes), y_CD.split(sizes), w_C.split(sizes)):
                torch.mm(s_nF, w2_L[l], out=y_nD)
                if b2_LD is not None:
                    y_nD.addr_(w_n, b2_LD[l])          # w * b2: the bias is weighted as well
            y_TD.index_add_(0, tok_C, y_CD)
            saved_h.append(h_CH)
            saved_a.append(a_CF)
        return y_TD, _State(x_TD, weights, w_N, token_N, chunks, rows, saved_h, saved_a)

    def backward(self, st: _State, gy_TD, grads: ExpertGrads):
        x_TD, weights, w_N, token_N = st.x_TD, st.weights, st.w_N, st.token_N
        w1_LDH, w2_LFD, b2_LD = weights.w1_LDH, weights.w2_LFD, weights.b2_LD
        D = x_TD.shape[1]
        gx_TD = torch.zeros_like(x_TD)
        gw_N = torch.empty_like(w_N)
        xbuf_RD, gbuf_RD = x_TD.new_empty(st.rows, D), x_TD.new_empty(st.rows, D)
        sbuf_RF = x_TD.new_empty(st.rows, w2_LFD.shape[1])
        seen = grads.host_seen
        w1t_L, w2t_L = w1_LDH.transpose(1, 2).unbind(0), w2_LFD.transpose(1, 2).unbind(0)
        gw1_L, gw2_L = grads.w1.unbind(0), grads.w2.unbind(0)
        for (start, stop, pieces), h_CH, a_CF in zip(st.chunks, st.saved_h, st.saved_a):
            C, tok_C, w_C = stop - start, token_N[start:stop], w_N[start:stop]
            # the scaled activations are recomputed (one cheap pass) rather than kept: [N, F] less
            s_CF = torch.mul(a_CF, w_C[:, None], out=sbuf_RF[:C])
            ids, sizes = [p[0] for p in pieces], [p[2] for p in pieces]
            gy_CD = torch.index_select(gy_TD, 0, tok_C, out=gbuf_RD[:C])
            ga_CF = torch.empty_like(a_CF)
            gy_n, ga_n, s_n, w_n = gy_CD.split(sizes), ga_CF.split(sizes), s_CF.split(sizes), \
                w_C.split(sizes)
            for i, l in enumerate(ids):
                torch.mm(gy_n[i], w2t_L[l], out=ga_n[i])
                _mm_into(gw2_L[l], s_n[i].t(), gy_n[i], not seen[l])
                if b2_LD is not None:
                    gb2 = torch.mv(gy_n[i].t(), w_n[i])
                    grads.b2[l].copy_(gb2) if not seen[l] else grads.b2[l].add_(gb2)
            gw_N[start:stop] = torch.linalg.vecdot(ga_CF, a_CF)
            if b2_LD is not None:   # d(w * b2)/dw
                for i, l in enumerate(ids):
                    gw_N[start + sum(sizes[:i]):start + sum(sizes[:i + 1])] += gy_n[i] @ b2_LD[l]
            gh_CH = activation_backward(weights.activation, ga_CF.mul_(w_C[:, None]), h_CH)
            x_CD = torch.index_select(x_TD, 0, tok_C, out=xbuf_RD[:C])
            x_n, gh_n, gx_n = x_CD.split(sizes), gh_CH.split(sizes), gy_n   # reuse the gy buffer
            for i, l in enumerate(ids):
                _mm_into(gw1_L[l], x_n[i].t(), gh_n[i], not seen[l])
                if grads.b1 is not None:
                    gb1 = gh_n[i].sum(0)
                    grads.b1[l].copy_(gb1) if not seen[l] else grads.b1[l].add_(gb1)
                torch.mm(gh_n[i], w1t_L[l], out=gx_n[i])
                seen[l] = True
            gx_TD.index_add_(0, tok_C, gy_CD)
        if grads.last:
            for l, touched in enumerate(seen):
                if not touched:                             # an expert that received no rows
                    for g in (grads.w1, grads.w2, grads.b1, grads.b2):
                        if g is not None:
                            g[l].zero_()
            grads.done = True
        else:
            grads.mark_host_seen()
        return gx_TD, gw_N
