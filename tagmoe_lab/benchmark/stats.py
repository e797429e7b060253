"""Paired comparisons over seeds: mean difference with a percentile bootstrap interval.

A seed fixes the training batches and the shared initial weights of every variant, so the
difference of two variants at one seed is the unit of analysis (paired design).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch


def bootstrap_ci(values: Sequence[float], resamples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> Tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and its percentile bootstrap interval (resampling
    the values with replacement, a fixed generator: the same input gives the same interval)."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if x.numel() == 0:
        return math.nan, math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=g)
    means = x[idx].mean(1)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return float(x.mean()), lo, hi


def paired(a: Dict[int, float], b: Dict[int, float], **kw) -> dict:
    """a - b over the seeds both have: mean, 95% bootstrap interval, wins of a (a < b), n."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    mean, lo, hi = bootstrap_ci(d, **kw)
    return {"mean": mean, "lo": lo, "hi": hi, "wins": sum(x < 0 for x in d), "n": len(d),
            "diffs": d}
