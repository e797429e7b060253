"""tagmoe_dist: task-aware Mixture-of-Experts with expert-parallel dispatch."""

from tagmoe_dist.tasks import UNKNOWN, TaskLevel, TaskSchema

__all__ = ["UNKNOWN", "TaskLevel", "TaskSchema"]
