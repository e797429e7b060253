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

Two implementations of that one algorithm: NativeLocalMoE runs it in C (csrc/moe_cpu.c, via
dispatch/native.py) and is what `local_moe` uses for CPU float32; LocalMoE runs it with torch ops
and is the fallback (no C compiler, other dtypes, TAGMOE_NATIVE=0). native_forward and
native_backward are also the per-chunk compute of the EP > 1 pipeline (dispatch/overlap.py).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from tagmoe_dist.dispatch import native
from tagmoe_dist.dispatch.permute import expert_chunks
from tagmoe_dist.experts import activation_backward, gelu, swiglu


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


class NativePlan:
    """What the native forward keeps for its backward: h, u and the chunk tables."""

    def __init__(self, h_NH, u_NF, chunk_C4, piece_P3, rows: int, act_id: int):
        self.h_NH, self.u_NF, self.chunk_C4, self.piece_P3 = h_NH, u_NF, chunk_C4, piece_P3
        self.rows, self.act_id = rows, act_id


def native_forward(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts: List[int], act_id: int,
                   max_rows: int):
    """y_TD = sum over rows r of w_N[r] * expert(r)(x_TD[token_N[r]]), rows sorted by expert
    (`counts` per expert), in one C call (csrc/moe_cpu.c). All tensors contiguous CPU float32
    (token_N int64). Returns (y_TD, plan for native_backward)."""
    lib, p = native.library(), native._ptr
    (T, D), H, F, N = x_TD.shape, w1_LDH.shape[-1], w2_LFD.shape[1], token_N.numel()
    chunks = expert_chunks(counts, max_rows)
    chunk_C4, piece_P3 = native.plan_tensors(chunks)
    rows = max(stop - start for start, stop, _ in chunks)
    y_TD = x_TD.new_zeros(T, D)
    h_NH, u_NF = x_TD.new_empty(N, H), x_TD.new_empty(N, F)          # kept for backward
    xbuf_RD, ybuf_RD, sbuf_RF = x_TD.new_empty(rows, D), x_TD.new_empty(rows, D), \
        x_TD.new_empty(rows, F)
    lib.tm_forward(D, H, F, act_id, p(x_TD), p(w1_LDH), p(w2_LFD), p(w_N), p(token_N),
                   len(chunks), p(chunk_C4), p(piece_P3), p(xbuf_RD), p(sbuf_RF), p(ybuf_RD),
                   p(h_NH), p(u_NF), p(y_TD))
    return y_TD, NativePlan(h_NH, u_NF, chunk_C4, piece_P3, rows, act_id)


def native_backward(plan: NativePlan, x_TD, w1_LDH, w2_LFD, w_N, token_N, gy_TD, gw1, gw2,
                    seen_L, finish: bool):
    """Gradients of native_forward: returns (gx_TD, gw_N) and writes gw1/gw2. Several calls
    may share gw1, gw2 and seen_L (uint8 [L], zeros before the first); the one with `finish`
    zeroes the weight gradients of experts that no call gave a row."""
    lib, p, R = native.library(), native._ptr, plan.rows
    (T, D), L, H, F = x_TD.shape, w1_LDH.shape[0], w1_LDH.shape[-1], w2_LFD.shape[1]
    gx_TD, gw_N = torch.zeros_like(x_TD), torch.empty_like(w_N)
    xbuf_RD, gbuf_RD = x_TD.new_empty(R, D), x_TD.new_empty(R, D)
    sbuf_RF, gabuf_RF, ghbuf_RH = x_TD.new_empty(R, F), x_TD.new_empty(R, F), x_TD.new_empty(R, H)
    lib.tm_backward(D, H, F, plan.act_id, L, p(x_TD), p(w1_LDH), p(w2_LFD), p(w_N),
                    p(token_N), plan.chunk_C4.shape[0], p(plan.chunk_C4), p(plan.piece_P3),
                    p(plan.h_NH), p(plan.u_NF), p(gy_TD), p(gx_TD), p(gw1), p(gw2), p(gw_N),
                    p(seen_L), p(xbuf_RD), p(gbuf_RD), p(sbuf_RF), p(gabuf_RF), p(ghbuf_RH),
                    int(finish))
    return gx_TD, gw_N


class NativeLocalMoE(torch.autograd.Function):
    """The same computation as LocalMoE, with the chunk loop in C (csrc/moe_cpu.c): one call for
    the forward and one for the backward instead of ~10 torch ops per expert. It keeps h and
    u_NF, the activation's tanh (GELU) or sigmoid (SwiGLU), rather than the activation itself,
    so the backward recomputes the activation and its derivative without evaluating exp."""

    @staticmethod
    def forward(ctx, x_TD, w1_LDH, w2_LFD, w_N, token_N, counts: List[int], act_id: int,
                max_rows: int):
        args = [t.contiguous() for t in (x_TD, w1_LDH, w2_LFD, w_N, token_N)]
        y_TD, ctx.plan = native_forward(*args, counts, act_id, max_rows)
        ctx.save_for_backward(*args)
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD):
        x_TD, w1_LDH, w2_LFD, w_N, token_N = ctx.saved_tensors
        gw1, gw2 = torch.empty_like(w1_LDH), torch.empty_like(w2_LFD)
        seen_L = torch.zeros(w1_LDH.shape[0], dtype=torch.uint8)
        gx_TD, gw_N = native_backward(ctx.plan, x_TD, w1_LDH, w2_LFD, w_N, token_N,
                                      gy_TD.contiguous(), gw1, gw2, seen_L, finish=True)
        return gx_TD, gw1, gw2, gw_N, None, None, None, None


_NATIVE_ACT = {gelu: native.ACTIVATIONS["gelu"], swiglu: native.ACTIVATIONS["swiglu"]}


def native_act_id(act, *tensors) -> Optional[int]:
    """The native kernel's id of `act` if the kernel can run on these tensors, else None."""
    if act in _NATIVE_ACT and native.usable(*tensors):
        return _NATIVE_ACT[act]
    return None


def local_moe(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts, act, max_rows):
    """Rows token_N (sorted by expert, `counts` per expert) of x through their experts, each
    scaled by w_N and summed back per token. The native kernel where it applies, else torch."""
    act_id = native_act_id(act, x_TD, w1_LDH, w2_LFD, w_N)
    if act_id is not None:
        return NativeLocalMoE.apply(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts, act_id, max_rows)
    return LocalMoE.apply(x_TD, w1_LDH, w2_LFD, w_N, token_N, counts, act, max_rows)
