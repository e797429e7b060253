"""MoEConfig: every knob of an MoE layer, validated at construction.

User errors are ValueErrors that name the field and say how to fix it; asserts are kept for
internal invariants only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

ROUTERS = ("topk", "task_aware", "task_level")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu")
INPUT_LAYOUTS = ("bsh", "sbh", "th")
DROP_POLICIES = ("probs", "position")
AUX_LOSS_TYPES = ("micro_batch", "seq")
AUX_LOSS_REDUCTIONS = ("mean", "sum")
TASK_CONDITIONING = ("none", "add", "concat")
ALIGN_TARGETS = ("learned", "detached", "orthogonal")
ALIGN_LOSSES = ("cosine", "contrastive")
EXPERT_KERNELS = ("auto", "native", "grouped_mm", "torch")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name}={value!r} is not supported; choose one of {list(allowed)}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"MoEConfig.{name} must be a number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Configuration of one MoE layer.

    Shapes: hidden_size = D (model width), ffn_hidden_size = F (width of one expert), E experts,
    each token picks top_k of them.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    # routing
    router: str = "topk"                      # topk | task_aware | task_level
    score_function: str = "softmax"           # softmax | sigmoid
    norm_topk_prob: bool = False              # renormalise the k chosen weights to sum to 1
    topk_scaling_factor: float = 1.0
    capacity_factor: Optional[float] = None   # None = dropless
    drop_policy: str = "probs"                # which tokens an over-full expert keeps
    min_capacity: int = 1
    aux_loss_coeff: float = 0.01
    aux_loss_type: str = "micro_batch"        # micro_batch | seq (per sequence, DeepSeek-V2 style)
    # load-balancing loss over a model's MoE layers: mean (MegaBlocks, the TAG-MoE paper's code
    # base) or sum (Megatron-core); the model tells each layer how many MoE layers it has
    aux_loss_reduction: str = "mean"
    z_loss_coeff: float = 0.0
    expert_bias: bool = False                 # aux-loss-free balancing (DeepSeek-V3)
    expert_bias_update_rate: float = 1e-3
    input_jitter: float = 0.0                 # multiplicative uniform noise on router input, training only
    # task-aware gating (TAG-MoE)
    task_conditioning: str = "none"           # none (paper) | add | concat
    task_embed_dim: int = 64                  # width of the task embedding used by "concat"
    align_loss_coeff: float = 0.05
    align_dim: int = 512                      # D of the tag embedding W_tag
    align_hidden: int = 256                   # width of the predictor MLP H_pred
    # orthogonal (fixed, collapse-safe) | detached (stop-gradient) | learned (the paper as
    # written; its loss collapses: docs/results.md)
    align_target: str = "orthogonal"
    align_loss: str = "cosine"                # cosine (paper) | contrastive
    align_temperature: float = 0.1
    # experts
    activation: str = "swiglu"                # swiglu | gelu (tanh approximation)
    expert_mlp_bias: bool = False             # biases on both expert linears (the paper's DiT experts)
    # which kernel computes the experts (kernels/__init__.py): auto | native | grouped_mm | torch
    expert_kernel: str = "auto"
    num_shared_experts: int = 0
    shared_expert_ffn_hidden_size: Optional[int] = None   # default: num_shared_experts * ffn_hidden_size
    shared_expert_gate: bool = False          # sigmoid gate on the shared expert (Qwen2-MoE)
    init_std: float = 0.02
    # layout / execution
    input_layout: str = "bsh"                 # bsh = [batch, seq, hidden], sbh = [seq, batch, hidden], th = flat
    # EP>1: chunks of the all-to-all / expert pipeline. "auto": the cost model's choice from rates
    # measured once by `plan_overlap` (outside forward; dispatch/dispatcher.py), or a default
    # without measurement; measured rates may differ between runs and so may the last bits:
    # give a number for bitwise-reproducible runs.
    overlap_chunks: Union[int, str] = "auto"
    debug_checks: bool = False                # host-syncing checks (non-finite logits)

    def __post_init__(self):
        for f in dataclasses.fields(self):   # NaN passes every comparison below: refuse it first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"MoEConfig.{f.name}={value} is not a finite number")
        for f in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "min_capacity",
                  "task_embed_dim", "align_dim", "align_hidden"):
            _positive_int(f, getattr(self, f))
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} is greater than num_experts="
                             f"{self.num_experts}; lower top_k or add experts")
        _choice("router", self.router, ROUTERS)
        _choice("score_function", self.score_function, SCORE_FUNCTIONS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("input_layout", self.input_layout, INPUT_LAYOUTS)
        _choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _choice("aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES)
        _choice("aux_loss_reduction", self.aux_loss_reduction, AUX_LOSS_REDUCTIONS)
        _choice("task_conditioning", self.task_conditioning, TASK_CONDITIONING)
        _choice("align_target", self.align_target, ALIGN_TARGETS)
        _choice("align_loss", self.align_loss, ALIGN_LOSSES)
        _choice("expert_kernel", self.expert_kernel, EXPERT_KERNELS)
        if self.capacity_factor is not None:
            if not isinstance(self.capacity_factor, (int, float)) or self.capacity_factor <= 0:
                raise ValueError(f"MoEConfig.capacity_factor must be > 0 or None (dropless), "
                                 f"got {self.capacity_factor!r}")
        for f in ("aux_loss_coeff", "z_loss_coeff", "align_loss_coeff", "input_jitter",
                  "expert_bias_update_rate", "init_std"):
            _non_negative(f, getattr(self, f))
        if self.input_jitter >= 1:
            raise ValueError("MoEConfig.input_jitter must be in [0, 1): it is the half-width of a "
                             "multiplicative noise 1 +- jitter")
        if self.align_temperature <= 0:
            raise ValueError("MoEConfig.align_temperature must be > 0")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be an integer >= 0, "
                             f"got {self.num_shared_experts!r}")
        if self.shared_expert_ffn_hidden_size is not None:
            _positive_int("shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size)
        if self.task_conditioning != "none" and self.router != "task_aware":
            raise ValueError(f"MoEConfig.task_conditioning={self.task_conditioning!r} only applies to "
                             "router='task_aware'; set router='task_aware' or task_conditioning='none'")
        if self.router == "task_level" and self.expert_bias:
            raise ValueError("MoEConfig.expert_bias is not supported with router='task_level' "
                             "(routing depends on the task only); set expert_bias=False")
        if self.overlap_chunks != "auto":
            if not isinstance(self.overlap_chunks, int) or self.overlap_chunks < 1:
                raise ValueError(f"MoEConfig.overlap_chunks must be a positive integer or 'auto', "
                                 f"got {self.overlap_chunks!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def uses_tasks(self) -> bool:
        return self.router in ("task_aware", "task_level")

    @property
    def shared_ffn_size(self) -> int:
        if self.shared_expert_ffn_hidden_size is not None:
            return self.shared_expert_ffn_hidden_size
        return self.num_shared_experts * self.ffn_hidden_size

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)


def parse_moe_layers(spec: Any, num_layers: int, field: str = "moe_layers") -> list:
    """Which of a model's `num_layers` blocks (0-based) have an MoE FFN, sorted.

    spec: a list of block indices (negative ones count from the end, as in Python), "last:K"
    (the last K blocks: the TAG-MoE paper's 10 of 60), "all", or "none". Errors name `field`.
    """
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"{field}: the model needs a positive number of layers, got {num_layers!r}")
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(num_layers))
        if s == "none":
            return []
        if s.startswith("last:"):
            try:
                k = int(s[5:])
            except ValueError:
                k = -1
            if not 0 <= k <= num_layers:
                raise ValueError(f"{field}={spec!r}: 'last:K' needs an integer K in 0..{num_layers} "
                                 f"(the model has {num_layers} layers)")
            return list(range(num_layers - k, num_layers))
        raise ValueError(f"{field}={spec!r} is not understood: give a list of layer indices, "
                         "'last:K', 'all' or 'none'")
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{field} must be a list of layer indices or a string ('last:K', 'all', "
                         f"'none'), got {type(spec).__name__}")
    out = set()
    for i in spec:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"{field}: layer index {i!r} is not an integer")
        if not -num_layers <= i < num_layers:
            raise ValueError(f"{field}: layer index {i} is out of range for a model of {num_layers} "
                             f"layers (valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)")
        j = i % num_layers
        if j in out:
            raise ValueError(f"{field}: layer {j} is listed twice")
        out.add(j)
    return sorted(out)
