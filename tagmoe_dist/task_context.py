"""Task ids per micro-batch, for hosts whose layer forward has no task argument (Megatron-core's
TransformerLayer calls `mlp(hidden_states)`), and the model-wide pool of routing signatures of the
TAG-MoE alignment loss, across pipeline stages and activation recomputation.

Notation: B samples of the micro-batch, E experts, L task-aware MoE layers of the whole model.

Usage, in the user's forward_step (every pipeline stage, the same task ids):
    with ctx.micro_batch(task_ids):        # LongTensor [B, levels] (-1 unknown) or multi-hot [B, N]
        output = model(tokens, position_ids, attention_mask, labels=labels)

Which micro-batch a layer's forward belongs to (`LayerTasks`):
  * a forward inside a `micro_batch` block reads that block's micro-batch;
  * recomputation (activation checkpointing) re-runs a layer's forward inside backward, after the
    block has closed (and maybe while another micro-batch's block is open). A layer whose forward
    ran in training with grad disabled - the checkpointed first pass - queues the micro-batch;
    its grad-enabled re-run outside any block pops the oldest. Megatron-core's schedules run a
    layer's backwards in the order of its forwards, so FIFO order is the right one.

The alignment loss pools g_b = (1/L) sum_l s_lb over ALL task-aware MoE layers (s_l [B, E]: the
per-sample mean routing distribution of layer l). It is computed exactly, with pipelines:
  1. every layer adds the *values* of s_l to the micro-batch's pool and, in backward, gives s_l the
     gradient dL/ds_l = coeff * dL_align/dg / L - the same for every layer (`inject_signature`);
  2. every stage but the last sends its pool (sum, layer count) to the last stage when its
     micro_batch block closes, i.e. before the schedule sends the activations;
  3. the model's last MoE layer (on the last stage) receives the pools, computes L_align(g) and
     its gradient w.r.t. g with autograd *in forward* (a small [B, E] -> predictor backward), and
     sends that gradient back; an earlier stage receives it when its first injection needs it.
  Only values travel, so layers recomputed in backward inject the same gradient as a plain pass.
Side messages use a gloo group of the pipeline's ranks (CPU tensors of B*E floats), never the
host's activation communicator, so they cannot be mistaken for activations.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from datetime import timedelta
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from tagmoe_dist.parallel import DEFAULT_TIMEOUT, ParallelGroups


@dataclasses.dataclass(eq=False)
class MicroBatch:
    """One micro-batch as seen by the MoE layers of this rank."""
    task: Optional[torch.Tensor]
    token_to_sample: Optional[torch.Tensor]
    index: int                                  # order of micro_batch blocks on this rank
    # pool of routing signatures (values) of this stage's layers
    sum_BE: Optional[torch.Tensor] = None
    num_layers: int = 0
    expects_grad: bool = False                  # some layer here will inject a gradient
    # set by the last MoE layer of the model (on the last stage)
    task_BN: Optional[torch.Tensor] = None
    g_BE: Optional[torch.Tensor] = None         # pooled signature over all layers
    grad_BE: Optional[torch.Tensor] = None      # coeff * dL_align/dg / L (for every layer)
    align_loss: Optional[torch.Tensor] = None
    align_acc: Optional[torch.Tensor] = None
    collected: bool = False


class TaskContext:
    """Per-micro-batch task ids shared by the MoE layers of one model (on one rank).

    Construct it on every rank after the process groups exist: with pipeline parallelism it
    creates a gloo side group (a collective call)."""

    def __init__(self, groups: Optional[ParallelGroups] = None,
                 timeout: timedelta = DEFAULT_TIMEOUT):
        groups = groups or ParallelGroups.single()
        self.pp_size, self.pp_rank = groups.pp_size, groups.pp_rank
        self._side = _side_group(groups.pp_group, timeout) if groups.pp_size > 1 else None
        self._stage_ranks = (dist.get_process_group_ranks(groups.pp_group)
                             if groups.pp_size > 1 else [])
        self._inflight: collections.deque = collections.deque()   # (work, tensor) of our sends
        self._open: List[MicroBatch] = []
        self._count = 0

    @contextlib.contextmanager
    def micro_batch(self, task: Optional[torch.Tensor] = None,
                    token_to_sample: Optional[torch.Tensor] = None):
        """The block in which the model computes one micro-batch's forward. `token_to_sample`:
        only for layers with input_layout='th' (flat tokens); Megatron's layout is 'sbh'."""
        mb = MicroBatch(task, token_to_sample, self._count)
        self._count += 1
        self._open.append(mb)
        try:
            yield mb
        finally:
            self._open.pop()
        self._close(mb)

    @property
    def current(self) -> Optional[MicroBatch]:
        return self._open[-1] if self._open else None

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    # ------------------------------------------------------------------ pooling (step 1)
    def add_signature(self, mb: MicroBatch, s_BE: torch.Tensor, task_BN: torch.Tensor,
                      expects_grad: bool) -> None:
        s_BE = s_BE.detach()
        mb.sum_BE = s_BE.clone() if mb.sum_BE is None else mb.sum_BE + s_BE
        mb.num_layers += 1
        mb.task_BN = task_BN
        mb.expects_grad |= expects_grad

    # ------------------------------------------------------------------ the loss (step 3)
    def collect(self, mb: MicroBatch, head, coeff: float, training: bool) -> torch.Tensor:
        """Pool every stage's signatures, compute L_align (returned, with its graph into the head's
        parameters) and the gradient every layer's signature receives. Called by the model's last
        MoE layer, after adding its own signature."""
        if not self.is_last_stage:
            raise ValueError("the model's last MoE layer must be on the last pipeline stage "
                             "(it computes the alignment loss from every stage's signatures)")
        sum_BE, count = mb.sum_BE, mb.num_layers
        senders = []
        for stage in range(self.pp_size - 1):
            part, n, wants = self._recv_pool(mb, stage)
            if n:
                sum_BE, count = sum_BE + part.to(sum_BE), count + n
            if wants:
                senders.append(stage)
        mb.g_BE = (sum_BE / count).detach()
        with torch.enable_grad():
            g_leaf = mb.g_BE.clone().requires_grad_(True)
            loss, acc = head.loss(g_leaf, mb.task_BN)
            if training or senders:
                (dg_BE,) = torch.autograd.grad(loss, g_leaf, retain_graph=True)
                mb.grad_BE = (coeff / count) * dg_BE.detach()
        for stage in senders:
            self._send_grad(mb, stage)
        mb.align_loss, mb.align_acc, mb.collected = loss.detach(), acc, True
        return loss

    def head_loss(self, mb: MicroBatch, head) -> torch.Tensor:
        """L_align again from the pooled signature (a recomputed last layer attaches this)."""
        assert mb.collected, "head_loss before collect"
        return head.loss(mb.g_BE, mb.task_BN)[0]

    def signature_grad(self, mb: MicroBatch) -> torch.Tensor:
        """coeff * dL_align/dg / L for this micro-batch (received from the last stage once)."""
        if mb.grad_BE is None:
            if self.is_last_stage:
                raise RuntimeError(
                    "no alignment loss was computed for this micro-batch: the task-aware MoE "
                    "layer that owns the alignment head (the model's last MoE layer) did not run")
            self._recv_grad(mb)
        return mb.grad_BE

    # ------------------------------------------------------------------ side messages
    # Stage -> last: header int64 [index, layers, expects_grad, numel], then fp32 [numel] if any.
    # Last -> stage: float64 [1 + B*E] = (index, gradient). Both in micro-batch order.
    def _close(self, mb: MicroBatch) -> None:
        if self._side is None or mb.task is None:
            return
        if not self.is_last_stage:
            numel = 0 if mb.sum_BE is None else mb.sum_BE.numel()
            header = torch.tensor([mb.index, mb.num_layers, int(mb.expects_grad), numel])
            self._send(header, self.pp_size - 1)
            if numel:
                self._send(mb.sum_BE.detach().float().cpu().reshape(-1), self.pp_size - 1)
        elif not mb.collected:
            # no layer here collected the pools (no task-aware layer): read them so the next
            # micro-batch's messages are not confused with these
            for stage in range(self.pp_size - 1):
                if self._recv_pool(mb, stage)[2]:
                    raise RuntimeError(
                        f"pipeline stage {stage} has task-aware MoE layers but the last stage "
                        "computed no alignment loss: the model's last MoE layer must be on the "
                        "last pipeline stage")

    def _recv_pool(self, mb: MicroBatch, stage: int) -> Tuple[Optional[torch.Tensor], int, bool]:
        header = torch.empty(4, dtype=torch.int64)
        self._recv(header, stage)
        index, n, wants, numel = header.tolist()
        if index != mb.index:
            raise RuntimeError(f"pipeline stage {stage} sent routing signatures of micro-batch "
                               f"{index} while this stage computes micro-batch {mb.index}: every "
                               "stage must wrap each forward in ctx.micro_batch(task)")
        part = None
        if numel:
            part = torch.empty(numel, dtype=torch.float32)
            self._recv(part, stage)
            part = part.view(mb.sum_BE.shape) if mb.sum_BE is not None else part
        return part, n, bool(wants)

    def _send_grad(self, mb: MicroBatch, stage: int) -> None:
        msg = torch.cat([torch.tensor([float(mb.index)], dtype=torch.float64),
                         mb.grad_BE.detach().double().cpu().reshape(-1)])
        self._send(msg, stage)

    def _recv_grad(self, mb: MicroBatch) -> None:
        shape = mb.sum_BE.shape
        msg = torch.empty(1 + shape.numel(), dtype=torch.float64)
        self._recv(msg, self.pp_size - 1)
        if int(msg[0]) != mb.index:
            raise RuntimeError(f"alignment gradient of micro-batch {int(msg[0])} arrived for "
                               f"micro-batch {mb.index}: was a training-mode forward run without "
                               "its backward? (use model.eval() for forward-only passes)")
        mb.grad_BE = msg[1:].view(shape).to(mb.sum_BE)

    def _send(self, t: torch.Tensor, stage: int) -> None:
        # Never wait here: a gloo send completes only once the receiver posts its receive, which
        # the last stage does after this stage's activations reach it. Keep the buffer alive.
        while self._inflight and self._inflight[0][0].is_completed():
            self._inflight.popleft()
        work = dist.isend(t, self._stage_ranks[stage], group=self._side)
        self._inflight.append((work, t))

    def _recv(self, t: torch.Tensor, stage: int) -> None:
        dist.recv(t, self._stage_ranks[stage], group=self._side)


class LayerTasks:
    """One MoE layer's view of a TaskContext (see the module docstring)."""

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
        self._replay: collections.deque = collections.deque()

    def enter(self, training: bool) -> Tuple[Optional[MicroBatch], bool]:
        """(the micro-batch of this forward, whether it is a recomputation)."""
        mb = self.ctx.current
        if mb is not None:
            if training and not torch.is_grad_enabled():
                self._replay.append(mb)      # checkpointed: this forward runs again in backward
            return mb, False
        if self._replay and torch.is_grad_enabled():
            return self._replay.popleft(), True
        return None, False


class _InjectSignatureGrad(torch.autograd.Function):
    """Returns y; in backward gives the signature s_BE the gradient `ctx.signature_grad(mb)` times
    the host's loss scale (read at backward time)."""

    @staticmethod
    def forward(fctx, y, s_BE, ctx, mb, scale_fn):
        fctx.ctx, fctx.mb, fctx.scale_fn = ctx, mb, scale_fn
        fctx.s_meta = (s_BE.dtype, s_BE.device)
        return y.view_as(y)

    @staticmethod
    def backward(fctx, gy):
        dtype, device = fctx.s_meta
        g_BE = fctx.ctx.signature_grad(fctx.mb).to(dtype=dtype, device=device) * fctx.scale_fn()
        return gy, g_BE, None, None, None


def inject_signature(y: torch.Tensor, s_BE: torch.Tensor, ctx: TaskContext, mb: MicroBatch,
                     scale_fn: Callable[[], float]) -> torch.Tensor:
    """y, with the alignment gradient of this layer's signature s_BE entering the backward pass."""
    return _InjectSignatureGrad.apply(y, s_BE, ctx, mb, scale_fn)


def _side_group(pp_group: dist.ProcessGroup, timeout: timedelta) -> dist.ProcessGroup:
    """A gloo group with the ranks of `pp_group`. new_group is collective over the world, so every
    rank learns every pipeline group's ranks and all create them in the same order."""
    mine = dist.get_process_group_ranks(pp_group)
    everyone: List[Optional[List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    side = None
    for ranks in sorted({tuple(r) for r in everyone}):
        g = dist.new_group(list(ranks), timeout=timeout, backend="gloo")
        if tuple(mine) == ranks:
            side = g
    return side


class SignatureSlot:
    """Receives a layer's routing signature: a model-wide `alignment=` for a MoELayer whose host
    (Megatron, Hugging Face, diffusers) pools the signatures itself. MoELayer calls `add` when
    it has task labels; the host `take`s it after the layer's forward."""

    def __init__(self):
        self.value = None

    def add(self, g_BE: torch.Tensor, task_BN: torch.Tensor) -> None:
        self.value = (g_BE, task_BN)

    def take(self):
        value, self.value = self.value, None
        return value


def in_backward() -> bool:
    """Whether this forward runs inside a backward pass (a checkpointed layer's recomputation)."""
    return torch._C._current_graph_task_id() != -1
