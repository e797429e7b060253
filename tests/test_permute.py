"""Index math of dispatch, tested without a process group (property tests)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tagmoe_dist.dispatch import permute as P
from tagmoe_dist.gating.capacity import capacity_keep_mask, expert_capacity
from tagmoe_dist.kernels.chunks import expert_chunks
from tests.reference import permute, unpermute
from tests.tolerance import REL_FP32, assert_rel_close

settings.register_profile("ci", deadline=None, max_examples=60)
settings.load_profile("ci")


@st.composite
def routing(draw):
    T = draw(st.integers(0, 40))
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    # K distinct experts per token, drawn from a random subset so that some experts stay empty
    active = torch.randperm(E, generator=g)[: draw(st.integers(K, E))]
    ids = torch.stack([active[torch.randperm(len(active), generator=g)[:K]] for _ in range(T)]) \
        if T else torch.zeros(0, K, dtype=torch.long)
    scores = torch.rand(T, K, generator=g)
    return T, E, K, ids, scores, g


@given(routing(), st.booleans())
def test_permute_unpermute_inverse(r, drop):
    T, E, K, ids, scores, g = r
    x = torch.randn(T, 5, generator=g)
    keep = None
    if drop:
        cap = expert_capacity(T, E, K, 0.7)
        keep = capacity_keep_mask(ids, scores, E, cap, "probs")
    perm, counts = P.sort_by_expert(ids, E, keep)
    kept = ids if keep is None else ids[keep]
    assert counts.tolist() == torch.bincount(kept.reshape(-1), minlength=E).tolist()
    assert perm.numel() == int(counts.sum())
    sorted_ids = ids.reshape(-1)[perm]
    assert bool((sorted_ids[1:] >= sorted_ids[:-1]).all()), "rows must be grouped by expert"
    x_N = permute(x, perm, K)
    w = torch.rand(T, K, generator=g)
    y = unpermute(x_N, perm, w)
    kept_w = w if keep is None else w * keep
    assert_rel_close(y, x * kept_w.sum(1, keepdim=True), REL_FP32)


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2 ** 31 - 1))
def test_chunk_sort_roundtrip(S, L, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (S, L), generator=g)
    counts[torch.rand(S, L, generator=g) < 0.3] = 0          # empty blocks
    R = int(counts.sum())
    src_block = torch.repeat_interleave(torch.arange(S * L), counts.reshape(-1))
    idx = P.chunk_sort_index(counts, R)
    regrouped = src_block[idx]
    # expert-major: block ids (s*L + l) ordered by (l, s)
    key = (regrouped % L) * S + regrouped // L
    assert bool((key[1:] >= key[:-1]).all())
    back = P.chunk_sort_index(counts.t().contiguous(), R)
    assert torch.equal(regrouped[back], src_block)


def _naive_keep(ids, scores, E, cap, policy):
    T, K = ids.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        ch = [(t, k) for t in range(T) for k in range(K) if ids[t, k] == e]
        if policy == "probs":
            ch.sort(key=lambda tk: (-float(scores[tk]), tk[0] * K + tk[1]))
        for t, k in ch[:cap]:
            keep[t, k] = True
    return keep


@given(routing(), st.sampled_from(["probs", "position"]), st.floats(0.1, 2.0))
def test_capacity_matches_naive(r, policy, factor):
    T, E, K, ids, scores, g = r
    cap = expert_capacity(T, E, K, factor)
    assert cap == max(1, math.ceil(T * K * factor / E))
    keep = capacity_keep_mask(ids, scores, E, cap, policy)
    assert torch.equal(keep, _naive_keep(ids, scores, E, cap, policy))


def test_stable_topk_breaks_ties_towards_lower_index():
    from tagmoe_dist.gating.topk import stable_topk
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0],      # tie across the boundary
                           [0.2, 0.2, 0.2, 0.2, 0.2],      # all tied
                           [0.5, 0.1, 0.4, 0.0, 0.0]])     # no tie
    _, ids = stable_topk(scores, 2)
    assert [sorted(r) for r in ids.tolist()] == [[1, 2], [0, 1], [0, 2]]
    # virtual groups of an upcycled router: rows replicated, every group of 3 copies ties
    logits = torch.randn(50, 4).repeat_interleave(3, dim=1)
    _, ids = stable_topk(torch.softmax(logits, -1), 6)
    groups = (ids // 3).sort(1).values
    assert torch.equal(groups[:, ::3], groups[:, 1::3]) and torch.equal(groups[:, ::3], groups[:, 2::3])


@given(st.integers(1, 6), st.integers(0, 2 ** 31 - 1))
def test_split_counts_and_block_rows(C, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 9, (7,), generator=g)
    parts = P.split_counts(counts, C)
    assert parts.shape == (C, 7) and torch.equal(parts.sum(0), counts)
    assert int((parts.max(0).values - parts.min(0).values).max()) <= 1
    assert bool((parts[:-1] >= parts[1:]).all()), "earlier parts take the remainder"
    # the chunks' row sets partition the sorted buffer, each block in order
    starts = torch.cumsum(counts, 0) - counts
    offs = torch.cumsum(parts, 0) - parts
    rows = torch.cat([P.block_rows(starts + offs[c], parts[c]) for c in range(C)])
    assert torch.equal(rows.sort().values, torch.arange(int(counts.sum())))


@given(st.lists(st.integers(0, 9), min_size=1, max_size=12), st.integers(1, 11))
def test_expert_chunks_keep_experts_whole(counts, max_rows):
    chunks = expert_chunks(counts, max_rows)
    owner = [e for e, c in enumerate(counts) for _ in range(c)]   # expert of each row, naive
    seen, pos, split = [], 0, {}
    for start, stop, pieces in chunks:
        assert start == pos and (0 < stop - start <= max_rows or sum(counts) == 0)
        off = 0
        for e, first, n in pieces:
            assert first == off and n > 0
            seen += [e] * n
            off += n
            split[e] = split.get(e, 0) + 1
        assert off == stop - start
        pos = stop
    assert seen == owner and pos == sum(counts)
    for e, parts in split.items():
        # an expert is cut only when it cannot fit one chunk, and then into the fewest parts
        assert parts == -(-counts[e] // max_rows)
        if parts > 1:
            assert all(len(p) == 1 for _, _, p in chunks if p and p[0][0] == e)
    # no two neighbouring chunks could have been merged
    for (a0, a1, pa), (b0, b1, pb) in zip(chunks, chunks[1:]):
        if len(pa) and len(pb) and pa[-1][0] != pb[0][0]:
            assert (a1 - a0) + pb[0][2] > max_rows or split[pb[0][0]] > 1 or split[pa[-1][0]] > 1
