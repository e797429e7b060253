"""Megatron-LM's training scripts (`pretrain_gpt.py`) with our MoE layer, through `--spec`.

Megatron-LM's GPT builder, after parsing its arguments, imports `--spec MODULE NAME` and uses
`MODULE.NAME` as the transformer layer (or block) spec. Imported inside such a run, this module
builds `gpt_spec` from Megatron-LM's arguments: Megatron's decoder-block spec (dense and MoE
layers by `--moe-layer-freq`, Transformer Engine or local modules by `--transformer-impl`) with
our layer in every MoE layer's MLP slot:

    torchrun ... pretrain_gpt.py <flags> --moe-token-dispatcher-type alltoall \\
        --spec tagmoe_dist.integrations.megatron_lm gpt_spec

MoEConfig fields beyond what the TransformerConfig flags map (router, alignment, task schema)
come from a YAML file named by the environment variable TAGMOE_MEGATRON_MOE (a training script's
flags are Megatron-LM's; `--spec` takes no arguments):

    moe: {router: task_aware, align_loss_coeff: 0.05}     # MoEConfig overrides
    task_schema: configs/tasks/text_tasks.yaml            # needed by task-aware routers
    blend_tasks:                                          # the task of each --data-path dataset
      - {scope: sequence_transform, type: [order_preserving]}
      - null                                              # unknown task

Task ids reach the layers through `task_context` (a TaskContext). Megatron-LM's forward_step
does not open it: `router="task_aware"` then routes like top-k without an alignment loss.
`blend_forward_step(forward_step)` wraps pretrain_gpt's forward_step so that each sample's task
is that of its dataset in the data blend (`--data-path`, `blend_tasks`; docs/megatron.md).
Outside a Megatron-LM run importing this module defines the helpers only.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.task_context import TaskContext
from tagmoe_dist.tasks import TaskSchema

ENV = "TAGMOE_MEGATRON_MOE"


@dataclasses.dataclass
class Settings:
    """The TAGMOE_MEGATRON_MOE file: `moe` (MoEConfig overrides), `task_schema` (a schema YAML
    path, relative to the working directory or to this file), `blend_tasks` (the task
    descriptor of each dataset of --data-path, in order; null = unknown)."""
    moe: Dict[str, Any] = dataclasses.field(default_factory=dict)
    task_schema: Optional[TaskSchema] = None
    blend_tasks: Optional[List[Optional[Dict[str, Any]]]] = None

    def task_table(self) -> torch.Tensor:
        """Multi-hot [datasets, tags]: row d is the task of dataset d of the blend."""
        if self.blend_tasks is None or self.task_schema is None:
            raise ValueError(f"task ids from the data blend need 'blend_tasks' and 'task_schema' "
                             f"in the {ENV} file")
        return self.task_schema.multi_hot(self.blend_tasks)


def load_settings(path: Optional[str]) -> Settings:
    """The settings file described above (no path: no settings)."""
    if not path:
        return Settings()
    import yaml
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    unknown = sorted(set(d) - {"moe", "task_schema", "blend_tasks"})
    if unknown:
        raise ValueError(f"{ENV}={path}: unknown keys {unknown}; the file has 'moe' (MoEConfig "
                         "overrides), 'task_schema' (a task schema YAML path) and 'blend_tasks' "
                         "(one task descriptor per dataset of the blend)")
    schema = d.get("task_schema")
    if schema is not None and not os.path.exists(schema):
        # a relative path that is not relative to the working directory: to the settings file
        schema = os.path.join(os.path.dirname(os.path.abspath(path)), schema)
    blend = d.get("blend_tasks")
    if blend is not None and not isinstance(blend, list):
        raise ValueError(f"{ENV}={path}: blend_tasks must be a list (one task descriptor per "
                         f"dataset of --data-path), got {type(blend).__name__}")
    return Settings(dict(d.get("moe") or {}), TaskSchema.from_yaml(schema) if schema else None,
                    blend)


def spec_from_args(args, config, moe_overrides: Optional[Dict[str, Any]] = None,
                   task_schema: Optional[TaskSchema] = None,
                   task_context: Optional[TaskContext] = None,
                   groups: Optional[ParallelGroups] = None):
    """Megatron's decoder-block spec for Megatron-LM's `args` and TransformerConfig `config`,
    with our layer (`moe_spec(**moe_overrides)`) as every MoE layer's MLP."""
    from tagmoe_dist.integrations import megatron as tmm
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise ValueError("--spec tagmoe_dist.integrations.megatron_lm builds one block spec per "
                         "process: virtual pipeline stages are not supported, unset "
                         "--num-layers-per-virtual-pipeline-stage")
    moe = tmm.moe_spec(task_schema=task_schema, task_context=task_context, groups=groups,
                       **(moe_overrides or {}))
    return tmm.get_gpt_decoder_block_spec(
        config, use_transformer_engine=getattr(args, "transformer_impl", "local") ==
        "transformer_engine", moe=moe, normalization=getattr(args, "normalization", None),
        qk_l2_norm=getattr(args, "qk_l2_norm", False))


def blend_forward_step(forward_step, task_table: Optional[torch.Tensor] = None,
                       task_context: Optional[TaskContext] = None,
                       groups: Optional[ParallelGroups] = None):
    """pretrain_gpt's `forward_step(data_iterator, model, ...)` with task ids: Megatron's
    BlendedDataset gives every sample a "dataset_id" (its dataset's index in the blend), and
    sample b's task is `task_table[dataset_id[b]]` (task_table: LongTensor [datasets, levels],
    -1 = unknown, or multi-hot [datasets, tags]). The ranks that read data (tensor-parallel rank
    0) take the next batch, the ids go to the other TP ranks by broadcast, and the batch is handed
    back to forward_step unchanged. Left out, the table, context and groups are this module's,
    built by `--spec` at model build (the table from `blend_tasks`), looked up at the first step.
    Pipeline parallelism is not covered: the middle stages read no data there (a ValueError)."""
    state = {}

    def resolve():
        table, ctx, g = task_table, task_context, groups
        if ctx is None:
            if _BUILT is None:
                raise ValueError("blend_forward_step without a task_context needs the model built "
                                 "with --spec tagmoe_dist.integrations.megatron_lm gpt_spec")
            ctx, g = _BUILT[1], g or _BUILT[2]
        if table is None:
            table = load_settings(os.environ.get(ENV)).task_table()
        g = g or ParallelGroups.single()
        if g.pp_size > 1:
            raise ValueError("blend_forward_step reads task ids from the data, which Megatron-LM "
                             "loads on the first and last pipeline stages only: use it with "
                             "--pipeline-model-parallel-size 1")
        state.update(table=table, ctx=ctx, groups=g)

    if groups is not None and task_context is not None and task_table is not None:
        resolve()           # everything given: errors now, not at the first step

    def step(data_iterator, model, *args, **kwargs):
        if not state:
            resolve()
        task_table, task_context, groups = state["table"], state["ctx"], state["groups"]
        batch = next(data_iterator) if data_iterator is not None else None
        ids = None
        if batch is not None:
            if "dataset_id" not in batch:
                raise ValueError("the batch has no 'dataset_id': task ids come from a data blend "
                                 "(Megatron's BlendedDataset), give --data-path with weights")
            ids = torch.as_tensor(batch["dataset_id"]).long()
        if groups.tp_size > 1:
            # every TP rank runs this step at the same time: rank 0 of the group has the data
            device = next(model.parameters()).device
            n = torch.tensor([0 if ids is None else ids.numel()], device=device)
            src = dist.get_global_rank(groups.tp_group, 0)
            dist.broadcast(n, src, group=groups.tp_group)
            buf = ids.to(device) if ids is not None else torch.empty(int(n.item()), dtype=torch.long,
                                                                      device=device)
            dist.broadcast(buf, src, group=groups.tp_group)
            ids = buf
        task = task_table.to(ids.device)[ids]
        it = data_iterator if batch is None else itertools.chain([batch], data_iterator)
        with task_context.micro_batch(task):
            return forward_step(it, model, *args, **kwargs)
    return step


def _from_megatron_lm():
    """(gpt_spec, task_context) inside a Megatron-LM run after its arguments are parsed, else
    None."""
    try:
        from megatron.training import get_args
        from megatron.training.arguments import core_transformer_config_from_args
        args = get_args()
    except (ImportError, AssertionError):
        return None
    settings = load_settings(os.environ.get(ENV))
    groups = ParallelGroups.from_megatron(sequence_parallel=bool(args.sequence_parallel))
    ctx = TaskContext(groups)
    config = core_transformer_config_from_args(args)
    return (spec_from_args(args, config, settings.moe, settings.task_schema, ctx, groups), ctx,
            groups)


_BUILT = _from_megatron_lm()
if _BUILT is not None:
    gpt_spec, task_context, _ = _BUILT
