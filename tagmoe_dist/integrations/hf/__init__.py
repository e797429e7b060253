"""Hugging Face models with tagmoe_dist MoE layers: convert MoE blocks / upcycle dense MLPs in
memory (`from_pretrained`), give micro-batches their task ids (`tasks`, `TaskModel`), export back
to a Hugging Face directory (`export`). docs/hf.md explains the mapping per family."""

from tagmoe_dist.integrations.hf.block import TaskModel, tasks
from tagmoe_dist.integrations.hf.convert import (from_pretrained, info, last_align, moe_layers,
                                                 set_aux_loss_scale)
from tagmoe_dist.integrations.hf.families import DENSE_FAMILIES, MOE_FAMILIES, SUPPORTED

__all__ = ["DENSE_FAMILIES", "MOE_FAMILIES", "SUPPORTED", "TaskModel", "from_pretrained", "info",
           "last_align", "moe_layers", "set_aux_loss_scale", "tasks"]
