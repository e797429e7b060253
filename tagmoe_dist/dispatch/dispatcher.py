"""The expert-parallel token dispatcher, in phases.

Notation: T local tokens, K top-k, N kept (token, choice) rows, E experts, S EP ranks,
L = E / S local experts, R rows received.

Contract (what makes overlap schedules possible without rewriting this class):
  dispatch_preprocess / dispatch_postprocess / combine_preprocess / combine_postprocess do local
  index work only and never communicate; token_dispatch / token_combine only communicate.

    x_TD --preprocess--> x_ND (sorted by global expert)
         --token_dispatch--> x_RD (grouped by source rank, then local expert)
         --postprocess--> x_RD (grouped by local expert)  -> experts ->
    y_RD --combine_preprocess--> (by source rank) --token_combine--> y_ND
         --combine_postprocess--> y_TD (weighted sum over the K choices)
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from tagmoe_dist.dispatch import permute as P
from tagmoe_dist.dispatch.alltoall import all_to_all, all_to_all_counts
from tagmoe_dist.dispatch.local import local_moe
from tagmoe_dist.gating.topk import RouterOutput
from tagmoe_dist.parallel import ParallelGroups


@dataclasses.dataclass
class DispatchPlan:
    """What the combine phases need to undo the dispatch phases."""
    perm_N: torch.Tensor
    weights_TK: torch.Tensor
    counts_E: torch.Tensor                     # rows this rank sends to each global expert
    counts_L: Optional[torch.Tensor] = None    # rows each local expert receives
    input_splits: Optional[List[int]] = None   # rows sent to each EP rank
    output_splits: Optional[List[int]] = None  # rows received from each EP rank
    regroup_R: Optional[torch.Tensor] = None   # [source][expert] -> [expert][source] gather index
    restore_R: Optional[torch.Tensor] = None   # its inverse


class AllToAllDispatcher:
    def __init__(self, num_experts: int, top_k: int, groups: ParallelGroups):
        self.num_experts, self.top_k, self.groups = num_experts, top_k, groups
        self.ep_size = groups.ep_size
        self.num_local = num_experts // groups.ep_size
        self.buffer_bytes = 8 << 20

    # ------------------------------------------------------------------ dispatch
    def dispatch_preprocess(self, x_TD: torch.Tensor, route: RouterOutput):
        perm_N, counts_E = P.sort_by_expert(route.topk_ids_TK, self.num_experts, route.keep_TK)
        x_ND = P.permute(x_TD, perm_N, self.top_k)
        return x_ND, DispatchPlan(perm_N, route.topk_weights_TK, counts_E)

    def token_dispatch(self, x_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.ep_size == 1:
            return x_ND
        group = self.groups.ep_group
        send_SL = plan.counts_E.view(self.ep_size, self.num_local)
        recv_SL = all_to_all_counts(send_SL, group)
        # The only host sync of the layer: split sizes must be known on the host.
        both = torch.stack([send_SL.sum(1), recv_SL.sum(1)]).tolist()
        plan.input_splits, plan.output_splits = both
        plan.counts_L = recv_SL  # kept as [S, L] until postprocess
        return all_to_all(x_ND, plan.output_splits, plan.input_splits, group)

    def dispatch_postprocess(self, x_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.ep_size == 1:
            plan.counts_L = plan.counts_E
            return x_RD
        recv_SL = plan.counts_L
        total = sum(plan.output_splits)
        plan.regroup_R = P.chunk_sort_index(recv_SL, total)
        plan.restore_R = P.chunk_sort_index(recv_SL.t().contiguous(), total)
        plan.counts_L = recv_SL.sum(0)
        return x_RD.index_select(0, plan.regroup_R)

    # ------------------------------------------------------------------ combine
    def combine_preprocess(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.ep_size == 1:
            return y_RD
        return y_RD.index_select(0, plan.restore_R)

    def token_combine(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.ep_size == 1:
            return y_RD
        return all_to_all(y_RD, plan.input_splits, plan.output_splits, self.groups.ep_group)

    def combine_postprocess(self, y_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return P.unpermute(y_ND, plan.perm_N, plan.weights_TK)

    # ------------------------------------------------------------------ EP = 1
    def local(self, x_TD: torch.Tensor, route: RouterOutput, experts) -> torch.Tensor:
        """Dispatch -> experts -> combine without an all-to-all (EP = 1).

        On CPU this runs the fused, chunked `LocalMoE` (see dispatch/local.py: never builds the
        [T*K, D] permuted copies; buffers stay near `buffer_bytes`). On CUDA the caching allocator
        makes one grouped GEMM over the whole permuted buffer the better choice.
        """
        perm_N, counts_E = P.sort_by_expert(route.topk_ids_TK, self.num_experts, route.keep_TK)
        token_N = torch.div(perm_N, self.top_k, rounding_mode="floor")
        w_N = route.topk_weights_TK.reshape(-1).index_select(0, perm_N).to(x_TD.dtype)
        if x_TD.is_cuda:
            y_ND = experts(x_TD.index_select(0, token_N), counts_E)
            return x_TD.new_zeros(x_TD.shape).index_add_(0, token_N, y_ND * w_N[:, None])
        counts = counts_E.tolist()
        width = max(x_TD.shape[1], experts.w1.shape[-1])
        max_rows = max(1, self.buffer_bytes // (x_TD.element_size() * width))
        return local_moe(x_TD, experts.w1, experts.w2, w_N, token_N, counts, experts.act, max_rows)

    # ------------------------------------------------------------------ whole passes
    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput):
        x_ND, plan = self.dispatch_preprocess(x_TD, route)
        x_RD = self.token_dispatch(x_ND, plan)
        return self.dispatch_postprocess(x_RD, plan), plan

    def combine(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        y_RD = self.combine_preprocess(y_RD, plan)
        y_ND = self.token_combine(y_RD, plan)
        return self.combine_postprocess(y_ND, plan)
