"""Parity of our token-choice router with DeepSpeed's gating (deepspeed.moe.sharded_moe).

Same logits in, same expert choices and combine weights out, for the configurations in which the
two define the same thing: softmax scores, no token dropping (DeepSpeed: drop_tokens=False; top-1:
use_rts=False, noisy_gate_policy=None; top-2: top2_2nd_expert_sampling=False).
DeepSpeed's per-token choices and weights are read from its combine_weights [T, E, C] summed over
the capacity dim C.

  top-1: DeepSpeed does not renormalise (weight = softmax prob)  <-> ours norm_topk_prob=False
  top-2 / top-k: DeepSpeed divides by the sum of the chosen probs <-> ours norm_topk_prob=True
  ties: top1gating / top2gating take torch.argmax, which returns the first maximal index; ours
        breaks ties towards the lower expert id: identical. topkgating uses torch.topk, whose tie
        order is unspecified, so ties are only tested for k <= 2.
With token dropping, the top-k gate (drop_policy "probs" and "position") keeps the same choices as
ours when the capacities agree, but DeepSpeed renormalises each token's weights over its *kept*
choices while ours keeps the weights of the full top-k (test_topk_dropping_*).

Notation: T tokens, E experts, K top-k, C capacity.
"""

from __future__ import annotations

import math

import pytest
import torch

import tagmoe_dist as tm
from tagmoe_dist.gating.capacity import expert_capacity
from tagmoe_dist.gating.topk import TopKRouter
from tests.tolerance import REL_FP32, assert_rel_close, assert_rel_far

sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")

T, E = 64, 8


def _logits(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed({"random": 0, "ties": 1}[kind])
    if kind == "random":
        return torch.randn(T, E, generator=g) * 2.0
    # few distinct values: many exact ties, including across the k-th place
    return torch.randint(-2, 2, (T, E), generator=g).float()


def ours(logits_TE: torch.Tensor, k: int, norm: bool, **over):
    cfg = tm.MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=E, top_k=k,
                       norm_topk_prob=norm, **over)
    route = TopKRouter(cfg).route(logits_TE.clone(), None, None)
    w_TK = route.topk_weights_TK
    if route.keep_TK is not None:
        w_TK = w_TK * route.keep_TK
    w_TE = torch.zeros(T, E).scatter_(1, route.topk_ids_TK, w_TK)
    return route, w_TE


def chosen_TE(route) -> torch.Tensor:
    keep_TK = torch.ones_like(route.topk_ids_TK, dtype=torch.bool) if route.keep_TK is None \
        else route.keep_TK
    return torch.zeros(T, E, dtype=torch.bool).scatter_(1, route.topk_ids_TK, keep_TK)


def ds_weights(combine_TEC: torch.Tensor) -> torch.Tensor:
    return combine_TEC.sum(-1)


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_top1_matches_deepspeed(kind):
    logits_TE = _logits(kind)
    l_aux, combine_TEC, _, counts_E = sharded_moe.top1gating(
        logits_TE.clone(), capacity_factor=1.0, min_capacity=0, noisy_gate_policy=None,
        drop_tokens=False, use_rts=False)
    route, w_TE = ours(logits_TE, k=1, norm=False)
    ds_w_TE = ds_weights(combine_TEC)
    assert torch.equal(ds_w_TE > 0, chosen_TE(route)), "top-1 expert choices differ"
    assert_rel_close(w_TE, ds_w_TE, REL_FP32)
    assert torch.equal(route.counts_E, counts_E)
    # top-1 load-balance loss: same formula (E * sum_e f_e P_e)
    assert_rel_close(route.losses["aux"], l_aux, REL_FP32)


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_top2_matches_deepspeed_with_renormalised_weights(kind):
    logits_TE = _logits(kind)
    l_aux, combine_TEC, _, counts_E = sharded_moe.top2gating(
        logits_TE.clone(), capacity_factor=1.0, min_capacity=0, drop_tokens=False,
        top2_2nd_expert_sampling=False)
    route, w_TE = ours(logits_TE, k=2, norm=True)
    ds_w_TE = ds_weights(combine_TEC)
    assert torch.equal(ds_w_TE > 0, chosen_TE(route)), "top-2 expert choices differ"
    assert_rel_close(w_TE, ds_w_TE, REL_FP32)
    assert_rel_close(ds_w_TE.sum(-1), torch.ones(T), REL_FP32)   # DeepSpeed renormalises
    assert torch.equal(route.counts_E, counts_E)
    # without renormalisation ours is different: the weights are the raw softmax probs
    _, raw_TE = ours(logits_TE, k=2, norm=False)
    assert (raw_TE.sum(-1) < 1 - 1e-3).all()
    # The top-2 aux loss differs by design: DeepSpeed counts first choices only,
    # l_aux = E * sum_e P_e * (first choices of e / T); ours counts all T*K choices.
    probs_TE = torch.softmax(logits_TE, -1)
    first_E = torch.bincount(route.topk_ids_TK[:, 0], minlength=E).float()
    assert_rel_close(l_aux, E * (probs_TE.mean(0) * first_E / T).sum(), REL_FP32)


@pytest.mark.parametrize("k", [2, 4])
def test_topk_matches_deepspeed(k):
    logits_TE = _logits("random")
    l_aux, combine_TEC, _, counts_E = sharded_moe.topkgating(
        logits_TE.clone(), k, capacity_factor=1.0, min_capacity=0, drop_tokens=False)
    route, w_TE = ours(logits_TE, k=k, norm=True)
    ds_w_TE = ds_weights(combine_TEC)
    assert torch.equal(ds_w_TE > 0, chosen_TE(route)), f"top-{k} expert choices differ"
    assert_rel_close(w_TE, ds_w_TE, REL_FP32)
    assert torch.equal(route.counts_E, counts_E)
    # top-k aux loss: E^2/k * mean_e(P_e * counts_e / T) == E * sum_e P_e * counts_e / (T*k)
    assert_rel_close(route.losses["aux"], l_aux, REL_FP32)


def test_capacity_formulas():
    """DeepSpeed: ceil(T/E * factor * k) (top2gating: k=2, top1: k=1), then max with min_capacity
    (MoE default 4, TopKGate default 8). Ours: ceil(T*k*factor/E), then max with min_capacity
    (default 1). Equal for equal min_capacity up to float rounding of the product."""
    for tokens, k, factor in [(64, 1, 1.0), (64, 2, 0.5), (50, 2, 1.25), (7, 4, 1.0), (3, 1, 1.0)]:
        gates = torch.zeros(tokens, E)
        ds = int(sharded_moe._capacity(gates, torch.tensor(factor * k), torch.tensor(0)))
        assert ds == expert_capacity(tokens, E, k, factor, min_capacity=1)
        assert ds == math.ceil(tokens / E * factor * k)
    # the defaults differ: with 3 tokens DeepSpeed's MoE (min_capacity=4) keeps 4 slots per expert
    assert int(sharded_moe._capacity(torch.zeros(3, E), torch.tensor(1.0), torch.tensor(4))) == 4
    assert expert_capacity(3, E, 1, 1.0) == 1


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("k", [2, 4])
def test_topk_dropping_keeps_the_same_choices(policy, k):
    """Capacity dropping in topkgating vs ours, capacities made equal (factor 0.5 -> C = 4k).
    Kept choices agree; DeepSpeed renormalises over the kept choices, ours does not."""
    logits_TE = _logits("random")
    factor = 0.5
    cap = expert_capacity(T, E, k, factor, min_capacity=1)
    _, combine_TEC, _, _ = sharded_moe.topkgating(
        logits_TE.clone(), k, capacity_factor=factor, min_capacity=0, drop_tokens=True,
        drop_policy=policy)
    assert combine_TEC.shape[-1] == cap
    route, w_TE = ours(logits_TE, k=k, norm=True, capacity_factor=factor, drop_policy=policy)
    ds_w_TE = ds_weights(combine_TEC)
    kept_TE = chosen_TE(route)
    assert not bool(route.keep_TK.all()), "the case must drop something"
    assert torch.equal(ds_w_TE > 0, kept_TE), f"kept choices differ ({policy})"
    # ours: the full top-k weights, dropped choices contribute nothing; DeepSpeed: renormalised
    kept_sum_T = w_TE.sum(-1, keepdim=True)
    some_kept_T = kept_sum_T.squeeze(-1) > 0
    assert_rel_close(ds_w_TE[some_kept_T], (w_TE / kept_sum_T)[some_kept_T], REL_FP32)
    partial_T = route.keep_TK.any(-1) & ~route.keep_TK.all(-1)
    if bool(partial_T.any()):
        assert_rel_far(ds_w_TE[partial_T], w_TE[partial_T], 1e-3)
