"""Test-only: run Megatron-core's own modules on a CPU-only torch, in the current process.

Why this exists: Megatron-core's attention, RNG tracker, MoE router, pipeline p2p and schedules
call `torch.cuda.current_device()`, `torch.cuda.synchronize()`, the CUDA RNG state and
`torch.zeros(..., device="cuda")` unconditionally, and its MoE router names Transformer Engine's
`te_general_gemm` without importing it, so they fail on a CPU build of torch. The
tests need those modules around our MoE layer (TransformerLayer, GPTModel, the 1F1B schedule).
Our own code must not need any of this: `patch()` makes `torch.cuda.current_device` fail the
test when it is called from a `tagmoe_dist` frame, so a CUDA call in the package is caught here.
Never import this from the package.
"""

from __future__ import annotations

import os
import sys
import types

import torch


def _current_device():
    # the nearest Megatron or tagmoe_dist frame is the caller that matters: Megatron's own call
    # runs under ours when our code calls a Megatron model (e.g. a wrapped forward_step)
    frame = sys._getframe(1)
    while frame is not None:
        if os.sep + "megatron" + os.sep in frame.f_code.co_filename:
            return "cpu"
        if "tagmoe_dist" + os.sep in frame.f_code.co_filename:
            raise AssertionError(f"tagmoe_dist called torch.cuda.current_device() in "
                                 f"{frame.f_code.co_filename}:{frame.f_lineno}: the package must "
                                 "be device-agnostic")
        frame = frame.f_back
    return "cpu"


def _zeros_on_cpu(*args, **kwargs):
    if str(kwargs.get("device", "")).startswith("cuda"):
        kwargs["device"] = "cpu"
    return torch.zeros(*args, **kwargs)


def patch() -> None:
    """Idempotent; call in every process (spawned ranks too) before building Megatron modules."""
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    torch.cuda.manual_seed = lambda *a, **k: None
    from megatron.core.tensor_parallel import random as mrandom
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    # moe_utils.py names te_general_gemm only when Transformer Engine imports (NameError here)
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # schedules.py allocates a token counter with device="cuda"
    from megatron.core.pipeline_parallel import schedules
    if not isinstance(schedules.torch, _TorchOnCPU):
        schedules.torch = _TorchOnCPU()


class _TorchOnCPU(types.ModuleType):
    """`torch` for schedules.py, with zeros(device="cuda") placed on the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.zeros = _zeros_on_cpu

    def __getattr__(self, name):
        return getattr(torch, name)


def init_megatron(tp=1, pp=1, ep=1, etp=None, seed=1234) -> None:
    """parallel_state over the already-initialised (gloo) default group, plus the RNG tracker."""
    patch()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                 create_gloo_process_groups=False, distributed_timeout_minutes=2)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
