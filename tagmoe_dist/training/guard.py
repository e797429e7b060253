"""Stop a run whose loss or gradient norm is not finite, before it is checkpointed.

One all-gather of two numbers per rank per step: every rank learns every rank's loss, so all of
them stop at the same step with the same message (a rank stopping alone would leave the others
waiting in the next collective).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from tagmoe_dist.checkpoint.engine import NonFiniteError


def check_finite(step: int, loss: float, grad_norm: Optional[float], device) -> None:
    """Raise NonFiniteError naming the step, each rank's loss and the gradient norm if any of
    them is NaN or inf. `grad_norm` None: not computed by this optimizer (checked: loss only)."""
    mine = torch.tensor([loss, math.nan if grad_norm is None else float(grad_norm)],
                        dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        values = torch.stack(rows).cpu().tolist()
    else:
        values = [mine.cpu().tolist()]
    losses = [v[0] for v in values]
    norm = values[0][1] if grad_norm is not None else None
    if all(math.isfinite(x) for x in losses) and (norm is None or math.isfinite(norm)):
        return
    raise NonFiniteError(
        f"step {step + 1}: non-finite training values, loss per rank {losses}, gradient norm "
        f"{norm}; stopping without writing a checkpoint. The run diverged: lower train.lr, raise "
        "train.warmup_steps or set train.grad_clip, and --resume from the last checkpoint")
