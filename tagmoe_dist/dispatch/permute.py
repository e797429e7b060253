"""Index math of token dispatch, as pure functions (no process group, no module state).

Notation:
  T  tokens on this rank          K  choices per token (top-k)       N  kept (token, choice) pairs
  E  experts (global)             L  experts on this rank            S  ranks of the EP group
  R  tokens received by this rank after the all-to-all

A routing decision is `topk_ids_TK` (expert of each choice). Flattened, choice j = t*K + k.
Dispatch sorts the kept choices by expert (stable, so ties keep token order); the experts then see
contiguous blocks of tokens, one per expert, and the combine step inverts the permutation.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

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


def sort_by_expert(topk_ids_TK: torch.Tensor, num_experts: int,
                   keep_TK: Optional[torch.Tensor] = None):
    """Permutation that groups the kept choices by expert.

    Returns (perm_N, counts_E): perm_N[i] is the flat choice index (t*K + k) of the i-th row of the
    permuted buffer; counts_E tokens per expert. Dropped choices (keep_TK False) are sent to a
    virtual expert E, sorted last by the same stable sort, and cut off.
    """
    ids_N = topk_ids_TK.reshape(-1)
    if keep_TK is None:
        perm_N = torch.argsort(ids_N, stable=True)
        return perm_N, torch.bincount(ids_N, minlength=num_experts)
    ids_N = torch.where(keep_TK.reshape(-1), ids_N, num_experts)
    perm_all = torch.argsort(ids_N, stable=True)
    counts_E = torch.bincount(ids_N, minlength=num_experts + 1)[:num_experts]
    # One host sync: the number of kept rows sizes every buffer after this point.
    num_kept = int(keep_TK.sum())
    return perm_all[:num_kept], counts_E


def permute(x_TD: torch.Tensor, perm_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x in expert order: x_ND[i] = x_TD[perm_N[i] // K]."""
    return x_TD.index_select(0, torch.div(perm_N, top_k, rounding_mode="floor"))


def unpermute(y_ND: torch.Tensor, perm_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute` with the weighted sum over the K choices: y_TD = sum_k w_tk * y[t,k].

    Choices that were dropped (their flat index is absent from perm_N) contribute zero.
    Implemented as a gather from the permuted buffer (plus one zero row for dropped choices)
    followed by a batched weighted sum, which is cheaper than a scatter-add on CPU and GPU.
    """
    T, K = weights_TK.shape
    N = perm_N.numel()
    D = y_ND.shape[-1]
    inv_TK = torch.full((T * K,), N, dtype=torch.long, device=perm_N.device)
    inv_TK[perm_N] = torch.arange(N, device=perm_N.device)
    y_pad = torch.cat([y_ND, y_ND.new_zeros(1, D)]) if N < T * K else y_ND
    y_TKD = y_pad.index_select(0, inv_TK).view(T, K, D)
    w_T1K = weights_TK.to(y_ND.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, y_TKD).squeeze(1)


def chunk_sort_index(counts_SL: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Gather index that reorders blocks laid out [source rank][local expert] into
    [local expert][source rank], so each local expert's tokens are contiguous.

    counts_SL[s, l] = rows from source s for local expert l; `total` = counts_SL.sum() if the
    caller knows it on the host (saves a sync). Returns idx_R. The inverse reordering is
    `chunk_sort_index(counts_SL.T)` (blocks laid out [local expert][source rank] back to
    [source][expert]).
    """
    S, L = counts_SL.shape
    flat_src = counts_SL.reshape(-1)                       # blocks in source-major order
    start_src = torch.cumsum(flat_src, 0) - flat_src       # where each block starts now
    counts_LS = counts_SL.t().reshape(-1)                  # the same blocks, expert-major
    start_of_target = start_src.view(S, L).t().reshape(-1)
    target_start = torch.cumsum(counts_LS, 0) - counts_LS
    # row r of target block b comes from start_of_target[b] + (r - target_start[b])
    shift_R = torch.repeat_interleave(start_of_target - target_start, counts_LS, output_size=total)
    return shift_R + torch.arange(shift_R.numel(), device=counts_SL.device)


def expert_chunks(counts: List[int], max_rows: int) -> List[Tuple[int, int, List[Tuple[int, int, int]]]]:
    """Cut rows [0, sum(counts)) (grouped by expert) into consecutive chunks of whole experts, at
    most `max_rows` rows each, except that an expert with more than `max_rows` rows is split into
    near-equal parts of at most `max_rows` rows, one chunk each. An expert never straddles two
    chunks unless it must, so its GEMMs run on whole blocks (no short remnant GEMMs at chunk
    edges). Returns, per chunk, (start, stop, pieces) where pieces are the non-empty (expert,
    first row inside the chunk, rows) blocks of the chunk, in order."""
    assert max_rows > 0
    out, start, pieces, rows = [], 0, [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        if rows and rows + n > max_rows:              # close the open chunk before this expert
            out.append((start, start + rows, pieces))
            start, pieces, rows = start + rows, [], 0
        if n > max_rows:                              # too big for one chunk: split it evenly
            parts = -(-n // max_rows)
            for i in range(parts):
                m = n // parts + (i < n % parts)
                out.append((start, start + m, [(e, 0, m)]))
                start += m
            continue
        pieces.append((e, rows, n))
        rows += n
    if rows or not out:
        out.append((start, start + rows, pieces))
    return out


def split_counts(counts_M: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Split every count into `num_chunks` near-equal parts: [M] -> [C, M], summing to counts.
    Part c of m is m // C, plus one for the first m % C parts. Sender and receiver apply the same
    rule to the same counts, so both know every chunk's sizes without exchanging them."""
    c_C1 = torch.arange(num_chunks, device=counts_M.device)[:, None]
    return counts_M[None, :] // num_chunks + (c_C1 < (counts_M % num_chunks)[None, :]).long()


def block_rows(starts_M: torch.Tensor, lengths_M: torch.Tensor) -> torch.Tensor:
    """Concatenation of the row ranges [starts[m], starts[m] + lengths[m]) in order of m."""
    excl_M = torch.cumsum(lengths_M, 0) - lengths_M
    shift = torch.repeat_interleave(starts_M - excl_M, lengths_M)
    return shift + torch.arange(shift.numel(), device=starts_M.device)
