"""Expert-parallel dispatch -> experts -> combine in chunks, with the all-to-all of one chunk in
flight while the experts compute another, in the forward *and* the backward pass.

Notation: T local tokens, D hidden, N rows this rank sends (kept choices, sorted by global expert),
S EP ranks, L local experts, H first-projection width, C chunks, R rows received.

Each chunk's experts run in the layer's expert kernel (kernels/base.py, passed in: the dispatcher
never touches expert weights itself), called with the received rows, the regroup permutation as
its row index and unit weights, so it reads rows in [source][expert] order, computes them grouped
by expert, and writes its output straight back in send order.

How chunks are cut (pure functions in permute.py): every (destination expert) block of the sorted
send buffer, and correspondingly every (source rank, local expert) block of the receive side, is
split into C near-equal parts with the same rule, so both sides derive every chunk's split sizes
from the one token-count exchange; no per-chunk count exchange and no extra host sync.

Forward schedule, identical on every rank (collectives must be issued in the same order):
  1. issue dispatch(0)
  2. for c in chunks: issue dispatch(c+1); wait dispatch(c); experts(c); issue combine(c);
                      wait combine(c-1) and scatter its weighted rows into y
  3. wait the last combine and scatter it
Backward mirrors it: the gradient of chunk c+1's outputs travels while the experts run the
backward of chunk c, and the input gradients travel back while the next chunk computes.
On CPU the gloo backend runs the exchanges on its own thread, so they overlap with the compute
of the calling thread.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from tagmoe_dist.dispatch import permute as P
from tagmoe_dist.dispatch.alltoall import all_to_all_start
from tagmoe_dist.kernels import native
from tagmoe_dist.kernels.base import ExpertGrads, ExpertKernel, ExpertWeights


class _Chunk:
    """Index plan of one chunk: device index tensors and host split sizes."""

    def __init__(self, send_rows, regroup, restore, in_splits: List[int], out_splits: List[int],
                 counts_L: List[int], counts_L_dev: torch.Tensor):
        self.send_rows = send_rows           # rows of the sorted send buffer in this chunk
        self.regroup, self.restore = regroup, restore   # [source][expert] <-> [expert][source]
        self.in_splits, self.out_splits = in_splits, out_splits   # rows sent to / received from each rank
        self.counts_L, self.counts_L_dev = counts_L, counts_L_dev  # received rows per local expert
        self.tok = self.w = None             # this rank's tokens / combine weights of the chunk
        self._ones = None

    def ones_R(self, like: torch.Tensor) -> torch.Tensor:
        """Unit combine weights for the received rows (the real weights are applied by the
        sender, after the combine)."""
        if self._ones is None:
            self._ones = like.new_ones(self.regroup.shape[0])
        return self._ones


def _part(m: int, c: int, C: int) -> int:
    """Part c of a count m split into C near-equal parts (the rule of permute.split_counts)."""
    return m // C + (c < m % C)


def plan_chunks(counts_E: torch.Tensor, recv_SL: torch.Tensor, host_counts_E: List[int],
                host_recv_SL: List[List[int]], num_chunks: int) -> List[_Chunk]:
    """Index plans of `num_chunks` chunks. Index tensors are computed on the counts' device from
    the device counts; split sizes on the host from the host copies of the same counts (the one
    host sync of the layer made them), so planning adds no sync."""
    S, L = recv_SL.shape
    C = num_chunks
    parts_CE = P.split_counts(counts_E, C)
    parts_CSL = P.split_counts(recv_SL.reshape(-1), C).view(C, S, L)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    offsets_CE = torch.cumsum(parts_CE, 0) - parts_CE
    chunks = []
    for c in range(C):
        send = [[_part(host_counts_E[s * L + l], c, C) for l in range(L)] for s in range(S)]
        recv = [[_part(host_recv_SL[s][l], c, C) for l in range(L)] for s in range(S)]
        n_send, n_recv = sum(map(sum, send)), sum(map(sum, recv))
        counts_L = [sum(recv[s][l] for s in range(S)) for l in range(L)]
        chunks.append(_Chunk(
            P.block_rows(starts_E + offsets_CE[c], parts_CE[c], total=n_send),
            P.chunk_sort_index(parts_CSL[c], n_recv),
            P.chunk_sort_index(parts_CSL[c].t().contiguous(), n_recv),
            [sum(r) for r in send], [sum(r) for r in recv], counts_L, parts_CSL[c].sum(0)))
    return chunks


class ExpertParallelMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_N, token_N, chunks: List[_Chunk], kernel: ExpertKernel,
                activation: str, has_bias: bool, group, shared: Optional[Callable],
                needs_grad: bool, max_rows: int, *weight_tensors):
        weights = ExpertWeights.of(weight_tensors, activation, has_bias)
        ctx.needs_grad = needs_grad
        T, D = x_TD.shape
        x_TD = x_TD.contiguous()
        states, saved_out = [], []
        for ch in chunks:          # this rank's tokens and combine weights of each chunk's rows
            ch.tok, ch.w = token_N.index_select(0, ch.send_rows), w_N.index_select(0, ch.send_rows)

        def dispatch(c):
            ch = chunks[c]
            return all_to_all_start(native.gather_rows(x_TD, ch.tok), ch.out_splits, ch.in_splits,
                                    group)

        def scatter(c, back_ND, work):
            work.wait()
            native.scatter_add_rows(y_TD, chunks[c].tok, back_ND, chunks[c].w)
            saved_out.append(back_ND)

        inflight = {0: dispatch(0)} if chunks else {}
        # The shared expert needs no exchange: run it while the first chunk travels. Its graph is
        # built here and back-propagated inside backward(), again while tokens travel.
        shared_in = shared_out = None
        if shared is not None and ctx.needs_grad:
            with torch.enable_grad():
                shared_in = x_TD.detach().requires_grad_(True)
                shared_out = shared(shared_in)
            y_TD = shared_out.detach().clone()
        elif shared is not None:                    # evaluation: no graph to keep
            y_TD = shared(x_TD)
        else:
            y_TD = x_TD.new_zeros(T, D)
        pending = None
        for c, ch in enumerate(chunks):
            if c + 1 < len(chunks):
                inflight[c + 1] = dispatch(c + 1)
            recv_RD, work = inflight.pop(c)
            work.wait()
            o_send_RD, state = kernel.forward(recv_RD, weights, ch.ones_R(w_N), ch.regroup,
                                              ch.counts_L_dev, ch.counts_L, max_rows)
            states.append(state if needs_grad else None)
            combine = all_to_all_start(o_send_RD, ch.in_splits, ch.out_splits, group)
            if pending is not None:
                scatter(*pending)
            pending = (c, *combine)
        if pending is not None:
            scatter(*pending)
        ctx.save_for_backward(w_N, *saved_out)
        ctx.chunks, ctx.group, ctx.T, ctx.kernel, ctx.states = chunks, group, T, kernel, states
        ctx.weights = weights
        ctx.shared = (shared_in, shared_out)
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD):
        w_N, *saved_out = ctx.saved_tensors
        chunks, group, kernel, C = ctx.chunks, ctx.group, ctx.kernel, len(ctx.chunks)
        gy_TD = gy_TD.contiguous()
        gx_TD = gy_TD.new_zeros(ctx.T, gy_TD.shape[1])
        grads = ExpertGrads(ctx.weights)
        gw_N = torch.zeros_like(w_N)

        def send_grad(c):
            ch = chunks[c]
            g_out, gw_N[ch.send_rows] = native.gather_scale_dot(gy_TD, ch.tok, ch.w, saved_out[c])
            return all_to_all_start(g_out, ch.out_splits, ch.in_splits, group)

        def gather_back(c, g_ND, work):
            work.wait()
            native.scatter_add_rows(gx_TD, chunks[c].tok, g_ND)

        inflight = {0: send_grad(0)} if chunks else {}
        shared_in, shared_out = ctx.shared
        if shared_out is not None:
            # reentrant backward of the shared expert's own graph, while chunk 0's grads travel
            torch.autograd.backward(shared_out, gy_TD)
            gx_TD += shared_in.grad
            ctx.shared = (None, None)
        pending = None
        for c in range(C):
            if c + 1 < C:
                inflight[c + 1] = send_grad(c + 1)
            recv_RD, work = inflight.pop(c)
            work.wait()
            grads.last = c == C - 1
            gx_send_RD, _ = kernel.backward(ctx.states[c], recv_RD, grads)
            ctx.states[c] = None
            back = all_to_all_start(gx_send_RD, chunks[c].in_splits, chunks[c].out_splits, group)
            if pending is not None:
                gather_back(*pending)
            pending = (c, *back)
        if pending is not None:
            gather_back(*pending)
        wgrads = grads.finish() if C else tuple(torch.zeros_like(t) for t in ctx.weights.tensors())
        return (gx_TD, gw_N) + (None,) * 9 + wgrads


def expert_parallel_moe(x_TD, w_N, token_N, chunks, experts, group, shared=None,
                        max_rows: int = 1024):
    """Routed experts (+ the shared expert, if given, overlapped with the first exchange).
    `experts`: the layer's expert module (its kernel computes each chunk). `max_rows`: rows per
    cached block inside CPU kernels (the dispatcher's buffer size)."""
    weights = experts.weights()
    # Inside forward() grad mode is off; whether a backward will come is decided out here.
    return ExpertParallelMoE.apply(x_TD, w_N, token_N, chunks, experts.kernel_for(x_TD),
                                   weights.activation, weights.has_bias, group, shared,
                                   torch.is_grad_enabled(), max_rows, *weights.tensors())
