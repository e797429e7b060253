"""The native CPU expert kernel (csrc/moe_cpu.c, loaded by kernels/native.py): the operation of
kernels/base.py in one C call for the forward and one for the backward, for float32 on CPU.

Notation: T rows of the input, D hidden, N rows sorted by expert, H first-projection width (2F
for SwiGLU), F expert width, L experts.

Why fused and chunked: an unfused pipeline materialises [N, D] copies of the input and output
(32 MB each for 4096 tokens x 8 choices x 256). Fresh CPU buffers of that size are served by mmap
and page-fault on every step, and a block gathered long before its GEMM runs has left the cache;
with narrow experts (F = 64) every input byte feeds few multiply-adds, so a GEMM on cold rows runs
markedly slower than on cached ones. Here each chunk of whole experts (about 1 MB of rows) is
gathered into a small reused buffer that stays in cache, pushed through its experts, scaled by
its combine weight in the narrow F space, and scattered back from another reused buffer. The
forward keeps h and u_NF, the activation's tanh (GELU) or sigmoid (SwiGLU), rather than the
activation itself, so the backward recomputes the activation and its derivative without
evaluating exp; it gathers the input rows again from x, which costs less than keeping a [N, D]
copy, and writes each expert's weight gradient with its first GEMM and accumulates after.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from tagmoe_dist.kernels import native
from tagmoe_dist.kernels.base import ExpertGrads, ExpertKernel, ExpertWeights
from tagmoe_dist.kernels.chunks import expert_chunks


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


class _State:
    def __init__(self, plan, x_TD, w1_LDH, w2_LFD, w_N, token_N):
        self.plan, self.x_TD, self.w1_LDH, self.w2_LFD = plan, x_TD, w1_LDH, w2_LFD
        self.w_N, self.token_N = w_N, token_N


class NativeKernel(ExpertKernel):
    name = "native"

    def supports(self, weights: ExpertWeights, x_TD: torch.Tensor) -> Optional[str]:
        if weights.has_bias:
            return "expert biases are not implemented in the native CPU kernel"
        if weights.activation not in native.ACTIVATIONS:
            return f"activation {weights.activation!r} has no native implementation"
        if x_TD.device.type != "cpu" or weights.w1_LDH.device.type != "cpu":
            return "the native kernel runs on CPU only"
        if x_TD.dtype != torch.float32 or weights.w1_LDH.dtype != torch.float32:
            return f"the native kernel computes in float32, got {x_TD.dtype}"
        if native.library() is None:
            return native.status()
        return None

    def forward(self, x_TD, weights: ExpertWeights, w_N, token_N, counts_L, counts, max_rows):
        counts = counts if counts is not None else counts_L.tolist()
        args = [t.contiguous() for t in (x_TD, weights.w1_LDH, weights.w2_LFD, w_N, token_N)]
        y_TD, plan = native_forward(*args, counts, native.ACTIVATIONS[weights.activation], max_rows)
        return y_TD, _State(plan, *args)

    def backward(self, st: _State, gy_TD, grads: ExpertGrads):
        out = native_backward(st.plan, st.x_TD, st.w1_LDH, st.w2_LFD, st.w_N, st.token_N,
                              gy_TD.contiguous(), grads.w1, grads.w2, grads.seen_L,
                              finish=grads.last)
        grads.done = grads.last           # the C kernel zeroed the experts no call gave a row
        return out
