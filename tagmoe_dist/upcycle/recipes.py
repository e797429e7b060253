"""Pure tensor recipes that turn one dense SwiGLU FFN into E experts and a router.

Nothing here reads files or knows a checkpoint layout: `convert.py` calls these once per layer and
per expert, and the tests call them directly.

Shape legend (suffixes on tensor names):
  H  hidden size               F  dense intermediate size
  G  granularity (slices)      f  expert intermediate size, F // G
  E  experts                   V  virtual groups, E // G
  K  top-k                     R  re-initialised rows (Drop-Upcycling)

Why the upcycled model equals the dense one (renormalised top-k, as in Mixtral and in Qwen2-MoE with
`norm_topk_prob=True`):
  1. G = 1: every expert is the whole FFN and the K selected weights sum to 1, so the output is FFN(x)
     whichever experts are picked.
  2. G > 1: expert e holds slice `slice_E[e]` of the intermediate dimension; the G experts of one
     virtual group hold slices 0..G-1 and share one router row, so they score identically. With K a
     multiple of G, top-k takes whole groups, each slice receives total weight 1/G, and the sum is
     FFN(x) / G. Multiplying the down projection by G restores FFN(x) exactly.
  3. All router rows equal (zeros init) ties every expert; torch.topk then picks a fixed set that does
     not follow group boundaries (see `topk_tie_set`). Laying the groups out over that set first makes
     it a union of whole groups, so (2) still holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import torch

ROUTER_INITS = ("zeros", "normal")
SCALINGS = ("down", "cube-root")


def derive_seed(seed: int, *ids: int | str) -> int:
    """A 63-bit seed for one (layer, expert, purpose) tuple.

    Derived from the tuple rather than drawn from a running generator, so that the output does not
    depend on the order in which tensors are produced.
    """
    digest = hashlib.sha256(repr((int(seed),) + tuple(ids)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *ids: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *ids))


# ---------------------------------------------------------------------------------------------
# Virtual groups: which slice each expert holds and which router row it shares.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    slice_E: tuple[int, ...]  # slice of the dense intermediate dimension held by expert e
    group_E: tuple[int, ...]  # virtual group of expert e; a group's experts share a router row
    granularity: int

    @property
    def num_experts(self) -> int:
        return len(self.slice_E)

    @property
    def num_groups(self) -> int:
        return self.num_experts // self.granularity


def topk_tie_set(num_experts: int, top_k: int) -> tuple[int, ...]:
    """The experts torch.topk selects when every router logit ties (all router rows zero).

    Mirrors the HF Mixtral/Qwen2-MoE routers: softmax in float32, then topk. On CPU the result is a
    deterministic function of (E, K) but not the K lowest indices (e.g. E=8, K=2 gives {5, 6}), so it
    is measured here instead of assumed. Another backend (CUDA) may break ties differently.
    """
    probs_1E = torch.softmax(torch.zeros(1, num_experts, dtype=torch.float32), dim=-1)
    topk_ids_1K = torch.topk(probs_1E, top_k, dim=-1).indices
    return tuple(sorted(int(i) for i in topk_ids_1K[0]))


def virtual_group_layout(num_experts: int, granularity: int,
                         first: Sequence[int] = ()) -> ExpertLayout:
    """Partition E experts into E/G virtual groups, each holding slices 0..G-1 once.

    Groups are consecutive runs of G experts taken from sorted(`first`) and then from the remaining
    experts in index order. With `first` empty this is the plain group-major layout
    (expert e = group * G + slice); passing `topk_tie_set(E, K)` makes the tied selection a union of
    whole groups.
    """
    assert num_experts % granularity == 0, "validated by UpcycleOptions"
    first = sorted(set(first))
    assert len(first) % granularity == 0 and all(0 <= e < num_experts for e in first)
    rest = [e for e in range(num_experts) if e not in set(first)]
    order = first + rest
    slice_E = [0] * num_experts
    group_E = [0] * num_experts
    for pos, e in enumerate(order):
        group_E[e], slice_E[e] = divmod(pos, granularity)
    return ExpertLayout(tuple(slice_E), tuple(group_E), granularity)


def router_weight(layout: ExpertLayout, hidden: int, init: str, std: float,
                  gen: torch.Generator) -> torch.Tensor:
    """Router rows [E, H]: one row per virtual group, copied to every expert of the group."""
    if init == "zeros":
        rows_VH = torch.zeros(layout.num_groups, hidden)
    elif init == "normal":
        rows_VH = torch.randn(layout.num_groups, hidden, generator=gen) * std
    else:
        raise ValueError(f"--router-init {init!r} is not one of {ROUTER_INITS}")
    return rows_VH[torch.tensor(layout.group_E)]


# ---------------------------------------------------------------------------------------------
# Scaling: restore the factor lost when an FFN is split into slices.
# ---------------------------------------------------------------------------------------------


def required_scale(num_experts: int, top_k: int, granularity: int, renormalised: bool) -> float:
    """Factor by which the experts' combined output falls short of the dense FFN at init.

    Renormalised top-k weights: each slice gets total weight 1/G, so the factor is G (exact).
    Softmax-then-top-k without renormalisation and a uniform router: each selected expert has weight
    1/E and each slice is picked K/G times, so the factor is E*G/K (approximate once the router is
    not uniform; the paper writes it E*G^2/T with E counting dense-sized experts).
    """
    if renormalised:
        return float(granularity)
    return num_experts * granularity / top_k


def projection_scales(factor: float, scaling: str) -> tuple[float, float, float]:
    """(gate, up, down) multipliers whose effect on a SwiGLU expert is `factor`.

    "down" puts the whole factor on the down projection: exact for any activation.
    "cube-root" puts factor**(1/3) on each of gate, up and down: exact only for positively
    homogeneous activations (ReLU), approximate for SiLU/GELU, since act(c*z) != c*act(z).
    """
    if scaling == "down":
        return 1.0, 1.0, float(factor)
    if scaling == "cube-root":
        c = float(factor) ** (1.0 / 3.0)
        return c, c, c
    raise ValueError(f"--scaling {scaling!r} is not one of {SCALINGS}")


# ---------------------------------------------------------------------------------------------
# Experts.
# ---------------------------------------------------------------------------------------------


def slice_ffn(gate_FH: torch.Tensor, up_FH: torch.Tensor, down_HF: torch.Tensor,
              slice_idx: int, granularity: int):
    """Slice `slice_idx` of G along the intermediate dimension: gate/up rows, down columns."""
    f = gate_FH.shape[0] // granularity
    lo, hi = slice_idx * f, (slice_idx + 1) * f
    return gate_FH[lo:hi], up_FH[lo:hi], down_HF[:, lo:hi]


def drop_indices(size: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Drop-Upcycling: a random permutation of the intermediate dimension, first round(r*f) kept."""
    return torch.randperm(size, generator=gen)[: int(round(ratio * size))]


def reinit_along(w: torch.Tensor, idx_R: torch.Tensor, dim: int,
                 gen: torch.Generator) -> torch.Tensor:
    """Copy of `w` with entries idx_R along `dim` redrawn from N(mean(w), std(w)).

    Statistics come from the expert's own matrix, so the redrawn neurons match the scale of the
    kept ones (the paper's choice); only R entries are drawn, not a full-size random matrix.
    """
    shape_R = list(w.shape)
    shape_R[dim] = idx_R.numel()
    fresh_R = torch.randn(shape_R, generator=gen, dtype=torch.float32)
    fresh_R = fresh_R * w.float().std() + w.float().mean()
    w = w.clone()
    w.index_copy_(dim, idx_R, fresh_R.to(w.dtype))
    return w


def add_noise(w: torch.Tensor, rel_std: float, gen: torch.Generator) -> torch.Tensor:
    """w + rel_std * std(w) * N(0, 1): breaks the symmetry between copies, and exactness with it."""
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float32) * (rel_std * w.float().std())
    return (w.float() + noise).to(w.dtype)


@dataclasses.dataclass(frozen=True)
class ExpertRecipe:
    granularity: int = 1
    scale_factor: float = 1.0  # see required_scale
    scaling: str = "down"
    drop_ratio: float = 0.0
    expert_noise: float = 0.0

    @property
    def exact(self) -> bool:
        """Whether the recipe keeps the dense output (for any activation) at initialisation."""
        return (self.drop_ratio == 0.0 and self.expert_noise == 0.0
                and (self.scaling == "down" or self.scale_factor == 1.0))


def build_expert(gate_FH: torch.Tensor, up_FH: torch.Tensor, down_HF: torch.Tensor,
                 slice_idx: int, recipe: ExpertRecipe, seed: int, layer: int, expert: int):
    """One expert's (gate [f, H], up [f, H], down [H, f]) from the dense FFN of one layer.

    Order: slice, Drop-Upcycling, noise, then scaling, so that the perturbations are drawn at the
    dense weights' scale and the exactness factor applies to the finished expert.
    """
    gate_fH, up_fH, down_Hf = slice_ffn(gate_FH, up_FH, down_HF, slice_idx, recipe.granularity)
    weights = {"gate": gate_fH, "up": up_fH, "down": down_Hf}
    neuron_dim = {"gate": 0, "up": 0, "down": 1}
    if recipe.drop_ratio > 0:
        # One index set per expert, shared by gate rows, up rows and down columns: together they
        # are whole intermediate neurons.
        idx_R = drop_indices(gate_fH.shape[0], recipe.drop_ratio,
                             make_generator(seed, layer, expert, "drop-idx"))
        weights = {n: reinit_along(w, idx_R, neuron_dim[n],
                                   make_generator(seed, layer, expert, f"drop-{n}"))
                   for n, w in weights.items()}
    if recipe.expert_noise > 0:
        weights = {n: add_noise(w, recipe.expert_noise,
                                make_generator(seed, layer, expert, f"noise-{n}"))
                   for n, w in weights.items()}
    out = []
    scales = projection_scales(recipe.scale_factor, recipe.scaling)
    for w, s in zip(weights.values(), scales):
        # Untouched slices are copied bit for bit; scaled ones are computed in float32.
        out.append(w.contiguous().clone() if s == 1.0 else (w.float() * s).to(w.dtype))
    return tuple(out)
