"""Turn the image-stream FFNs of chosen MMDiT blocks of a diffusers transformer into expert-parallel
MoELayers, upcycled from the dense FFN (docs/diffusion.md).

Notation: B samples, S image tokens, D hidden, F dense FFN width, E experts, K top-k.

Why the converted transformer equals the dense one at initialisation (the default recipe):
  1. every expert is a copy of the dense FFN (w_in, b_in, w_out, b_out), so whichever experts a
     token picks, each computes FFN(x) up to the scale c applied to its output projection;
  2. the router starts at zero, so every logit ties and every selected expert gets the same
     weight w0 (softmax: 1/E; sigmoid: 1/2; renormalised top-k: 1/K; times topk_scaling_factor);
  3. the output is sum over the K choices of w0 * c * FFN(x); with c = 1 / (K * w0) (`combine_scale`)
     it is FFN(x). For the paper's routing (softmax top-1 of 4, weight not renormalised) c = 4: a
     power of two, so the scaling is exact in floating point.
With `MoEConfig.norm_topk_prob=True` the top-k weights sum to 1 for any router, c = 1, and the
router may start random (router_init="normal") with the output still exact. Token dropping
(capacity_factor), expert noise and Drop-Upcycling break exactness by design (`info()["exact"]`).

Task ids and the alignment loss: block.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating.task_aware import TaskAlignment
from tagmoe_dist.integrations.diffusers.block import (DiffusersMoE, TaskState,
                                                      _AlignmentHook)
from tagmoe_dist.integrations.diffusers.families import (dense_ffn_weights, family_of,
                                                         parse_moe_blocks)
from tagmoe_dist.layer import MoELayer, register_moe_layers
from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.tasks import TaskSchema
from tagmoe_dist.upcycle.recipes import add_noise, drop_indices, make_generator, reinit_along

STATE_ATTR = "tagmoe"                 # TaskState on the converted transformer
ALIGNMENT_ATTR = "tagmoe_alignment"   # the shared TaskAlignment (a registered submodule)

# The paper's experts and routing (ICTMCG/TAG-MoE: MegaBlocks dMoE, 4 experts, top-1, softmax
# weight not renormalised, tanh-GELU, width of the dense FFN).
PAPER_MOE: Dict[str, Any] = dict(num_experts=4, top_k=1, score_function="softmax",
                                 norm_topk_prob=False, activation="gelu", expert_mlp_bias=True)
ROUTER_INITS = ("zeros", "normal")


@dataclasses.dataclass(frozen=True)
class UpcycleOptions:
    """How experts and router are initialised from the dense FFN (`upcycle=` of `convert`)."""
    router_init: str = "zeros"     # zeros (exact for any routing) | normal (exact only renormalised)
    router_std: float = 0.02
    expert_noise: float = 0.0      # relative std of noise added to each expert copy
    drop_ratio: float = 0.0        # Drop-Upcycling: fraction of each expert's neurons redrawn
    seed: int = 0

    def __post_init__(self):
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"upcycle.router_init={self.router_init!r}: choose one of {list(ROUTER_INITS)}")
        for f in ("router_std", "expert_noise"):
            if not isinstance(getattr(self, f), (int, float)) or getattr(self, f) < 0:
                raise ValueError(f"upcycle.{f} must be a number >= 0, got {getattr(self, f)!r}")
        if not 0 <= self.drop_ratio <= 1:
            raise ValueError(f"upcycle.drop_ratio must be in [0, 1], got {self.drop_ratio!r}")

    @classmethod
    def from_any(cls, value: Union[None, Mapping[str, Any], "UpcycleOptions"]) -> "UpcycleOptions":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"upcycle must be a mapping of {[f.name for f in dataclasses.fields(cls)]}, "
                             f"got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown upcycle option(s) {unknown}; valid: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**value)


def combine_scale(cfg: MoEConfig) -> float:
    """c such that K selected copies of FFN, each weighted w0 at a tied (zero) router and scaled
    by c, sum to FFN(x): c = 1 / (K * w0). See the module docstring."""
    if cfg.norm_topk_prob:
        w0 = 1.0 / cfg.top_k
    elif cfg.score_function == "softmax":
        w0 = 1.0 / cfg.num_experts
    else:
        w0 = 0.5
    return 1.0 / (cfg.top_k * w0 * cfg.topk_scaling_factor)


def moe_config_for(hidden: int, ffn: int, moe: Union[None, Mapping[str, Any], MoEConfig],
                   num_blocks: int, has_schema: bool) -> MoEConfig:
    """The MoEConfig of the converted blocks: the paper's defaults, then the user's fields."""
    given = moe.to_dict() if isinstance(moe, MoEConfig) else dict(moe or {})
    defaults = dict(PAPER_MOE, hidden_size=hidden, ffn_hidden_size=ffn,
                    router="task_aware" if has_schema else "topk",
                    # MegaBlocks (the paper's code) averages the balance loss over the MoE layers:
                    # weight 0.01, aux_loss_reduction="mean" (register_moe_layers sets L)
                    aux_loss_coeff=0.01, aux_loss_reduction="mean")
    fields = {**defaults, **given}
    for name, want, why in (("hidden_size", hidden, "the transformer's inner dim"),
                            ("ffn_hidden_size", ffn, "the dense FFN's width: experts are its copies"),
                            ("activation", "gelu", "the dense FFN's tanh-GELU"),
                            ("expert_mlp_bias", True, "the dense FFN has biases"),
                            ("input_layout", "bsh", "diffusers blocks feed [B, S, D]")):
        if name in given and given[name] != want:
            raise ValueError(f"moe.{name}={given[name]!r} must be {want!r} ({why}); leave it out")
    try:
        return MoEConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"moe: {e}") from e


# --------------------------------------------------------------------------------- upcycling
def _expert_copy(w1_DF, b1_F, w2_FD, b2_D, opts: UpcycleOptions, block: int, expert: int):
    """One expert from the dense FFN: Drop-Upcycling and noise (optional), in the dense weights'
    scale, as upcycle/recipes.py does for SwiGLU. Neurons are columns of w1, entries of b1 and
    rows of w2."""
    if opts.drop_ratio > 0:
        idx = drop_indices(w1_DF.shape[1], opts.drop_ratio,
                           make_generator(opts.seed, block, expert, "drop-idx"))
        w1_DF = reinit_along(w1_DF, idx, 1, make_generator(opts.seed, block, expert, "drop-w1"))
        w2_FD = reinit_along(w2_FD, idx, 0, make_generator(opts.seed, block, expert, "drop-w2"))
    if opts.expert_noise > 0:
        w1_DF = add_noise(w1_DF, opts.expert_noise, make_generator(opts.seed, block, expert, "noise-w1"))
        w2_FD = add_noise(w2_FD, opts.expert_noise, make_generator(opts.seed, block, expert, "noise-w2"))
    return w1_DF, b1_F, w2_FD, b2_D


def upcycled_state_dict(layer: MoELayer, dense, opts: UpcycleOptions, block: int
                        ) -> Dict[str, torch.Tensor]:
    """Global weights of `layer` (the `load_full_state_dict` layout) from a dense FFN's
    (w_in [F, D], b_in [F], w_out [D, F], b_out [D])."""
    cfg = layer.cfg
    w_in, b_in, w_out, b_out = (t.float() for t in dense)
    c = combine_scale(cfg)
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items() if not k.startswith("experts.")}
    if opts.router_init == "zeros":
        sd["router.weight"] = torch.zeros_like(sd["router.weight"])
    else:
        g = make_generator(opts.seed, block, "router")
        sd["router.weight"] = torch.randn(sd["router.weight"].shape, generator=g) * opts.router_std
    E = cfg.num_experts
    if opts.drop_ratio == 0 and opts.expert_noise == 0:
        # identical copies: expanded views, nothing materialised for experts of other ranks
        sd["experts.w1"] = w_in.t().unsqueeze(0).expand(E, -1, -1)
        sd["experts.b1"] = b_in.unsqueeze(0).expand(E, -1)
        sd["experts.w2"] = (w_out.t() * c).unsqueeze(0).expand(E, -1, -1)
        sd["experts.b2"] = (b_out * c).unsqueeze(0).expand(E, -1)
        return sd
    parts = [_expert_copy(w_in.t(), b_in, w_out.t(), b_out, opts, block, e) for e in range(E)]
    sd["experts.w1"] = torch.stack([p[0] for p in parts])
    sd["experts.b1"] = torch.stack([p[1] for p in parts])
    sd["experts.w2"] = torch.stack([p[2] for p in parts]) * c
    sd["experts.b2"] = torch.stack([p[3] for p in parts]) * c
    return sd


def is_exact(cfg: MoEConfig, opts: UpcycleOptions) -> bool:
    """Whether the converted transformer's output equals the dense one's at initialisation."""
    return (cfg.capacity_factor is None and opts.drop_ratio == 0 and opts.expert_noise == 0
            and (opts.router_init == "zeros" or cfg.norm_topk_prob) and not cfg.expert_bias
            and cfg.num_shared_experts == 0 and cfg.input_jitter == 0)


# --------------------------------------------------------------------------------- the call
def convert(transformer: nn.Module, moe_blocks: Any = "last:10",
            moe: Union[None, Mapping[str, Any], MoEConfig] = None,
            task_schema: Optional[TaskSchema] = None, groups: Optional[ParallelGroups] = None,
            upcycle: Union[None, Mapping[str, Any], UpcycleOptions] = None) -> nn.Module:
    """Replace the image-stream FFN of the chosen blocks of a diffusers MMDiT by MoELayers, in
    place; returns the transformer.

    transformer: QwenImageTransformer2DModel, FluxTransformer2DModel or SD3Transformer2DModel.
    moe_blocks: "last:K" (the paper: "last:10" of Qwen-Image's 60), "all", "none" or a list of
      block indices (negative from the end).
    moe: MoEConfig fields overriding the paper's (4 experts, top-1, softmax weight not
      renormalised, tanh-GELU with bias, width of the dense FFN, balance loss 0.01 averaged over
      the converted blocks; router "task_aware" when a task_schema is given, else "topk").
    task_schema: the tag vocabulary (configs/tasks/tagmoe_paper.yaml for the paper's 18 tags).
    groups: expert parallelism (ParallelGroups.build(ep_size=...) or the DeepSpeed adapter's);
      every rank converts the same dense transformer and keeps its own experts.
    upcycle: UpcycleOptions fields (router_init, router_std, expert_noise, drop_ratio, seed).
    Everything is validated before any layer is built.
    """
    family = family_of(transformer)
    if getattr(transformer, STATE_ATTR, None) is not None:
        raise ValueError("tm.diffusers.convert: this transformer was converted already")
    blocks = getattr(transformer, family.blocks)
    chosen = parse_moe_blocks(moe_blocks, len(blocks))
    if not chosen:
        raise ValueError(f"moe_blocks={moe_blocks!r} selects no block; choose at least one")
    dense = {i: dense_ffn_weights(getattr(blocks[i], family.ffn),
                                  f"{family.blocks}.{i}.{family.ffn}") for i in chosen}
    w_in = dense[chosen[0]][0]
    cfg = moe_config_for(w_in.shape[1], w_in.shape[0], moe, len(chosen), task_schema is not None)
    groups = groups or ParallelGroups.single()
    if cfg.num_experts % groups.ep_size != 0:
        raise ValueError(f"moe.num_experts={cfg.num_experts} is not divisible by the expert-parallel "
                         f"size {groups.ep_size}; choose a multiple of {groups.ep_size} experts or "
                         "another ep_size")
    if cfg.uses_tasks and task_schema is None:
        raise ValueError(f"moe.router={cfg.router!r} needs task_schema= (e.g. TaskSchema.from_yaml("
                         "'configs/tasks/tagmoe_paper.yaml'))")
    opts = UpcycleOptions.from_any(upcycle)

    state = TaskState(task_schema if cfg.uses_tasks else None, transformer)
    alignment = TaskAlignment(cfg, task_schema) if cfg.router == "task_aware" else None
    for i in chosen:
        ffn = getattr(blocks[i], family.ffn)
        ref = ffn.net[0].proj.weight
        layer = DiffusersMoE(cfg, groups, state.schema, alignment, state, i)
        layer.moe.load_full_state_dict(upcycled_state_dict(layer.moe, dense[i], opts, i))
        setattr(blocks[i], family.ffn, layer.to(device=ref.device, dtype=ref.dtype))
    if alignment is not None:
        ref = dense[chosen[0]][0]
        setattr(transformer, ALIGNMENT_ATTR, alignment.to(device=ref.device, dtype=ref.dtype))
        transformer.norm_out.register_forward_hook(_AlignmentHook(alignment, state))
    object.__setattr__(transformer, STATE_ATTR, state)
    object.__setattr__(transformer, "tagmoe_info", {
        "family": type(transformer).__name__, "blocks": chosen, "ffn": family.ffn,
        "moe": cfg.to_dict(), "upcycle": dataclasses.asdict(opts), "exact": is_exact(cfg, opts),
        "combine_scale": combine_scale(cfg), "ep_size": groups.ep_size})
    register_moe_layers(transformer)    # aux_loss_reduction="mean": averaged over the MoE blocks
    return transformer


# --------------------------------------------------------------------------------- helpers
def _state(transformer: nn.Module) -> TaskState:
    state = getattr(transformer, STATE_ATTR, None)
    if state is None:
        raise ValueError("the transformer was not converted by tm.diffusers.convert")
    return state


def tasks(transformer: nn.Module, task: Optional[torch.Tensor]):
    """Context manager: the task descriptors (LongTensor [B, levels], -1 unknown, or multi-hot
    [B, tags]) of the forward pass run inside it."""
    return _state(transformer).use(task)


class TaskTransformer(nn.Module):
    """`TaskTransformer(transformer)(hidden_states, ..., task=t)`: the transformer's forward with a
    `task` keyword."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        _state(transformer)
        self.transformer = transformer

    def forward(self, *args, task: Optional[torch.Tensor] = None, **kwargs):
        with tasks(self.transformer, task):
            return self.transformer(*args, **kwargs)


def moe_blocks(transformer: nn.Module) -> Dict[int, DiffusersMoE]:
    """{block index: DiffusersMoE} of a converted transformer."""
    return {m.block_index: m for m in transformer.modules() if isinstance(m, DiffusersMoE)}


def moe_layers(transformer: nn.Module) -> List[MoELayer]:
    return [m.moe for _, m in sorted(moe_blocks(transformer).items())]


def set_aux_loss_scale(transformer: nn.Module, scale: float) -> None:
    """1/(gradient accumulation steps) when the main loss is averaged over micro-batches."""
    _state(transformer).aux_loss_scale = scale
    for layer in moe_layers(transformer):
        layer.aux_loss_scale = scale


def last_align(transformer: nn.Module) -> Dict[str, torch.Tensor]:
    """{"loss", "acc"} of the last forward pass with task ids (empty otherwise)."""
    return _state(transformer).last_align


def info(transformer: nn.Module) -> Dict[str, Any]:
    """What `convert` did: family, blocks, MoEConfig, upcycle options, whether exact at init."""
    _state(transformer)
    return dict(transformer.tagmoe_info)
