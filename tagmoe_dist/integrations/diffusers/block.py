"""The module that takes the place of a block's image-stream FFN, and how task ids and the TAG
alignment loss reach it (the diffusers transformers' forward has no `task` argument).

Notation: B samples, S image tokens, D hidden, E experts.

Task ids reach the layers through the transformer's `TaskState` (its forward has no `task`
argument): `with tm.diffusers.tasks(transformer, task): transformer(...)`, or the `TaskTransformer`
wrapper. The TAG alignment loss pools the per-sample routing signatures of all converted blocks of
one forward pass (one shared TaskAlignment) and is attached once, by a forward hook on the
transformer's `norm_out`, through AuxLossAutoScaler.

Gradient checkpointing (diffusers' `enable_gradient_checkpointing`, non-reentrant) re-runs a
block's forward inside backward, after the `tasks` block has closed:
  1. a block's first pass (grad enabled, checkpointing on) queues the task ids it used; the
     recomputation (a forward inside a backward pass) takes them from the queue, so it runs the
     same operations and regenerates the same saved tensors;
  2. the MoELayer hands its routing signature to the block (a slot), and only the first pass adds
     it to the pool: the loss and its graph come from the first pass, whose saved tensors the
     recomputation restores.
Reentrant checkpointing runs the first pass without grad, so no routing gradient could reach the
alignment loss: it is refused.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating.losses import AuxLossAutoScaler
from tagmoe_dist.gating.task_aware import TaskAlignment
from tagmoe_dist.layer import MoELayer
from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.task_context import SignatureSlot, in_backward
from tagmoe_dist.tasks import TaskSchema


class TaskState:
    """The task ids of the forward pass in progress, the auxiliary-loss scale and the last
    alignment loss of one converted transformer."""

    def __init__(self, schema: Optional[TaskSchema], transformer: nn.Module):
        self.schema = schema
        self._stack: List[Optional[torch.Tensor]] = []
        self.aux_loss_scale = 1.0
        self.last_align: Dict[str, torch.Tensor] = {}
        self.transformer_ref = lambda: transformer     # no reference cycle through modules

    @property
    def task(self) -> Optional[torch.Tensor]:
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def use(self, task: Optional[torch.Tensor]):
        if task is not None:
            if self.schema is None:
                raise ValueError("task= was given but the transformer was converted without a "
                                 "task_schema; pass task_schema= to tm.diffusers.convert")
            task = self.schema.to_multi_hot(task)        # validated once per forward, here
        self._stack.append(task)
        try:
            yield
        finally:
            self._stack.pop()




class DiffusersMoE(nn.Module):
    """Takes the place of a block's image-stream FeedForward: `forward(hidden_states [B, S, D])`.
    `moe` holds this rank's experts. `dmoe_bias` [D] is MegaBlocks' output bias `experts.bias`,
    kept only so that the authors' checkpoint layout round-trips: their forward discards it
    (`dMoE(...)[0]` with `return_bias=True`), and so does this one."""

    def __init__(self, cfg: MoEConfig, groups: ParallelGroups, schema: Optional[TaskSchema],
                 alignment: Optional[TaskAlignment], state: TaskState, block_index: int):
        super().__init__()
        self._slot = SignatureSlot()
        self.moe = MoELayer(cfg, groups=groups, task_schema=schema,
                            alignment=self._slot if alignment is not None else None)
        self.block_index = block_index
        self.register_buffer("dmoe_bias", torch.zeros(cfg.hidden_size))
        object.__setattr__(self, "_state", state)        # shared, not a submodule
        object.__setattr__(self, "_alignment", alignment)
        self._replay: collections.deque = collections.deque()

    def _task(self):
        """(task ids of this forward, whether it is a checkpoint's recomputation)."""
        if in_backward() and self._replay:
            return self._replay.popleft(), True
        task = self._state.task if self.moe.cfg.uses_tasks else None
        if self.training and getattr(self._state.transformer_ref(), "gradient_checkpointing", False):
            if not torch.is_grad_enabled() and task is not None and self._alignment is not None:
                raise ValueError("reentrant gradient checkpointing runs the first pass without "
                                 "grad, so the TAG alignment loss could not reach the routers; use "
                                 "diffusers' default (non-reentrant) enable_gradient_checkpointing()")
            if torch.is_grad_enabled():
                self._replay.append(task)
        return task, False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        task, replay = self._task()
        y = self.moe(hidden_states, task=task)
        got = self._slot.take()
        if got is not None and not replay:
            self._alignment.add(*got)
        return y


class _AlignmentHook:
    """Forward hook of `norm_out`: the alignment loss of this forward pass, pooled over every
    converted block, attached once to the hidden state."""

    def __init__(self, alignment: TaskAlignment, state: TaskState):
        self.alignment, self.state = alignment, state

    def __call__(self, module, args, output):
        loss, acc = self.alignment.finish()      # always: it also resets the pool
        self.state.last_align = {}
        if loss is None:
            return output
        self.state.last_align = {"loss": loss.detach(), "acc": acc}
        if torch.is_grad_enabled():
            output = AuxLossAutoScaler.apply(output, self.alignment.cfg.align_loss_coeff * loss,
                                             self.state.aux_loss_scale)
        return output


