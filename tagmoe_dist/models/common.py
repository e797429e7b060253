"""What every reference model with MoE FFNs shares: the model-wide TAG alignment loss, the
auxiliary-loss scale, and the active-parameter count used for fair comparisons."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, List, Mapping, Optional

import torch
import yaml

from tagmoe_dist.config import MoEConfig, parse_moe_layers
from tagmoe_dist.gating.losses import AuxLossAutoScaler
from tagmoe_dist.layer import MoELayer
from tagmoe_dist.tasks import TaskSchema

ARCHS = ("moe", "dense")
_REPO_ROOT = Path(__file__).resolve().parents[2]



def load_task_schema(path: Optional[str]) -> Optional[TaskSchema]:
    """A model YAML's `task_schema:` path (relative: to the working directory, then the repo
    root), loaded; None when the model has none."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = _REPO_ROOT / p
    return TaskSchema.from_yaml(p)

class ModelConfigMixin:
    """The YAML-facing half shared by the reference models' frozen config dataclasses: the
    embedded `moe` mapping (an MoEConfig without hidden_size = d_model), `arch` / `moe_every` /
    `moe_layers`, the task schema path, the trainer's opaque `train` mapping, and dict / YAML
    conversion. Needs the fields d_model, n_layer, moe, moe_every, moe_layers, arch, task_schema,
    train.

    MoE placement: `moe_layers` (a list of block indices, or "last:K", see
    `tagmoe_dist.config.parse_moe_layers`) when given, else periodic `moe_every`."""

    def _check_moe_fields(self) -> None:
        name = type(self).__name__
        if self.arch not in ARCHS:
            raise ValueError(f"{name}.arch={self.arch!r} is not supported; choose one of {list(ARCHS)}")
        if not isinstance(self.moe_every, int) or not 0 <= self.moe_every <= self.n_layer:
            raise ValueError(f"{name}.moe_every must be an integer in 0..n_layer={self.n_layer} "
                             f"(0 = dense, 1 = every block, 2 = every other block), got {self.moe_every!r}")
        if self.moe_layers is not None:
            if self.moe_every != 1:
                raise ValueError(f"{name}: set either moe_layers={self.moe_layers!r} or moe_every="
                                 f"{self.moe_every}, not both (leave moe_every at its default 1)")
            parse_moe_layers(self.moe_layers, self.n_layer, f"{name}.moe_layers")
        if not isinstance(self.moe, Mapping):
            raise ValueError(f"{name}.moe must be a mapping of MoEConfig fields, e.g. "
                             "{ffn_hidden_size: 128, num_experts: 8, top_k: 2}")
        if "hidden_size" in self.moe and self.moe["hidden_size"] != self.d_model:
            raise ValueError(f"{name}.moe.hidden_size={self.moe['hidden_size']} differs from "
                             f"d_model={self.d_model}; leave it out (it is set from d_model)")
        if not isinstance(self.train, Mapping):
            raise ValueError(f"{name}.train must be a mapping of trainer settings")
        try:
            self.moe_config
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}.moe: {e}") from e

    # ------------------------------------------------------------------ derived
    @property
    def moe_config(self) -> MoEConfig:
        return MoEConfig.from_dict({**self.moe, "hidden_size": self.d_model})

    @property
    def moe_layer_indices(self) -> List[int]:
        """The blocks (0-based) with an MoE FFN; [] for a dense model."""
        if self.arch == "dense":
            return []
        if self.moe_layers is not None:
            return parse_moe_layers(self.moe_layers, self.n_layer)
        if self.moe_every == 0:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.moe_every == 0]

    @property
    def is_dense(self) -> bool:
        return not self.moe_layer_indices

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layer_indices

    @property
    def dense_ffn_size(self) -> int:
        """Width of a dense FFN: the active width of an MoE FFN (top_k experts + shared expert)."""
        m = self.moe_config
        return m.top_k * m.ffn_hidden_size + m.shared_ffn_size

    def load_task_schema(self) -> Optional[TaskSchema]:
        return load_task_schema(self.task_schema)

    # ------------------------------------------------------------------ dict / YAML
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["moe"], d["train"] = dict(self.moe), dict(self.train)
        if isinstance(d.get("moe_layers"), tuple):
            d["moe_layers"] = list(d["moe_layers"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        name = cls.__name__
        if not isinstance(d, Mapping):
            raise ValueError(f"{name}: expected a mapping of fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown {name} field(s) {unknown}; valid fields: {sorted(fields)}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in d]
        if missing:
            raise ValueError(f"{name}: missing required field(s) {missing}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path):
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_yaml(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


class MoEModelMixin:
    """Needs `self.blocks` (each with an `ffn`), `self.alignment` (TaskAlignment or None),
    `self.groups`, `self.aux_loss_scale` and `self.last_align`."""

    def _attach_alignment(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """The TAG alignment loss, pooled over all MoE layers of this forward pass (the paper's
        g_b), attached once to the hidden state."""
        self.last_align = {}
        if self.alignment is None:
            return x_BSD
        loss, acc = self.alignment.finish()     # always: it also resets the pool for next forward
        if loss is None:
            return x_BSD
        self.last_align = {"loss": loss.detach(), "acc": acc,
                           "target_min_dist": self.alignment.last_stats["target_min_dist"]}
        if torch.is_grad_enabled():
            x_BSD = AuxLossAutoScaler.apply(x_BSD, self.alignment.cfg.align_loss_coeff * loss,
                                            self.aux_loss_scale)
        return x_BSD

    def moe_layers(self) -> List[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def _register_moe_layers(self) -> None:
        """Tell every MoE layer how many MoE layers the model has (MoEConfig.aux_loss_reduction
        = 'mean' divides each layer's load-balancing loss by it). Called by the constructor."""
        layers = self.moe_layers()
        for layer in layers:
            layer.num_moe_layers = len(layers)

    def set_aux_loss_scale(self, scale: float) -> None:
        """1/(gradient accumulation steps) when the main loss is averaged over micro-batches."""
        self.aux_loss_scale = scale
        for layer in self.moe_layers():
            layer.aux_loss_scale = scale

    def num_params(self, active_only: bool = False) -> int:
        """Global parameter count (expert weights summed over the EP group; tied weights once).

        active_only: the parameters one token's forward computes with. Per MoE layer that is
        top_k of the E experts (+ the shared expert); routing parameters (router gates, the task
        alignment head) are left out as routing overhead (E*D per MoE layer, plus the
        training-only alignment head). With that count a dense FFN of width
        top_k*ffn_hidden_size (+ shared width) is exactly as large, for GPT with SwiGLU:
            active = V*D + S*D + n_layer*(attn 4*D^2 + 2 norms 4*D) + 2*D
                     + n_layer * 3*D*(top_k*F + shared)
        for the dense and every MoE variant alike.
        """
        routing = {id(p) for layer in self.moe_layers() for p in layer.router.parameters()}
        if self.alignment is not None:
            routing |= {id(p) for p in self.alignment.parameters()}
        expert_share = {}
        for layer in self.moe_layers():
            frac = layer.cfg.top_k / layer.cfg.num_experts if active_only else 1.0
            for p in layer.experts.parameters():
                # local numel * ep_size = all experts; times top_k/E for the active share
                expert_share[id(p)] = frac * self.groups.ep_size
        total = 0.0
        for p in self.parameters():         # nn.Module.parameters() yields tied weights once
            if active_only and id(p) in routing:
                continue
            # ZeRO-3 leaves a partitioned parameter empty; ds_numel is its whole size
            numel = getattr(p, "ds_numel", None) or p.numel()
            total += numel * expert_share.get(id(p), 1.0)
        return int(round(total))
