"""Expert capacity and token dropping, as pure functions: which (token, choice) pairs an
over-full expert keeps. A routing decision, so it lives with the routers.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int = 1) -> int:
    """Tokens one expert may take: ceil(T * K * factor / E), at least `min_capacity`."""
    return max(min_capacity, math.ceil(num_tokens * top_k * capacity_factor / num_experts))


def capacity_keep_mask(topk_ids_TK: torch.Tensor, topk_scores_TK: torch.Tensor, num_experts: int,
                       capacity: int, policy: str = "probs") -> torch.Tensor:
    """Which (token, choice) pairs an expert keeps when it may take at most `capacity` of them.

    policy "probs": an expert keeps its highest-scoring choices (ties: earlier token first);
    policy "position": an expert keeps the earliest tokens in the sequence.
    Returns keep_TK (bool).
    """
    ids_N = topk_ids_TK.reshape(-1)
    if policy == "probs":
        by_score_N = torch.argsort(topk_scores_TK.reshape(-1), descending=True, stable=True)
        order_N = by_score_N[torch.argsort(ids_N[by_score_N], stable=True)]
    elif policy == "position":
        order_N = torch.argsort(ids_N, stable=True)
    else:
        raise ValueError(f"drop policy {policy!r}: use 'probs' or 'position'")
    sorted_ids_N = ids_N[order_N]
    counts_E = torch.bincount(ids_N, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert_N = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[sorted_ids_N]
    keep_N = torch.empty_like(ids_N, dtype=torch.bool)
    keep_N[order_N] = rank_in_expert_N < capacity
    return keep_N.view_as(topk_ids_TK)
