"""Hugging Face model families: what each one's MoE block computes, and how its weights map onto
`MoELayer`.

Shape legend: E experts, D hidden, F expert width, S shared-expert width, Fd dense MLP width.

Routing rules, read from transformers 5.x (`models/<family>/modeling_<family>.py`):

  family      router                                              experts   MoEConfig
  mixtral     softmax(fp32 logits) -> top-k -> renormalise        SwiGLU    softmax, norm_topk_prob=True
  qwen2_moe   softmax(fp32) -> top-k -> renormalise iff            SwiGLU    softmax, norm_topk_prob=cfg,
              norm_topk_prob; + shared expert * sigmoid(gate)               shared_expert_gate=True
  qwen3_moe   as qwen2_moe without the shared expert              SwiGLU    softmax, norm_topk_prob=cfg

Our router computes its logits in fp32 from fp32 weights (Mixtral computes them in the model
dtype, Qwen in the model dtype then softmax in fp32): identical in fp32, and in bf16 our routing
is the more precise one. Ties between scores go to the lower expert index (torch.topk leaves
them unspecified); random or trained routers do not tie.

Weight mapping (transformers 5 keeps experts packed in memory):
  gate.weight [E, D]                       -> router.weight [E, D]
  experts.gate_up_proj [E, 2F, D]          -> experts.w1 [E, D, 2F]   (transpose; gate half first)
  experts.down_proj [E, D, F]              -> experts.w2 [E, F, D]    (transpose)
  shared_expert.{gate,up}_proj [S, D]      -> shared_expert.mlp.w1 [D, 2S] (gate | up, transposed)
  shared_expert.down_proj [D, S]           -> shared_expert.mlp.w2 [S, D]
  shared_expert_gate.weight [1, D]         -> shared_expert.gate.weight [1, D]
Dense sources (llama, mistral, qwen2): each MLP's gate/up/down_proj [Fd, D] / [D, Fd] is upcycled
by `tagmoe_dist.upcycle.recipes` (the same recipes and seeds as `python -m tagmoe_dist.upcycle`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import torch

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
DENSE_FAMILIES = ("llama", "mistral", "qwen2")
SUPPORTED = MOE_FAMILIES + DENSE_FAMILIES
# the Hugging Face family an export writes (dense sources become their MoE counterpart)
EXPORT_TYPE = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
               "llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"}
_SPARSE_BLOCKS = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
                  "qwen3_moe": "Qwen3MoeSparseMoeBlock"}
_DENSE_MLPS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP"}


def supported_text() -> str:
    return (f"MoE sources {list(MOE_FAMILIES)} (converted), dense sources {list(DENSE_FAMILIES)} "
            "(upcycled; pass upcycle=dict(num_experts=..., top_k=...))")


def check_family(model_type: Any, where: str) -> str:
    if model_type not in SUPPORTED:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: "
                         f"{supported_text()}")
    return model_type


def is_dense(model_type: str) -> bool:
    return model_type in DENSE_FAMILIES


def replaced_class(model_type: str) -> str:
    """Class name of the decoder-layer `mlp` modules that become MoE layers."""
    return (_DENSE_MLPS if is_dense(model_type) else _SPARSE_BLOCKS)[model_type]


def _act_check(config, model_type: str) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.hidden_act={act!r} ({model_type}): tagmoe_dist experts are SwiGLU "
                         "(silu gate); only hidden_act='silu' converts exactly")


def moe_fields(config, model_type: str) -> Dict[str, Any]:
    """MoEConfig fields that reproduce an MoE source's routing and experts (see the table)."""
    _act_check(config, model_type)
    D = config.hidden_size
    if model_type == "mixtral":
        return dict(hidden_size=D, ffn_hidden_size=config.intermediate_size,
                    num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                    score_function="softmax", norm_topk_prob=True,
                    input_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
                    aux_loss_coeff=float(config.router_aux_loss_coef))
    fields = dict(hidden_size=D, ffn_hidden_size=config.moe_intermediate_size,
                  num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                  score_function="softmax", norm_topk_prob=bool(config.norm_topk_prob),
                  aux_loss_coeff=float(config.router_aux_loss_coef))
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    if model_type == "qwen2_moe" and shared > 0:
        # a zero-width shared expert (as our upcycler writes) adds exactly 0: leave it out
        fields.update(num_shared_experts=1, shared_expert_ffn_hidden_size=shared,
                      shared_expert_gate=True)
    return fields


@dataclasses.dataclass(frozen=True)
class UpcycleSpec:
    """upcycle= of from_pretrained: the options of `python -m tagmoe_dist.upcycle` that apply in
    memory (no output format, no shard size)."""
    num_experts: int
    top_k: int
    granularity: int = 1
    router_init: str = "normal"
    scaling: str = "down"
    drop_ratio: float = 0.0
    expert_noise: float = 0.0
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]], where: str = "upcycle") -> "UpcycleSpec":
        if d is None:
            raise ValueError(f"{where}: a dense source needs upcycle=dict(num_experts=..., "
                             "top_k=...) (the MoE layers are built from its MLPs)")
        if isinstance(d, cls):
            return d
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        spec = cls(**d)
        from tagmoe_dist.upcycle.options import UpcycleOptions
        # the CLI's validation, with placeholder paths (nothing is read or written here)
        try:
            UpcycleOptions(src="/in-memory/src", dst="/in-memory/dst", num_experts=spec.num_experts,
                           top_k=spec.top_k, granularity=spec.granularity,
                           router_init=spec.router_init, scaling=spec.scaling,
                           drop_ratio=spec.drop_ratio, expert_noise=spec.expert_noise,
                           seed=spec.seed)
        except ValueError as e:
            msg = str(e)
            for flag in ("num-experts", "top-k", "granularity", "router-init", "scaling",
                         "drop-ratio", "expert-noise"):
                msg = msg.replace(f"--{flag}", f"{where}.{flag.replace('-', '_')}")
            raise ValueError(msg) from None
        return spec

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def dense_fields(config, model_type: str, up: UpcycleSpec) -> Dict[str, Any]:
    """MoEConfig fields of an upcycled dense MLP: renormalised top-k (the exact recipe; the
    Mixtral / Qwen2-MoE export targets renormalise too)."""
    _act_check(config, model_type)
    if getattr(config, "mlp_bias", False):
        raise ValueError(f"config.mlp_bias=True ({model_type}): MoE experts have no bias, so the "
                         "upcycled model could not equal the dense one")
    inter = config.intermediate_size
    if inter % up.granularity:
        raise ValueError(f"upcycle.granularity={up.granularity} does not divide the dense "
                         f"intermediate_size {inter}; choose a divisor of {inter}")
    return dict(hidden_size=config.hidden_size, ffn_hidden_size=inter // up.granularity,
                num_experts=up.num_experts, top_k=up.top_k, score_function="softmax",
                norm_topk_prob=True, aux_loss_coeff=0.01)


# ---------------------------------------------------------------------------------------------
# weights: Hugging Face module -> MoELayer.full_state_dict() naming


def sparse_block_state(block, model_type: str) -> Dict[str, torch.Tensor]:
    """Global MoELayer weights of one HF sparse MoE block (all experts)."""
    sd = {"router.weight": block.gate.weight.detach(),
          "experts.w1": block.experts.gate_up_proj.detach().transpose(1, 2),
          "experts.w2": block.experts.down_proj.detach().transpose(1, 2)}
    if model_type == "qwen2_moe" and getattr(block.shared_expert.gate_proj, "out_features", 0) > 0:
        se = block.shared_expert
        sd["shared_expert.mlp.w1"] = torch.cat([se.gate_proj.weight.detach().t(),
                                                se.up_proj.weight.detach().t()], dim=1)
        sd["shared_expert.mlp.w2"] = se.down_proj.weight.detach().t()
        sd["shared_expert.gate.weight"] = block.shared_expert_gate.weight.detach()
    return sd


def upcycled_state(mlp, layer: int, up: UpcycleSpec, expert_ids, router_std: float
                   ) -> Dict[str, torch.Tensor]:
    """MoELayer weights of one upcycled dense MLP, experts `expert_ids` only (this rank's), with
    the recipes and seeds of `python -m tagmoe_dist.upcycle --format hf`."""
    from tagmoe_dist.upcycle import recipes
    gate_FH, up_FH, down_HF = (mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                               mlp.down_proj.weight.detach())
    layout = recipes.virtual_group_layout(up.num_experts, up.granularity)
    recipe = recipes.ExpertRecipe(
        granularity=up.granularity,
        scale_factor=recipes.required_scale(up.num_experts, up.top_k, up.granularity, True),
        scaling=up.scaling, drop_ratio=up.drop_ratio, expert_noise=up.expert_noise)
    w1, w2 = [], []
    for e in expert_ids:
        g, u, d = recipes.build_expert(gate_FH, up_FH, down_HF, layout.slice_E[e], recipe,
                                       up.seed, layer, e)
        w1.append(torch.cat([g.t(), u.t()], dim=1))
        w2.append(d.t())
    router = recipes.router_weight(layout, gate_FH.shape[1], up.router_init, router_std,
                                   recipes.make_generator(up.seed, layer, "router"))
    return {"router.weight": router.to(gate_FH.dtype), "experts.w1": torch.stack(w1),
            "experts.w2": torch.stack(w2)}
