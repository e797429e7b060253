"""`overlap_chunks="auto"` never measures inside forward: the rates come from `plan_overlap`,
called once outside (collective over the EP group), and every rank of the group picks the same
chunk count from them. Without a plan, "auto" uses a default that measures nothing."""

from __future__ import annotations

import torch
import torch.distributed as dist

import tagmoe_dist as tm
from tagmoe_dist.dispatch import costmodel, dispatcher
from tests.dist_utils import run_distributed
from tests.tolerance import REL_FP32, assert_rel_close


def _worker(rank, world):
    calls = []
    real = costmodel.measure_rates

    def counting(*a, **k):          # instrumentation: the real measurement still runs
        calls.append(k.get("device"))
        return real(*a, **k)
    costmodel.measure_rates = counting
    import tagmoe_dist.layer as layer_mod
    layer_mod.measure_rates = counting

    groups = tm.ParallelGroups.build(ep_size=world)
    cfg = tm.MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2,
                       overlap_chunks="auto")
    torch.manual_seed(0)
    model = torch.nn.Sequential(tm.MoELayer(cfg, groups=groups), tm.MoELayer(cfg, groups=groups))
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(rank))

    y_default = model(x)                          # no plan: nothing measured in forward
    assert calls == [], calls
    assert all(m.dispatcher.rates is None for m in model)

    assert tm.plan_overlap(model) == 1            # one measurement shared by equal layers
    assert len(calls) == 1 and calls[0] == x.device
    rates = model[0].dispatcher.rates
    assert rates is not None and model[1].dispatcher.rates is rates

    chosen = []
    real_plan = dispatcher.plan_chunks

    def record(*a):
        chosen.append(a[-1])
        return real_plan(*a)
    dispatcher.plan_chunks = record
    y_planned = model(x)
    assert len(calls) == 1, "forward measured again"
    # every rank of the group picks the same chunk count (collectives must match)
    counts = [None] * world
    dist.all_gather_object(counts, chosen)
    assert all(c == counts[0] for c in counts), counts
    # the chunk count changes the schedule, not the result
    assert_rel_close(y_planned, y_default, REL_FP32)


def test_auto_chunks_are_planned_outside_forward():
    run_distributed(_worker, 2)


def test_plan_overlap_is_a_no_op_without_expert_parallelism():
    cfg = tm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=2, top_k=1)
    assert tm.plan_overlap(tm.MoELayer(cfg)) == 0
