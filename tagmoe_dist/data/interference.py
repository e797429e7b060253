"""A multi-task workload built to have real task interference (issue 18), and its negative control.

Every task reads the same kind of input, a row of 8 coloured symbols, and must map each symbol
to an output symbol, position by position; the tasks demand conflicting outputs for the same
input symbol. The sequence starts with a task token (the model needs no tags at inference).

  alphabet   A = 12 symbols; low half 0..5, high half 6..11
  colours    C = 4 colour variants of each symbol: input token = (symbol, colour). The colour
             never changes the answer; it multiplies the distinct input tokens a token-only
             router sees (48 ids) without carrying any information about the task
  tasks      8 = 4 families f (scope) x 2 variants v (type):
               low-half symbol s  -> P_f(s)       shared by the family's two variants
               high-half symbol s -> Q_{f,v}(s)   its own per task
             families f0, f1 keep the parity of every low-half symbol (preservation: parity),
             f2, f3 do not
  control    the same tasks, tokens and tags, but every task uses the map of task f0v0: the
             tasks agree on every output, so there is nothing to interfere (expected: task-aware
             routing brings nothing)

  sequence   [task token] x_1 ... x_8 [PAD]        (10 ids)
  labels     -100 -100 y_1 ... y_8                 (same-position labels, as lm_loss expects:
                                                    the logits at x_i predict y_i)

Vocabulary: 0 PAD, 1..8 task tokens, 9..56 input tokens (9 + 4 s + c), 57..68 output symbols.
Maps are drawn once from a fixed generator (MAP_SEED), identical for every training seed.
Batches are generated vectorised from (seed, split) with torch generators: reproducible.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from tagmoe_dist.tasks import TaskSchema

A, C, N_POS = 12, 4, 8
FAMILIES, VARIANTS = ("f0", "f1", "f2", "f3"), ("v0", "v1")
TASK_NAMES = tuple(f + v for f in FAMILIES for v in VARIANTS)
K = len(TASK_NAMES)
PAD, TASK0, IN0 = 0, 1, 1 + K
OUT0 = IN0 + A * C
VOCAB = OUT0 + A                   # 69
SEQ_LEN = N_POS + 2
MAP_SEED = 1234


def task_descriptor(name: str) -> dict:
    """Hierarchical tags of a task (configs/tasks/interference.yaml)."""
    f, v = name[:2], name[2:]
    return {"scope": f, "type": v, "preservation": ["parity"] if f in ("f0", "f1") else ["none"]}


def flat_descriptor(name: str) -> dict:
    """Flat tags (configs/tasks/interference_flat.yaml): one tag per task."""
    return {"task": name}


def _perm(values: List[int], keep_parity: bool, g: torch.Generator) -> Dict[int, int]:
    """A random bijection of `values` onto itself; keep_parity: even -> even, odd -> odd,
    otherwise one that breaks parity somewhere."""
    while True:
        if keep_parity:
            out = {}
            for par in (0, 1):
                vs = [x for x in values if x % 2 == par]
                out.update({x: vs[p] for x, p in zip(vs, torch.randperm(len(vs), generator=g).tolist())})
            return out
        perm = torch.randperm(len(values), generator=g).tolist()
        out = {x: values[p] for x, p in zip(values, perm)}
        if any(out[x] % 2 != x % 2 for x in values):
            return out


def _conflicting_perm(values, keep_parity, g, others, max_agree: int,
                      disjoint=None) -> Dict[int, int]:
    """`_perm` that agrees with each map in `others` on at most `max_agree` symbols, and with
    `disjoint` on none (so the tasks really demand different outputs for the same input)."""
    for _ in range(20_000):
        m = _perm(values, keep_parity, g)
        if all(sum(m[x] == o[x] for x in values) <= max_agree for o in others) and (
                disjoint is None or all(m[x] != disjoint[x] for x in values)):
            return m
    raise RuntimeError("no conflicting permutation found")   # pragma: no cover (fixed seed)


def task_maps(control: bool = False) -> torch.Tensor:
    """LongTensor [K, A]: the output symbol of each (task, input symbol). Low-half maps of two
    families agree on at most 2 of 6 symbols; the high-half maps of tasks of two families on at
    most 2, of a family's two variants on none."""
    g = torch.Generator().manual_seed(MAP_SEED)
    low, high = list(range(A // 2)), list(range(A // 2, A))
    maps = torch.zeros(K, A, dtype=torch.long)
    lows, highs = [], []
    for fi, f in enumerate(FAMILIES):
        keep = f in ("f0", "f1")
        p_low = _conflicting_perm(low, keep, g, lows, 2)
        lows.append(p_low)
        fam = []
        for vi in range(len(VARIANTS)):
            q_high = _conflicting_perm(high, False, g, highs, 2, fam[0] if fam else None)
            fam.append(q_high)
            k = fi * len(VARIANTS) + vi
            maps[k] = torch.tensor([p_low[s] if s in p_low else q_high[s] for s in range(A)])
        highs += fam
    if control:
        maps[:] = maps[0]
    return maps


def make_batches(seed: int, steps: int, batch_size: int, control: bool = False,
                 split: str = "train") -> List[dict]:
    """`steps` batches of `batch_size` samples, tasks drawn uniformly per sample."""
    n = steps * batch_size
    g = torch.Generator().manual_seed(seed * 2 + (1 if split == "eval" else 0) + 7919)
    task_N = torch.randint(0, K, (n,), generator=g)
    return _batches(task_N, g, batch_size, control)


def eval_batches(per_task: int, batch_size: int, control: bool = False, seed: int = 0) -> List[dict]:
    """`per_task` samples of every task, interleaved (every batch mixes tasks)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    task_N = torch.arange(K).repeat(per_task)
    return _batches(task_N, g, batch_size, control)


def _batches(task_N: torch.Tensor, g: torch.Generator, batch_size: int, control: bool) -> List[dict]:
    n = task_N.shape[0]
    maps_KA = task_maps(control)
    sym_NP = torch.randint(0, A, (n, N_POS), generator=g)
    col_NP = torch.randint(0, C, (n, N_POS), generator=g)
    out_NP = maps_KA[task_N[:, None], sym_NP]
    ids = torch.full((n, SEQ_LEN), PAD, dtype=torch.long)
    ids[:, 0] = TASK0 + task_N
    ids[:, 1:1 + N_POS] = IN0 + sym_NP * C + col_NP
    labels = torch.full((n, SEQ_LEN), -100, dtype=torch.long)
    labels[:, 2:] = OUT0 + out_NP
    mask = torch.zeros(n, SEQ_LEN, dtype=torch.long)
    mask[:, 1:1 + N_POS] = 1          # the routed tokens that count in routing statistics
    out = []
    for a in range(0, n, batch_size):
        sl = slice(a, min(n, a + batch_size))
        out.append({"input_ids": ids[sl], "labels": labels[sl], "attention_mask": mask[sl],
                    "task_index": task_N[sl]})
    return out


def tag_table(schema: TaskSchema) -> torch.Tensor:
    """Multi-hot [K, N] of every task under `schema` (the hierarchical or the flat one)."""
    flat = schema.level_names == ["task"]
    return schema.multi_hot([(flat_descriptor if flat else task_descriptor)(t) for t in TASK_NAMES])
