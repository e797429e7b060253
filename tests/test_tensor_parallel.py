"""Tensor and sequence parallelism: shard index math without a process group, the region
functions against their definitions, and the MoE layer over TP=2 (and TP=2 x EP=2 on 4 processes)
equal to the single-process layer (TP=1, EP=1) in outputs, every gradient and the losses."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import tagmoe_dist as tm
from tagmoe_dist.parallel import tensor as tp
from tagmoe_dist.experts import DenseMLP, GroupedExperts
from tagmoe_dist.kernels.activations import activation_fn
from tests.dist_utils import run_distributed
from tests.tolerance import REL_FP32, assert_rel_close, assert_exact

D, F_, E, K, S = 16, 8, 8, 2, 8

SCHEMA = tm.TaskSchema.from_dict({"levels": {
    "scope": ["local", "global", "generation"],
    "type": {"values": ["object", "style", "pose"], "multi": True}}})

# (name, MoEConfig overrides)
CASES = [
    ("topk-capacity-z", dict(capacity_factor=1.0, z_loss_coeff=1e-2)),
    ("task_aware-shared-gate", dict(router="task_aware", num_shared_experts=1,
                                    shared_expert_gate=True, task_conditioning="add")),
    ("sigmoid-seqaux-gelu-shared", dict(score_function="sigmoid", norm_topk_prob=True,
                                        aux_loss_type="seq", activation="gelu",
                                        num_shared_experts=2)),
]


# ---------------------------------------------------------------- pure index math
def test_split_sizes_and_slices():
    assert tp.split_sizes(10, 4) == [3, 3, 2, 2]
    assert [tp.token_slice(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [tp.token_slice(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]


@pytest.mark.parametrize("gated", [True, False])
def test_shards_round_trip_and_sum_to_the_mlp(gated):
    g = torch.Generator().manual_seed(0)
    H = 2 * F_ if gated else F_
    w1, w2 = torch.randn(3, D, H, generator=g), torch.randn(3, F_, D, generator=g)
    x = torch.randn(5, D, generator=g)
    act = activation_fn("swiglu" if gated else "gelu")
    for size in (1, 2, 4):
        p1 = [tp.shard_columns(w1, r, size, gated) for r in range(size)]
        p2 = [tp.shard_rows(w2, r, size) for r in range(size)]
        assert_exact(tp.unshard_columns(p1, gated), w1)
        assert_exact(tp.unshard_rows(p2), w2)
        # column-parallel then row-parallel: the partial outputs sum to the whole MLP
        full = act(x @ w1[1]) @ w2[1]
        parts = sum(act(x @ a[1]) @ b[1] for a, b in zip(p1, p2))
        assert_rel_close(parts, full, REL_FP32)
    with pytest.raises(ValueError, match="not divisible"):
        tp.shard_rows(w2, 0, 3)


def test_sharded_init_is_a_slice_of_the_global_init():
    full = GroupedExperts(D, F_, [2, 3], "swiglu", 0.02, base_seed=5)
    for r in range(2):
        part = GroupedExperts(D, F_, [2, 3], "swiglu", 0.02, base_seed=5, shard=(r, 2))
        assert_exact(part.w1.detach(), tp.shard_columns(full.w1.detach(), r, 2, True))
        assert_exact(part.w2.detach(), tp.shard_rows(full.w2.detach(), r, 2))
    torch.manual_seed(1)
    dense = DenseMLP(D, F_, "gelu")
    torch.manual_seed(1)
    half = DenseMLP(D, F_, "gelu", shard=(1, 2))
    assert_exact(half.w1.detach(), tp.shard_columns(dense.w1.detach(), 1, 2, False))


def test_layout_errors():
    bad = tm.ParallelGroups(tp_size=2, tp_rank=0, tp_group=object(), etp_size=1,
                            sequence_parallel=True)
    with pytest.raises(ValueError, match="input_layout='sbh'"):
        tp.TensorParallelMoE.maybe(bad, "bsh")
    with pytest.raises(ValueError, match="must be 1 or the tensor-parallel size"):
        tp.check_groups(tm.ParallelGroups(tp_size=2, tp_rank=0, tp_group=object(), etp_size=4,
                                          etp_rank=0, etp_group=object()))


# ---------------------------------------------------------------- region functions (2 ranks)
def _regions(rank, world):
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, generator=g) for _ in range(world)]      # every rank's input
    cs = [torch.randn(4, 3, generator=g) for _ in range(world)]      # every rank's cotangent
    full_c = torch.cat(cs)

    def run(fn, cot):
        x = xs[rank].clone().requires_grad_(True)
        y = fn(x, group)
        (y * cot).sum().backward()
        return y.detach(), x.grad

    y, gx = run(tp.copy_to_region, cs[rank])
    assert_exact(y, xs[rank])
    assert_rel_close(gx, sum(cs))
    y, gx = run(tp.reduce_from_region, cs[rank])
    assert_rel_close(y, sum(xs))
    assert_exact(gx, cs[rank])
    y, gx = run(tp.gather_sequence, full_c)
    assert_exact(y, torch.cat(xs))
    assert_rel_close(gx, full_c.chunk(world)[rank] * world)   # every rank's cot is full_c
    y, gx = run(tp.gather_replicated, full_c)
    assert_exact(gx, full_c.chunk(world)[rank])
    y, gx = run(tp.reduce_scatter_sequence, cs[rank][:4 // world])
    assert_rel_close(y, sum(xs).chunk(world)[rank])
    assert_rel_close(gx, torch.cat([c[:4 // world] for c in cs]))
    y, gx = run(tp.scatter_sequence, cs[rank][:4 // world])
    assert_exact(y, xs[rank].chunk(world)[rank])
    assert_rel_close(gx, torch.cat([c[:4 // world] for c in cs]))
    # enter: replicated use (grad whole) + split use (grad partial)
    x = xs[rank].clone().requires_grad_(True)
    rep, part = tp.enter_sequence_parallel(x, group)
    ((rep * full_c).sum() + (part * cs[rank].repeat(world, 1)).sum()).backward()
    assert_rel_close(x.grad, full_c.chunk(world)[rank] + sum(cs))
    # a non-zero dim
    x = xs[rank].clone().requires_grad_(True)
    y = tp.gather_sequence(x, group, dim=1)
    assert_exact(y, torch.cat(xs, 1))


def test_region_functions():
    run_distributed(_regions, 2)


# ---------------------------------------------------------------- the MoE layer over TP
def make_cfg(over):
    return tm.MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K, align_dim=12,
                        align_hidden=10, init_std=0.3, input_layout="sbh", **over)


def make_layer(cfg, groups):
    torch.manual_seed(7)
    layer = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA)
    with torch.no_grad():     # make task terms matter (they are zero-initialised)
        for n, p in layer.named_parameters():
            if n.startswith("router.task_"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return layer


def replica_batch(replica: int, case: int, B: int = 3):
    g = torch.Generator().manual_seed(100 * case + replica)
    x = torch.randn(S, B, D, generator=g)
    task = torch.stack([torch.randint(-1, 3, (B,), generator=g),
                        torch.randint(-1, 3, (B,), generator=g)], 1)
    cot = torch.randn(S, B, D, generator=g)
    return x, task, cot


def reference(cfg, replica, case):
    """The single-process layer (TP=1, EP=1): output, losses, input grad, param grads."""
    layer = make_layer(cfg, tm.ParallelGroups.single())
    x, task, cot = replica_batch(replica, case)
    x.requires_grad_(True)
    y = layer(x, task=task)
    (y * cot).sum().backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in layer.named_parameters()}
    return layer, y.detach(), dict(layer.last_losses), x.grad, grads


def check_tp_layer(groups, cfg, case, replica, num_replicas, where):
    """Run the TP layer on this rank's share of its replica's batch and compare with the
    reference. Expert grads are compared after the sum over the expert-data-parallel group (what
    the host's DDP does), against the sum of every replica's reference grads."""
    ref_layer, y_ref, losses_ref, gx_ref, g_ref = reference(cfg, replica, case)
    layer = make_layer(cfg, groups)
    full = layer.full_state_dict()
    for k, v in ref_layer.full_state_dict().items():      # global weights are layout-invariant
        assert_exact(full[k], v, f"{where}: {k}")
    x, task, cot = replica_batch(replica, case)
    if groups.sequence_parallel:      # rank holds its sequence shard of the input and output
        def mine(t):
            return t.chunk(groups.tp_size)[groups.tp_rank]
        x, cot, y_ref, gx_ref = mine(x), mine(cot), mine(y_ref), mine(gx_ref)
    x = x.clone().requires_grad_(True)
    y = layer(x, task=task)
    (y * cot).sum().backward()
    assert_rel_close(y, y_ref, REL_FP32, f"{where}: output")
    assert_rel_close(x.grad, gx_ref, REL_FP32, f"{where}: dx")
    assert set(layer.last_losses) == set(losses_ref), where
    for k, v in losses_ref.items():
        assert_rel_close(layer.last_losses[k], v, REL_FP32, f"{where}: loss {k}")

    all_g = [g_ref] + [reference(cfg, r, case)[4] for r in range(num_replicas) if r != replica]
    ids = layer.experts.global_ids
    swiglu = cfg.activation == "swiglu"
    for n, p in layer.named_parameters():
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        if n.startswith("experts."):
            want = sum(g[n] for g in all_g)[ids[0]:ids[-1] + 1]
            if groups.etp_size > 1:
                want = tp.shard_ffn(want, n[-2:], groups.etp_rank, groups.etp_size, swiglu)
            got = got.clone()
            if groups.edp_group is not None:
                dist.all_reduce(got, group=groups.edp_group)
        else:
            want = g_ref[n]
            if n.startswith("shared_expert.mlp."):
                want = tp.shard_ffn(want, n[-2:], groups.tp_rank, groups.tp_size, swiglu)
        assert_rel_close(got, want, REL_FP32, f"{where}: grad {n}")
    # and the weights load back from any layout
    layer.load_full_state_dict(ref_layer.full_state_dict())


def _tp2(rank, world):
    tp_group = dist.new_group([0, 1])
    for etp in (2, 1):
        for sp in (False, True):
            groups = tm.ParallelGroups(
                tp_size=2, tp_rank=rank, tp_group=tp_group, etp_size=etp,
                etp_rank=rank if etp > 1 else 0, etp_group=tp_group if etp > 1 else None,
                # with whole experts on both TP ranks, the host reduces their grads over both
                edp_group=tp_group if etp == 1 else None, sequence_parallel=sp)
            for ci, (name, over) in enumerate(CASES):
                check_tp_layer(groups, make_cfg(over), ci, 0, 1,
                               f"{name} tp=2 etp={etp} sp={sp} rank {rank}")


def test_tp2_equals_single_process():
    run_distributed(_tp2, 2)


def _tp2_ep2(rank, world):
    pytest.importorskip("megatron.core")
    from tests.megatron_cpu import init_megatron
    for etp in (2, 1):
        init_megatron(tp=2, ep=2, etp=etp)
        for sp in (False, True):
            groups = tm.ParallelGroups.from_megatron(sequence_parallel=sp)
            assert (groups.tp_size, groups.ep_size, groups.etp_size, groups.pp_size) == (2, 2, etp, 1)
            assert groups.tp_rank == rank % 2 and groups.sequence_parallel == sp
            # Megatron's layouts: TP groups are contiguous; with etp=2 the EP group strides over
            # them, with etp=1 it is the TP group itself (tokens are then split by rank)
            ep_ranks = dist.get_process_group_ranks(groups.ep_group)
            first = rank - rank % 2
            assert ep_ranks == ([rank % 2, rank % 2 + 2] if etp == 2 else [first, first + 1])
            assert groups.edp_size == 4 // (etp * 2)
            for ci, (name, over) in enumerate(CASES[:2]):
                check_tp_layer(groups, make_cfg(over), ci, rank // 2, 2,
                               f"{name} tp=2 ep=2 etp={etp} sp={sp} rank {rank}")


def test_tp2_ep2_equals_single_process():
    pytest.importorskip("megatron.core")
    run_distributed(_tp2_ep2, 4)
