"""Expert activations and their explicit backward (the fused kernels keep no autograd graph).

Notation: N rows, H first-projection width (2F for SwiGLU: gate | up), F expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("swiglu", "gelu")


def swiglu(h_NF2: torch.Tensor) -> torch.Tensor:
    gate, up = h_NF2.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(h_NF: torch.Tensor) -> torch.Tensor:
    return F.gelu(h_NF, approximate="tanh")


def activation_fn(name: str):
    return swiglu if name == "swiglu" else gelu


def activation_backward(act, grad_NF: torch.Tensor, h_NH: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh applied to grad, for the fused expert kernels (no autograd graph kept).
    `act`: the activation's name or function."""
    if isinstance(act, str):
        act = activation_fn(act)
    if act is gelu:
        return torch.ops.aten.gelu_backward(grad_NF, h_NH, approximate="tanh")
    assert act is swiglu, act
    gate, up = h_NH.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(grad_NF * up, gate), grad_NF * F.silu(gate)], -1)
