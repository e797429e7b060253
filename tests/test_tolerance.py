"""The suite's comparison helper (tests/tolerance.py): scale-relative, float64, NaN-proof.

The case that made the suite red on another machine: upcycled logits of magnitude ~6 that differ
from the dense ones by 1.06e-5 (a different CPU / BLAS). An absolute 1e-5 rejects them; relative
to the logits' scale that is 1.8e-6, well inside fp32 rounding of the same maths in another order.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.tolerance import (REL_FP32, assert_dict_rel_close, assert_exact, assert_rel_close,
                             assert_rel_far, rel_diff)


def _logits_pair(scale: float, diff: float):
    want = torch.linspace(-scale, scale, 64, dtype=torch.float32)
    got = want.clone()
    got[7] += diff
    return got, want


def test_fresh_machine_case_passes_relative_but_not_absolute():
    got, want = _logits_pair(6.0, 1.06e-5)
    assert (got - want).abs().max().item() > 1e-5            # the old absolute check failed
    assert assert_rel_close(got, want, REL_FP32) == pytest.approx(1.06e-5 / 6, rel=0.05)


def test_same_relative_error_at_any_scale():
    for scale in (1e-4, 1.0, 36.0, 1e4):
        got, want = _logits_pair(scale, 3e-6 * scale)
        assert_rel_close(got, want, REL_FP32)
        got, want = _logits_pair(scale, 3e-4 * scale)
        with pytest.raises(AssertionError, match="max\\|got - want\\| / max\\|want\\|"):
            assert_rel_close(got, want, REL_FP32, msg="logits")
        assert_rel_far(got, want, 1e-4)


def test_nan_zero_and_shape_edge_cases():
    want = torch.ones(3)
    assert math.isnan(rel_diff(torch.tensor([1.0, float("nan"), 1.0]), want))
    with pytest.raises(AssertionError):
        assert_rel_close(torch.tensor([1.0, float("nan"), 1.0]), want)
    assert rel_diff(torch.zeros(4), torch.zeros(4)) == 0.0
    assert rel_diff(torch.full((4,), 1e-30), torch.zeros(4)) == math.inf   # zero reference: exact
    assert rel_diff(torch.empty(0), torch.empty(0)) == 0.0
    with pytest.raises(AssertionError, match="shape"):
        rel_diff(torch.ones(3), torch.ones(1, 3))
    # compared in float64: a float32 difference below fp32's spacing at 1e8 is still seen
    assert rel_diff(torch.tensor([1e8], dtype=torch.float64) + 1, torch.tensor([1e8])) > 0


def test_dict_and_exact():
    a = {"w": torch.ones(2, 2), "b": torch.full((2,), 1e-3)}
    b = {"w": torch.ones(2, 2) * (1 + 1e-6), "b": torch.full((2,), 1e-3 * (1 + 1e-6))}
    assert_dict_rel_close(a, b)                  # each tensor against its own scale
    b["b"] = torch.full((2,), 2e-3)
    with pytest.raises(AssertionError, match="^b: "):
        assert_dict_rel_close(a, b)
    assert_exact(torch.arange(4.0), torch.arange(4.0))
    with pytest.raises(AssertionError):
        assert_exact(torch.arange(4.0), torch.arange(4.0) + 1e-7)
