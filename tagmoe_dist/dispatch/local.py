"""Dispatch -> experts -> combine on one rank (EP = 1, CPU), fused into one autograd function.

Notation: T tokens, D hidden, N kept (token, choice) rows sorted by expert, C rows of one chunk,
H first-projection width (2F for SwiGLU), F expert width, L experts.

Why fused and chunked: the unfused pipeline materialises [N, D] copies of the input and output
(32 MB each for 4096 tokens x 8 choices x 256). Fresh CPU buffers of 32 MB and more are served
by mmap and page-fault on every step, and a block gathered long before its GEMM runs has left
the cache; both cost more than the matmuls of fine-grained experts. Here each chunk of C rows
(about 1 MB) is gathered, pushed through its experts, scaled by its combine weight in the narrow
F space and scattered back while it is still in cache; the backward walks the same chunks and
accumulates the expert gradients in place. The gathered inputs [N, D], pre-activations [N, H]
and activations [N, F] are kept for backward (no recomputation), as any implementation keeps
its dispatched tokens.
"""

from __future__ import annotations

from typing import Callable, List

import torch

from tagmoe_dist.dispatch.permute import row_chunks
from tagmoe_dist.experts import activation_backward


class LocalMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w1_LDH, w2_LFD, w_N, token_N, counts: List[int], act: Callable,
                max_rows: int):
        T, D = x_TD.shape
        y_TD = x_TD.new_zeros(T, D)
        chunks = row_chunks(counts, max_rows)
        saved_h, saved_a, saved_x = [], [], []
        for start, stop, pieces in chunks:
            tok_C = token_N[start:stop]
            x_CD = x_TD.index_select(0, tok_C)
            h_CH = x_CD.new_empty(stop - start, w1_LDH.shape[-1])
            for l, a, n in pieces:
                torch.mm(x_CD[a:a + n], w1_LDH[l], out=h_CH[a:a + n])
            a_CF = act(h_CH)
            s_CF = a_CF * w_N[start:stop, None]             # combine weight applied in F space
            y_CD = torch.empty_like(x_CD)
            for l, a, n in pieces:
                torch.mm(s_CF[a:a + n], w2_LFD[l], out=y_CD[a:a + n])
            y_TD.index_add_(0, tok_C, y_CD)
            saved_h.append(h_CH)
            saved_a.append(a_CF)
            saved_x.append(x_CD)    # kept: gathering it again in backward costs more than it saves
        ctx.save_for_backward(x_TD, w1_LDH, w2_LFD, w_N, token_N, *saved_h, *saved_a, *saved_x)
        ctx.chunks, ctx.act = chunks, act
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD):
        x_TD, w1_LDH, w2_LFD, w_N, token_N, *saved = ctx.saved_tensors
        n = len(ctx.chunks)
        saved_h, saved_a, saved_x = saved[:n], saved[n:2 * n], saved[2 * n:]
        act = ctx.act
        gy_TD = gy_TD.contiguous()
        gx_TD = torch.zeros_like(x_TD)
        gw1 = torch.zeros_like(w1_LDH)
        gw2 = torch.zeros_like(w2_LFD)
        gw_N = torch.empty_like(w_N)
        for (start, stop, pieces), h_CH, a_CF, x_CD in zip(ctx.chunks, saved_h, saved_a, saved_x):
            tok_C = token_N[start:stop]
            gy_CD = gy_TD.index_select(0, tok_C)
            w_C1 = w_N[start:stop, None]
            s_CF = a_CF * w_C1
            gs_CF = s_CF.new_empty(s_CF.shape)
            for l, a, n in pieces:
                torch.mm(gy_CD[a:a + n], w2_LFD[l].t(), out=gs_CF[a:a + n])
                gw2[l].addmm_(s_CF[a:a + n].t(), gy_CD[a:a + n])
            gw_N[start:stop] = (gs_CF * a_CF).sum(1)
            gh_CH = activation_backward(act, gs_CF * w_C1, h_CH)
            gx_CD = gy_CD                                   # reuse the gathered buffer
            for l, a, n in pieces:
                torch.mm(gh_CH[a:a + n], w1_LDH[l].t(), out=gx_CD[a:a + n])
                gw1[l].addmm_(x_CD[a:a + n].t(), gh_CH[a:a + n])
            gx_TD.index_add_(0, tok_C, gx_CD)
        return gx_TD, gw1, gw2, gw_N, None, None, None, None


def local_moe(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts, act, max_rows):
    return LocalMoE.apply(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts, act, max_rows)
