"""Expert-parallel equivalence: a layer spread over EP ranks equals a naive single-process
reference (tests/reference.py) in outputs, every gradient and every auxiliary loss."""

from __future__ import annotations

import pytest
import torch

import tagmoe_dist as tm
from tests.dist_utils import run_distributed
from tests.reference import reference_grads
from tests.tolerance import REL_FP32, assert_rel_close

D, F_, E, K, S = 16, 8, 8, 2, 6

SCHEMA = tm.TaskSchema.from_dict({"levels": {
    "scope": ["local", "global", "generation"],
    "type": {"values": ["object", "style", "pose"], "multi": True}}})

# (name, config overrides); each runs at every EP size
CASES = [
    (f"{router}-{'drop' if cf else 'dropless'}",
     dict(router=router, capacity_factor=cf, z_loss_coeff=1e-2))
    for router in ("topk", "task_aware", "task_level") for cf in (None, 1.0)
] + [
    ("topk-sigmoid-norm-seqaux-shared-gelu",
     dict(score_function="sigmoid", norm_topk_prob=True, aux_loss_type="seq", num_shared_experts=1,
          shared_expert_gate=True, activation="gelu", topk_scaling_factor=2.0)),
    ("task_aware-add-position-drop", dict(router="task_aware", task_conditioning="add",
                                          capacity_factor=0.5, drop_policy="position")),
    ("task_aware-concat-shared", dict(router="task_aware", task_conditioning="concat",
                                      num_shared_experts=2)),
    # the paper's DiT experts: tanh-GELU with biases, top-1 (the native kernel has no biases)
    ("task_aware-gelu-bias-top1", dict(router="task_aware", activation="gelu", top_k=1,
                                       expert_mlp_bias=True)),
]
BIAS_CASES = {"task_aware-gelu-bias-top1"}


def rank_inputs(rank: int, case_idx: int):
    """Each rank's batch, reproducible anywhere. Rank 1 of case 1 gets an empty batch."""
    g = torch.Generator().manual_seed(1000 * case_idx + rank)
    B = 0 if (rank == 1 and case_idx == 1) else 2 + rank % 2
    x = torch.randn(B, S, D, generator=g)
    ids = torch.stack([torch.randint(-1, 3, (B,), generator=g),
                       torch.randint(-1, 3, (B,), generator=g)], 1)
    if B:
        ids[0] = -1  # one fully unannotated sample per batch
    cot = torch.randn(B, S, D, generator=g)
    return x, ids, cot


def _check(rank, world, cases=None, kernel="native"):
    """Every case with the expert kernel `kernel` (MoEConfig.expert_kernel): a named kernel that
    cannot run here raises, so 'native' also asserts that the C kernel loads."""
    groups = tm.ParallelGroups.build(ep_size=world) if world > 1 else tm.ParallelGroups.single()
    for ci, (name, over) in enumerate(CASES):
        if cases is not None and name not in cases:
            continue
        # biases exist in the torch and grouped_mm kernels; with 'native' the case runs 'auto'
        k = "auto" if (kernel == "native" and name in BIAS_CASES) else kernel
        for chunks in (cases or {}).get(name, [None]):
            over_c = dict(over, expert_kernel=k)
            _check_case(rank, world, groups, ci, name,
                        dict(over_c, overlap_chunks=chunks) if chunks else over_c)


def _check_case(rank, world, groups, ci, name, over):
    cfg = tm.MoEConfig(**dict(dict(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K,
                                   align_dim=12, align_hidden=10, init_std=0.3), **over))
    torch.manual_seed(7)
    layer = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA)
    with torch.no_grad():  # make task terms matter (they are zero-initialised)
        for n, p in layer.named_parameters():
            if n.startswith("router.task_") or n in ("experts.b1", "experts.b2"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    full = layer.full_state_dict()
    x, ids, cot = rank_inputs(rank, ci)
    x.requires_grad_(True)
    y = layer(x, task=ids)
    (y * cot).sum().backward()

    # reference, for every rank's batch (expert grads are sums over all ranks' tokens)
    task = {r: SCHEMA.to_multi_hot(rank_inputs(r, ci)[1]) for r in range(world)}
    refs = {r: reference_grads(cfg, full, rank_inputs(r, ci)[0], task[r], rank_inputs(r, ci)[2])
            for r in range(world)}
    y_ref, losses_ref, g_ref, gx_ref = refs[rank]
    where = f"case {name}, ep={world}, rank {rank}"
    assert_rel_close(y, y_ref, REL_FP32, f"{where}: output")
    assert_rel_close(x.grad, gx_ref, REL_FP32, f"{where}: dx")
    assert set(layer.last_losses) == set(losses_ref), (where, layer.last_losses, losses_ref)
    for k, v in losses_ref.items():
        assert_rel_close(layer.last_losses[k], v, REL_FP32, f"{where}: loss {k}")
    lo, hi = layer.experts.global_ids[0], layer.experts.global_ids[-1] + 1
    for n, p in layer.named_parameters():
        if n.startswith("experts."):
            want = sum(refs[r][2][n] for r in range(world))[lo:hi]
        else:
            want = g_ref[n]
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        assert_rel_close(got, want, REL_FP32, f"{where}: grad {n}")


@pytest.mark.parametrize("kernel", ["native", "torch", "grouped_mm"])
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_ep_equals_reference(ep, kernel):
    """Every expert kernel: the native one (csrc/moe_cpu.c), the PyTorch one it falls back to,
    and torch's grouped_mm (the GPU kernel, which torch also runs on CPU)."""
    if ep == 1:
        _check(0, 1, None, kernel)
    else:
        run_distributed(_check, ep, None, kernel)


OVERLAP = {"topk-dropless": [1, 2, 4], "topk-drop": [3], "task_aware-gelu-bias-top1": [3],
           "topk-sigmoid-norm-seqaux-shared-gelu": [1, 2, 4], "task_aware-concat-shared": [2]}


@pytest.mark.parametrize("ep", [2, 4])
def test_overlap_chunks_equal_reference(ep):
    """The chunked all-to-all / expert pipeline gives the reference's outputs, gradients and
    losses for every chunk count, with and without shared experts (issue: overlap)."""
    run_distributed(_check, ep, OVERLAP, "native")
    run_distributed(_check, ep, OVERLAP, "torch")
    run_distributed(_check, ep, OVERLAP, "grouped_mm")
