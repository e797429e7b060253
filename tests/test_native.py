"""The native EP = 1 CPU kernel (csrc/moe_cpu.c) and the PyTorch kernel it replaces, each against a
naive float64 reference; the native top-k against a stable sort; the build's cache and fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tagmoe_dist.kernels import native
from tagmoe_dist.kernels import select_kernel
from tagmoe_dist.kernels.base import ExpertWeights, expert_rows
from tests.reference import _mlp
from tests.tolerance import REL_FP32, assert_rel_close

KERNELS = ["native", "torch", "grouped_mm"]


def test_native_kernel_is_used_here():
    # This machine has a C compiler and torch's MKL: the fast path must be the one that runs.
    assert native.library() is not None, native.status()
    w = ExpertWeights(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8), activation="gelu")
    assert select_kernel("auto", w, torch.zeros(3, 8)).name == "native"


def _case(act, T=60, K=3, E=7, D=16, F=8, seed=0, empty=(2,), rows=None):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if act == "swiglu" else F
    x = torch.randn(T, D, generator=g)
    w1 = torch.randn(E, D, H, generator=g) * 0.3
    w2 = torch.randn(E, F, D, generator=g) * 0.3
    ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    for e in empty:                        # experts that receive no rows
        ids[ids == e] = (e + 1) % E
    ids = ids.reshape(-1)
    perm = torch.argsort(ids, stable=True)
    if rows is not None:
        perm = perm[:rows]
    counts = torch.bincount(ids[perm], minlength=E).tolist()
    tok = torch.div(perm, K, rounding_mode="floor")
    w = torch.rand(tok.numel(), generator=g)
    gy = torch.randn(T, D, generator=g)
    return x, w1, w2, w, tok, counts, gy


def _reference(act, x, w1, w2, w, tok, counts, gy):
    """Per-row loop in float64: y[tok[r]] += w[r] * mlp_{expert(r)}(x[tok[r]])."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w2, w)]
    xd, w1d, w2d, wd = leaves
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    y = torch.zeros_like(xd)
    for r in range(tok.numel()):
        e, t = int(experts[r]), int(tok[r])
        y = y.index_add(0, tok[r:r + 1], wd[r] * _mlp(xd[t:t + 1], w1d[e], w2d[e], act))
    y.backward(gy.double())
    return [y.detach()] + [t.grad for t in leaves]


def _run(kernel, act, x, w1, w2, w, tok, counts, gy, max_rows):
    xl, w1l, w2l, wl = leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w)]
    weights = ExpertWeights(w1l, w2l, activation=act)
    k = select_kernel(kernel, weights, xl)          # a named kernel that cannot run raises
    y = expert_rows(k, xl, weights, wl, tok, torch.tensor(counts), counts, max_rows)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("max_rows", [1000, 23, 4])     # one chunk; whole experts; experts split
def test_kernel_matches_reference(kernel, act, max_rows):
    if kernel == "native" and native.library() is None:
        pytest.fail(native.status())
    case = _case(act)
    got = _run(kernel, act, *case, max_rows)
    want = _reference(act, *case)
    for name, a, b in zip(["y", "x.grad", "w1.grad", "w2.grad", "w.grad"], got, want):
        assert_rel_close(a, b, REL_FP32, name)
    # the empty expert's weight gradients are zero, not left uninitialised
    assert got[2][2].abs().max() == 0 and got[3][2].abs().max() == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_with_no_rows(kernel):
    case = _case("gelu", rows=0)
    y, gx, gw1, gw2, gw = _run(kernel, "gelu", *case, 16)
    assert y.abs().max() == 0 and gx.abs().max() == 0
    assert gw1.abs().max() == 0 and gw2.abs().max() == 0 and gw.numel() == 0


def _stable_ids(s, k):
    return torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]


@pytest.mark.parametrize("seed", range(6))
def test_native_topk_is_a_stable_sort(seed):
    if native.library() is None:
        pytest.fail(native.status())
    g = torch.Generator().manual_seed(seed)
    for T, E, k in [(37, 64, 8), (33, 9, 4), (5, 80, 13), (17, 3, 3), (20, 8, 8), (4, 600, 2),
                    (1, 1, 1), (50, 32, 1)]:
        for kind in ["random", "ties", "nan", "-inf"]:
            s = (torch.randint(0, 4, (T, E), generator=g).float() if kind == "ties"
                 else torch.randn(T, E, generator=g))
            if kind == "nan":
                s[::3, ::5] = float("nan")
            if kind == "-inf":
                s[::2, 1:] = float("-inf")
            ids = native.topk_ids(s, k)
            assert torch.equal(ids, _stable_ids(s, k)), (T, E, k, kind)


def test_stable_topk_values_carry_gradient():
    from tagmoe_dist.gating.topk import stable_topk
    s = torch.randn(40, 16, requires_grad=True)
    vals, ids = stable_topk(s, 4)
    assert torch.equal(ids, _stable_ids(s.detach(), 4))
    vals.sum().backward()
    want = torch.zeros(40, 16).scatter_(1, ids, 1.0)
    assert torch.equal(s.grad, want)


def test_row_movement_matches_torch():
    """The sending side's fused row ops (dispatch/overlap.py) against plain torch indexing."""
    if native.library() is None:
        pytest.fail(native.status())
    g = torch.Generator().manual_seed(3)
    src, idx = torch.randn(50, 24, generator=g), torch.randint(0, 50, (130,), generator=g)
    w, other = torch.rand(130, generator=g), torch.randn(130, 24, generator=g)
    assert torch.equal(native.gather_rows(src, idx), src[idx])
    rows = torch.randn(130, 24, generator=g)
    for weights in (None, w):
        got, want = torch.zeros(50, 24), torch.zeros(50, 24)
        native.scatter_add_rows(got, idx, rows, weights)
        want.index_add_(0, idx, rows if weights is None else rows * weights[:, None])
        assert_rel_close(got, want, REL_FP32)
    scaled, dots = native.gather_scale_dot(src, idx, w, other)
    assert_rel_close(scaled, src[idx] * w[:, None], REL_FP32)
    assert_rel_close(dots, (src[idx] * other).sum(1), REL_FP32)
    # no rows at all
    assert native.gather_rows(src, idx[:0]).shape == (0, 24)


_BUILD = textwrap.dedent("""
    import sys, warnings
    from tagmoe_dist.kernels import native
    if sys.argv[1] == "build":
        print(native.build())
    else:
        import torch, tagmoe_dist as tm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer = tm.MoELayer(tm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4,
                                             top_k=2))
            layer(torch.randn(2, 3, 8)).sum().backward()
        print(native.status())
        print("WARN " + " | ".join(str(w.message) for w in caught))
""")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(args, env, timeout=120):
    return subprocess.run([sys.executable, "-c", _BUILD, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_concurrent_builds_share_one_library(tmp_path):
    env = dict(os.environ, TAGMOE_NATIVE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, "build"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(paths.pop())]   # no temp files left


def test_failed_build_falls_back_and_says_why(tmp_path):
    env = dict(os.environ, TAGMOE_NATIVE_DIR=str(tmp_path), CC="false")
    res = _python(["layer"], env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    status = next(ln for ln in lines if ln.startswith("PyTorch kernel:"))
    warn = next(ln for ln in lines if ln.startswith("WARN "))
    assert "native CPU kernel unavailable" in status and "failed (exit 1)" in status, status
    assert "native CPU kernel unavailable" in warn
    assert os.listdir(tmp_path) == []
