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
