"""Device hygiene of the hot path, checked on CPU: forward + backward of the layer run under a
TorchFunctionMode that records (a) tensor factories with no device (on a GPU they would build
CPU tensors and copy) and (b) host syncs (`.item()`, `.tolist()`, `.cpu()`, `bool()` of a
tensor, `nonzero`, boolean-mask indexing). Allowed: the token-count exchange at EP > 1, one host
read per layer call. The layer gets a multi-hot task, as models pass it (validated once per batch
by the model, not in every layer)."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import tagmoe_dist as tm
from tests.dist_utils import run_distributed

FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor,
             torch.randn, torch.rand, torch.randint, torch.empty_strided, torch.linspace,
             torch.eye, torch.randperm, torch.as_tensor}
SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.__bool__,
         torch.Tensor.nonzero, torch.nonzero, torch.Tensor.numpy, torch.masked_select,
         torch.Tensor.masked_select, torch.Tensor.__int__, torch.Tensor.__float__}


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if "tagmoe_dist" in f.filename]
    return f"{frames[-1].filename.split('tagmoe_dist/')[-1]}:{frames[-1].lineno}" if frames else "?"


class HygieneMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.factories, self.syncs = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            self.factories.append(f"{getattr(func, '__name__', func)} at {_where()}")
        if func in SYNCS:
            self.syncs.append(f"{getattr(func, '__name__', func)} at {_where()}")
        if func is torch.Tensor.__getitem__ and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.syncs.append(f"boolean-mask indexing at {_where()}")
        # a literal "cpu" target (a device taken from another tensor is device-generic)
        if func is torch.Tensor.to and any(isinstance(a, str) and a == "cpu"
                                           for a in list(args[1:]) + list(kwargs.values())):
            self.syncs.append(f"to(cpu) at {_where()}")
        return func(*args, **kwargs)


class SyncMode(TorchDispatchMode):
    """Host syncs at the aten level, where backward passes are seen too."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith(("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")):
            self.syncs.append(f"{name} at {_where()}")
        if name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.syncs.append(f"boolean-mask {name} at {_where()}")
        return func(*args, **kwargs)


class _BackwardUnder:
    """Custom autograd Functions' backward run on the autograd engine, where a TorchFunctionMode
    entered around `.backward()` is not active: enter it inside each custom backward."""

    def __init__(self, mode):
        self.mode, self.orig = mode, torch.autograd.function.BackwardCFunction.apply

    def __enter__(self):
        orig, mode = self.orig, self.mode

        def apply(this, *args):
            with mode:
                return orig(this, *args)
        torch.autograd.function.BackwardCFunction.apply = apply

    def __exit__(self, *exc):
        torch.autograd.function.BackwardCFunction.apply = self.orig


SCHEMA = tm.TaskSchema.from_dict({"levels": {
    "scope": ["local", "global", "generation"],
    "type": {"values": ["object", "style", "pose"], "multi": True}}})


def _run(rank: int, world: int, kernel: str, shared: bool):
    groups = tm.ParallelGroups.build(ep_size=world) if world > 1 else tm.ParallelGroups.single()
    cfg = tm.MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2,
                       router="task_aware", expert_kernel=kernel, overlap_chunks="auto",
                       num_shared_experts=1 if shared else 0, z_loss_coeff=1e-3)
    torch.manual_seed(0)
    layer = tm.MoELayer(cfg, groups=groups, task_schema=SCHEMA)
    x = torch.randn(3, 5, 16, requires_grad=True)
    task = SCHEMA.to_multi_hot(torch.tensor([[0, 1], [2, -1], [-1, 0]]))   # validated here, once
    layer(x, task=task)            # warm-up: one-time set-up (kernel choice) is not the hot path
    mode, sync = HygieneMode(), SyncMode()
    with mode, sync:
        y = layer(x, task=task)
    with sync, _BackwardUnder(mode):
        y.sum().backward()
    syncs = mode.syncs + sync.syncs
    allowed = 1 if world > 1 else 0   # the counts exchange: split sizes must reach the host
    assert not mode.factories, f"factories without a device: {mode.factories}"
    assert len(syncs) <= allowed, f"host syncs ({len(syncs)}, allowed {allowed}): {syncs}"
    if world > 1:
        assert any("dispatch/dispatcher.py" in s for s in syncs), syncs


@pytest.mark.parametrize("ep", [1, 2])
def test_hot_path_is_device_clean(ep):
    """The GPU kernel (grouped_mm, which torch also runs on CPU). The CPU-only kernels (native,
    torch) read expert row counts on the host by design: on CPU that is no device sync."""
    if ep == 1:
        _run(0, 1, "grouped_mm", True)
    else:
        run_distributed(_run, ep, "grouped_mm", True)


class _Leaky(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * torch.ones(g.shape) * float(g.sum())      # a device-less factory and a sync


def test_the_modes_catch_what_they_should():
    # the checkers must be able to fail, in forward and in a custom backward
    mode, sync = HygieneMode(), SyncMode()
    t = torch.ones(3, requires_grad=True)
    with mode, sync:
        torch.zeros(2)
        t.sum().item()
        _ = t[t > 0]
        torch.zeros(2, device=t.device)
        y = _Leaky.apply(t)
    assert len(mode.factories) == 1, mode.factories
    assert len(mode.syncs) == 2 and len(sync.syncs) == 2, (mode.syncs, sync.syncs)
    mode2, sync2 = HygieneMode(), SyncMode()
    with sync2, _BackwardUnder(mode2):
        y.sum().backward()
    assert len(mode2.factories) == 1 and sync2.syncs, (mode2.factories, sync2.syncs)
