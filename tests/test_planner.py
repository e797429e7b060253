"""The alpha-beta cost model (tagmoe_dist.planner): closed forms, monotonicity, the chunk choice,
YAML validation. Pure: no process group (measure_rates runs on one process)."""

import math
import os
import subprocess
import sys

import pytest

from tagmoe_lab import planner as pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTERS = os.path.join(ROOT, "configs", "clusters")


def rates(beta=1e9, alpha=0.0, flops=1e12, overhead=0.0, inter=None):
    return pl.Rates(flops=flops, intra=pl.Link(alpha, beta), inter=inter, chunk_overhead_s=overhead)


# ------------------------------------------------------------------------------ closed forms
def test_expert_flops_closed_forms():
    R, D, F = 10, 64, 128
    assert pl.expert_flops(R, D, F, "gelu", backward=False) == 4 * R * D * F
    assert pl.expert_flops(R, D, F, "swiglu", backward=False) == 6 * R * D * F
    assert pl.expert_flops(R, D, F, "swiglu") == 3 * 6 * R * D * F
    with pytest.raises(ValueError, match="activation"):
        pl.expert_flops(R, D, F, "relu")


def test_dispatch_bytes_and_all_to_all_time():
    assert pl.dispatch_bytes(100, 64, 2, 1) == 0
    assert pl.dispatch_bytes(100, 64, 2, 4, 2) == 100 * 2 * 64 * 2 * 3 / 4
    r = rates(beta=1e9, alpha=1e-5)
    assert pl.all_to_all_time(1e6, 1, 1, r) == 0.0
    assert pl.all_to_all_time(1e6, 8, 8, r) == pytest.approx(1e-5 + 1e-3)
    # across nodes: the inter-node share over the slower link dominates
    r2 = rates(beta=1e9, alpha=1e-5, inter=pl.Link(2e-5, 1e8))
    t = pl.all_to_all_time(7e6, 8, 4, r2)            # 4 of 7 peers remote: 4e6 bytes at 1e8
    assert t == pytest.approx(2e-5 + 4e6 / 1e8)


def test_pair_curve_speeds_up_the_steady_state():
    plain = pl.Link(1e-4, 1e7, ((1e4, 1e7), (1e7, 1e7)))
    paired = pl.Link(1e-4, 1e7, plain.curve, ((1e4, 2e7), (1e7, 2e7)))
    assert paired.pair_beta(1e5) == 2e7 and plain.pair_beta(1e5) == 1e7
    kw = dict(hidden=256, ffn=512, activation="gelu", ep=2)
    slow = pl.moe_layer_cost(4e6, 8192, rates=pl.Rates(30e9, plain), chunks=4, **kw)
    fast = pl.moe_layer_cost(4e6, 8192, rates=pl.Rates(30e9, paired), chunks=4, **kw)
    assert fast.overlapped_s < slow.overlapped_s
    assert fast.comm_s == slow.comm_s          # one exchange at a time is unchanged


def test_allreduce_and_link_curve():
    link = pl.Link(1e-5, 1e9)
    assert pl.allreduce_time(1e6, 1, link) == 0
    assert pl.allreduce_time(1e6, 4, link) == pytest.approx(6e-5 + 1.5e6 / 1e9)
    curve = pl.Link(0.0, 1e8, ((1e3, 4e8), (1e6, 1e8)))
    assert curve.beta(1e3) == 4e8 and curve.beta(1e6) == 1e8
    assert curve.beta(10) == 4e8 and curve.beta(1e9) == 1e8       # clamped
    assert 1e8 < curve.beta(3e4) < 4e8
    assert curve.time(1e6) == pytest.approx(1e6 / 1e8)


def test_pipeline_pass_closed_forms():
    V, C, a = 0.4, 1.0, 0.01
    # one chunk = the sequential layer: dispatch + compute + combine
    assert pl.pipeline_pass_time(1, V, C, a) == pytest.approx(2 * (a + V) + C)
    # compute-bound (c >= 2d): first dispatch + N computes + last combine
    n = 4
    d, c = a + V / n, C / n
    assert pl.pipeline_pass_time(n, V, C, a) == pytest.approx(d + n * c + d)
    # network-bound: all 2N exchanges back to back plus one chunk's compute
    assert pl.pipeline_pass_time(4, 2.0, 1.0) == pytest.approx(2 * 2.0 + 1.0 / 4)
    with pytest.raises(ValueError, match="chunks"):
        pl.pipeline_pass_time(0, V, C)


def test_overlap_never_beats_its_bounds_and_improves_with_chunks():
    kw = dict(hidden=256, ffn=512, activation="gelu", ep=2)
    r = rates(beta=40e6, alpha=2e-4, flops=30e9, overhead=2e-4)
    send, rows = 4096 * 256 * 4, 8192
    seq = pl.moe_layer_cost(send, rows, rates=r, chunks=1, **kw)
    assert seq.overlapped_s == pytest.approx(seq.sequential_s)
    prev = seq.overlapped_s
    for n in (2, 4):
        cost = pl.moe_layer_cost(send, rows, rates=r, chunks=n, **kw)
        assert cost.overlapped_s < prev
        assert cost.overlapped_s >= max(cost.compute_s, 4 * (cost.a2a_s - cost.alpha_s))
        prev = cost.overlapped_s


def test_costs_are_monotone():
    kw = dict(hidden=256, ffn=512, activation="swiglu", ep=4)
    base = pl.moe_layer_cost(1e6, 4096, rates=rates(beta=1e8), chunks=2, **kw)
    more_bytes = pl.moe_layer_cost(2e6, 4096, rates=rates(beta=1e8), chunks=2, **kw)
    faster_net = pl.moe_layer_cost(1e6, 4096, rates=rates(beta=1e9), chunks=2, **kw)
    more_rows = pl.moe_layer_cost(1e6, 8192, rates=rates(beta=1e8), chunks=2, **kw)
    faster_gpu = pl.moe_layer_cost(1e6, 4096, rates=rates(beta=1e8, flops=1e13), chunks=2, **kw)
    assert more_bytes.overlapped_s >= base.overlapped_s and more_bytes.comm_s > base.comm_s
    assert faster_net.overlapped_s <= base.overlapped_s
    assert more_rows.compute_s > base.compute_s and more_rows.overlapped_s >= base.overlapped_s
    assert faster_gpu.overlapped_s <= base.overlapped_s


# ------------------------------------------------------------------------------ choose_chunks
def test_choose_chunks_is_one_when_communication_is_negligible():
    r = rates(beta=1e15, alpha=1e-6, flops=1e10, overhead=1e-4)
    assert pl.choose_chunks(1e3, 8192, 256, 512, r, "gelu", 2) == 1
    # no overhead at all and nothing to hide: a tie, and ties go to the smallest N
    r0 = rates(beta=float("inf"), flops=1e10)
    assert pl.choose_chunks(1e3, 8192, 256, 512, r0, "gelu", 2) == 1


def test_choose_chunks_is_more_than_one_when_comparable():
    r = rates(beta=40e6, alpha=2e-4, flops=30e9, overhead=2e-4)
    send, rows = 4096 * 256 * 4, 8192                  # comm ~ 0.4 s, compute ~ 0.4 s
    cost1 = pl.moe_layer_cost(send, rows, 256, 512, r, 1, "gelu", 2)
    assert 0.3 < cost1.comm_s / cost1.compute_s < 3
    n = pl.choose_chunks(send, rows, 256, 512, r, "gelu", 2)
    assert n > 1
    best = pl.moe_layer_cost(send, rows, 256, 512, r, n, "gelu", 2).overlapped_s
    for m in range(1, 17):
        assert best <= pl.moe_layer_cost(send, rows, 256, 512, r, m, "gelu", 2).overlapped_s + 1e-12
    # a large per-chunk cost pulls the choice down
    r_slow = rates(beta=40e6, alpha=2e-4, flops=30e9, overhead=0.05)
    assert pl.choose_chunks(send, rows, 256, 512, r_slow, "gelu", 2) < n
    assert pl.choose_chunks(send, rows, 256, 512, r, "gelu", 2, candidates=[1, 3]) in (1, 3)


def test_measure_rates_single_process():
    from tagmoe_dist.parallel import ParallelGroups
    r = pl.measure_rates(ParallelGroups.single(), hidden=64, ffn=128, rows=256, reps=2)
    assert math.isfinite(r.flops) and r.flops > 0
    assert r.intra.bandwidth_Bps == float("inf") and r.intra.latency_s == 0
    assert r.chunk_overhead_s > 0 and r.mem_bandwidth_Bps > 0


# ------------------------------------------------------------------------------ specs and plans
CLUSTER = dict(name="t", gpus_per_node=8, nodes=2, intra_node_bandwidth_GBps=300,
               intra_node_latency_us=10, inter_node_bandwidth_Gbps=400, inter_node_latency_us=20,
               achieved_tflops=500, memory_GiB=80)
MODEL = dict(hidden=1024, ffn_hidden=512, num_experts=16, top_k=2, num_layers=8, seq_len=1024,
             micro_batch=1, global_batch=64)


@pytest.mark.parametrize("change, field", [
    (dict(nodes=0), "cluster.nodes"),
    (dict(gpus_per_node=2.5), "cluster.gpus_per_node"),
    (dict(intra_node_bandwidth_GBps=-1), "cluster.intra_node_bandwidth_GBps"),
    (dict(inter_node_latency_us="fast"), "cluster.inter_node_latency_us"),
    (dict(achieved_tflops=True), "cluster.achieved_tflops"),
    (dict(nvlink=900), "nvlink"),
])
def test_cluster_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        pl.ClusterSpec.from_dict({**CLUSTER, **change})


def test_cluster_missing_field():
    d = dict(CLUSTER)
    del d["memory_GiB"]
    with pytest.raises(ValueError, match=r"cluster\.memory_GiB is missing"):
        pl.ClusterSpec.from_dict(d)


@pytest.mark.parametrize("change, field", [
    (dict(activation="relu"), "model.activation"),
    (dict(top_k=32), "model.top_k"),
    (dict(hidden=0), "model.hidden"),
    (dict(experts=8), "experts"),
])
def test_model_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        pl.ModelShape.from_dict({**MODEL, **change})


def test_load_yaml_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {}\n")
    with pytest.raises(ValueError, match="'cluster' section"):
        pl.load_yaml(str(p))
    p.write_text("cluster: {nodes: 1}\nextra: 1\n")
    with pytest.raises(ValueError, match="extra"):
        pl.load_yaml(str(p))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CLUSTERS) if f.endswith(".yaml")))
def test_shipped_cluster_files_plan(name):
    cluster, model = pl.load_yaml(os.path.join(CLUSTERS, name))
    assert model is not None
    plans = pl.enumerate_plans(cluster, model)
    assert plans
    keys = [(not p.fits, p.step_s) for p in plans]
    assert keys == sorted(keys)
    for p in plans:
        assert p.tp * p.pp * p.dp == cluster.world
        assert model.num_experts % p.ep == 0 and (p.dp * p.tp) % p.ep == 0
        assert p.moe.overlapped_s <= p.moe.sequential_s + 1e-12 or p.chunks == 1


def test_pipeline_bubble_and_faster_network():
    c = pl.ClusterSpec.from_dict(CLUSTER)
    m = pl.ModelShape.from_dict(MODEL)
    p1 = pl.plan_step(c, m, tp=1, ep=8, pp=1, chunks=1)
    p4 = pl.plan_step(c, m, tp=1, ep=4, pp=4, chunks=1)
    assert p1.bubble == 0
    assert p4.bubble == pytest.approx(3 / (p4.microbatches + 3))
    assert p4.microbatches == 64 // (4 * 1)
    fast = pl.ClusterSpec.from_dict({**CLUSTER, "intra_node_bandwidth_GBps": 3000})
    assert pl.plan_step(fast, m, 1, 8, 1, 1).moe.a2a_s < p1.moe.a2a_s
    # EP spanning two nodes crosses the slower link
    assert pl.plan_step(c, m, 1, 16, 1, 1).moe.a2a_s > p1.moe.a2a_s
    with pytest.raises(ValueError, match="ep=8 must divide dp\\*tp=4"):
        pl.plan_step(c, m, tp=1, ep=8, pp=4)


def test_plan_parallelism_cli(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_parallelism.py"),
                          "--cluster", os.path.join(CLUSTERS, "h100x8_ib400.yaml"), "--top", "3",
                          "--set", "num_experts=16"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| # | TP | EP | PP |" in out.stdout and "E=16" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  gpus_per_node: 8\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan_parallelism.py"),
                          "--cluster", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cluster.nodes is missing" in out.stderr
