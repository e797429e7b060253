"""Reading torch files without running code from them.

Every tensor file is read with `torch.load(weights_only=True)`: the unpickler accepts tensors,
containers and plain values only, so a crafted file cannot run code (an unrestricted load runs any
callable the pickle names, e.g. `os.system`). DeepSpeed's own checkpoint files also hold a few of
DeepSpeed's Python objects; those classes, and only those, are allowed by name (`DEEPSPEED_GLOBALS`,
the explicit opt-in documented in docs/reliability.md). Resume goes through DeepSpeed's loader,
which unpickles without restriction; `restricted(engine)` routes it through the same safe load.
A file that cannot be read is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

PathLike = Union[str, os.PathLike]

# The Python objects DeepSpeed 0.19 (ZeRO 0-2) pickles into its checkpoint files, beyond what
# weights_only=True accepts: fragment addresses of the optimizer partitions, the loss scaler
# state, and the config's enums. Nothing here has a constructor with side effects.
DEEPSPEED_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _allowed() -> list:
    out = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):   # an older or newer DeepSpeed: not needed there
            continue
    return out


def load(path: PathLike, map_location="cpu", mmap: bool = False, deepspeed_objects: bool = False,
         allow: Sequence[type] = ()):
    """torch.load(path, weights_only=True); `deepspeed_objects` also allows DEEPSPEED_GLOBALS,
    `allow` these classes (e.g. argparse.Namespace for Megatron-LM's stored args)."""
    path = Path(path)
    extra = [*(_allowed() if deepspeed_objects else []), *allow]
    ctx = torch.serialization.safe_globals(extra) if extra else contextlib.nullcontext()
    try:
        with ctx:
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds Python objects that tagmoe_dist and DeepSpeed checkpoints do "
                         f"not ({_unsafe(path)}); refused rather than unpickled (torch.load "
                         "weights_only=True). Was the file made elsewhere or changed?") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the file is truncated "
                         "or damaged") from None


def _unsafe(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - only used to enrich a message
        return "globals not listed"
    return "globals: " + ", ".join(names) if names else "no globals"


class _SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` replaced by the restricted one."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return load(path, map_location=map_location, deepspeed_objects=True)


@contextlib.contextmanager
def restricted(engine) -> Iterator[None]:
    """While active, `engine.load_checkpoint` reads every file with weights_only=True (plus
    DEEPSPEED_GLOBALS) instead of DeepSpeed's unrestricted torch.load."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
