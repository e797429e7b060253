"""The token dispatcher: routing decision in, expert outputs combined per token out.

Notation: T local tokens, K top-k, N kept (token, choice) rows, E experts, S EP ranks,
L = E / S local experts, R rows received.

    x_TD --sort by expert--> rows N (only indices: the rows are gathered chunk by chunk)
         --counts all-to-all--> split sizes on the host (the one host sync of the layer)
         --per chunk: gather | all-to-all | regroup by local expert | experts |
                      restore | all-to-all back | weighted scatter-add--> y_TD

Phase contract (dispatch/overlap.py): gathering, regrouping, restoring and scattering are local
index work and never communicate; only the all-to-alls communicate, which is what lets the
schedule overlap one chunk's exchange with another chunk's expert compute.
"""

from __future__ import annotations

import math

import torch

from tagmoe_dist.dispatch import permute as P
from tagmoe_dist.dispatch.alltoall import all_to_all_counts
from tagmoe_dist.dispatch.local import local_moe
from tagmoe_dist.dispatch.overlap import expert_parallel_moe, plan_chunks
from tagmoe_dist.gating.topk import RouterOutput
from tagmoe_dist.parallel import ParallelGroups

MAX_AUTO_CHUNKS = 8


class AllToAllDispatcher:
    def __init__(self, num_experts: int, top_k: int, groups: ParallelGroups):
        self.num_experts, self.top_k, self.groups = num_experts, top_k, groups
        self.ep_size = groups.ep_size
        self.num_local = num_experts // groups.ep_size
        # CPU: fresh buffers of 32 MB and more are mmapped and page-fault on every step, and an
        # expert block gathered long before its GEMM has left the cache; chunks of about 1 MB
        # keep gather -> GEMM -> activation -> GEMM -> scatter within cache (measured best).
        self.buffer_bytes = 1 << 20
        self._rates = None   # measured link / compute rates for overlap_chunks="auto"

    def _sorted_rows(self, x_TD: torch.Tensor, route: RouterOutput):
        perm_N, counts_E = P.sort_by_expert(route.topk_ids_TK, self.num_experts, route.keep_TK)
        token_N = torch.div(perm_N, self.top_k, rounding_mode="floor")
        w_N = route.topk_weights_TK.reshape(-1).index_select(0, perm_N).to(x_TD.dtype)
        return token_N, w_N, counts_E

    def _rows_per_buffer(self, x_TD: torch.Tensor, experts) -> int:
        width = max(x_TD.shape[1], experts.w1.shape[-1])
        return max(1, self.buffer_bytes // (x_TD.element_size() * width))

    def _auto_chunks(self, x_TD: torch.Tensor, experts, max_rows: int) -> int:
        """Chunk count from the alpha-beta model (planner.py) with this system's measured
        all-to-all latency / bandwidth and expert FLOP rate (measured once per layer, agreed over
        the EP group), and at least enough chunks to keep CPU buffers near `buffer_bytes`.
        Inputs are group-wide (the largest sender's rows), so every rank picks the same count."""
        from tagmoe_dist.planner import choose_chunks, measure_rates
        D, F = x_TD.shape[1], experts.w2.shape[1]
        if self._rates is None:
            self._rates = measure_rates(self.groups, hidden=D, ffn=F,
                                        activation=experts.activation, reps=3)
        n = choose_chunks(max_rows * D * x_TD.element_size(), max_rows, D, F, self._rates,
                          experts.activation, ep=self.ep_size, max_chunks=MAX_AUTO_CHUNKS)
        if not x_TD.is_cuda:
            n = max(n, math.ceil(max_rows / self._rows_per_buffer(x_TD, experts)))
        return max(1, min(MAX_AUTO_CHUNKS, n))

    # ------------------------------------------------------------------ EP = 1
    def local(self, x_TD: torch.Tensor, route: RouterOutput, experts) -> torch.Tensor:
        """Sort -> experts -> weighted combine on this rank (dispatch/local.py)."""
        token_N, w_N, counts_E = self._sorted_rows(x_TD, route)
        if x_TD.is_cuda:
            y_ND = experts(x_TD.index_select(0, token_N), counts_E)
            return x_TD.new_zeros(x_TD.shape).index_add_(0, token_N, y_ND * w_N[:, None])
        return local_moe(x_TD, experts.w1, experts.w2, w_N, token_N, counts_E.tolist(),
                         experts.act, self._rows_per_buffer(x_TD, experts))

    # ------------------------------------------------------------------ EP > 1
    def expert_parallel(self, x_TD: torch.Tensor, route: RouterOutput, experts,
                        overlap_chunks="auto", shared=None) -> torch.Tensor:
        """All-to-all dispatch -> local experts -> all-to-all combine, in chunks
        (dispatch/overlap.py). `overlap_chunks`: a count, or "auto". `shared`: the shared expert,
        run while the first chunk is in flight; its output is included in the result."""
        S, L, group = self.ep_size, self.num_local, self.groups.ep_group
        token_N, w_N, counts_E = self._sorted_rows(x_TD, route)
        # One exchange carries the per-expert counts and each sender's row total; the totals let
        # every rank of the group pick the same chunk count (collectives must match).
        send_SL1 = torch.cat([counts_E.view(S, L),
                              counts_E.sum().view(1, 1).expand(S, 1)], 1)
        recv_SL1 = all_to_all_counts(send_SL1, group).cpu()
        recv_SL, max_rows = recv_SL1[:, :L], int(recv_SL1[:, L].max())
        if overlap_chunks == "auto":
            overlap_chunks = self._auto_chunks(x_TD, experts, max_rows)
        chunks = plan_chunks(counts_E.cpu(), recv_SL, overlap_chunks, device=x_TD.device)
        return expert_parallel_moe(x_TD, experts.w1, experts.w2, w_N, token_N, chunks,
                                   experts.act, group, shared, self._rows_per_buffer(x_TD, experts))
