"""A small GPT-style decoder whose FFNs are MoE layers (TAG-MoE, plain top-k) or dense.

Notation: B batch, S sequence, D d_model, H heads, V vocab, E experts, N tags.

Layout (nanoGPT-like): token + learned position embeddings, pre-norm blocks
(x += attn(norm(x)); x += ffn(norm(x))), final norm, LM head tied to the token embedding.
Block i has an MoE FFN iff it is in `moe_layers` (a list, or "last:K") when that is set, else
iff (i + 1) % moe_every == 0 (moe_every=2: blocks 1, 3, ...; the last block
of an even-depth model is MoE), a DenseMLP elsewhere.

Fair comparisons: a dense FFN is `top_k * ffn_hidden_size (+ shared expert width)` wide, so the
`dense` variant (`arch: dense` or `moe_every: 0`) has exactly the active parameters of the MoE one
(see `GPT.num_params`). Labels are same-position: use `lm_loss` for the shifted loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tagmoe_dist.experts import DenseMLP
from tagmoe_dist.gating.task_aware import TaskAlignment
from tagmoe_dist.layer import MoELayer
from tagmoe_dist.models.common import ModelConfigMixin, MoEModelMixin
from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.tasks import TaskSchema

try:  # apex's fused kernels when installed (it falls back to F.layer_norm itself on CPU tensors)
    from apex.normalization import FusedLayerNorm as _FusedLayerNorm
except ImportError:
    _FusedLayerNorm = None



@dataclasses.dataclass(frozen=True)
class GPTConfig(ModelConfigMixin):
    """The model of a YAML file in configs/models/ (`from_yaml`); `moe` is validated as an
    MoEConfig at construction, `train` is carried along for the trainer and never read here."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    moe: Mapping[str, Any]                    # MoEConfig fields except hidden_size (= d_model)
    moe_every: int = 1                        # 0 = no MoE (same as arch: dense)
    moe_layers: Optional[Any] = None          # [block indices] | "last:K" | "all"; overrides moe_every
    arch: str = "moe"                         # moe | dense
    task_schema: Optional[str] = None         # YAML path (relative: to cwd, then the repo root)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # opaque: the trainer's

    def __post_init__(self):
        for f in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPTConfig.{f} must be a positive integer, got {v!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model={self.d_model} is not divisible by n_head="
                             f"{self.n_head}; pick d_model as a multiple of n_head")
        if isinstance(self.moe_layers, list):      # frozen: keep the config hashable
            object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        self._check_moe_fields()


def _layer_norm(d: int) -> nn.Module:
    if _FusedLayerNorm is not None:
        try:
            return _FusedLayerNorm(d)
        except ImportError:     # a Python-only apex build: its CUDA extension loads here, not at import
            pass
    return nn.LayerNorm(d)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, std: float):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=std)
        # GPT-2: residual projections scaled down so the residual stream's variance stays O(1)
        nn.init.normal_(self.proj.weight, std=std / math.sqrt(2 * cfg.n_layer))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        q_BHSd, k_BHSd, v_BHSd = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2)
                                  for t in (q, k, v))
        y_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, is_causal=True)
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int, groups: ParallelGroups,
                 schema: Optional[TaskSchema], alignment: Optional[TaskAlignment]):
        super().__init__()
        m = cfg.moe_config
        self.ln_1, self.ln_2 = _layer_norm(cfg.d_model), _layer_norm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, m.init_std)
        if cfg.is_moe_layer(index):
            self.ffn = MoELayer(m, groups=groups, task_schema=schema, alignment=alignment)
        else:
            self.ffn = DenseMLP(cfg.d_model, cfg.dense_ffn_size, m.activation, m.init_std,
                                bias=m.expert_mlp_bias)

    def forward(self, x_BSD: torch.Tensor, task: Optional[torch.Tensor]) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.ln_1(x_BSD))
        h_BSD = self.ln_2(x_BSD)
        if isinstance(self.ffn, MoELayer):
            return x_BSD + self.ffn(h_BSD, task=task)
        return x_BSD + self.ffn(h_BSD)


class GPT(MoEModelMixin, nn.Module):
    """`forward(input_ids_BS, task=None) -> logits_BSV`.

    task: LongTensor [B, levels] (-1 = unknown) or multi-hot [B, N]; used by task-aware routers,
    ignored by top-k and dense models (so one training loop serves every variant).
    With router='task_aware' the model owns ONE TaskAlignment that every MoE layer feeds; its loss
    (pooled over all MoE layers, as in the paper) is attached once, after the last block.
    """

    def __init__(self, cfg: GPTConfig, groups: Optional[ParallelGroups] = None,
                 task_schema: Optional[TaskSchema] = None):
        super().__init__()
        groups = groups or ParallelGroups.single()
        self.cfg, self.groups = cfg, groups
        moe_cfg = cfg.moe_config
        has_moe = not cfg.is_dense
        self.uses_tasks = has_moe and moe_cfg.uses_tasks
        if self.uses_tasks and task_schema is None:
            task_schema = cfg.load_task_schema()
            if task_schema is None:
                raise ValueError(f"GPTConfig.moe.router={moe_cfg.router!r} needs a task schema: set "
                                 "GPTConfig.task_schema (a YAML path) or pass task_schema=")
        self.task_schema = task_schema if self.uses_tasks else None
        self.alignment = (TaskAlignment(moe_cfg, task_schema)
                          if has_moe and moe_cfg.router == "task_aware" else None)

        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=moe_cfg.init_std)
        nn.init.normal_(self.wpe.weight, std=moe_cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, i, groups, self.task_schema, self.alignment)
                                    for i in range(cfg.n_layer))
        self.ln_f = _layer_norm(cfg.d_model)
        fused = _FusedLayerNorm is not None and isinstance(self.ln_f, _FusedLayerNorm)
        self.norm_impl = "apex" if fused else "torch"      # which LayerNorm kernels the model runs
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight     # tied
        self.aux_loss_scale = 1.0
        self.last_align: Dict[str, torch.Tensor] = {}
        self._register_moe_layers()

    def forward(self, input_ids_BS: torch.Tensor, task: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S = input_ids_BS.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"input has {S} positions but GPTConfig.seq_len={self.cfg.seq_len}; "
                             "raise seq_len or truncate the batch")
        task = task if self.uses_tasks else None
        if task is not None:     # validated once per batch here, not in every MoE layer
            task = self.task_schema.to_multi_hot(task, B)
        pos_S = torch.arange(S, device=input_ids_BS.device)
        x_BSD = self.wte(input_ids_BS) + self.wpe(pos_S)
        for block in self.blocks:
            x_BSD = block(x_BSD, task)
        x_BSD = self._attach_alignment(x_BSD)
        return self.lm_head(self.ln_f(x_BSD))


def lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, per_sample: bool = False,
            ignore_index: int = -100) -> torch.Tensor:
    """Causal LM loss with same-position labels: logits at t predict labels[t + 1].

    per_sample=True returns the mean loss of each sample [B] (0 where no label), for per-task logs.
    """
    logits_BSV, labels_BS = logits_BSV[:, :-1], labels_BS[:, 1:]
    B, S, V = logits_BSV.shape
    ce_BS = F.cross_entropy(logits_BSV.reshape(-1, V).float(), labels_BS.reshape(-1),
                            ignore_index=ignore_index, reduction="none").view(B, S)
    valid_BS = (labels_BS != ignore_index).to(ce_BS.dtype)
    if per_sample:
        return ce_BS.sum(1) / valid_BS.sum(1).clamp(min=1.0)
    return ce_BS.sum() / valid_BS.sum().clamp(min=1.0)
