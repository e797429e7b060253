"""Task-level routing (Task-MoE, Kudugunta et al. 2021): a sample's tokens all go to the experts
chosen from its task descriptor alone, so the experts one task uses can be cut out as a smaller
model for serving that task (`extract_task_submodel`).

Notation: T tokens, E experts, K top-k, B samples, N tags.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.kernels.activations import activation_fn
from tagmoe_dist.gating.topk import Router
from tagmoe_dist.tasks import TaskSchema


class TaskLevelRouter(Router):
    """logits_b = t_b . W_task + w_unknown, broadcast to every token of sample b.

    `unknown_logits` is what a sample with no annotated tag is routed by (t_b = 0).
    """

    def __init__(self, cfg: MoEConfig, schema: TaskSchema):
        super().__init__(cfg)
        self.schema = schema
        # Unit-scale init: with a tiny std every task would tie and share the same experts.
        self.task_weight = nn.Parameter(torch.randn(schema.num_tags, cfg.num_experts))
        self.unknown_logits = nn.Parameter(torch.zeros(cfg.num_experts))

    def task_logits(self, task_BN: torch.Tensor) -> torch.Tensor:
        return task_BN.float() @ self.task_weight + self.unknown_logits

    def compute_logits(self, x_TD, sample_idx_T, task_BN):
        if task_BN is None:
            raise ValueError("router='task_level' routes by the task descriptor: pass task= "
                             "(use -1 / all-zero rows for samples whose task is unknown)")
        return self.task_logits(task_BN).index_select(0, sample_idx_T)


class TaskSubModel(nn.Module):
    """The part of a task-level MoE layer that one task uses: its K experts with fixed weights."""

    def __init__(self, w1_KDF: torch.Tensor, w2_KFD: torch.Tensor, weights_K: torch.Tensor,
                 expert_ids: list, activation: str, shared: Optional[nn.Module] = None):
        super().__init__()
        self.w1 = nn.Parameter(w1_KDF.clone())
        self.w2 = nn.Parameter(w2_KFD.clone())
        self.register_buffer("combine_weights", weights_K.clone())
        self.expert_ids = list(expert_ids)
        self.act = activation_fn(activation)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        h_KTF = self.act(torch.einsum("td,kdf->ktf", x_TD, self.w1))
        y_TD = torch.einsum("k,ktf,kfd->td", self.combine_weights.to(x.dtype), h_KTF, self.w2)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view_as(x)


@torch.no_grad()
def extract_task_submodel(layer, task) -> TaskSubModel:
    """Cut out the experts a `router='task_level'` MoE layer uses for one task.

    `task`: a descriptor dict ({"scope": "...", ...}), a LongTensor [levels] of ids, or a
    multi-hot [num_tags]. Works on any EP layout (the chosen experts are gathered from the group).
    """
    if layer.cfg.router != "task_level":
        raise ValueError(f"extract_task_submodel needs router='task_level', the layer has "
                         f"router={layer.cfg.router!r}: token-routed layers use every expert")
    schema = layer.task_schema
    if isinstance(task, Mapping):
        task_1N = schema.multi_hot([task])
    else:
        task_1N = schema.to_multi_hot(torch.as_tensor(task).reshape(1, -1), field="task")
    out = layer.router.route(layer.router.task_logits(task_1N), None, None)
    ids = out.topk_ids_TK[0].tolist()
    full = layer.full_state_dict()
    shared = None
    if layer.shared_expert is not None:
        import copy
        shared = copy.deepcopy(layer.shared_expert)
    return TaskSubModel(full["experts.w1"][ids], full["experts.w2"][ids], out.topk_weights_TK[0],
                        ids, layer.cfg.activation, shared)
