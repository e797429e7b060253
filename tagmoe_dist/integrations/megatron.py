"""Megatron-core adapter: the only module that reads Megatron's host globals (`parallel_state`,
the MoE loss scale and logging tracker in `moe_utils`).

What Megatron-core needs from an MoE layer, and how we give it:
  1. Process groups: `parallel_groups()` turns parallel_state's TP, PP, DP, EP, expert-TP and
     expert-DP groups into our ParallelGroups (ParallelGroups.from_megatron delegates here).
  2. A module its TransformerLayer can build from a ModuleSpec in place of its MLP/MoE:
     `MegatronMoE(config, ...)`, with Megatron's forward signature
     `forward(hidden_states [S(/TP), B, D], padding_mask=None) -> (output, None)`.
     `moe_spec(...)` makes the ModuleSpec; `get_gpt_layer_local_spec`,
     `get_gpt_layer_with_transformer_engine_spec` and `get_gpt_decoder_block_spec` are Megatron's
     GPT spec functions with the MoE MLP replaced (all routers: topk, task_aware, task_level).
  3. The user's TransformerConfig moe_* flags: `moe_config_from_megatron` maps them to MoEConfig
     (unsupported ones are ValueErrors naming the flag): moe_grouped_gemm selects the grouped_mm
     expert kernel, moe_token_dispatcher_type must be "alltoall" (the dispatch we do).
  4. Parameter conventions of Megatron's DDP and optimizer: expert weights carry
     `allreduce=False` (reduced over the expert-data-parallel group; set by MoELayer), and
     tensor-parallel shards carry `tensor_model_parallel`, `partition_dim`, `partition_stride`.
     Nothing carries `sequence_parallel`: our replicated parameters already get whole gradients
     on every TP rank (tensor_parallel.py), and Megatron must not sum them over TP.
  5. Losses: aux, z and alignment enter backward through Megatron's MoEAuxLossAutoScaler, so
     the schedule's scale (1/num_microbatches, the fp16 loss scale) applies; they are logged in
     Megatron's MoE tracker ("load_balancing_loss" / "seq_load_balancing_loss", "z_loss",
     "align_loss"), which its training loop reduces over pipeline stages.
  6. Task ids: Megatron's forward has no task argument; layers read a `TaskContext` that the
     user's forward_step opens per micro-batch (task_context.py, docs/megatron.md).
  7. Distributed checkpointing: `MegatronMoE.sharded_state_dict` (and `sharded_state_dict(layer)`
     for an MoELayer placed in a Megatron model some other way) describe every tensor as a
     shard of a global one, so `dist_checkpointing.save/load` reshard EP, expert-TP and TP.
Nothing here calls torch.cuda: the module runs wherever its tensors are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating.task_aware import TaskAlignment
from tagmoe_dist.integrations import megatron_checkpoint
from tagmoe_dist.layer import MoELayer
from tagmoe_dist.parallel import ParallelGroups, hosts
from tagmoe_dist.task_context import LayerTasks, SignatureSlot, TaskContext, inject_signature
from tagmoe_dist.tasks import TaskSchema


def _megatron():
    try:
        from megatron.core import parallel_state
        from megatron.core.transformer.moe import moe_utils
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Megatron-core integration needs megatron-core: "
                          "pip install 'tagmoe-dist[megatron]'") from e
    return parallel_state, moe_utils


# ---------------------------------------------------------------------------------------------
# 1. process groups


# Reading parallel_state is the host adapter's job (tagmoe_dist/parallel/hosts.py).
def parallel_groups(sequence_parallel: bool = False) -> ParallelGroups:
    return ParallelGroups(**hosts.megatron_groups(sequence_parallel))



# ---------------------------------------------------------------------------------------------
# 3. TransformerConfig moe_* flags -> MoEConfig


def _unsupported(flag: str, value: Any, hint: str) -> ValueError:
    return ValueError(f"TransformerConfig.{flag}={value!r} is not supported by the tagmoe MoE "
                      f"layer; {hint}")


def _single(flag: str, value):
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise _unsupported(flag, value, "give one value (one load-balancing type)")
        return value[0]
    return value


def moe_config_from_megatron(config, **overrides) -> MoEConfig:
    """MoEConfig from a TransformerConfig's MoE flags; `overrides` set MoEConfig fields directly
    (e.g. router="task_aware", align_loss_coeff=0.05), after the mapping."""
    E = config.num_moe_experts
    if E is None:
        raise ValueError("TransformerConfig.num_moe_experts is None: set it (the number of "
                         "experts) to build an MoE layer")
    for flag, hint in [
        ("moe_router_num_groups", "unset it (group-limited routing)"),
        ("moe_router_group_topk", "unset it (group-limited routing)"),
        ("moe_router_topk_limited_devices", "unset it (device-limited routing)"),
        ("moe_pad_expert_input_to_capacity", "unset it: capacity drops tokens, it does not pad"),
        ("moe_apply_probs_on_input", "unset it: probabilities weight the expert outputs"),
        ("moe_latent_size", "unset it (latent MoE projections)"),
        ("moe_router_force_load_balancing", "unset it (benchmark-only random routing)"),
        ("moe_enable_routing_replay", "unset it"),
    ]:
        value = getattr(config, flag, None)
        if value:
            raise _unsupported(flag, value, hint)
    if getattr(config, "add_bias_linear", False):
        raise _unsupported("add_bias_linear", True, "set add_bias_linear=False (the experts have "
                           "no biases, as in Megatron's grouped-GEMM experts)")
    if getattr(config, "moe_router_dtype", None) == "fp64":
        raise _unsupported("moe_router_dtype", "fp64", "routing runs in fp32 (set fp32 or None)")
    if getattr(config, "glu_linear_offset", 0.0) or getattr(config, "activation_func_clamp_value",
                                                            None) is not None:
        raise _unsupported("glu_linear_offset/activation_func_clamp_value", "set",
                           "use the plain SwiGLU / GELU activation")

    dispatcher = getattr(config, "moe_token_dispatcher_type", "alltoall")
    if dispatcher != "alltoall":
        # the layer always exchanges tokens with a variable-size all-to-all over the EP group
        raise _unsupported("moe_token_dispatcher_type", dispatcher,
                           "set moe_token_dispatcher_type='alltoall' (Megatron-LM: "
                           "--moe-token-dispatcher-type alltoall), the dispatch this layer does")

    gated, act = config.gated_linear_unit, config.activation_func
    if gated and act is F.silu:
        activation = "swiglu"
    elif not gated and act is F.gelu:
        activation = "gelu"     # ours is the tanh approximation of GELU
    else:
        raise _unsupported("activation_func", getattr(act, "__name__", act),
                           "use gated_linear_unit=True with F.silu (SwiGLU) or "
                           "gated_linear_unit=False with F.gelu")

    balancing = _single("moe_router_load_balancing_type", config.moe_router_load_balancing_type)
    aux_coeff = float(_single("moe_aux_loss_coeff", config.moe_aux_loss_coeff) or 0.0)
    if balancing not in ("aux_loss", "seq_aux_loss", "none"):
        raise _unsupported("moe_router_load_balancing_type", balancing,
                           "choose 'aux_loss', 'seq_aux_loss' or 'none' (or expert bias: "
                           "moe_router_enable_expert_bias=True)")
    score = config.moe_router_score_function
    shared = config.moe_shared_expert_intermediate_size
    d: Dict[str, Any] = dict(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
        num_experts=E, top_k=config.moe_router_topk,
        score_function=score,
        # Megatron: softmax over the k chosen logits (= renormalised top-k) unless pre-softmax;
        # sigmoid scores are renormalised over the k chosen when k > 1
        norm_topk_prob=(not config.moe_router_pre_softmax) if score == "softmax"
        else config.moe_router_topk > 1,
        topk_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
        capacity_factor=config.moe_expert_capacity_factor,
        drop_policy=config.moe_token_drop_policy,
        aux_loss_coeff=0.0 if balancing == "none" else aux_coeff,
        aux_loss_type="seq" if balancing == "seq_aux_loss" else "micro_batch",
        aux_loss_reduction="sum",       # Megatron applies the coefficient in every MoE layer
        z_loss_coeff=float(config.moe_z_loss_coeff or 0.0),
        expert_bias=config.moe_router_enable_expert_bias,
        expert_bias_update_rate=config.moe_router_bias_update_rate,
        input_jitter=float(config.moe_input_jitter_eps or 0.0),
        activation=activation,
        num_shared_experts=1 if shared else 0,
        shared_expert_ffn_hidden_size=shared,
        shared_expert_gate=bool(shared) and config.moe_shared_expert_gate,
        init_std=config.init_method_std,
        input_layout="sbh",
        # Megatron's grouped GEMM experts -> ours; otherwise the kernel is chosen per device
        expert_kernel="grouped_mm" if getattr(config, "moe_grouped_gemm", False) else "auto",
    )
    d.update(overrides)
    return MoEConfig.from_dict(d)


def moe_layer_pattern(config) -> List[int]:
    """1 for MoE layers, 0 for dense, per layer (TransformerConfig.moe_layer_freq, as Megatron)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


# ---------------------------------------------------------------------------------------------
# 2. the module



class _MegatronMoELayer(MoELayer):
    def _attach_aux_loss(self, y, loss):
        # the schedule sets this scale (1/num_microbatches, fp16 loss scale) before backward
        return _megatron()[1].MoEAuxLossAutoScaler.apply(y, loss)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Megatron's distributed-checkpoint description (integrations/megatron_checkpoint.py)."""
        return megatron_checkpoint.sharded_state_dict(self, prefix, sharded_offsets, metadata)


def _main_loss_scale():
    scale = _megatron()[1].MoEAuxLossAutoScaler.main_loss_backward_scale
    return 1.0 if scale is None else scale


class MegatronMoE(nn.Module):
    """Our MoE layer in Megatron's MLP slot. Built by TransformerLayer from `moe_spec(...)`.

    config: Megatron's TransformerConfig (moe_* flags mapped by `moe_config_from_megatron`,
    then `moe_overrides` applied), or pass `moe_config` whole. `task_context`: the TaskContext
    the user's forward_step opens (needed by task-aware and task-level routers).
    """

    def __init__(self, config, moe_config: Optional[MoEConfig] = None,
                 task_schema: Optional[TaskSchema] = None,
                 task_context: Optional[TaskContext] = None,
                 groups: Optional[ParallelGroups] = None,
                 moe_overrides: Optional[Dict[str, Any]] = None, **unused):
        super().__init__()
        cfg = moe_config or moe_config_from_megatron(config, **(moe_overrides or {}))
        if cfg.input_layout != "sbh":
            raise ValueError(f"MoEConfig.input_layout={cfg.input_layout!r}: Megatron-core passes "
                             "[sequence, batch, hidden]; use input_layout='sbh'")
        groups = groups or parallel_groups(sequence_parallel=config.sequence_parallel)
        if groups.sequence_parallel != (config.sequence_parallel and groups.tp_size > 1):
            raise ValueError("ParallelGroups.sequence_parallel differs from "
                             "TransformerConfig.sequence_parallel; build the groups with "
                             "ParallelGroups.from_megatron(sequence_parallel="
                             "config.sequence_parallel)")
        if cfg.uses_tasks and task_context is None:
            raise ValueError(f"MoEConfig.router={cfg.router!r} reads task ids from a TaskContext: "
                             "pass task_context= to moe_spec (see docs/megatron.md)")
        if (cfg.router == "task_aware" and groups.pp_size > 1
                and getattr(config, "virtual_pipeline_model_parallel_size", None)):
            raise ValueError("router='task_aware' with a virtual (interleaved) pipeline is not "
                             "supported: the alignment loss pools signatures stage by stage")
        self.config, self.groups, self.task_context = config, groups, task_context
        self._slot = SignatureSlot()
        self.moe = _MegatronMoELayer(cfg, groups=groups, task_schema=task_schema,
                                     alignment=self._slot)
        self._tasks = LayerTasks(task_context) if task_context is not None else None
        self.alignment_head: Optional[TaskAlignment] = None
        self.layer_number: Optional[int] = None
        self.last_align: Dict[str, torch.Tensor] = {}
        _flag_tensor_parallel(self.moe, groups)

    @property
    def cfg(self) -> MoEConfig:
        return self.moe.cfg

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer right after construction (global, 1-based). The model's
        last MoE layer owns the alignment head (W_tag and H_pred) and computes L_align."""
        self.layer_number = layer_number
        pattern = moe_layer_pattern(self.config)
        self.moe.num_moe_layers = max(1, sum(pattern))     # MoEConfig.aux_loss_reduction='mean'
        last = max((i + 1 for i, m in enumerate(pattern) if m), default=None)
        if self.cfg.router == "task_aware" and layer_number == last and self.alignment_head is None:
            if self.groups.pp_rank != self.groups.pp_size - 1:
                raise ValueError("the model's last MoE layer must be on the last pipeline stage "
                                 "(it computes the alignment loss of every stage's layers)")
            self.alignment_head = TaskAlignment(self.cfg, self.moe.task_schema)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """For `megatron.core.dist_checkpointing`: global tensors sharded by EP, expert-TP and TP,
        so a checkpoint saved at one layout loads at another (megatron_checkpoint.py)."""
        sd = megatron_checkpoint.sharded_state_dict(self.moe, f"{prefix}moe.", sharded_offsets,
                                                    metadata)
        if self.alignment_head is not None:
            # one layer of the model has it: not stacked with the other layers (no layer axis)
            sd.update(megatron_checkpoint.replicated_state_dict(
                self.alignment_head, self.groups.tp_group, f"{prefix}alignment_head.", (),
                metadata))
        return sd

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused):
        """[S(/TP), B, D] -> ([S(/TP), B, D], None). `padding_mask` is not used: padding tokens
        are routed and counted in the routing losses like the others."""
        mb, replay = self._tasks.enter(self.training) if self._tasks is not None else (None, False)
        task, tts = (None, None) if mb is None else (mb.task, mb.token_to_sample)
        y = self.moe(hidden_states, task=task, token_to_sample=tts)
        y = self._alignment(y, mb, replay)
        if self.training and torch.is_grad_enabled():
            self._log()
        return y, None

    def _alignment(self, y, mb, replay: bool):
        got = self._slot.take()
        if got is None or mb is None:
            return y
        s_BE, task_BN = got
        ctx, coeff = self.task_context, self.cfg.align_loss_coeff
        grad = self.training and torch.is_grad_enabled()
        if not replay:
            ctx.add_signature(mb, s_BE, task_BN, expects_grad=self.training)
        if self.alignment_head is not None:
            if replay:
                loss = ctx.head_loss(mb, self.alignment_head)
            else:
                loss = ctx.collect(mb, self.alignment_head, coeff, self.training)
                self.last_align = {"loss": mb.align_loss, "acc": mb.align_acc}
                if self.training:
                    self._track("align_loss", mb.align_loss)
            if grad:
                y = _megatron()[1].MoEAuxLossAutoScaler.apply(y, coeff * loss)
        elif self.training and not replay:
            # every stage with task-aware layers holds an "align_loss" entry, so that Megatron's
            # reduction over the pipeline runs the same collectives on every stage
            self._track("align_loss", s_BE.new_zeros(()))
        if grad:
            y = inject_signature(y, s_BE, ctx, mb, _main_loss_scale)
        return y

    # ------------------------------------------------------------------ logging
    _TRACKER_NAMES = {"z": "z_loss"}

    def _log(self) -> None:
        for name, value in self.moe.last_losses.items():
            if name == "aux":
                key = ("seq_load_balancing_loss" if self.cfg.aux_loss_type == "seq"
                       else "load_balancing_loss")
            else:
                key = self._TRACKER_NAMES.get(name, f"{name}_loss")
            self._track(key, value)

    def _track(self, name: str, value: torch.Tensor) -> None:
        num_layers = self.config.num_layers + (getattr(self.config, "mtp_num_layers", None) or 0)
        avg = self.groups.dp_group if self.groups.dp_size > 1 else None
        _megatron()[1].save_to_aux_losses_tracker(name, value.detach(), self.layer_number,
                                                  num_layers, avg_group=avg)


def _flag_tensor_parallel(layer: MoELayer, groups: ParallelGroups) -> None:
    """Megatron's attributes on tensor-parallel shards (grad-norm and checkpoint code read them)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    if groups.etp_size > 1:       # w1 [L, D, H] column shards, w2 [L, F, D] row shards
        set_tensor_model_parallel_attributes(layer.experts.w1, True, 2, 1)
        set_tensor_model_parallel_attributes(layer.experts.w2, True, 1, 1)
    if groups.tp_size > 1 and layer.shared_expert is not None:
        set_tensor_model_parallel_attributes(layer.shared_expert.mlp.w1, True, 1, 1)
        set_tensor_model_parallel_attributes(layer.shared_expert.mlp.w2, True, 0, 1)


def moe_losses(model: nn.Module, groups: Optional[ParallelGroups] = None) -> Dict[str, float]:
    """The last forward's MoE losses of a (pipelined) model, on every stage: aux and z averaged
    over all MoE layers of all stages, align from the last stage (a collective over the pipeline
    group: call it on every stage)."""
    import torch.distributed as dist
    layers = [m for m in model.modules() if isinstance(m, MegatronMoE)]
    names = ["aux", "z", "align"]
    acc = torch.zeros(2 * len(names), dtype=torch.float64)
    for layer in layers:
        for i, n in enumerate(names[:2]):
            if n in layer.moe.last_losses:
                acc[2 * i] += float(layer.moe.last_losses[n])
                acc[2 * i + 1] += 1
        if layer.last_align:
            acc[4] += float(layer.last_align["loss"])
            acc[5] += 1
    groups = groups or (layers[0].groups if layers else ParallelGroups.single())
    if groups.pp_size > 1:
        dist.all_reduce(acc, group=groups.pp_group)
    return {n: float(acc[2 * i] / acc[2 * i + 1]) for i, n in enumerate(names) if acc[2 * i + 1]}


# ---------------------------------------------------------------------------------------------
# ModuleSpecs


def moe_spec(moe_config: Optional[MoEConfig] = None, task_schema: Optional[TaskSchema] = None,
             task_context: Optional[TaskContext] = None, groups: Optional[ParallelGroups] = None,
             **moe_overrides):
    """ModuleSpec of our MoE layer for a TransformerLayer's `mlp` slot. `moe_overrides`: MoEConfig
    fields applied over the TransformerConfig mapping (router="task_aware", align_dim=..., ...)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    return ModuleSpec(module=MegatronMoE, params=dict(
        moe_config=moe_config, task_schema=task_schema, task_context=task_context, groups=groups,
        moe_overrides=moe_overrides))


def with_moe(layer_spec, mlp_spec):
    """A copy of a TransformerLayer spec whose MLP is `mlp_spec` (e.g. `moe_spec(...)`)."""
    from megatron.core.transformer.identity_op import IdentityOp
    sub = layer_spec.submodules
    if sub.pre_mlp_layernorm is IdentityOp:
        raise ValueError("this layer spec has no pre-MLP norm (Megatron's dense Transformer-Engine "
                         "spec fuses it into linear_fc1): build it with num_experts set")
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, mlp=mlp_spec))


def get_gpt_layer_local_spec(moe, **megatron_kwargs):
    """Megatron's local (Megatron-core modules) GPT layer spec with `moe` as its MLP."""
    from megatron.core.models.gpt import gpt_layer_specs
    megatron_kwargs["num_experts"] = megatron_kwargs.get("num_experts") or 1
    return with_moe(gpt_layer_specs.get_gpt_layer_local_spec(**megatron_kwargs), moe)


def get_gpt_layer_with_transformer_engine_spec(moe, **megatron_kwargs):
    """Megatron's Transformer-Engine GPT layer spec with `moe` as its MLP (attention and norms from
    TE; num_experts is set so that the pre-MLP norm is a separate TE norm)."""
    from megatron.core.models.gpt import gpt_layer_specs
    megatron_kwargs["num_experts"] = megatron_kwargs.get("num_experts") or 1
    return with_moe(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**megatron_kwargs),
                    moe)


def get_gpt_decoder_block_spec(config, use_transformer_engine: bool, moe, **megatron_kwargs):
    """Megatron's decoder-block spec (this pipeline stage's layers, dense and MoE by
    config.moe_layer_freq) with every MoE layer's MLP replaced by `moe`."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine,
                                                       **megatron_kwargs)
    specs = [with_moe(s, moe) if getattr(s.submodules.mlp, "module", None) is MegatronMoELayer
             else s for s in block.layer_specs]
    return dataclasses.replace(block, layer_specs=specs)


__all__ = ["MegatronMoE", "TaskContext", "get_gpt_decoder_block_spec",
           "get_gpt_layer_local_spec", "get_gpt_layer_with_transformer_engine_spec",
           "moe_config_from_megatron", "moe_layer_pattern", "moe_losses", "moe_spec",
           "parallel_groups", "with_moe"]
