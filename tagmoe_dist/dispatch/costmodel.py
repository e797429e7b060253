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
                  activation: str = "gelu", pairs: bool = True, device=None,
                  dtype=None) -> Rates:
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

    `device` / `dtype`: where and in what the layer runs (default CPU float32); the probes run
    there, so on GPUs the exchanges go through NCCL and the MLP is timed on the GPU. Never call
    this inside forward: it issues collectives and takes tens of milliseconds (`plan_overlap`
    in layer.py calls it once, outside).
    """
    import statistics
    import time

    import torch
    import torch.distributed as dist
    import torch.nn.functional as Fn

    _check_activation(activation)
    ffn = ffn or 4 * hidden
    group = groups.ep_group if groups.ep_size > 1 else None

    device = torch.device(device if device is not None else "cpu")
    dtype = dtype or torch.float32
    kw = dict(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, n=reps):
        fn()
        sync()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    P = groups.ep_size
    sizes = sorted([a2a_bytes] if isinstance(a2a_bytes, int) else a2a_bytes)
    alpha, t_a2a = 0.0, [0.0] * len(sizes)
    if group is not None:
        def a2a(nrows):
            x = torch.zeros(nrows * P, hidden, **kw)
            out = torch.empty_like(x)
            return lambda: dist.all_to_all_single(out, x, group=group)
        dist.barrier(group=group)
        def a2a_pair(nrows):
            xs = [torch.zeros(nrows * P, hidden, **kw) for _ in range(2)]
            outs = [torch.empty_like(x) for x in xs]
            return lambda: [w.wait() for w in [dist.all_to_all_single(o, x, group=group, async_op=True)
                                               for o, x in zip(outs, xs)]]
        alpha = timed(a2a(1), 3 * reps)
        t_a2a = [timed(a2a(max(1, nb // (4 * hidden)))) for nb in sizes]
        if pairs:
            t_a2a += [timed(a2a_pair(max(1, nb // (4 * hidden)))) for nb in sizes]
    width = 2 * ffn if activation == "swiglu" else ffn
    w1 = torch.randn(hidden, width, **kw).requires_grad_(True)
    w2 = torch.randn(ffn, hidden, **kw).requires_grad_(True)

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
    x = torch.randn(rows, hidden, **kw)
    t_mlp = timed(mlp(x))
    idx = torch.randperm(rows, device=device)
    t_gather = timed(lambda: x.index_select(0, idx))
    one, y1 = torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, hidden, **kw)
    small = mlp(x[:1])
    t_chunk = timed(lambda: (small(), y1.index_add_(0, one, x.index_select(0, one))), 3 * reps)
    t = torch.tensor([alpha, t_mlp, t_gather, t_chunk] + t_a2a, dtype=torch.float64, device=device)
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
                 mem_bandwidth_Bps=2 * rows * hidden * x.element_size() / t_gather, chunk_overhead_s=t_chunk)
