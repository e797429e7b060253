"""Dispatch -> experts -> combine on one rank (EP = 1, CPU), fused into one autograd function.

Notation: T tokens, D hidden, N kept (token, choice) rows sorted by expert, C rows of one chunk,
H first-projection width (2F for SwiGLU), F expert width, L experts.

Why fused and chunked: an unfused pipeline materialises [N, D] copies of the input and output
(32 MB each for 4096 tokens x 8 choices x 256). Fresh CPU buffers of that size are served by mmap
and page-fault on every step, and a block gathered long before its GEMM runs has left the cache;
with narrow experts (F = 64) every input byte feeds few multiply-adds, so a GEMM on cold rows runs
markedly slower than on cached ones. Here each chunk of whole experts (about 1 MB of rows) is
gathered into a small reused buffer that stays in cache, pushed through its experts, scaled by
its combine weight in the narrow F space, and scattered back from another reused buffer. Only
the narrow [N, H] pre-activations and [N, F] activations are kept for backward (no
recomputation of the activation); the backward gathers the input rows again from x, which costs
less than keeping a [N, D] copy that must round-trip through memory, and writes each expert's
weight gradient with its first GEMM and accumulates into it after (no zero-filled buffers).
"""

from __future__ import annotations

from typing import Callable, List

import torch

from tagmoe_dist.dispatch.permute import expert_chunks
from tagmoe_dist.experts import activation_backward


def _mm_into(out, a, b, first: bool):
    """out = a @ b on an expert's first block, out += a @ b after (no zero-fill of gradients)."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


class LocalMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w1_LDH, w2_LFD, w_N, token_N, counts: List[int], act: Callable,
                max_rows: int):
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
            C, tok_C = stop - start, token_N[start:stop]
            ids, sizes = [p[0] for p in pieces], [p[2] for p in pieces]
            x_CD = torch.index_select(x_TD, 0, tok_C, out=xbuf_RD[:C])
            h_CH = x_TD.new_empty(C, w1_LDH.shape[-1])
            for l, x_nD, h_nH in zip(ids, x_CD.split(sizes), h_CH.split(sizes)):
                torch.mm(x_nD, w1_L[l], out=h_nH)
            a_CF = act(h_CH)
            # the combine weight is applied in the narrow F space, before the second GEMM
            s_CF = torch.mul(a_CF, w_N[start:stop, None], out=sbuf_RF[:C])
            y_CD = ybuf_RD[:C]
            for l, s_nF, y_nD in zip(ids, s_CF.split(sizes), y_CD.split(sizes)):
                torch.mm(s_nF, w2_L[l], out=y_nD)
            y_TD.index_add_(0, tok_C, y_CD)
            saved_h.append(h_CH)
            saved_a.append(a_CF)
        ctx.save_for_backward(x_TD, w1_LDH, w2_LFD, w_N, token_N, *saved_h, *saved_a)
        ctx.chunks, ctx.act, ctx.rows = chunks, act, rows
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD):
        x_TD, w1_LDH, w2_LFD, w_N, token_N, *saved = ctx.saved_tensors
        n_chunks, act, D = len(ctx.chunks), ctx.act, x_TD.shape[1]
        saved_h, saved_a = saved[:n_chunks], saved[n_chunks:]
        gy_TD = gy_TD.contiguous()
        gx_TD = torch.zeros_like(x_TD)
        gw1, gw2 = torch.empty_like(w1_LDH), torch.empty_like(w2_LFD)
        gw_N = torch.empty_like(w_N)
        xbuf_RD, gbuf_RD = x_TD.new_empty(ctx.rows, D), x_TD.new_empty(ctx.rows, D)
        sbuf_RF = x_TD.new_empty(ctx.rows, w2_LFD.shape[1])
        seen = [False] * w1_LDH.shape[0]
        w1t_L, w2t_L = w1_LDH.transpose(1, 2).unbind(0), w2_LFD.transpose(1, 2).unbind(0)
        gw1_L, gw2_L = gw1.unbind(0), gw2.unbind(0)
        for (start, stop, pieces), h_CH, a_CF in zip(ctx.chunks, saved_h, saved_a):
            C, tok_C, w_C1 = stop - start, token_N[start:stop], w_N[start:stop, None]
            # the scaled activations are recomputed (one cheap pass) rather than kept: [N, F] less
            s_CF = torch.mul(a_CF, w_C1, out=sbuf_RF[:C])
            ids, sizes = [p[0] for p in pieces], [p[2] for p in pieces]
            gy_CD = torch.index_select(gy_TD, 0, tok_C, out=gbuf_RD[:C])
            ga_CF = torch.empty_like(a_CF)
            gy_n, ga_n, s_n = gy_CD.split(sizes), ga_CF.split(sizes), s_CF.split(sizes)
            for i, l in enumerate(ids):
                torch.mm(gy_n[i], w2t_L[l], out=ga_n[i])
                _mm_into(gw2_L[l], s_n[i].t(), gy_n[i], not seen[l])
            gw_N[start:stop] = torch.linalg.vecdot(ga_CF, a_CF)
            gh_CH = activation_backward(act, ga_CF.mul_(w_C1), h_CH)
            x_CD = torch.index_select(x_TD, 0, tok_C, out=xbuf_RD[:C])
            gx_CD = gy_CD                                   # reuse the gathered buffer
            x_n, gh_n, gx_n = x_CD.split(sizes), gh_CH.split(sizes), gy_n
            for i, l in enumerate(ids):
                _mm_into(gw1_L[l], x_n[i].t(), gh_n[i], not seen[l])
                torch.mm(gh_n[i], w1t_L[l], out=gx_n[i])
                seen[l] = True
            gx_TD.index_add_(0, tok_C, gx_CD)
        for l, touched in enumerate(seen):
            if not touched:                                 # an expert that received no rows
                gw1[l].zero_()
                gw2[l].zero_()
        return gx_TD, gw1, gw2, gw_N, None, None, None, None


def local_moe(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts, act, max_rows):
    return LocalMoE.apply(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts, act, max_rows)
