"""The module that takes the place of a Hugging Face MoE block (or dense MLP), and the task ids of
a model whose forward has no `task` argument.

Notation: B samples, S positions, D hidden, E experts.

Task ids reach the layers through a `TaskContext` (tagmoe_dist/task_context.py) held by the model:

    with tm.hf.tasks(model, task_BN):          # LongTensor [B, levels] or multi-hot [B, tags]
        out = model(input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()                        # inside or after the block, as you like

The TAG alignment loss pools every MoE layer's routing signature (per-sample mean routing
distribution) over the whole model. Hugging Face gradient checkpointing re-runs a decoder layer's
forward inside backward, after the block has closed, so nothing may depend on running once:
  1. In its first pass a layer adds the *values* of its signature s_l [B, E] to the micro-batch's
     pool, and (grad enabled) gives s_l, in backward, the gradient coeff * dL_align/dg / L read
     from the micro-batch (`inject_signature`: no saved tensors, so the checkpoint's recomputation
     sees the same saved tensors as the first pass).
  2. A forward hook on the final norm (run once per forward, never checkpointed) computes L_align
     from the pooled g = mean_l s_l, the gradient above, and attaches L_align (graph into the
     alignment head only) to the norm's output through AuxLossAutoScaler.
  3. A checkpointed layer's recomputation (detected as: a forward inside a backward pass, with a
     micro-batch queued by the layer's first pass) reads the queued micro-batch, adds nothing to
     the pool and injects the same gradient. Reentrant checkpointing runs the first pass without
     grad: only the recomputation injects. Non-reentrant runs both with grad: the first pass's
     graph is the one backward uses.
Whether a layer will be recomputed is decided where Hugging Face decides it: a forward pre-hook
on the decoder layer (hooks run outside the checkpoint) reads `gradient_checkpointing`,
`training` and the grad mode.
"""

from __future__ import annotations

import collections
from typing import Dict, Optional

import torch
import torch.nn as nn

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating.losses import AuxLossAutoScaler
from tagmoe_dist.gating.task_aware import TaskAlignment
from tagmoe_dist.layer import MoELayer
from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.task_context import SignatureSlot, TaskContext, in_backward, inject_signature
from tagmoe_dist.tasks import TaskSchema

CONTEXT_ATTR = "tagmoe_task_context"
HEAD_ATTR = "tagmoe_alignment"




class HFMoEBlock(nn.Module):
    """`forward(hidden_states [B, S, D]) -> [B, S, D]`: our MoELayer in a decoder layer's `mlp`
    slot. `moe` holds this rank's experts only."""

    def __init__(self, cfg: MoEConfig, groups: ParallelGroups, task_schema: Optional[TaskSchema],
                 context: TaskContext, layer_index: int):
        super().__init__()
        self._slot = SignatureSlot()
        self.moe = MoELayer(cfg, groups=groups, task_schema=task_schema, alignment=self._slot)
        self.layer_index = layer_index
        object.__setattr__(self, "_context", context)          # shared, not a submodule
        self._replay: collections.deque = collections.deque()
        self._will_recompute = False

    @property
    def cfg(self) -> MoEConfig:
        return self.moe.cfg

    def decoder_pre_hook(self, layer: nn.Module, args, kwargs=None) -> None:
        self._will_recompute = bool(getattr(layer, "gradient_checkpointing", False)
                                    and layer.training and torch.is_grad_enabled())

    def _enter(self):
        """(micro-batch of this forward, whether it is a recomputation)."""
        if in_backward() and self._replay:
            return self._replay.popleft(), True
        mb = self._context.current
        if mb is not None and self._will_recompute:
            self._replay.append(mb)
        self._will_recompute = False
        return mb, False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mb, replay = self._enter()
        task = None if mb is None or not self.cfg.uses_tasks else mb.task
        y = self.moe(hidden_states, task=task)
        got = self._slot.take()
        if got is None or mb is None:
            return y
        s_BE, task_BN = got
        if not replay:
            self._context.add_signature(mb, s_BE, task_BN, expects_grad=self.training)
        if self.training and torch.is_grad_enabled():
            y = inject_signature(y, s_BE, self._context, mb, lambda: self.moe.aux_loss_scale)
        return y


class AlignmentHook:
    """Forward hook of the final norm: step 2 of the module docstring."""

    def __init__(self, model: nn.Module, head: TaskAlignment, context: TaskContext):
        object.__setattr__(self, "model", model)
        self.head, self.context = head, context
        self.aux_loss_scale = 1.0
        self.last_align: Dict[str, torch.Tensor] = {}

    def __call__(self, module, args, output):
        mb = self.context.current
        self.last_align = {}
        if mb is None or mb.sum_BE is None or mb.collected:
            return output
        training = self.head.training
        loss = self.context.collect(mb, self.head, self.head.cfg.align_loss_coeff, training)
        self.last_align = {"loss": mb.align_loss, "acc": mb.align_acc}
        if training and torch.is_grad_enabled():
            output = AuxLossAutoScaler.apply(output, self.head.cfg.align_loss_coeff * loss,
                                             self.aux_loss_scale)
        return output


def tasks(model: nn.Module, task: Optional[torch.Tensor]):
    """Context manager: the task descriptors of the micro-batch computed inside it."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if ctx is None:
        raise ValueError("tasks(model, ...): the model was not converted by "
                         "tagmoe_dist.hf.from_pretrained")
    return ctx.micro_batch(task)


class TaskModel(nn.Module):
    """A wrapper whose forward accepts `task=`: `TaskModel(model)(input_ids, task=t, labels=y)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, task: Optional[torch.Tensor] = None, **kwargs):
        with tasks(self.model, task):
            return self.model(*args, **kwargs)
