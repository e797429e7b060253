"""Training a converted Qwen-Image transformer on instruction editing under
`python -m tagmoe_dist.train` (a model YAML with a `diffusers:` section; docs/diffusion.md).
Qwen-Image only: the loss feeds its input layout (Flux / SD3 convert, but train in your own loop).

Legend: B batch, C latent channels, H W latent size, P = C*4 packed channels, S = (H/2)(W/2)
image tokens per image, L instruction length, T text width.

The loss is Qwen-Image's flow matching (diffusers FlowMatchEulerDiscreteScheduler and its training
scripts), with the source image in context as Qwen-Image-Edit does:
  1. sigma from the sample's uniform u: logit-normal (or uniform) then the scheduler's exponential
     time shift with mu interpolated from the image sequence length (base 256 -> 0.5, max 8192 ->
     0.9, Qwen-Image's scheduler config), unless `flow.shift_mu` fixes it;
  2. x_t = (1 - sigma) x0 + sigma noise on the target latents; both x_t and the source latents are
     packed 2x2 into tokens and concatenated along the sequence ([x_t ; source], img_shapes
     [(1, H/2, W/2)] * 2), the instruction embedding is the text stream;
  3. the transformer gets timestep = sigma (its time projection scales by 1000) and predicts the
     velocity of the first S tokens; loss_b = mean (v_pred - (noise - x0))^2 (weighting "none").
The TAG alignment loss (pooled over the MoE blocks) and the balance losses enter backward through
the converted layers, as in the reference models.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import yaml

from tagmoe_dist.tasks import TaskSchema

_REPO_ROOT = Path(__file__).resolve().parents[3]
FLOW_DEFAULTS: Dict[str, Any] = dict(sigma_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
                                     shift_mu=None, base_seq_len=256, max_seq_len=8192,
                                     base_shift=0.5, max_shift=0.9)
WORKLOAD_DEFAULTS: Dict[str, Any] = dict(channels=16, size=8, text_len=6, text_dim=24,
                                         num_samples=1_000_000)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_diffusers_yaml(path) -> bool:
    with open(path, encoding="utf-8") as f:
        d = yaml.safe_load(f)
    return isinstance(d, Mapping) and "diffusers" in d


def pack_latents(x_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], as QwenImagePipeline._pack_latents."""
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def sigmas_from_u(u_B: torch.Tensor, seq_len: int, flow: Mapping[str, Any]) -> torch.Tensor:
    """Step 1 of the module docstring."""
    u_B = u_B.float().clamp(1e-6, 1 - 1e-6)
    if flow["sigma_sampling"] == "logit_normal":
        # inverse CDF of the normal: the logit-normal draw of diffusers' compute_density_for_timestep_sampling
        z_B = flow["logit_mean"] + flow["logit_std"] * math.sqrt(2) * torch.erfinv(2 * u_B - 1)
        s_B = torch.sigmoid(z_B)
    else:
        s_B = u_B
    mu = flow["shift_mu"]
    if mu is None:
        m = (flow["max_shift"] - flow["base_shift"]) / (flow["max_seq_len"] - flow["base_seq_len"])
        mu = flow["base_shift"] + m * (seq_len - flow["base_seq_len"])
    return math.exp(mu) / (math.exp(mu) + (1 / s_B - 1))


class EditingModel(nn.Module):
    """`forward(source, target, noise, u, prompt_embeds, prompt_mask, task) -> loss [B]`: the
    flow-matching loss of a converted transformer (module docstring). Exposes what the trainer
    reads from its models: `moe_layers()`, `set_aux_loss_scale`, `last_align`."""

    def __init__(self, transformer: nn.Module, flow: Mapping[str, Any]):
        super().__init__()
        self.transformer = transformer
        self.flow = dict(flow)

    def forward(self, source, target, noise, u, prompt_embeds, prompt_mask, task=None):
        from tagmoe_dist.integrations.diffusers.convert import tasks
        B, C, H, W = target.shape
        if H % 2 or W % 2:
            raise ValueError(f"latents must have even height and width (2x2 packing), got {H}x{W}")
        dtype = next(self.transformer.parameters()).dtype
        S = (H // 2) * (W // 2)
        sigma_B = sigmas_from_u(u, 2 * S, self.flow).to(target.device)
        s4 = sigma_B[:, None, None, None]
        x_t = (1 - s4) * target + s4 * noise
        tokens = torch.cat([pack_latents(x_t), pack_latents(source)], dim=1).to(dtype)
        with tasks(self.transformer, task):
            out = self.transformer(hidden_states=tokens, encoder_hidden_states=prompt_embeds.to(dtype),
                                   encoder_hidden_states_mask=prompt_mask, timestep=sigma_B.to(dtype),
                                   img_shapes=[[(1, H // 2, W // 2), (1, H // 2, W // 2)]] * B,
                                   return_dict=False)[0]
        v_BSP = out[:, :S].float()
        return (v_BSP - pack_latents(noise - target)).square().flatten(1).mean(1)

    # ------------------------------------------------------------------ the trainer's interface
    def moe_layers(self):
        from tagmoe_dist.integrations.diffusers.convert import moe_layers
        return moe_layers(self.transformer)

    def set_aux_loss_scale(self, scale: float) -> None:
        from tagmoe_dist.integrations.diffusers.convert import set_aux_loss_scale
        set_aux_loss_scale(self.transformer, scale)

    @property
    def last_align(self) -> Dict[str, torch.Tensor]:
        from tagmoe_dist.integrations.diffusers.convert import last_align
        return last_align(self.transformer)


@dataclasses.dataclass(frozen=True)
class DiffusersModelConfig:
    """A model YAML with a `diffusers:` section (configs/models/qwenimage*.yaml):

    diffusers:   family (a supported class name), config (its constructor arguments: a model
                 built from a config, random weights) or pretrained (a diffusers directory, e.g. a
                 Qwen-Image snapshot; `subfolder` default "transformer"), dtype, and optionally
                 authors_checkpoint (safetensors in the authors' dMoE layout, loaded after
                 conversion) and gradient_checkpointing
    moe_blocks:  "last:K" or a list;  moe: MoEConfig fields;  upcycle: UpcycleOptions fields
    task_schema: the tag vocabulary YAML;  flow: FLOW_DEFAULTS keys;  workload: the synthetic
                 data's shape (WORKLOAD_DEFAULTS keys; ignored for train.data=<index.jsonl>)
    train:       the trainer's keys (tagmoe_dist/train.py TRAIN_DEFAULTS)
    """

    diffusers: Mapping[str, Any]
    task_schema: Optional[str] = None
    moe_blocks: Any = "last:10"
    moe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    upcycle: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    flow: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    workload: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    is_dense = False
    zero3_init = False        # ZeRO-3: built whole, partitioned by the engine (integrations/zero3.py)

    def __post_init__(self):
        from tagmoe_dist.integrations.diffusers.families import SUPPORTED
        d = self.diffusers
        if not isinstance(d, Mapping) or d.get("family") not in SUPPORTED:
            raise ValueError(f"diffusers.family must be one of {list(SUPPORTED)}, got "
                             f"{d.get('family') if isinstance(d, Mapping) else d!r}")
        if d["family"] != "QwenImageTransformer2DModel":
            raise ValueError(f"diffusers.family={d['family']!r}: the editing trainer feeds Qwen-Image's "
                             "inputs (packed latents, img_shapes, source in context); use "
                             "QwenImageTransformer2DModel (other families: tm.diffusers.convert "
                             "and your own loop)")
        known = {"family", "config", "pretrained", "subfolder", "dtype", "authors_checkpoint",
                 "gradient_checkpointing"}
        if set(d) - known:
            raise ValueError(f"unknown diffusers.* key(s) {sorted(set(d) - known)}; valid: {sorted(known)}")
        if ("config" in d) == ("pretrained" in d):
            raise ValueError("diffusers: give exactly one of `config` (build from a config) or "
                             "`pretrained` (a diffusers model directory)")
        if d.get("dtype", "float32") not in DTYPES:
            raise ValueError(f"diffusers.dtype must be one of {list(DTYPES)}, got {d.get('dtype')!r}")
        for name, given, allowed in (("flow", self.flow, FLOW_DEFAULTS),
                                     ("workload", self.workload, WORKLOAD_DEFAULTS)):
            if not isinstance(given, Mapping) or set(given) - set(allowed):
                raise ValueError(f"{name}: unknown key(s) {sorted(set(given) - set(allowed))}; "
                                 f"valid: {sorted(allowed)}")
        if self.flow.get("sigma_sampling", "logit_normal") not in ("logit_normal", "uniform"):
            raise ValueError("flow.sigma_sampling must be 'logit_normal' or 'uniform'")
        if self.task_schema is None:
            raise ValueError("task_schema: the editing workload needs the tag vocabulary "
                             "(configs/tasks/tagmoe_paper.yaml)")

    # ------------------------------------------------------------------ YAML
    @classmethod
    def from_yaml(cls, path) -> "DiffusersModelConfig":
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid: {sorted(fields)}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        return {f.name: (dict(getattr(self, f.name)) if isinstance(getattr(self, f.name), Mapping)
                         else getattr(self, f.name)) for f in dataclasses.fields(self)}

    def load_task_schema(self) -> TaskSchema:
        path = Path(self.task_schema)
        if not path.is_absolute() and not path.exists():
            path = _REPO_ROOT / path
        return TaskSchema.from_yaml(path)

    # ------------------------------------------------------------------ the trainer's hooks
    def build_model(self, groups, schema: TaskSchema) -> EditingModel:
        import diffusers

        from tagmoe_dist.integrations.diffusers.convert import convert
        from tagmoe_dist.integrations.diffusers.megablocks import (load_authors_state_dict,
                                                                   read_safetensors)
        d = self.diffusers
        cls = getattr(diffusers, d["family"])
        dtype = DTYPES[d.get("dtype", "float32")]
        if "config" in d:
            transformer = cls(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in d["config"].items()})
            if dtype != torch.float32:
                transformer = transformer.to(dtype)
        else:
            transformer = cls.from_pretrained(d["pretrained"], subfolder=d.get("subfolder", "transformer"),
                                              torch_dtype=dtype)
        convert(transformer, self.moe_blocks, moe=dict(self.moe), task_schema=schema, groups=groups,
                upcycle=dict(self.upcycle))
        if d.get("authors_checkpoint"):
            load_authors_state_dict(transformer, read_safetensors(d["authors_checkpoint"]))
        if d.get("gradient_checkpointing"):
            transformer.enable_gradient_checkpointing()
        return EditingModel(transformer.train(), {**FLOW_DEFAULTS, **self.flow})

    def build_data(self, train: Mapping[str, Any], schema: TaskSchema):
        from tagmoe_dist.data.editing import EditingDataset, SyntheticEditing, synthetic_eval_splits
        w = {**WORKLOAD_DEFAULTS, **self.workload}
        if train["data"] == "synthetic":
            n = w.pop("num_samples")
            data = SyntheticEditing(n, schema, seed=train["seed"], **w)
            evals = synthetic_eval_splits(train["eval_samples_per_task"], schema, seed=train["seed"], **w)
            return data, evals
        data = EditingDataset(train["data"], schema, seed=train["seed"])
        evals = {}
        if train["eval_data"]:
            ev = EditingDataset(train["eval_data"], schema, seed=train["seed"], split="eval")
            per_task: Dict[str, List[int]] = {}
            for i, r in enumerate(ev.records):
                per_task.setdefault(r["task_name"], []).append(i)
            evals = {n: torch.utils.data.Subset(ev, idx[:train["eval_samples_per_task"]])
                     for n, idx in per_task.items()}
        return data, evals

    def collator(self, schema: TaskSchema):
        from tagmoe_dist.data.editing import EditingCollator
        return EditingCollator(schema)

    @staticmethod
    def batch_loss(engine, batch: Mapping[str, Any], device) -> torch.Tensor:
        """Per-sample flow-matching loss [B] of one collated batch."""
        keys = ("source", "target", "noise", "u", "prompt_embeds", "prompt_mask")
        return engine(*(batch[k].to(device) for k in keys), task=batch["task_multi_hot"].to(device))
