"""Scale-relative numerical comparisons for the test suite.

An absolute tolerance means different things for logits of size 6 and gradients of size 1e-4,
and an element-wise relative one blows up where a value happens to cross zero. Every numerical
comparison in the suite therefore measures the largest difference against the largest magnitude
of the reference, both in float64:

    max|got - want| <= rtol * max|want|

Levels (fp32 epsilon is 1.2e-7):
  REL_FP32  same maths in another order (EP vs one rank, fused vs unfused, upcycled vs dense):
            rounding grows with depth; measured 2e-6 at most on small models, so 5x+ margin.
  REL_FP32_LOOSE  long fp32 chains (optimizer steps, many-layer backward) that amplify rounding.
Bit-exact results (resume, resharding, pure data movement) are compared with `assert_exact`,
never with a tolerance.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch

REL_FP32 = 1e-5
REL_FP32_LOOSE = 1e-4

Number = Union[float, int, torch.Tensor]


def _f64(x: Number) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def rel_diff(got: Number, want: Number) -> float:
    """max|got - want| / max|want| in float64 (0 when both are exactly equal, inf when `want`
    is all zero and `got` is not). NaN anywhere gives NaN, which every `<=` check rejects."""
    g, w = _f64(got), _f64(want)
    assert g.shape == w.shape, f"shape {tuple(g.shape)} != {tuple(w.shape)}"
    if g.numel() == 0:
        return 0.0
    diff = (g - w).abs().max().item()
    scale = w.abs().max().item()
    if diff != diff or scale != scale:
        return float("nan")
    if diff == 0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def assert_rel_close(got: Number, want: Number, rtol: float = REL_FP32,
                     msg: Union[str, Callable[[], str], None] = None) -> float:
    """Assert max|got - want| <= rtol * max|want| (float64); returns the relative difference."""
    r = rel_diff(got, want)
    if not r <= rtol:
        where = msg() if callable(msg) else (msg or "")
        raise AssertionError(f"{where}: max|got - want| / max|want| = {r:.3e} > {rtol:.1e}".lstrip(": "))
    return r


def assert_rel_far(got: Number, want: Number, rtol: float, msg: Optional[str] = None) -> float:
    """The negative check: the two differ by more than rtol of the reference's scale."""
    r = rel_diff(got, want)
    assert r > rtol, f"{msg or ''}: expected a difference > {rtol:.1e} of scale, got {r:.3e}".lstrip(": ")
    return r


def assert_dict_rel_close(got: Mapping[str, Number], want: Mapping[str, Number],
                          rtol: float = REL_FP32, where: str = "") -> None:
    """Per-entry `assert_rel_close` over the same keys (each tensor against its own scale)."""
    assert set(got) == set(want), f"{where}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        assert_rel_close(got[k], want[k], rtol, msg=f"{where} {k}".strip())


def assert_exact(got: Number, want: Number, msg: Optional[str] = None) -> None:
    """Bit-exact equality (same dtype, same values): for resume, resharding and data movement."""
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=0, atol=0,
                               msg=msg)
