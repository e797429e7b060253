"""MoELayer = router + dispatcher + experts (+ shared expert).

Notation: T tokens on this rank, D hidden, B samples, N tags, E experts.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.dispatch.costmodel import measure_rates
from tagmoe_dist.dispatch.dispatcher import TokenDispatcher
from tagmoe_dist.experts import DenseMLP, GroupedExperts
from tagmoe_dist.gating.losses import AuxLossAutoScaler, routing_entropy
from tagmoe_dist.gating.task_aware import TaskAlignment, TaskAwareRouter, per_sample_mean
from tagmoe_dist.gating.task_level import TaskLevelRouter
from tagmoe_dist.gating.topk import TopKRouter
from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.tasks import TaskSchema
from tagmoe_dist.parallel.tensor import TensorParallelMoE, copy_to_region, gather_ffn, shard_ffn

_LOSS_COEFF = {"aux": "aux_loss_coeff", "z": "z_loss_coeff", "align": "align_loss_coeff"}


class SharedExpert(nn.Module):
    """Always-on expert(s) applied to every token, optionally behind a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, cfg: MoEConfig, groups: Optional[ParallelGroups] = None):
        super().__init__()
        # With tensor parallelism the MLP is F-sharded over the TP group and its output is a
        # partial sum (see tensor_parallel.py); the gate stays replicated.
        tp = (groups.tp_rank, groups.tp_size) if groups is not None else (0, 1)
        self.tp_group = groups.tp_group if groups is not None and groups.tp_size > 1 else None
        self.mlp = DenseMLP(cfg.hidden_size, cfg.shared_ffn_size, cfg.activation, cfg.init_std,
                            shard=tp)
        self.gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x_TD: torch.Tensor, xp_TD: Optional[torch.Tensor] = None) -> torch.Tensor:
        """xp_TD: the MLP's input when it differs from x_TD (the TP copy whose grad is partial)."""
        y_TD = self.mlp(x_TD if xp_TD is None else xp_TD)
        if self.gate is not None:
            # y_TD may be a partial sum over TP ranks: so is the gradient of the gate's output
            y_TD = copy_to_region(torch.sigmoid(self.gate(x_TD)), self.tp_group) * y_TD
        return y_TD


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN. `forward(x, task=None, token_to_sample=None)` returns a tensor of
    x's shape; auxiliary losses enter the backward pass through `AuxLossAutoScaler`.

    alignment: a model-wide `TaskAlignment` shared by all task-aware layers of a model (the model
    calls `alignment.finish()` and attaches the loss); if None, a task-aware layer owns one.
    """

    def __init__(self, cfg: MoEConfig, groups: Optional[ParallelGroups] = None,
                 task_schema: Optional[TaskSchema] = None,
                 alignment: Optional[TaskAlignment] = None):
        super().__init__()
        groups = groups or ParallelGroups.single()
        if cfg.uses_tasks and task_schema is None:
            raise ValueError(f"MoEConfig.router={cfg.router!r} needs a task schema: pass "
                             "task_schema=TaskSchema.from_yaml('configs/tasks/<name>.yaml')")
        self.cfg, self.groups, self.task_schema = cfg, groups, task_schema
        local_ids = groups.local_experts(cfg.num_experts)
        # Drawn from the global RNG so that the same torch.manual_seed gives the same global
        # weights on every rank and for every EP size; experts then use their own generators.
        base_seed = int(torch.randint(0, 2 ** 30, (1,)).item())

        if cfg.router == "task_aware":
            self.router = TaskAwareRouter(cfg, task_schema)
        elif cfg.router == "task_level":
            self.router = TaskLevelRouter(cfg, task_schema)
        else:
            self.router = TopKRouter(cfg)
        self.tp = TensorParallelMoE.maybe(groups, cfg.input_layout)   # None without TP
        self.experts = GroupedExperts(cfg.hidden_size, cfg.ffn_hidden_size, local_ids,
                                      cfg.activation, cfg.init_std, base_seed,
                                      shard=(groups.etp_rank, groups.etp_size),
                                      bias=cfg.expert_mlp_bias, kernel=cfg.expert_kernel)
        for p in self.experts.parameters():
            # DeepSpeed / Megatron conventions: not all-reduced over data parallel, but over the
            # expert-data-parallel group named after the EP size.
            p.allreduce = False
            p.group_name = f"ep_size_{groups.ep_size}"
        self.shared_expert = SharedExpert(cfg, groups) if cfg.shared_ffn_size > 0 else None
        self.dispatcher = TokenDispatcher(cfg.num_experts, cfg.top_k, groups, cfg.overlap_chunks)

        self.alignment: Optional[TaskAlignment] = None
        # Not a submodule: the model owns it (registering it here would duplicate its weights).
        object.__setattr__(self, "_shared_alignment", alignment)
        if cfg.router == "task_aware" and alignment is None:
            self.alignment = TaskAlignment(cfg, task_schema)
        # 1/(gradient accumulation steps) when the main loss is averaged over micro-batches.
        self.aux_loss_scale = 1.0
        # MoE layers of the model this layer is part of (set by the model): with
        # aux_loss_reduction='mean' the load-balancing loss is divided by it
        self.num_moe_layers = 1
        self.last_losses: Dict[str, torch.Tensor] = {}
        self.last_stats: Dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, task: Optional[torch.Tensor] = None,
                token_to_sample: Optional[torch.Tensor] = None) -> torch.Tensor:
        out_shape, tp = x.shape, self.tp
        # TP: every rank of the group sees all its tokens; xp is the copy the split work reads
        x, xp = tp.enter(x) if tp else (x, x)
        x_TD, sample_idx_T, num_samples = self._flatten(x, task, token_to_sample)
        task_BN = self._task_multi_hot(task, num_samples)

        route = self.router(x_TD, sample_idx_T, num_samples, task_BN)        # router
        if tp:
            y_TD = self._tensor_parallel_experts(tp, x_TD, xp.reshape(x_TD.shape), route)
        else:
            plan = self.dispatcher.plan(x_TD, route)                            # dispatch
            # experts and combine (EP > 1: the shared expert runs while the first tokens travel)
            y_TD = self.dispatcher(x_TD, plan, self.experts, self.shared_expert)

        y = tp.exit(y_TD.view(x.shape)) if tp else y_TD      # TP: sum the partial outputs

        y = self._add_losses(y, route, sample_idx_T, num_samples, task_BN)
        return y.view(out_shape)

    def _tensor_parallel_experts(self, tp, x_TD, xp_TD, route):
        """Step 3 of tensor_parallel.py: this rank's partial output, routed + shared experts."""
        xe_TD, route_e = tp.expert_inputs(xp_TD, route)
        y_TD = self.dispatcher(xe_TD, self.dispatcher.plan(xe_TD, route_e), self.experts)
        y_TD = tp.expert_outputs(y_TD, x_TD.shape[0])
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD, xp_TD)
        return y_TD

    # ------------------------------------------------------------------ input handling
    def _flatten(self, x, task, token_to_sample):
        cfg = self.cfg
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoELayer input must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"MoELayer input has hidden size {x.shape[-1]} but MoEConfig.hidden_size"
                             f"={cfg.hidden_size}; check the model width or the config")
        D = cfg.hidden_size
        if cfg.input_layout == "th":
            if x.dim() != 2:
                raise ValueError(f"MoEConfig.input_layout='th' expects x of shape [tokens, {D}], "
                                 f"got {tuple(x.shape)}")
            if token_to_sample is None:
                if task is not None or cfg.uses_tasks or cfg.aux_loss_type == "seq":
                    raise ValueError("input_layout='th' needs token_to_sample (LongTensor [tokens], "
                                     "the sample of each token) for task routing / per-sequence loss")
                return x, None, None
            if token_to_sample.shape != x.shape[:1] or token_to_sample.dtype != torch.long:
                raise ValueError(f"token_to_sample must be a LongTensor of shape [{x.shape[0]}], got "
                                 f"{token_to_sample.dtype} {tuple(token_to_sample.shape)}")
            num_samples = task.shape[0] if task is not None else int(token_to_sample.max()) + 1
            return x, token_to_sample, num_samples
        if x.dim() != 3:
            raise ValueError(f"MoEConfig.input_layout={cfg.input_layout!r} expects a 3-D input, got "
                             f"shape {tuple(x.shape)}; set input_layout='th' for flat tokens")
        if token_to_sample is not None:
            raise ValueError("token_to_sample is only used with input_layout='th'")
        x_TD = x.reshape(-1, D)
        if cfg.input_layout == "bsh":
            B, S = x.shape[0], x.shape[1]
            sample_idx_T = torch.arange(B, device=x.device).repeat_interleave(S)
        else:
            S, B = x.shape[0], x.shape[1]
            sample_idx_T = torch.arange(B, device=x.device).repeat(S)
        return x_TD, sample_idx_T, B

    def _task_multi_hot(self, task, num_samples):
        if task is None:
            if self.cfg.router == "task_level":
                raise ValueError("router='task_level' routes by the task: pass task= (LongTensor "
                                 "[batch, levels] with -1 for unknown, or multi-hot [batch, tags])")
            return None
        if self.task_schema is None:
            raise ValueError("task= was given but the layer has no task_schema; pass "
                             "task_schema= to MoELayer")
        # A multi-hot from the model (validated once per batch there) is taken as it is: value
        # checks would cost a host sync in every layer. Level ids are validated here.
        validate = not task.dtype.is_floating_point
        return self.task_schema.to_multi_hot(task, num_samples, validate=validate).to(
            self.router_device)

    @property
    def router_device(self):
        return next(self.router.parameters()).device

    # ------------------------------------------------------------------ losses and stats
    def _add_losses(self, y_TD, route, sample_idx_T, num_samples, task_BN):
        losses = dict(route.losses)
        stats = {}
        if self.cfg.router == "task_aware" and task_BN is not None:
            g_BE = per_sample_mean(route.probs_TE, sample_idx_T, num_samples)
            if self._shared_alignment is not None:
                self._shared_alignment.add(g_BE, task_BN)
            else:
                losses["align"], stats["align_acc"] = self.alignment.loss(g_BE, task_BN)
                stats["align_target_min_dist"] = self.alignment.last_stats["target_min_dist"]
        total = None
        for name, value in losses.items():
            term = getattr(self.cfg, _LOSS_COEFF[name]) * value
            if name == "aux" and self.cfg.aux_loss_reduction == "mean":
                term = term / self.num_moe_layers
            total = term if total is None else total + term
        if total is not None and torch.is_grad_enabled():
            y_TD = self._attach_aux_loss(y_TD, total)
        with torch.no_grad():
            self.last_losses = {k: v.detach() for k, v in losses.items()}
            stats["load"] = route.counts_E
            if sample_idx_T is not None:
                # per-sample routing counts [B, E], for task x expert statistics
                E, K = self.cfg.num_experts, self.cfg.top_k
                key = sample_idx_T.repeat_interleave(K) * E + route.topk_ids_TK.reshape(-1)
                stats["sample_load"] = torch.bincount(key, minlength=num_samples * E).view(num_samples, E)
            if route.keep_TK is not None:
                stats["dropped_fraction"] = 1.0 - route.keep_TK.float().mean()
            stats["entropy"] = routing_entropy(route.probs_TE)
            self.last_stats = stats
        return y_TD

    def _attach_aux_loss(self, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Put `loss` into the backward pass (a host integration may scale it its own way)."""
        return AuxLossAutoScaler.apply(y, loss, self.aux_loss_scale)

    # ------------------------------------------------------------------ weights
    @property
    def _EXPERT_KEYS(self):
        return ("experts.w1", "experts.w2") + (("experts.b1", "experts.b2")
                                               if self.experts.b1 is not None else ())

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Global (unsharded) weights on every rank: expert tensors gathered over the EP group.
        Expert weights appear stacked as `experts.w1` [E, D, H] and `experts.w2` [E, F, D],
        whatever per-expert naming the host framework's checkpoints use."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items()
              if not k.startswith("experts.")}
        for key in self._EXPERT_KEYS:
            t = getattr(self.experts, key.split(".")[1]).detach()
            if self.groups.ep_size > 1:
                parts = [torch.empty_like(t) for _ in range(self.groups.ep_size)]
                dist.all_gather(parts, t.contiguous(), group=self.groups.ep_group)
                t = torch.cat(parts, 0)
            sd[key] = t.clone()
        for key, group in self._tp_sharded_keys().items():
            sd[key] = gather_ffn(sd[key], key[-2:], self.cfg.activation == "swiglu", group)
        return sd

    def _tp_sharded_keys(self) -> Dict[str, dist.ProcessGroup]:
        """FFN weights held as tensor-parallel shards, and the group over which they are split."""
        keys = {}
        if self.groups.etp_size > 1:
            keys.update({k: self.groups.etp_group for k in self._EXPERT_KEYS})
        if self.groups.tp_size > 1 and self.shared_expert is not None:
            keys.update({f"shared_expert.mlp.{w}": self.groups.tp_group for w in ("w1", "w2")})
        return keys

    def load_full_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        """Load global weights (from `full_state_dict` of a layer with any EP size)."""
        want = {k: v.shape for k, v in self.state_dict().items() if not k.startswith("experts.")}
        want.update({k: (self.cfg.num_experts,) + tuple(getattr(self.experts, k[8:]).shape[1:])
                     for k in self._EXPERT_KEYS})
        sharded = self._tp_sharded_keys()
        for k, group in sharded.items():     # TP shards: compare with the whole (global) shape
            size, dim = dist.get_world_size(group), -1 if k.endswith("w1") else -2
            shape = list(want[k])
            shape[dim] *= size
            want[k] = tuple(shape)
        missing = sorted(set(want) - set(sd))
        unexpected = sorted(set(sd) - set(want))
        if missing or unexpected:
            raise ValueError(f"load_full_state_dict: missing keys {missing}, unexpected keys "
                             f"{unexpected}; was the state dict saved from a layer with the same "
                             "MoEConfig (router, shared experts, task schema)?")
        for name, t in sd.items():
            if tuple(t.shape) != tuple(want[name]):
                raise ValueError(f"load_full_state_dict: {name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(want[name])} (num_experts={self.cfg.num_experts})")
        ids = self.experts.global_ids
        local = {k: (v[ids[0]:ids[-1] + 1] if k in self._EXPERT_KEYS else v) for k, v in sd.items()}
        for k, group in sharded.items():
            local[k] = shard_ffn(local[k], k[-2:], dist.get_rank(group), dist.get_world_size(group),
                                 self.cfg.activation == "swiglu")
        self.load_state_dict(local)

    def plan_overlap(self, tokens: Optional[int] = None) -> None:
        """Measure this system's all-to-all and expert rates once, so `overlap_chunks="auto"`
        chooses chunk counts from the cost model (dispatch/costmodel.py). Collective over the EP
        group: every rank calls it, outside forward (the trainer does at model build). Without it
        "auto" uses a default that needs no measurement. `tokens`: tokens per rank per step."""
        plan_overlap(self, tokens)

    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step; call after each optimizer step (all ranks)."""
        self.router.update_expert_bias(self.groups.dp_group)


def plan_overlap(model: nn.Module, tokens: Optional[int] = None) -> int:
    """`MoELayer.plan_overlap` for every expert-parallel layer of `model` with
    overlap_chunks="auto", measuring once per distinct (groups, shape, device, dtype) and sharing
    the rates. Collective: every rank calls it with the same model. Returns the measurements made."""
    measured = {}
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        cfg, g = layer.cfg, layer.groups
        if g.ep_size == 1 or cfg.overlap_chunks != "auto":
            continue
        w = layer.experts.w2
        # ZeRO-3 (integrations/zero3.py): outside forward w2 is a 1-D partition; ds_shape is whole
        F_ = tuple(getattr(w, "ds_shape", w.shape))[1]
        key = (id(g.ep_group), cfg.hidden_size, F_, cfg.activation, w.device, w.dtype)
        if key not in measured:
            rows = (tokens or 2048) * cfg.top_k // max(1, layer.experts.num_local_experts)
            measured[key] = measure_rates(g, cfg.hidden_size, F_, rows=max(64, min(rows, 4096)),
                                          activation=cfg.activation, reps=3, device=w.device,
                                          dtype=w.dtype)
        layer.dispatcher.rates = measured[key]
    return len(measured)


def register_moe_layers(model: nn.Module) -> int:
    """Tell every MoELayer of `model` how many MoE layers the model has, so that
    `aux_loss_reduction="mean"` averages the load-balancing loss over them (MegaBlocks'
    convention). Models and integrations call it once they are built. Returns the count."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.num_moe_layers = len(layers)
    return len(layers)
