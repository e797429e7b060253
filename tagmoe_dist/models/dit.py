"""A small diffusion transformer (DiT) for image generation and editing, with MoE or dense FFNs,
trained by flow matching (rectified flow).

Notation: B batch, C image channels, H W image size, p patch size, S = (H/p)(W/p) tokens,
D d_model, L instruction length, E experts, N tags.

Layout (DiT with adaLN-Zero; the source image enters by channel concatenation as in
InstructPix2Pix, the instruction both as adaLN conditioning and as attention context):
  tokens   patchify(concat(x_t, source) over channels) -> linear -> + learned positions   [B, S, D]
  instr    e_BLD = Embed_l(instruction[:, l]) per slot l                                   [B, L, D]
  cond     c = MLP(sinusoid(t)) + sum_l e_BLD[:, l]   (instruction_adaln: false: MLP(sinusoid(t)))  [B, D]
  blocks   x += gate1(c) * attn(q = modulate(norm(x), c), k/v over [norm(e); modulate(norm(x), c)])
           x += gate2(c) * ffn(modulate(norm(x), c))
  out      modulate(norm(x), c) -> linear (zero-init) -> unpatchify: the velocity  [B, C, H, W]
The instruction tokens are context only (as the text stream of the paper's MMDiT, whose FFNs are
not the MoE ones): image tokens attend to them, the FFNs and routers see image tokens alone.
Block i has an MoE FFN iff it is in `moe_layers` (a list, or "last:K") when that is set, else
iff (i + 1) % moe_every == 0, as in gpt.py; a dense FFN is
`top_k * ffn_hidden_size (+ shared)` wide, so every variant has the same active parameters.

Flow matching: x_t = (1 - t) x0 + t noise, t in [0, 1]; the model predicts v = noise - x0 and
sampling integrates dx/dt = v from t = 1 (noise) to t = 0 (image) with Euler steps.
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



@dataclasses.dataclass(frozen=True)
class DiTConfig(ModelConfigMixin):
    """A YAML file in configs/models/dit_*.yaml (`from_yaml`). `moe` is validated as an MoEConfig
    at construction; `train` is carried along for the trainer and never read here."""

    image_size: int
    patch_size: int
    n_layer: int
    n_head: int
    d_model: int
    moe: Mapping[str, Any]                    # MoEConfig fields except hidden_size (= d_model)
    in_channels: int = 3
    instruction_vocab: int = 19               # tagmoe_dist.data.images.INSTRUCTION_VOCAB
    instruction_len: int = 3
    moe_every: int = 1                        # 0 = no MoE (same as arch: dense)
    moe_layers: Optional[Any] = None          # [block indices] | "last:K" | "all"; overrides moe_every
    # False: the instruction reaches image tokens only through attention (the paper's MMDiT);
    # adaLN is conditioned on the timestep alone, so it does not rescale every router input
    instruction_adaln: bool = True
    arch: str = "moe"                         # moe | dense
    task_schema: Optional[str] = None         # YAML path (relative: to cwd, then the repo root)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for f in ("image_size", "patch_size", "n_layer", "n_head", "d_model", "in_channels",
                  "instruction_vocab", "instruction_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DiTConfig.{f} must be a positive integer, got {v!r}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"DiTConfig.image_size={self.image_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"DiTConfig.d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if isinstance(self.moe_layers, list):      # frozen: keep the config hashable
            object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        if not isinstance(self.instruction_adaln, bool):
            raise ValueError(f"DiTConfig.instruction_adaln must be true or false, got "
                             f"{self.instruction_adaln!r}")
        self._check_moe_fields()
        if self.moe.get("input_layout", "bsh") != "bsh":
            raise ValueError("DiTConfig.moe.input_layout must be 'bsh' (the DiT feeds [B, S, D])")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as DiT's integer timesteps): [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device) / half)
    args_BH = 1000.0 * t_B.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args_BH), torch.sin(args_BH)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _modulate(x_BSD, shift_BD, scale_BD):
    return x_BSD * (1 + scale_BD[:, None]) + shift_BD[:, None]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, std: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BSD: torch.Tensor, ctx_BLD: torch.Tensor) -> torch.Tensor:
        """Queries from x; keys and values from [ctx; x] (ctx: context tokens, not updated)."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(torch.cat([ctx_BLD, x_BSD], dim=1)).split(D, dim=-1)
        q = q[:, ctx_BLD.shape[1]:]
        q, k, v = (t.reshape(B, -1, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y_BHSd = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, D))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, index: int, groups: ParallelGroups,
                 schema: Optional[TaskSchema], alignment: Optional[TaskAlignment]):
        super().__init__()
        m, D = cfg.moe_config, cfg.d_model
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.n_head, m.init_std)
        if cfg.is_moe_layer(index):
            self.ffn = MoELayer(m, groups=groups, task_schema=schema, alignment=alignment)
        else:
            # biased like the experts when they are (the paper's FFNs have biases)
            self.ffn = DenseMLP(D, cfg.dense_ffn_size, m.activation, m.init_std,
                                bias=m.expert_mlp_bias)
        # adaLN-Zero: shift/scale/gate of both sublayers from c, zero-initialised (identity block)
        self.ada = nn.Linear(D, 6 * D)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x_BSD, c_BD, e_BLD, task):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c_BD)).chunk(6, dim=-1)
        x_BSD = x_BSD + g1[:, None] * self.attn(_modulate(self.norm1(x_BSD), sh1, sc1),
                                                self.norm1(e_BLD))
        h_BSD = _modulate(self.norm2(x_BSD), sh2, sc2)
        y_BSD = self.ffn(h_BSD, task=task) if isinstance(self.ffn, MoELayer) else self.ffn(h_BSD)
        return x_BSD + g2[:, None] * y_BSD


class DiT(MoEModelMixin, nn.Module):
    """`forward(x_t, t, source, instruction, task=None) -> velocity` (shape of x_t).

    x_t, source: float [B, C, H, W]; t: float [B] in [0, 1]; instruction: LongTensor [B, L];
    task: LongTensor [B, levels] or multi-hot [B, N], read by task-aware routers only (training:
    the alignment loss), ignored by top-k and dense models.
    With router='task_aware' the model owns ONE TaskAlignment that every MoE layer feeds; its loss
    is attached once after the last block, exactly as in gpt.py.
    """

    def __init__(self, cfg: DiTConfig, groups: Optional[ParallelGroups] = None,
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
                raise ValueError(f"DiTConfig.moe.router={moe_cfg.router!r} needs a task schema: set "
                                 "DiTConfig.task_schema (a YAML path) or pass task_schema=")
        self.task_schema = task_schema if self.uses_tasks else None
        self.alignment = (TaskAlignment(moe_cfg, task_schema)
                          if has_moe and moe_cfg.router == "task_aware" else None)

        D, p, C, std = cfg.d_model, cfg.patch_size, cfg.in_channels, moe_cfg.init_std
        self.patch_in = nn.Linear(2 * C * p * p, D)          # noisy image and source, per patch
        self.pos = nn.Parameter(torch.randn(cfg.num_tokens, D) * std)
        self.t_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.instr = nn.Parameter(torch.randn(cfg.instruction_len, cfg.instruction_vocab, D) * std)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i, groups, self.task_schema, self.alignment)
                                    for i in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(D, 2 * D)
        self.patch_out = nn.Linear(D, C * p * p)
        for lin in (self.ada_out, self.patch_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.aux_loss_scale = 1.0
        self.last_align: Dict[str, torch.Tensor] = {}
        self._register_moe_layers()

    # ------------------------------------------------------------------ patches
    def patchify(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = img_BCHW.shape
        p = self.cfg.patch_size
        x = img_BCHW.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x_BSP: torch.Tensor) -> torch.Tensor:
        B, p, C, n = x_BSP.shape[0], self.cfg.patch_size, self.cfg.in_channels, \
            self.cfg.image_size // self.cfg.patch_size
        x = x_BSP.reshape(B, n, n, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, C, n * p, n * p)

    # ------------------------------------------------------------------ forward
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, source: torch.Tensor,
                instruction: torch.Tensor, task: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.cfg
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if tuple(x_t.shape[1:]) != want or x_t.shape != source.shape:
            raise ValueError(f"DiT: x_t {tuple(x_t.shape)} and source {tuple(source.shape)} must both "
                             f"be [B, {want[0]}, {want[1]}, {want[2]}]")
        if instruction.shape != (x_t.shape[0], cfg.instruction_len):
            raise ValueError(f"DiT: instruction must be LongTensor [B, {cfg.instruction_len}], got "
                             f"{tuple(instruction.shape)}")
        task = task if self.uses_tasks else None
        if task is not None:     # validated once per batch here, not in every MoE layer
            task = self.task_schema.to_multi_hot(task, x_t.shape[0])
        x_BSD = self.patch_in(self.patchify(torch.cat([x_t, source], dim=1))) + self.pos
        slots_L = torch.arange(cfg.instruction_len, device=instruction.device)
        e_BLD = self.instr[slots_L, instruction]
        c_BD = self.t_mlp(timestep_embedding(t, cfg.d_model))
        if cfg.instruction_adaln:
            c_BD = c_BD + e_BLD.sum(1)
        for block in self.blocks:
            x_BSD = block(x_BSD, c_BD, e_BLD, task)
        x_BSD = self._attach_alignment(x_BSD)
        shift_BD, scale_BD = self.ada_out(F.silu(c_BD)).chunk(2, dim=-1)
        return self.unpatchify(self.patch_out(_modulate(self.norm_out(x_BSD), shift_BD, scale_BD)))


def flow_matching_loss(model: DiT, target: torch.Tensor, source: torch.Tensor,
                       instruction: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       task: Optional[torch.Tensor] = None, per_sample: bool = False) -> torch.Tensor:
    """Rectified-flow loss: MSE between model(x_t) and v = noise - target, x_t = (1-t) target + t noise.

    noise [B, C, H, W] and t [B] are passed in (not drawn here) so that a caller can fix them:
    the same noise and t for every model variant in training, a fixed grid for evaluation.
    per_sample=True returns [B] (mean over pixels), else the batch mean.
    """
    t4 = t.to(target.dtype)[:, None, None, None]
    x_t = (1 - t4) * target + t4 * noise
    err = (model(x_t, t, source, instruction, task=task) - (noise - target)).square()
    per_B = err.flatten(1).mean(1)
    return per_B if per_sample else per_B.mean()


@torch.no_grad()
def sample(model: DiT, source: torch.Tensor, instruction: torch.Tensor, steps: int = 20,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Euler integration of the learned flow from noise (t=1) to an image (t=0): [B, C, H, W]."""
    x = torch.randn(source.shape, generator=generator).to(source)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t_B = torch.full((source.shape[0],), float(ts[i]), device=source.device)
        x = x + (ts[i + 1] - ts[i]) * model(x, t_B, source, instruction)
    return x.clamp(-1, 1)
