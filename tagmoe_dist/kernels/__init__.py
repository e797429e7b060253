"""Expert kernels behind one interface (base.py), chosen by `MoEConfig.expert_kernel`:

  native      the C kernel for float32 on CPU (native_kernel.py, csrc/moe_cpu.c)
  grouped_mm  torch.nn.functional.grouped_mm: CUDA, and CPU in torch >= 2.13 (grouped.py)
  torch       plain PyTorch ops: runs anywhere, the fallback (torch_kernel.py)
  auto        native on CPU where it applies, grouped_mm on CUDA where it applies, else torch
"""

from __future__ import annotations

import torch

from tagmoe_dist.kernels.base import ExpertKernel, ExpertWeights
from tagmoe_dist.kernels.grouped import GroupedMMKernel
from tagmoe_dist.kernels.native_kernel import NativeKernel
from tagmoe_dist.kernels.torch_kernel import TorchKernel

KERNELS = ("auto", "native", "grouped_mm", "torch")
_BY_NAME = {"native": NativeKernel, "grouped_mm": GroupedMMKernel, "torch": TorchKernel}


def select_kernel(name: str, weights: ExpertWeights, x_TD: torch.Tensor) -> ExpertKernel:
    """The kernel `name` if it can run on these tensors; "auto" picks the fastest that can.
    A named kernel that cannot run is an error that says why (never a silent fallback)."""
    if name == "auto":
        first = NativeKernel() if x_TD.device.type == "cpu" else GroupedMMKernel()
        return first if first.supports(weights, x_TD) is None else TorchKernel()
    if name not in _BY_NAME:
        raise ValueError(f"MoEConfig.expert_kernel={name!r} is not a kernel; choose one of {list(KERNELS)}")
    kernel = _BY_NAME[name]()
    reason = kernel.supports(weights, x_TD)
    if reason is not None:
        raise ValueError(f"MoEConfig.expert_kernel={name!r} cannot run here: {reason}; "
                         "use expert_kernel='auto' (or 'torch', which runs anywhere)")
    return kernel
