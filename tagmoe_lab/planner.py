"""The cluster planner: ranks EP / TP / PP / chunk choices for a cluster and model described in
YAML, with the alpha-beta cost model of `tagmoe_dist.dispatch.costmodel` (formulas there).
Lab tooling for `tools/plan_parallelism.py`; not installed with the library.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

from tagmoe_dist.dispatch.costmodel import *  # noqa: F401,F403  (the planner's vocabulary)
from tagmoe_dist.dispatch.costmodel import (Link, Rates, _check_activation, all_to_all_time,
                                            allreduce_time, choose_chunks, moe_layer_cost)

# ------------------------------------------------------------------------------ cluster / model
def _num(section: str, d: Mapping[str, Any], name: str, default: Any = None, integer: bool = False,
         minimum: float = 0.0, strict: bool = True) -> Any:
    if name not in d:
        if default is None:
            raise ValueError(f"{section}.{name} is missing")
        return default
    v = d[name]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (v <= minimum if strict else v < minimum):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{section}.{name} must be {kind} {'>' if strict else '>='} {minimum:g}, got {v!r}")
    return v


def _unknown(section: str, d: Mapping[str, Any], fields: Sequence[str]) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{section} must be a mapping of fields, got {type(d).__name__}")
    extra = sorted(set(d) - set(fields))
    if extra:
        raise ValueError(f"unknown {section} field(s) {extra}; valid fields: {sorted(fields)}")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """A cluster: bandwidths are per GPU and per direction (NVLink "900 GB/s" bidirectional =
    450 GB/s each way); flops is what the expert GEMMs achieve, not the datasheet peak."""
    name: str
    gpus_per_node: int
    nodes: int
    intra_node_bandwidth_GBps: float
    intra_node_latency_us: float
    inter_node_bandwidth_Gbps: float
    inter_node_latency_us: float
    achieved_tflops: float
    memory_GiB: float
    chunk_overhead_us: float = 0.0
    hbm_bandwidth_GBps: float = 0.0       # 0 = local work not modelled

    FIELDS = ("name", "gpus_per_node", "nodes", "intra_node_bandwidth_GBps", "intra_node_latency_us",
              "inter_node_bandwidth_Gbps", "inter_node_latency_us", "achieved_tflops", "memory_GiB",
              "chunk_overhead_us", "hbm_bandwidth_GBps")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClusterSpec":
        s = "cluster"
        _unknown(s, d, cls.FIELDS)
        if not isinstance(d.get("name", ""), str):
            raise ValueError(f"cluster.name must be a string, got {d['name']!r}")
        return cls(name=d.get("name", "cluster"),
                   gpus_per_node=_num(s, d, "gpus_per_node", integer=True),
                   nodes=_num(s, d, "nodes", integer=True),
                   intra_node_bandwidth_GBps=_num(s, d, "intra_node_bandwidth_GBps"),
                   intra_node_latency_us=_num(s, d, "intra_node_latency_us", strict=False),
                   inter_node_bandwidth_Gbps=_num(s, d, "inter_node_bandwidth_Gbps"),
                   inter_node_latency_us=_num(s, d, "inter_node_latency_us", strict=False),
                   achieved_tflops=_num(s, d, "achieved_tflops"),
                   memory_GiB=_num(s, d, "memory_GiB"),
                   chunk_overhead_us=_num(s, d, "chunk_overhead_us", 0.0, strict=False),
                   hbm_bandwidth_GBps=_num(s, d, "hbm_bandwidth_GBps", 0.0, strict=False))

    def rates(self) -> Rates:
        return Rates(flops=self.achieved_tflops * 1e12,
                     intra=Link(self.intra_node_latency_us * 1e-6, self.intra_node_bandwidth_GBps * 1e9),
                     inter=Link(self.inter_node_latency_us * 1e-6, self.inter_node_bandwidth_Gbps * 1e9 / 8),
                     mem_bandwidth_Bps=self.hbm_bandwidth_GBps * 1e9 if self.hbm_bandwidth_GBps else float("inf"),
                     chunk_overhead_s=self.chunk_overhead_us * 1e-6)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The transformer being trained; every layer's FFN is an MoE layer."""
    hidden: int
    ffn_hidden: int            # width of one expert
    num_experts: int
    top_k: int
    num_layers: int
    seq_len: int
    micro_batch: int           # sequences per micro-batch per data-parallel rank
    global_batch: int          # sequences per optimizer step
    activation: str = "swiglu"
    bytes_per_element: int = 2
    vocab_size: int = 0

    FIELDS = ("hidden", "ffn_hidden", "num_experts", "top_k", "num_layers", "seq_len", "micro_batch",
              "global_batch", "activation", "bytes_per_element", "vocab_size")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelShape":
        s = "model"
        _unknown(s, d, cls.FIELDS)
        kw = {f: _num(s, d, f, integer=True) for f in cls.FIELDS[:8]}
        kw["bytes_per_element"] = _num(s, d, "bytes_per_element", 2, integer=True)
        kw["vocab_size"] = _num(s, d, "vocab_size", 0, integer=True, strict=False)
        act = d.get("activation", "swiglu")
        if act not in ACTIVATIONS:
            raise ValueError(f"model.activation={act!r} is not supported; choose one of {list(ACTIVATIONS)}")
        if kw["top_k"] > kw["num_experts"]:
            raise ValueError(f"model.top_k={kw['top_k']} is greater than model.num_experts={kw['num_experts']}")
        return cls(activation=act, **kw)


def load_yaml(path: str):
    """(ClusterSpec, ModelShape or None) from a YAML file with a `cluster:` section and an
    optional `model:` section (the workload the file is an example for)."""
    import yaml
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, Mapping) or "cluster" not in doc:
        raise ValueError(f"{path}: expected a mapping with a 'cluster' section (and optionally 'model')")
    _unknown("top level", doc, ("cluster", "model"))
    model = ModelShape.from_dict(doc["model"]) if doc.get("model") is not None else None
    return ClusterSpec.from_dict(doc["cluster"]), model


# ------------------------------------------------------------------------------ whole steps
@dataclasses.dataclass(frozen=True)
class Plan:
    tp: int
    ep: int
    pp: int
    dp: int
    microbatches: int
    chunks: int
    moe: LayerCost
    attn_s: float              # per layer per micro-batch, forward + backward
    tp_comm_s: float
    stage_s: float             # one micro-batch through one stage
    step_s: float
    bubble: float              # idle fraction of the pipeline
    memory_GiB: float
    fits: bool


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_step(c: ClusterSpec, m: ModelShape, tp: int, ep: int, pp: int,
              chunks: Optional[int] = None, zero_stage: int = 1) -> Plan:
    """Predicted step of one configuration (chunks None: `choose_chunks`). Ranks are laid out
    TP fastest (a TP group stays in a node when tp <= GPUs/node); the experts use Megatron's
    separate expert decomposition with expert-TP 1, so an EP group is `ep` consecutive ranks."""
    rates = c.rates()
    world = c.world
    if world % (tp * pp) or m.num_layers % pp or m.num_experts % ep:
        raise ValueError(f"tp={tp} x pp={pp} must divide the {world} GPUs, pp the "
                         f"{m.num_layers} layers and ep={ep} the {m.num_experts} experts")
    dp = world // (tp * pp)
    if (dp * tp) % ep or m.global_batch % (dp * m.micro_batch):
        raise ValueError(f"ep={ep} must divide dp*tp={dp * tp} and dp*micro_batch="
                         f"{dp * m.micro_batch} the global batch {m.global_batch}")
    mb = m.global_batch // (dp * m.micro_batch)
    b = m.bytes_per_element
    T = m.micro_batch * m.seq_len / tp            # sequence parallel: each TP rank routes 1/tp
    ep_per_node = min(ep, c.gpus_per_node)
    send = dispatch_bytes(T, m.hidden, m.top_k, ep, b)
    rows = T * m.top_k
    if chunks is None:
        chunks = choose_chunks(send, rows, m.hidden, m.ffn_hidden, rates, m.activation, ep,
                               ep_per_node)
    moe = moe_layer_cost(send, rows, m.hidden, m.ffn_hidden, rates, chunks, m.activation, ep,
                         ep_per_node, T, m.num_experts, b)
    # The expert weights' E/P split shows up as rows per expert, not FLOPs: each rank still
    # computes T*K rows.
    S = m.micro_batch * m.seq_len
    attn = 3 * (8 * S * m.hidden ** 2 + 4 * S * m.seq_len * m.hidden) / tp / rates.flops
    tp_comm = 4 * allreduce_time(S * m.hidden * b, tp, rates.link(tp > c.gpus_per_node))
    layer = attn + tp_comm + moe.overlapped_s
    ranks_per_stage = world // pp
    p2p = 2 * rates.link(ranks_per_stage >= c.gpus_per_node).time(S * m.hidden * b / tp) if pp > 1 else 0.0
    stage = m.num_layers / pp * layer + p2p
    step = (mb + pp - 1) * stage
    # memory of the busiest stage: weights + grads + Adam (16 B/param mixed precision; ZeRO-1
    # shards the 12 B of fp32 master + moments over the data-parallel replicas of each param)
    per = 2 if m.activation == "gelu" else 3
    dense_p = m.num_layers / pp * (4 * m.hidden ** 2 / tp + m.hidden * m.num_experts) + m.vocab_size * m.hidden / tp
    expert_p = m.num_layers / pp * (m.num_experts / ep) * per * m.hidden * m.ffn_hidden
    edp = dp * tp // ep
    shard = (lambda r: 4 + 12 / r) if zero_stage >= 1 else (lambda r: 16)
    states = dense_p * shard(dp) + expert_p * shard(edp)
    act_layer = (34 * T * m.hidden + rows * (2 * m.hidden + (per + 1) * m.ffn_hidden)) * b / 2
    acts = min(pp, mb) * m.num_layers / pp * act_layer
    mem = (states + acts) / 2 ** 30
    return Plan(tp, ep, pp, dp, mb, chunks, moe, attn, tp_comm, stage, step,
                (pp - 1) / (mb + pp - 1), mem, mem <= 0.9 * c.memory_GiB)


def enumerate_plans(c: ClusterSpec, m: ModelShape, chunk_choices: Sequence[Optional[int]] = (1, None),
                    max_tp: Optional[int] = None) -> List[Plan]:
    """Every TP / EP / PP (and chunk choice) that divides the cluster, model and batch, fastest
    first (configurations that do not fit in memory last)."""
    out = []
    world = c.world
    for tp in _divisors(min(c.gpus_per_node, max_tp or c.gpus_per_node)):
        for pp in _divisors(m.num_layers):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if m.global_batch % (dp * m.micro_batch):
                continue
            for ep in _divisors(m.num_experts):
                if (dp * tp) % ep:
                    continue
                seen = set()
                for ch in chunk_choices:
                    p = plan_step(c, m, tp, ep, pp, ch)
                    if p.chunks not in seen:
                        seen.add(p.chunks)
                        out.append(p)
    out.sort(key=lambda p: (not p.fits, p.step_s))
    return out


def plans_table(plans: Sequence[Plan], limit: int = 20) -> str:
    rows = ["| # | TP | EP | PP | DP | micro-batches | chunks | a2a ms | experts ms | MoE seq ms | "
            "MoE overlapped ms | stage ms | step s | bubble | memory GiB | fits |",
            "|" + "---|" * 16]
    for i, p in enumerate(plans[:limit], 1):
        rows.append(f"| {i} | {p.tp} | {p.ep} | {p.pp} | {p.dp} | {p.microbatches} | {p.chunks} | "
                    f"{p.moe.a2a_s * 1e3:.3f} | {p.moe.compute_s * 1e3:.3f} | "
                    f"{p.moe.sequential_s * 1e3:.3f} | {p.moe.overlapped_s * 1e3:.3f} | "
                    f"{p.stage_s * 1e3:.2f} | {p.step_s:.3f} | {p.bubble:.0%} | {p.memory_GiB:.1f} | "
                    f"{'yes' if p.fits else 'NO'} |")
    return "\n".join(rows)


def as_dict(p: Plan) -> Dict[str, Any]:
    d = dataclasses.asdict(p)
    d["moe"]["sequential_s"] = p.moe.sequential_s
    return d
