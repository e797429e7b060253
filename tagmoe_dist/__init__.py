"""tagmoe_dist: task-aware Mixture-of-Experts with expert-parallel dispatch."""

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating.losses import AuxLossAutoScaler
from tagmoe_dist.gating.task_aware import TaskAlignment
from tagmoe_dist.gating.task_level import extract_task_submodel
from tagmoe_dist.layer import MoELayer, plan_overlap
from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.tasks import UNKNOWN, TaskLevel, TaskSchema

__all__ = ["AuxLossAutoScaler", "MoEConfig", "MoELayer", "ParallelGroups", "TaskAlignment",
           "TaskLevel", "TaskSchema", "UNKNOWN", "extract_task_submodel", "plan_overlap"]


def __getattr__(name):
    # tm.hf imports transformers, tm.diffusers imports diffusers: only when first used
    if name in ("hf", "diffusers"):
        import importlib
        return importlib.import_module("tagmoe_dist.hf" if name == "hf"
                                       else "tagmoe_dist.integrations.diffusers")
    raise AttributeError(f"module 'tagmoe_dist' has no attribute {name!r}")
