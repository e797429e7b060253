"""An alpha-beta cost model of MoE training steps, and the chunk count of the overlap schedule.

Units: seconds, bytes, FLOP. Notation: T tokens per rank entering the MoE layer, D hidden, F expert
width, E experts, K top-k, P = EP size, b bytes per element, N overlap chunks.

Model (one MoE layer, forward + backward, dropless, balanced routing unless rows are given):

  rows routed per rank       T*K                 rows received per rank  R = T*K (balanced)
  bytes sent per exchange    V = T*K*D*b*(P-1)/P  (the rows for the P-1 other ranks)
  one all-to-all             a2a = alpha + max(V_intra / beta_intra, V_inter / beta_inter)
                             with V split over peers on the same node / on other nodes
  exchanges per step         4 (dispatch, combine; their transposes in the backward) + the
                             token-count exchange (one alpha)
  expert FLOPs, forward      swiglu: 2*R*D*(2F) + 2*R*F*D = 6*R*D*F
                             gelu:   2*R*D*F    + 2*R*F*D = 4*R*D*F
                             backward = 2 x forward (input and weight gradients): step = 3 x fwd
  expert time                FLOPs / achieved FLOP rate
  local work                 router (2*T*D*E FLOP fwd, x3) + 12 passes of R*D*b bytes over memory
                             (gather, regroup, restore, scatter, forward and backward)

Overlap with N chunks (dispatch(c+1) and combine(c-1) travel while chunk c computes; the network
is one FIFO resource per rank, compute another), per pass with expert time C and exchange
bandwidth time V/beta:

  d = alpha + (V/beta)/N               one chunk's exchange
  c = C/N + o                          one chunk's compute, o = fixed per-chunk overhead
  pass(N) = d + (N-1) * max(c, 2d) + c + d
          = first chunk's dispatch + steady state + last chunk's compute and combine

pass(1) = 2*a2a + C is the sequential layer. The step is pass_fwd(C) + pass_bwd(2C) + local work
+ one alpha; `choose_chunks` minimises it. Optional measured refinements (`measure_rates`): beta
by message size (`Link.curve`; chunks send smaller messages) and the aggregate beta of two
exchanges in flight (`Link.pair_curve`, replacing 2d in the steady state). Around the MoE layer (`plan_step`): attention
FLOPs 8*T*D^2 + 4*T*S*D per layer forward (x3 with backward, / TP), 4 TP ring all-reduces of
T*D*b per layer (2 forward, 2 backward: 2(p-1)*alpha + 2(p-1)/p*bytes/beta each), pipeline
1F1B with m micro-batches: step = (m + PP - 1) * (stage time per micro-batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

ACTIVATIONS = ("swiglu", "gelu")
LOCAL_PASSES = 12            # R*D*b-sized passes over memory per step (see module docstring)


# ------------------------------------------------------------------------------ rates
@dataclasses.dataclass(frozen=True)
class Link:
    latency_s: float          # alpha: fixed cost of one exchange
    bandwidth_Bps: float      # beta: bytes/s one rank sends (per direction)
    # Optional measured beta by message size (bytes per peer, B/s), ascending: some transports
    # are not one straight alpha-beta line (gloo over TCP: ~2x slower per byte above ~1 MB per
    # peer in both directions at once). Interpolated in log(size), clamped at the ends.
    curve: Tuple[Tuple[float, float], ...] = ()
    # Optional aggregate beta with two exchanges of that size in flight at once (the overlap
    # schedule's steady state); gloo gets up to ~2x more than from one large exchange.
    pair_curve: Tuple[Tuple[float, float], ...] = ()

    def beta(self, message_bytes: Optional[float] = None) -> float:
        return _interp(self.curve, message_bytes, self.bandwidth_Bps)

    def pair_beta(self, message_bytes: float) -> float:
        """Aggregate bytes/s of two concurrent exchanges (no pair curve: same as one)."""
        return _interp(self.pair_curve, message_bytes, self.beta(message_bytes))

    def time(self, nbytes: float, message_bytes: Optional[float] = None) -> float:
        return self.latency_s + nbytes / self.beta(message_bytes if message_bytes is not None else nbytes)


def _interp(pts, message_bytes, default):
    """Piecewise linear in log(message size) through (size, B/s) points, clamped at the ends."""
    if not pts or message_bytes is None:
        return default
    if message_bytes <= pts[0][0]:
        return pts[0][1]
    for (s0, b0), (s1, b1) in zip(pts, pts[1:]):
        if message_bytes <= s1:
            w = math.log(message_bytes / s0) / math.log(s1 / s0)
            return b0 + w * (b1 - b0)
    return pts[-1][1]


@dataclasses.dataclass(frozen=True)
class Rates:
    """What a system achieves (measured, or taken from a cluster description)."""
    flops: float                                 # achieved FLOP/s of the expert GEMMs
    intra: Link                                  # link between ranks on one node
    inter: Optional[Link] = None                 # between nodes (None: same as intra)
    mem_bandwidth_Bps: float = float("inf")      # gathers / scatters of the local work
    chunk_overhead_s: float = 0.0                # fixed compute-side cost of one chunk

    def link(self, crosses_nodes: bool) -> Link:
        return (self.inter or self.intra) if crosses_nodes else self.intra


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}")


def expert_flops(rows: float, hidden: int, ffn: int, activation: str = "swiglu",
                 backward: bool = True) -> float:
    """FLOPs of `rows` tokens through one expert MLP D -> F -> D (forward, or forward+backward)."""
    _check_activation(activation)
    fwd = (6 if activation == "swiglu" else 4) * rows * hidden * ffn
    return 3 * fwd if backward else fwd


def dispatch_bytes(tokens: float, hidden: int, top_k: int, ep: int, bytes_per_element: int = 4) -> float:
    """Bytes one rank sends in one all-to-all under balanced routing: its T*K rows minus the 1/P
    that stay local."""
    return tokens * top_k * hidden * bytes_per_element * (ep - 1) / ep


def all_to_all_time(send_bytes: float, ep: int, ep_per_node: int, rates: Rates) -> float:
    """One all-to-all of `send_bytes` (spread evenly over the P-1 peers) across an EP group of
    which `ep_per_node` ranks share a node (contiguous placement)."""
    if ep <= 1:
        return 0.0
    ep_per_node = max(1, min(ep_per_node, ep))
    crosses = ep > ep_per_node
    per_peer = send_bytes / (ep - 1)           # message size, for links with a measured curve
    intra_b = per_peer * (ep_per_node - 1)
    inter_b = send_bytes - intra_b
    t = intra_b / rates.intra.beta(per_peer)
    if crosses:
        t = max(t, inter_b / rates.link(True).beta(per_peer))
    return rates.link(crosses).latency_s + t


def allreduce_time(nbytes: float, size: int, link: Link) -> float:
    """Ring all-reduce of `nbytes` over `size` ranks."""
    if size <= 1:
        return 0.0
    return 2 * (size - 1) * link.latency_s + 2 * (size - 1) / size * nbytes / link.bandwidth_Bps


def pipeline_pass_time(n: int, exchange_s: float, compute_s: float, alpha_s: float = 0.0,
                       chunk_overhead_s: float = 0.0, pair_s: Optional[float] = None) -> float:
    """One pass (forward or backward) of dispatch -> compute -> combine in `n` chunks.

    exchange_s: bandwidth time of one whole exchange (no alpha); compute_s: expert time of the
    whole pass; pair_s: time of the steady state's two chunk exchanges in flight together
    (dispatch of c+1, combine of c-1; default 2d: one after the other). n = 1 gives the
    sequential 2*(alpha + exchange_s) + compute_s (+ overhead).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"chunks must be a positive integer, got {n!r}")
    d = alpha_s + exchange_s / n
    c = compute_s / n + chunk_overhead_s
    net = 2 * d if pair_s is None else pair_s
    return d + (n - 1) * max(c, net) + c + d


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One MoE layer, forward + backward, on one rank."""
    a2a_s: float              # one all-to-all of the dispatch volume
    comm_s: float             # all communication of the step: 4 exchanges + count exchange
    compute_s: float          # expert GEMMs, forward + backward
    local_s: float            # router + permutation passes
    chunks: int
    overlapped_s: float       # the step with `chunks` chunks (== sequential_s for 1)
    alpha_s: float

    @property
    def sequential_s(self) -> float:
        return self.comm_s + self.compute_s + self.local_s

    @property
    def overlap_efficiency(self) -> float:
        """overlapped / max(comm, compute): 1.0 is perfect hiding."""
        return self.overlapped_s / max(self.comm_s, self.compute_s)


def moe_layer_cost(send_bytes: float, recv_rows: float, hidden: int, ffn: int, rates: Rates,
                   chunks: int = 1, activation: str = "swiglu", ep: int = 2,
                   ep_per_node: Optional[int] = None, tokens: float = 0.0, num_experts: int = 0,
                   bytes_per_element: int = 4) -> LayerCost:
    """Step cost of one MoE layer given the bytes this rank sends per exchange and the rows its
    experts receive (from a real dispatch, or `dispatch_bytes` / T*K when balanced)."""
    ep_per_node = ep if ep_per_node is None else ep_per_node
    link = rates.link(ep > ep_per_node)
    alpha = link.latency_s if ep > 1 else 0.0
    a2a = all_to_all_time(send_bytes, ep, ep_per_node, rates)
    # bandwidth time of the whole volume sent as `chunks` exchanges of 1/chunks of it each, and
    # of two such exchanges in flight together (the steady state)
    bw_s = chunks * max(all_to_all_time(send_bytes / chunks, ep, ep_per_node, rates) - alpha, 0.0)
    pair = None
    if ep > 1 and link.pair_curve:
        pair = alpha + 2 * (send_bytes / chunks) / link.pair_beta(send_bytes / chunks / (ep - 1))
    fwd = expert_flops(recv_rows, hidden, ffn, activation, backward=False) / rates.flops
    local = (3 * 2 * tokens * hidden * num_experts / rates.flops
             + LOCAL_PASSES * recv_rows * hidden * bytes_per_element / rates.mem_bandwidth_Bps)
    count_s = alpha
    comm = 4 * a2a + count_s
    overlapped = (pipeline_pass_time(chunks, bw_s, fwd, alpha, rates.chunk_overhead_s, pair)
                  + pipeline_pass_time(chunks, bw_s, 2 * fwd, alpha, rates.chunk_overhead_s, pair)
                  + local + count_s)
    if chunks == 1:      # no per-chunk overhead in the plain sequential path
        overlapped = comm + 3 * fwd + local
    return LayerCost(a2a, comm, 3 * fwd, local, chunks, overlapped, alpha)


def choose_chunks(send_bytes: float, recv_rows: float, hidden: int, ffn: int, rates: Rates,
                  activation: str = "swiglu", ep: int = 2, ep_per_node: Optional[int] = None,
                  max_chunks: int = 16, candidates: Optional[Iterable[int]] = None) -> int:
    """The chunk count minimising the predicted layer step (smallest N on ties). Every rank of an
    EP group must pass identical arguments, or ranks issue different numbers of collectives:
    use group-wide values (e.g. the max over the group, or the balanced estimate) and `Rates`
    from `measure_rates`, which agrees them over the group."""
    cands = sorted(set(candidates)) if candidates is not None else range(1, max_chunks + 1)
    best, best_t = 1, math.inf
    for n in cands:
        t = moe_layer_cost(send_bytes, recv_rows, hidden, ffn, rates, n, activation, ep,
                           ep_per_node).overlapped_s
        if t < best_t * (1 - 1e-9):
            best, best_t = n, t
    return best


# ------------------------------------------------------------------------------ measuring
def measure_rates(groups, hidden: int, ffn: Optional[int] = None, rows: int = 2048,
                  a2a_bytes: Union[int, Sequence[int]] = 1 << 20, reps: int = 5,
                  activation: str = "gelu", pairs: bool = True) -> Rates:
    """Time a small all-to-all, a small expert MLP and a gather on the running system (collective
    over the EP group: every rank must call it). Returns the same `Rates` on every rank (times
    are max-reduced over the group) so `choose_chunks` decides the same N everywhere.

    alpha: a 1-row all-to-all. beta: `a2a_bytes` sent to each peer, time minus alpha (several
    sizes: a measured beta curve, `bandwidth_Bps` the largest size's beta; `pairs`: also two
    exchanges of each size in flight at once, the pair curve). flops: one
    expert MLP [rows, D] -> F -> D forward + backward at the caller's thread count, counted with
    `expert_flops` (so the activation and the backward's transposed GEMMs are in the rate).
    mem bandwidth: a row gather. chunk overhead: the same MLP on 1 row plus a gather and a
    scatter-add (the fixed host-side cost one more chunk adds; a lower bound).
    """
    import statistics
    import time

    import torch
    import torch.distributed as dist
    import torch.nn.functional as Fn

    _check_activation(activation)
    ffn = ffn or 4 * hidden
    group = groups.ep_group if groups.ep_size > 1 else None

    def timed(fn, n=reps):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    P = groups.ep_size
    sizes = sorted([a2a_bytes] if isinstance(a2a_bytes, int) else a2a_bytes)
    alpha, t_a2a = 0.0, [0.0] * len(sizes)
    if group is not None:
        def a2a(nrows):
            x = torch.zeros(nrows * P, hidden)
            out = torch.empty_like(x)
            return lambda: dist.all_to_all_single(out, x, group=group)
        dist.barrier(group=group)
        def a2a_pair(nrows):
            xs = [torch.zeros(nrows * P, hidden) for _ in range(2)]
            outs = [torch.empty_like(x) for x in xs]
            return lambda: [w.wait() for w in [dist.all_to_all_single(o, x, group=group, async_op=True)
                                               for o, x in zip(outs, xs)]]
        alpha = timed(a2a(1), 3 * reps)
        t_a2a = [timed(a2a(max(1, nb // (4 * hidden)))) for nb in sizes]
        if pairs:
            t_a2a += [timed(a2a_pair(max(1, nb // (4 * hidden)))) for nb in sizes]
    width = 2 * ffn if activation == "swiglu" else ffn
    w1 = torch.randn(hidden, width, requires_grad=True)
    w2 = torch.randn(ffn, hidden, requires_grad=True)

    def act(h):
        if activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            return Fn.silu(g) * u
        return Fn.gelu(h, approximate="tanh")

    def mlp(x):
        def step():
            xi = x.detach().requires_grad_(True)
            act(xi @ w1).matmul(w2).sum().backward()
        return step
    x = torch.randn(rows, hidden)
    t_mlp = timed(mlp(x))
    idx = torch.randperm(rows)
    t_gather = timed(lambda: x.index_select(0, idx))
    one, y1 = torch.zeros(1, dtype=torch.long), torch.zeros(1, hidden)
    small = mlp(x[:1])
    t_chunk = timed(lambda: (small(), y1.index_add_(0, one, x.index_select(0, one))), 3 * reps)
    t = torch.tensor([alpha, t_mlp, t_gather, t_chunk] + t_a2a, dtype=torch.float64)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    alpha, t_mlp, t_gather, t_chunk, *t_a2a = t.tolist()
    msg = [float(max(1, nb // (4 * hidden)) * 4 * hidden) for nb in sizes]
    curve = pair_curve = ()
    if group is not None:
        curve = tuple((m, m * (P - 1) / max(ta - alpha, 0.5 * ta, 1e-9)) for m, ta in zip(msg, t_a2a))
        if pairs:
            pair_curve = tuple((m, 2 * m * (P - 1) / max(ta - alpha, 0.5 * ta, 1e-9))
                               for m, ta in zip(msg, t_a2a[len(sizes):]))
    beta = curve[-1][1] if curve else float("inf")
    link = Link(alpha, beta, curve if len(curve) > 1 else (), pair_curve)
    return Rates(flops=expert_flops(rows, hidden, ffn, activation) / t_mlp, intra=link,
                 mem_bandwidth_Bps=2 * rows * hidden * 4 / t_gather, chunk_overhead_s=t_chunk)


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
