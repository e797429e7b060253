"""Bootstrap intervals of paired differences (benchmark/stats.py)."""

import statistics

import pytest
import torch

from tagmoe_lab.benchmark.stats import bootstrap_ci, paired


def test_bootstrap_interval_matches_normal_theory_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(400, generator=g, dtype=torch.float64) * 2 + 1).tolist()
    mean, lo, hi = bootstrap_ci(x)
    se = statistics.stdev(x) / len(x) ** 0.5
    assert mean == pytest.approx(statistics.fmean(x))
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.2 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.2 * se)
    assert bootstrap_ci(x) == (mean, lo, hi)


def test_paired_uses_common_seeds_and_counts_wins():
    r = paired({0: 1.0, 1: 2.0, 2: 0.5, 3: 9.0}, {0: 1.5, 1: 1.0, 2: 1.0})
    assert r["n"] == 3 and r["wins"] == 2
    assert r["diffs"] == [-0.5, 1.0, -0.5]
    assert r["lo"] <= r["mean"] <= r["hi"]
    const = paired({s: 1.0 for s in range(5)}, {s: 1.25 for s in range(5)})
    assert (const["lo"], const["hi"]) == pytest.approx((-0.25, -0.25))
