"""How the fused CPU kernels cut the rows of one call into cache-sized chunks (pure index math)."""

from __future__ import annotations

from typing import List, Tuple


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
