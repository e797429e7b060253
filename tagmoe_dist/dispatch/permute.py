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


def split_counts(counts_M: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Split every count into `num_chunks` near-equal parts: [M] -> [C, M], summing to counts.
    Part c of m is m // C, plus one for the first m % C parts. Sender and receiver apply the same
    rule to the same counts, so both know every chunk's sizes without exchanging them."""
    c_C1 = torch.arange(num_chunks, device=counts_M.device)[:, None]
    return counts_M[None, :] // num_chunks + (c_C1 < (counts_M % num_chunks)[None, :]).long()


def block_rows(starts_M: torch.Tensor, lengths_M: torch.Tensor,
               total: Optional[int] = None) -> torch.Tensor:
    """Concatenation of the row ranges [starts[m], starts[m] + lengths[m]) in order of m.
    `total`: sum(lengths) when the caller knows it on the host (saves a sync on GPU)."""
    excl_M = torch.cumsum(lengths_M, 0) - lengths_M
    shift = torch.repeat_interleave(starts_M - excl_M, lengths_M, output_size=total)
    return shift + torch.arange(shift.numel(), device=starts_M.device)
