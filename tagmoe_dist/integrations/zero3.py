"""ZeRO-3 for models that hold tagmoe_dist `MoELayer`s: experts partitioned over the
expert-data-parallel group, everything else over the data-parallel group, through DeepSpeed's
own parameter placement (the marks DeepSpeed's AutoEP puts on its experts).

How DeepSpeed 0.19.8 places a parameter under ZeRO-3, and what we set:
  1. `deepspeed.zero.Init` scatters each parameter over `param.ds_zero_partition_process_group`
     when the parameter carries one, else over the data-parallel group
     (partition_parameters.py `_convert_to_deepspeed_param`); the engine's own conversion of
     parameters built outside `zero.Init` goes through the same function.
  2. The ZeRO-3 optimizer builds one sub-group per partition group, and treats a sub-group whose
     parameters carry `ds_zero_placement_family = "autoep_expert"` and
     `ds_zero_partition_group_name = "ep_size_<N>"` as experts (stage3.py
     `_autoep_expert_parallel_group`): their gradients are reduce-scattered over the
     expert-data-parallel group and divided by the *whole* data-parallel size (each expert's
     gradient already holds the tokens of its expert-parallel group), and the gradient norm
     adds the expert-parallel ranks' shares once each. These are AutoEP's marks
     (module_inject/auto_ep_layer.py); we put them on `MoELayer.experts`.
  3. Our expert container is *not* declared an MoE module to the engine under ZeRO-3 (it is under
     ZeRO 0-2, see deepspeed.py): the engine refuses native MoE modules with stage 3, and its
     AutoEP checkpoint path is keyed to AutoEP's own `experts.w1/w2/w3` layout. So the engine
     sees a plain ZeRO-3 model whose expert sub-groups it partitions and reduces as above, and
     saves a plain ZeRO-3 checkpoint (`ds_zero_partition_groups` in each optimizer file records
     the partition groups; `tagmoe_dist.checkpoint.zero3` reads it).
  4. ZeRO-3 gathers a module's parameters in forward/backward hooks of the module that owns
     them. `MoELayer` reads its experts' weights without calling the expert module (the
     dispatcher runs grouped kernels on them), so every `MoELayer` is made a ZeRO-3 *leaf
     module* (`deepspeed.utils.set_z3_leaf_modules`): all of its parameters are gathered when
     it is entered, on every rank, whatever the routing -- a rank whose tokens reach none of its
     experts still takes part in the same gathers and reduce-scatters (DeepSpeed issue 4808).
     The model-wide `TaskAlignment` is read by the model after the last block (`finish()`), so
     its parameters are registered as external parameters of the root module (gathered for the
     whole forward and backward of the model).

Construction (`init`): a `deepspeed.zero.Init` whose conversion waits one level: a module's
parameters are partitioned when its *parent* finishes `__init__`. The parent's own init code
(`nn.init.normal_(self.child.weight)`, weight tying, `MoELayer` marking its experts) then sees
whole tensors, so the model equals one built without ZeRO-3, while no more than one module's
children are ever whole at once. Each rank builds only its expert-parallel share of the experts
(`init_expert_weights` draws each expert from its own seed), so no rank materialises all experts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

EXPERT_FAMILY = "autoep_expert"


# ---------------------------------------------------------------------------- config checks
def zero_stage(ds_config: Dict[str, Any]) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def check_config(ds_config: Dict[str, Any], ep_size: int = 1, etp_size: int = 1,
                 sequence_parallel: bool = False) -> None:
    """Refuse, before any process group or engine exists, what DeepSpeed refuses (or gets wrong)
    with ZeRO-3 and expert parallelism. Each error names the option and the fix. Every ep_size
    is supported (it is accepted for symmetry with the stage 0-2 checks)."""
    if zero_stage(ds_config) != 3:
        return
    zero = ds_config.get("zero_optimization") or {}
    bad = []
    hpz = int(zero.get("zero_hpz_partition_size", 1) or 1)
    if hpz > 1:
        bad.append(f"zero_optimization.zero_hpz_partition_size={hpz} (hpZ secondary partitions): "
                   "DeepSpeed's ZeRO-3 expert sub-groups do not support it; set it to 1")
    if zero.get("zero_quantized_gradients"):
        bad.append("zero_optimization.zero_quantized_gradients=true: DeepSpeed's ZeRO-3 expert "
                   "sub-groups do not support quantized gradient reduction; set it to false")
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        bad.append("zero_optimization.zero_quantized_weights: quantized all-gathers are untested "
                   "with expert partition groups; set it to false")
    for key in ("offload_param", "offload_optimizer"):
        off = zero.get(key)
        if off and str((off or {}).get("device", "none")).lower() != "none":
            bad.append(f"zero_optimization.{key}.device={off.get('device')!r}: ZeRO-3 offload "
                       "is not supported with tagmoe_dist experts; remove "
                       f"zero_optimization.{key} (or set its device to \"none\")")
    sp = int(ds_config.get("sequence_parallel_size", 1) or 1)
    if sp > 1 or sequence_parallel:
        bad.append("sequence parallelism (sequence_parallel_size > 1 / tensor-parallel sequence "
                   "parallel): DeepSpeed does not support it with ZeRO-3 expert partitions; use "
                   "ZeRO stage 2")
    ep_cfg = ds_config.get("expert_parallel") or {}
    etp = max(int(etp_size), int(ep_cfg.get("expert_tensor_parallel_size", 1) or 1))
    if etp > 1:
        bad.append(f"expert tensor parallel size {etp}: ZeRO-3 expert partitions support only "
                   "expert_tensor_parallel_size=1; use ZeRO stage 2 for expert tensor parallelism")
    if ep_cfg.get("enabled"):
        bad.append("expert_parallel.enabled=true (DeepSpeed AutoEP): tagmoe_dist MoE layers do "
                   "their own expert parallelism; remove the expert_parallel section")
    if zero.get("stage3_module_granularity_threshold"):
        bad.append("zero_optimization.stage3_module_granularity_threshold: tagmoe_dist sets its "
                   "own ZeRO-3 leaf modules (each MoELayer); remove the option")
    if bad:
        raise ValueError("zero_optimization.stage=3 with tagmoe_dist MoE layers: unsupported "
                         "option(s):\n  - " + "\n  - ".join(bad))


# ---------------------------------------------------------------------------- placement
def _ds_groups():
    from deepspeed.utils import groups
    return groups


def _same_group(a, b) -> bool:
    import torch.distributed as dist
    if a is b:
        return True
    if a is None or b is None:
        return False
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def mark_experts(layer) -> None:
    """Put AutoEP's placement marks on `layer.experts` (an `MoELayer`): partition over its
    expert-data-parallel group, reduce as experts. The groups must be DeepSpeed's (built by
    `ParallelGroups.from_deepspeed`), since the ZeRO-3 optimizer looks the expert-parallel group
    up by name in DeepSpeed's registry."""
    groups = layer.groups
    name = f"ep_size_{groups.ep_size}"
    registry = _ds_groups()
    if name not in registry._get_expert_data_parallel_group_dict():
        raise ValueError(f"MoELayer with ep_size={groups.ep_size}: ZeRO-3 needs DeepSpeed's "
                         "expert groups; build the layer's groups with "
                         f"ParallelGroups.from_deepspeed(ep_size={groups.ep_size})")
    edp = registry._get_expert_data_parallel_group(name)
    if groups.edp_group is not None and not _same_group(groups.edp_group, edp):
        raise ValueError(f"MoELayer groups: the expert-data-parallel group is not DeepSpeed's "
                         f"'{name}' group; build them with ParallelGroups.from_deepspeed()")
    for p in layer.experts.parameters():
        p.allreduce = False
        p.group_name = name
        p.ds_zero_placement_family = EXPERT_FAMILY
        p.ds_zero_partition_group_name = name
        p.ds_zero_partition_process_group = edp


def _moe_layers(model: nn.Module):
    from tagmoe_dist.layer import MoELayer
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _is_zero_param(p) -> bool:
    return hasattr(p, "ds_id")


def prepare_model(model: nn.Module) -> nn.Module:
    """Make a model holding `MoELayer`s ready for a ZeRO-3 engine (call before
    `deepspeed.initialize`, whether or not it was built under `init`). Returns the model."""
    from deepspeed.utils import set_z3_leaf_modules
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from tagmoe_dist.gating.task_aware import TaskAlignment
    from tagmoe_dist.layer import MoELayer
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("zero3.prepare_model found no tagmoe_dist.MoELayer in the model")
    sizes = {layer.groups.ep_size for layer in layers}
    if len(sizes) > 1:
        raise ValueError(f"MoE layers with different ep_size {sorted(sizes)}: one EP size per model")
    for layer in layers:
        if layer.groups.etp_size > 1 or layer.groups.tp_size > 1:
            raise ValueError("ZeRO-3 with tensor or expert-tensor parallel MoE layers is not "
                             "supported; use ZeRO stage 2")
        for n, p in layer.experts.named_parameters():
            if _is_zero_param(p):
                want = p.ds_zero_partition_process_group if hasattr(
                    p, "ds_zero_partition_process_group") else None
                if want is None or not _same_group(p.ds_process_group, want):
                    raise ValueError(
                        f"expert parameter {n} was partitioned over the data-parallel group by a "
                        "plain deepspeed.zero.Init; build the model under "
                        "tagmoe_dist.integrations.zero3.init(ds_config) instead")
        if not all(_is_zero_param(p) for p in layer.experts.parameters()):
            mark_experts(layer)
    set_z3_leaf_modules(model, [MoELayer])
    from tagmoe_dist.checkpoint.zero3 import client_state
    model.tagmoe_client_state = client_state(model)      # saved by checkpoint/engine.save
    inside = {id(m) for layer in layers for m in layer.modules()}
    for m in model.modules():
        if isinstance(m, TaskAlignment) and id(m) not in inside:
            # all of it, predictor included: Hugging Face models evaluate the head on a
            # detached signature (task_context.py) whose backward no module hook announces
            for p in m.parameters():
                register_external_parameter(model, p)
    return model


# ---------------------------------------------------------------------------- construction
_INIT_CLASS: Optional[type] = None


def _init_class() -> type:
    """deepspeed.zero.Init, converting a module's parameters when its parent's __init__ ends.
    Built lazily so that importing this module does not import deepspeed."""
    global _INIT_CLASS
    if _INIT_CLASS is None:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import is_zero_param

        class _OneLevelLateInit(deepspeed.zero.Init):
            def _post_init_method(self, module):
                from tagmoe_dist.layer import MoELayer
                if isinstance(module, MoELayer):
                    mark_experts(module)
                for child in module.children():
                    todo = [p for p in child.parameters() if not is_zero_param(p)]
                    if todo:
                        self._convert_to_zero_parameters(todo)

        _INIT_CLASS = _OneLevelLateInit
    return _INIT_CLASS


@contextlib.contextmanager
def init(ds_config: Dict[str, Any], enabled: bool = True) -> Iterator[None]:
    """Build a model under ZeRO-3 partitioning (see the module docstring):

        with zero3.init(ds_config):
            model = GPT(cfg, groups=ParallelGroups.from_deepspeed(ep_size), ...)
        zero3.prepare_model(model)

    Parameters still whole at the end (the root module's own) are partitioned by the engine.
    With `enabled=False` (another ZeRO stage) it does nothing."""
    if not enabled or zero_stage(ds_config) != 3:
        yield
        return
    from deepspeed.utils import groups as ds_groups
    with _init_class()(config_dict_or_path=ds_config, mem_efficient_linear=False,
                       data_parallel_group=ds_groups._get_data_parallel_group()):
        yield


# ---------------------------------------------------------------------------- measurement
def partition_bytes(engine) -> Dict[str, Dict[str, int]]:
    """This rank's bytes, read from the engine's own ZeRO-3 partitions: 16/32-bit parameter
    partitions (`param.ds_tensor`; whole for persistent parameters), fp32 master partitions and
    optimizer state of each sub-group, split into experts and dense.
    {"expert"|"dense": {"param", "master", "optim"}}"""
    opt = engine.optimizer
    out = {k: {"param": 0, "master": 0, "optim": 0} for k in ("expert", "dense")}

    def kind(params):
        fams = {getattr(p, "ds_zero_placement_family", "replicated") for p in params}
        assert len(fams) == 1, fams
        return "expert" if fams == {EXPERT_FAMILY} else "dense"

    for p in engine.module.parameters():
        k = "expert" if getattr(p, "ds_zero_placement_family", None) == EXPERT_FAMILY else "dense"
        # persistent parameters (numel <= stage3_param_persistence_threshold) stay whole
        n = p.ds_numel if p.ds_persist else p.ds_tensor.numel()
        out[k]["param"] += n * p.ds_tensor.element_size()
    for i, group in enumerate(opt.fp16_groups):
        k = kind(group)
        flat = opt.fp32_partitioned_groups_flat[i]
        out[k]["master"] += flat.numel() * flat.element_size()
        state = opt.optimizer.state.get(flat, {})
        out[k]["optim"] += sum(t.numel() * t.element_size() for t in state.values()
                               if isinstance(t, torch.Tensor) and t.dim() > 0)
    return out


def full_numel(model: nn.Module) -> Dict[str, int]:
    """Element counts of this rank's whole parameters (experts: this rank's EP share)."""
    out = {"expert": 0, "dense": 0}
    for p in model.parameters():
        k = "expert" if getattr(p, "ds_zero_placement_family", None) == EXPERT_FAMILY else "dense"
        out[k] += int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()
    return out


def expert_param_names(model: nn.Module) -> List[str]:
    return [n for n, p in model.named_parameters()
            if getattr(p, "ds_zero_placement_family", None) == EXPERT_FAMILY]
