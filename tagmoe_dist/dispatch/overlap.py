"""Expert-parallel dispatch -> experts -> combine in chunks, with the all-to-all of one chunk in
flight while the experts compute another, in the forward *and* the backward pass.

Notation: T local tokens, D hidden, N rows this rank sends (kept choices, sorted by global expert),
S EP ranks, L local experts, H first-projection width, C chunks, R rows received.

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

from tagmoe_dist.dispatch import native
from tagmoe_dist.dispatch import permute as P
from tagmoe_dist.dispatch.alltoall import all_to_all_start
from tagmoe_dist.dispatch.local import native_act_id, native_backward, native_forward
from tagmoe_dist.experts import activation_backward


def _blocks(counts: List[int]):
    start = 0
    for l, n in enumerate(counts):
        if n:
            yield l, start, n
        start += n


class _Chunk:
    """Index plan of one chunk (all host-side sizes known)."""

    def __init__(self, send_rows: torch.Tensor, send_SL: torch.Tensor, recv_SL: torch.Tensor,
                 device):
        self.send_rows = send_rows.to(device)                   # rows of the sorted send buffer
        self.in_splits = send_SL.sum(1).tolist()                # rows sent to each rank
        self.out_splits = recv_SL.sum(1).tolist()               # rows received from each rank
        R = sum(self.out_splits)
        # [source][expert] -> [expert][source] and back
        self.regroup = P.chunk_sort_index(recv_SL, R).to(device)
        self.restore = P.chunk_sort_index(recv_SL.t().contiguous(), R).to(device)
        self.counts_L = recv_SL.sum(0).tolist()
        self._ones = None

    def ones_R(self) -> torch.Tensor:
        """Unit combine weights for the received rows (the native kernel's w_N: the real
        weights are applied by the sender, after the combine)."""
        if self._ones is None:
            self._ones = torch.ones(self.regroup.numel(), device=self.regroup.device)
        return self._ones


def plan_chunks(counts_E: torch.Tensor, recv_SL: torch.Tensor, num_chunks: int,
                device=None) -> List[_Chunk]:
    """Index plans of `num_chunks` chunks, from host-side (CPU) counts."""
    S, L = recv_SL.shape
    parts_CE = P.split_counts(counts_E, num_chunks)
    parts_CSL = P.split_counts(recv_SL.reshape(-1), num_chunks).view(num_chunks, S, L)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    offsets_CE = torch.cumsum(parts_CE, 0) - parts_CE
    return [_Chunk(P.block_rows(starts_E + offsets_CE[c], parts_CE[c]),
                   parts_CE[c].view(S, L), parts_CSL[c], device) for c in range(num_chunks)]


class ExpertParallelMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w1_LDH, w2_LFD, w_N, token_N, chunks: List[_Chunk], act: Callable, group,
                shared: Optional[Callable], needs_grad: bool, max_rows: int):
        ctx.needs_grad = needs_grad
        T, D = x_TD.shape
        saved_x, saved_h, saved_a, saved_out = [], [], [], []
        # CPU float32: each chunk's experts run in the native kernel (dispatch/local.py), which
        # reads the received rows through the regroup index and writes its output straight into
        # send order (restore is regroup's inverse), so no regrouped copies are made.
        w1_LDH, w2_LFD = w1_LDH.contiguous(), w2_LFD.contiguous()
        act_id = native_act_id(act, x_TD, w1_LDH, w2_LFD, w_N)
        plans = []
        x_TD = x_TD.contiguous()
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
            if act_id is not None:
                o_send_RD, plan = native_forward(recv_RD, w1_LDH, w2_LFD, ch.ones_R(), ch.regroup,
                                                 ch.counts_L, act_id, max_rows)
                plans.append(plan)
                saved_x.append(recv_RD)
            else:
                x_RD = recv_RD.index_select(0, ch.regroup)
                h_RH = x_RD.new_empty(x_RD.shape[0], w1_LDH.shape[-1])
                for l, a, n in _blocks(ch.counts_L):
                    torch.mm(x_RD[a:a + n], w1_LDH[l], out=h_RH[a:a + n])
                a_RF = act(h_RH)
                o_RD = x_RD.new_empty(x_RD.shape)
                for l, a, n in _blocks(ch.counts_L):
                    torch.mm(a_RF[a:a + n], w2_LFD[l], out=o_RD[a:a + n])
                o_send_RD = o_RD.index_select(0, ch.restore)
                saved_x.append(x_RD)
                saved_h.append(h_RH)
                saved_a.append(a_RF)
            combine = all_to_all_start(o_send_RD, ch.in_splits, ch.out_splits, group)
            if pending is not None:
                scatter(*pending)
            pending = (c, *combine)
        if pending is not None:
            scatter(*pending)
        ctx.save_for_backward(w1_LDH, w2_LFD, w_N, token_N, *saved_x, *saved_h, *saved_a, *saved_out)
        ctx.chunks, ctx.act, ctx.group, ctx.T = chunks, act, group, T
        ctx.plans = plans
        ctx.shared = (shared_in, shared_out)
        return y_TD

    @staticmethod
    def backward(ctx, gy_TD):
        w1_LDH, w2_LFD, w_N, token_N, *rest = ctx.saved_tensors
        C, plans = len(ctx.chunks), ctx.plans
        if plans:                  # native chunks keep their h and u in the plans, not here
            saved_x, saved_out = rest[:C], rest[C:]
        else:
            saved_x, saved_h, saved_a, saved_out = (rest[i * C:(i + 1) * C] for i in range(4))
        chunks, act, group = ctx.chunks, ctx.act, ctx.group
        gy_TD = gy_TD.contiguous()
        gx_TD = torch.zeros(ctx.T, gy_TD.shape[1], dtype=gy_TD.dtype, device=gy_TD.device)
        if plans:                  # written by the chunks' first GEMMs, no zero-fill
            gw1, gw2 = torch.empty_like(w1_LDH), torch.empty_like(w2_LFD)
            seen_L = torch.zeros(w1_LDH.shape[0], dtype=torch.uint8)
        else:
            gw1, gw2 = torch.zeros_like(w1_LDH), torch.zeros_like(w2_LFD)
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
        for c, ch in enumerate(chunks):
            if c + 1 < C:
                inflight[c + 1] = send_grad(c + 1)
            recv_RD, work = inflight.pop(c)
            work.wait()
            if plans:
                gx_send_RD, _ = native_backward(plans[c], saved_x[c], w1_LDH, w2_LFD, ch.ones_R(),
                                                ch.regroup, recv_RD, gw1, gw2, seen_L,
                                                finish=c == C - 1)
            else:
                go_RD = recv_RD.index_select(0, ch.regroup)
                x_RD, h_RH, a_RF = saved_x[c], saved_h[c], saved_a[c]
                ga_RF = a_RF.new_empty(a_RF.shape)
                for l, a, n in _blocks(ch.counts_L):
                    torch.mm(go_RD[a:a + n], w2_LFD[l].t(), out=ga_RF[a:a + n])
                    gw2[l].addmm_(a_RF[a:a + n].t(), go_RD[a:a + n])
                gh_RH = activation_backward(act, ga_RF, h_RH)
                gx_RD = go_RD                               # reuse the regrouped buffer
                for l, a, n in _blocks(ch.counts_L):
                    torch.mm(gh_RH[a:a + n], w1_LDH[l].t(), out=gx_RD[a:a + n])
                    gw1[l].addmm_(x_RD[a:a + n].t(), gh_RH[a:a + n])
                gx_send_RD = gx_RD.index_select(0, ch.restore)
            back = all_to_all_start(gx_send_RD, ch.in_splits, ch.out_splits, group)
            if pending is not None:
                gather_back(*pending)
            pending = (c, *back)
        if pending is not None:
            gather_back(*pending)
        return gx_TD, gw1, gw2, gw_N, None, None, None, None, None, None, None


def expert_parallel_moe(x_TD, w1_LDH, w2_LFD, w_N, token_N, chunks, act, group, shared=None,
                        max_rows: int = 1024):
    """Routed experts (+ the shared expert, if given, overlapped with the first exchange).
    `max_rows`: rows per cached block inside the native kernel (the dispatcher's buffer size)."""
    # Inside forward() grad mode is off; whether a backward will come is decided out here.
    return ExpertParallelMoE.apply(x_TD, w1_LDH, w2_LFD, w_N, token_N, chunks, act, group, shared,
                                   torch.is_grad_enabled(), max_rows)
