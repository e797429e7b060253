"""The token dispatcher: a routing decision in, the experts' outputs combined per token out.

Notation: T local tokens, K top-k, N kept (token, choice) rows, E experts, S EP ranks,
L = E / S local experts, R rows received.

    x_TD --sort by expert--> rows N (only indices: rows are gathered by the kernel, chunk by chunk)
         EP = 1: experts' kernel (gather | expert MLPs | weighted scatter-add, fused) --> y_TD
         EP > 1: --counts all-to-all--> split sizes on the host (the one host sync of the layer)
                 --per chunk: gather | all-to-all | experts' kernel in [source][expert] order |
                              all-to-all back | weighted scatter-add--> y_TD

Phases (dispatch/overlap.py): gathering and scattering are local index work and never
communicate; only the all-to-alls communicate, which lets the schedule overlap one chunk's
exchange with another chunk's expert compute. The expert math is the experts module's (its
kernel, kernels/base.py); the dispatcher only moves rows and indices.

Chunk count at EP > 1 (`MoEConfig.overlap_chunks`): a number, or "auto". "auto" never measures
inside forward: with rates from `plan_overlap` (measured once, outside forward, costmodel.py) it
takes the alpha-beta model's choice; without them, a default that needs no measurement (CPU:
enough chunks for ~1 MB buffers; GPU: 2, one exchange in flight while the other computes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tagmoe_dist.dispatch import permute as P
from tagmoe_dist.dispatch.alltoall import all_to_all_counts
from tagmoe_dist.dispatch.costmodel import Rates, choose_chunks
from tagmoe_dist.dispatch.overlap import expert_parallel_moe, plan_chunks
from tagmoe_dist.gating.topk import RouterOutput
from tagmoe_dist.parallel import ParallelGroups

MAX_AUTO_CHUNKS = 8
GPU_DEFAULT_CHUNKS = 2


class DispatchPlan:
    """Where each kept choice goes: rows sorted by expert (`token_N`, combine weights `w_N`)
    and rows per expert `counts_E` (device tensors)."""

    def __init__(self, token_N: torch.Tensor, w_N: torch.Tensor, counts_E: torch.Tensor):
        self.token_N, self.w_N, self.counts_E = token_N, w_N, counts_E


class TokenDispatcher:
    def __init__(self, num_experts: int, top_k: int, groups: ParallelGroups,
                 overlap_chunks="auto"):
        self.num_experts, self.top_k, self.groups = num_experts, top_k, groups
        self.ep_size = groups.ep_size
        self.num_local = num_experts // groups.ep_size
        self.overlap_chunks = overlap_chunks
        # CPU: fresh buffers of 32 MB and more are mmapped and page-fault on every step, and an
        # expert block gathered long before its GEMM has left the cache; chunks of about 1 MB
        # keep gather -> GEMM -> activation -> GEMM -> scatter within cache (measured best).
        self.buffer_bytes = 1 << 20
        self.rates: Optional[Rates] = None   # set by plan_overlap (costmodel.measure_rates)

    # ------------------------------------------------------------------ phases
    def plan(self, x_TD: torch.Tensor, route: RouterOutput) -> DispatchPlan:
        """Sort the kept choices by expert (local index work, no communication)."""
        perm_N, counts_E = P.sort_by_expert(route.topk_ids_TK, self.num_experts, route.keep_TK)
        token_N = torch.div(perm_N, self.top_k, rounding_mode="floor")
        w_N = route.topk_weights_TK.reshape(-1).index_select(0, perm_N).to(x_TD.dtype)
        return DispatchPlan(token_N, w_N, counts_E)

    def __call__(self, x_TD: torch.Tensor, plan: DispatchPlan, experts,
                 shared=None) -> torch.Tensor:
        """The experts' outputs for every token, combined with its routing weights (+ the shared
        expert's output when `shared` is given). Picks the local or the expert-parallel path."""
        rows = self._rows_per_buffer(x_TD, experts)
        if self.ep_size == 1:
            y_TD = experts(x_TD, plan.token_N, plan.w_N, plan.counts_E, max_rows=rows)
            return y_TD if shared is None else y_TD + shared(x_TD)
        return self._expert_parallel(x_TD, plan, experts, shared, rows)

    # ------------------------------------------------------------------ EP > 1
    def _expert_parallel(self, x_TD, plan: DispatchPlan, experts, shared, rows):
        """All-to-all dispatch -> local experts -> all-to-all combine, in chunks; the shared
        expert runs while the first chunk is in flight."""
        S, L, group = self.ep_size, self.num_local, self.groups.ep_group
        counts_E = plan.counts_E
        # One exchange carries the per-expert counts and each sender's row total; the totals let
        # every rank of the group pick the same chunk count (collectives must match).
        send_SL1 = torch.cat([counts_E.view(S, L), counts_E.sum().view(1, 1).expand(S, 1)], 1)
        recv_SL1 = all_to_all_counts(send_SL1, group)
        # the layer's one host sync: split sizes of the all-to-alls must be known on the host
        host = torch.cat([recv_SL1.reshape(-1), counts_E]).tolist()
        host_recv = [host[s * (L + 1):s * (L + 1) + L] for s in range(S)]
        max_rows = max(host[s * (L + 1) + L] for s in range(S))
        chunks = plan_chunks(counts_E, recv_SL1[:, :L], host[S * (L + 1):], host_recv,
                             self._num_chunks(x_TD, experts, max_rows))
        return expert_parallel_moe(x_TD, plan.w_N, plan.token_N, chunks, experts, group, shared,
                                   rows)

    def _rows_per_buffer(self, x_TD: torch.Tensor, experts) -> int:
        width = max(x_TD.shape[1], experts.w1.shape[-1])
        return max(1, self.buffer_bytes // (x_TD.element_size() * width))

    def _num_chunks(self, x_TD: torch.Tensor, experts, max_rows: int) -> int:
        """The chunk count, from group-wide inputs (the largest sender's rows), so every rank of
        the group picks the same one. No measurement here (see the module docstring)."""
        if self.overlap_chunks != "auto":
            return self.overlap_chunks
        on_cpu = x_TD.device.type == "cpu"
        n = 1 if on_cpu else GPU_DEFAULT_CHUNKS
        if self.rates is not None:
            D, F = x_TD.shape[1], experts.w2.shape[1]
            n = choose_chunks(max_rows * D * x_TD.element_size(), max_rows, D, F, self.rates,
                              experts.activation, ep=self.ep_size, max_chunks=MAX_AUTO_CHUNKS)
        if on_cpu:   # and at least enough chunks to keep CPU buffers near `buffer_bytes`
            n = max(n, math.ceil(max_rows / self._rows_per_buffer(x_TD, experts)))
        return max(1, min(MAX_AUTO_CHUNKS, n))
