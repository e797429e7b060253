"""DeepSpeed adapter: the only module that reads DeepSpeed's host globals (`deepspeed.utils.groups`).

What DeepSpeed needs from an MoE model, and how we give it:
  1. Expert parameters carry `allreduce=False` and `group_name="ep_size_<N>"` (set by MoELayer),
     so `split_params_into_different_moe_groups_for_optimizer` puts them in their own optimizer
     groups and ZeRO 1/2 reduces them over the expert-data-parallel group.
  2. The engine switches on its MoE code paths (expert-DP gradient reduction, per-expert
     checkpoint files) only for modules that are instances of `deepspeed.moe.layer.MoE`.
     `prepare_model` turns each of our expert containers into `DeepSpeedGroupedExperts`, which
     is both: it keeps our stacked weights and grouped GEMMs, and exposes DeepSpeed's names.
  3. DeepSpeed's checkpointing moves every state-dict key containing "expert" of such a module
     into `layer_<L>_expert_<E>_mp_rank_XX_model_states.pt` files and *drops it from the main
     file*; keys that do not match its `deepspeed_moe.experts.deepspeed_experts.<i>` pattern would
     be lost. So the container writes its stacked weights as per-expert views under exactly that
     pattern, and reads either form back.
That is ZeRO 0-2. Under ZeRO-3 the engine refuses native MoE modules, so experts are not declared
as such: `build_context` / `prepare_model(model, ds_config)` hand over to `zero3.py`, which puts
DeepSpeed AutoEP's placement marks on them instead.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from tagmoe_dist.parallel import ParallelGroups, hosts

_DS_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
_DS_KEY = re.compile(r"deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w1|w2|b1|b2)$")


def _deepspeed():
    try:
        import deepspeed  # noqa: F401
        from deepspeed.utils import groups
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the DeepSpeed integration needs deepspeed: pip install 'tagmoe-dist[deepspeed]'") from e
    return deepspeed, groups


# Reading DeepSpeed's groups is the host adapter's job (tagmoe_dist/parallel/hosts.py).
def parallel_groups(ep_size: int = 1) -> ParallelGroups:
    return ParallelGroups(**hosts.deepspeed_groups(ep_size))



def _moe_base():
    from deepspeed.moe.layer import MoE
    return MoE


class _DeepSpeedNames:
    """State-dict naming and engine hooks shared by the DeepSpeed expert container."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # DeepSpeed's MoE creates its groups here; ours were created (from DeepSpeed's registry)
        # before the model was built. Only check that they are still registered.
        _, groups = _deepspeed()
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    def _expert_names(self):
        # the stacked expert tensors: weights, and biases when the experts have them
        return ("w1", "w2") + (("b1", "b2") if getattr(self, "b1", None) is not None else ())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in self._expert_names():
            p = getattr(self, name)
            for local_id in range(p.shape[0]):
                t = p[local_id] if keep_vars else p.detach()[local_id]
                destination[f"{prefix}{_DS_PREFIX}{local_id}.{name}"] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self._expert_names():
            p = getattr(self, name)
            stacked = prefix + name
            if stacked in state_dict:      # our own stacked layout
                src = state_dict[stacked]
            else:
                keys = [f"{prefix}{_DS_PREFIX}{i}.{name}" for i in range(p.shape[0])]
                absent = [k for k in keys if k not in state_dict]
                if absent:
                    missing_keys.extend(absent)
                    continue
                src = torch.stack([state_dict[k] for k in keys])
            if src.shape != p.shape:
                error_msgs.append(f"{prefix}{name}: checkpoint shape {tuple(src.shape)} != "
                                  f"{tuple(p.shape)}; was it saved with another ep_size? "
                                  "Reshard it with python -m tagmoe_dist.reshard")
                continue
            with torch.no_grad():
                p.copy_(src)
        if strict:
            for k in state_dict:
                if k.startswith(prefix) and k[len(prefix):] not in self._expert_names() and \
                        not _DS_KEY.match(k[len(prefix):]):
                    unexpected_keys.append(k)


_CLASS_CACHE: Dict[type, type] = {}


def _ds_class(base: type) -> type:
    # Built lazily so that importing this module does not import deepspeed.
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = type("DeepSpeedGroupedExperts", (_DeepSpeedNames, base, _moe_base()), {})
    return _CLASS_CACHE[base]


def build_context(ds_config: Dict[str, Any], enabled: bool = True):
    """The context to build the model in: ZeRO-3 partitioning at construction for stage 3
    (`zero3.init`), nothing for stages 0-2 or with enabled=False (models whose building cannot
    run under deepspeed.zero.Init, e.g. transformers' from_pretrained: the engine partitions
    them at deepspeed.initialize, with the same placement)."""
    from tagmoe_dist.integrations import zero3
    return zero3.init(ds_config, enabled=enabled)


def prepare_model(model: nn.Module, ds_config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Make the tagmoe MoE layers of `model` ready for the DeepSpeed engine; call before
    `deepspeed.initialize`. Returns the model. ZeRO 0-2 (or no `ds_config`): every expert
    container becomes visible to the engine as an MoE module (see the module docstring).
    ZeRO-3: `zero3.prepare_model` (experts partitioned over the expert-data-parallel group)."""
    from tagmoe_dist.layer import MoELayer
    if ds_config is not None:
        from tagmoe_dist.integrations import zero3
        if zero3.zero_stage(ds_config) == 3:
            return zero3.prepare_model(model)
    count = 0
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        experts = layer.experts
        if isinstance(experts, _moe_base()):
            continue
        experts.__class__ = _ds_class(type(experts))
        # The attributes DeepSpeed's engine and checkpointing read from its MoE modules.
        experts.num_experts = layer.cfg.num_experts
        experts.ep_size = layer.groups.ep_size
        experts.expert_group_name = f"ep_size_{layer.groups.ep_size}"
        experts.enable_expert_tensor_parallelism = False
        count += 1
    if count == 0:
        raise ValueError("prepare_model found no tagmoe_dist.MoELayer in the model")
    return model


def check_zero_stage(ds_config: Dict[str, Any], ep_size: int = 1) -> None:
    """Refuse, before DeepSpeed starts, ZeRO settings that would train wrongly or that DeepSpeed
    refuses late (stage 3: the options listed in zero3.check_config)."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage == 0 and ep_size > 1 and float(ds_config.get("gradient_clipping", 0) or 0) > 0:
        # deepspeed/runtime/utils.py clip_grad_norm_ averages each rank's sqrt(dense^2 + its
        # experts^2) over data-parallel ranks instead of summing every expert once: the norm is
        # underestimated and gradients are clipped too little (ZeRO 1 and 2 are exact).
        raise ValueError(
            "gradient_clipping with zero_optimization.stage=0 and ep_size > 1 uses a wrong global "
            "gradient norm in DeepSpeed (experts are not summed across expert-parallel ranks); use "
            "ZeRO stage 1 or 2, or set gradient_clipping to 0 (train.grad_clip=0)")
    if stage == 3:
        from tagmoe_dist.integrations import zero3
        zero3.check_config(ds_config, ep_size)


def optimizer_param_groups(model: nn.Module, weight_decay: float = 0.0,
                           no_decay_names=("bias", "norm", "ln", "embed")) -> List[Dict[str, Any]]:
    """Parameter groups for DeepSpeed: dense / no-decay split, then experts split into their own
    groups (`moe: True`, one per expert-data-parallel group name)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 parameters are 1-D partitions; ds_shape is the whole tensor's shape
        dim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if dim < 2 or any(k in n for k in no_decay_names) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def init_distributed(timeout_s: float = 600.0) -> None:
    """Discover rank / world / master from whichever launcher started us (torchrun, deepspeed,
    srun, mpirun, or none: one process), init torch.distributed with a timeout, and hand the
    process group to DeepSpeed's comm layer (which then reuses it instead of re-discovering)."""
    deepspeed, _ = _deepspeed()
    import torch.distributed as dist
    from tagmoe_dist.launch import init_distributed as launch_init
    if not dist.is_initialized():
        launch_init(timeout_s=timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
