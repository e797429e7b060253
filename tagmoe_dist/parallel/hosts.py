"""Host adapters: the one place that reads the process groups DeepSpeed
(`deepspeed.utils.groups`) or Megatron-core (`parallel_state`) keep as globals, and hands them
to `ParallelGroups` as its fields (`ParallelGroups.from_deepspeed` / `.from_megatron` build the
object). Everything else receives a `ParallelGroups` and never reads host globals.
"""

from __future__ import annotations

import importlib

from typing import Any, Dict


def _import(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"{module} is needed here: pip install 'tagmoe-dist[{extra}]'") from e


def deepspeed_groups(ep_size: int = 1) -> Dict[str, Any]:
    """ParallelGroups built from DeepSpeed's expert-parallel / expert-data-parallel groups
    (creating them through DeepSpeed if this EP size has none yet), so that our all-to-all and
    DeepSpeed's gradient reduction use the same groups."""
    groups = _import("deepspeed.utils.groups", "deepspeed")
    import deepspeed.comm as dscomm
    if not dscomm.is_initialized():
        raise RuntimeError("call deepspeed.init_distributed() before ParallelGroups.from_deepspeed()")
    world = dscomm.get_world_size()
    if world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} does not divide the world size {world}")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    return dict(
        ep_size=ep_size,
        ep_rank=groups._get_expert_parallel_rank(name),
        ep_group=ep_group if ep_size > 1 else None,
        edp_group=groups._get_expert_data_parallel_group(name),
        dp_group=groups._get_data_parallel_group(),
    )


def megatron_groups(sequence_parallel: bool = False) -> Dict[str, Any]:
    """ParallelGroups from Megatron's parallel_state (after initialize_model_parallel)."""
    ps = _import("megatron.core.parallel_state", "megatron")
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call megatron.core.parallel_state.initialize_model_parallel(...) "
                           "before ParallelGroups.from_megatron()")
    if ps.get_context_parallel_world_size() > 1:
        raise ValueError("context_parallel_size > 1 is not supported by the tagmoe MoE layer "
                         "(routing statistics would cover one sequence chunk only)")
    tp, ep, etp = (ps.get_tensor_model_parallel_world_size(),
                   ps.get_expert_model_parallel_world_size(),
                   ps.get_expert_tensor_parallel_world_size())
    pp = ps.get_pipeline_model_parallel_world_size()
    return dict(
        ep_size=ep, ep_rank=ps.get_expert_model_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group() if ep > 1 else None,
        edp_group=ps.get_expert_data_parallel_group(),
        dp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_size=tp, tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
        etp_size=etp, etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_group=ps.get_expert_tensor_parallel_group() if etp > 1 else None,
        pp_size=pp, pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_group=ps.get_pipeline_model_parallel_group() if pp > 1 else None,
        sequence_parallel=bool(sequence_parallel) and tp > 1,
    )
