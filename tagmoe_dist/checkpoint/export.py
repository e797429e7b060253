"""Export: one global fp32 state dict from a DeepSpeed checkpoint of an expert-parallel model.

    python -m tagmoe_dist.checkpoint export --ckpt runs/x/checkpoints --out model.safetensors

Why not DeepSpeed's `zero_to_fp32.py`: (deepspeed 0.19.8) it refuses every MoE checkpoint, ours and
those of DeepSpeed's own `deepspeed.moe.layer.MoE` alike. It globs `*_model_states.pt`, which also
matches the per-expert files, and stops at the first of them with
`ValueError: .../layer_0_expert_0_mp_rank_00_model_states.pt is not a model state checkpoint`;
past that, it would merge the expert optimizer partitions as if they were sharded over the whole
data-parallel group ("consumed N numels out of 2N - something is wrong").

What DeepSpeed writes in `<ckpt_dir>/<tag>/` for ZeRO stages 0-2 (model parallel size 1):

    mp_rank_00_model_states.pt                          'module': non-expert parameters, buffers;
                                                        'num_experts': [E of each MoE layer]
    layer_<L>_expert_<E>_mp_rank_00_model_states.pt     one expert E (global id) of MoE layer L:
        <prefix>.deepspeed_moe.experts.deepspeed_experts.<E>.w1 (and .w2)
    zero_pp_rank_<r>_mp_rank_00_optim_states.pt         optimizer partitions (not read here)

`consolidate` stacks the experts in global order under MoELayer.full_state_dict()'s naming,
`<prefix>.w1` [E, D, H] (prefix = the layer's expert container, e.g. `blocks.0.moe.experts`). The
values are the module weights: exactly the trained weights for fp32 training; for bf16/fp16 training
the 16-bit weights upcast (the fp32 master copy lives in the optimizer partitions).
Before reading, the checkpoint is verified against its manifest (sizes and content hashes;
`manifest.select`, which also falls back from a damaged `latest` to the newest intact step_N).
Files are read with `torch.load(weights_only=True)` (`loading.py`): no code runs from them.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from tagmoe_dist.checkpoint import atomic, loading, manifest
from tagmoe_dist.checkpoint.files import EXPERT_FILE, MAIN_FILE, TP_MAIN_FILE, ZERO3_MAIN_FILE, expert_file

_EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")

PathLike = Union[str, os.PathLike]


def _fp32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _expert_files(tag_dir: Path) -> Dict[int, Dict[int, Path]]:
    """{layer: {global expert id: file}} of every per-expert file in the tag directory."""
    files: Dict[int, Dict[int, Path]] = defaultdict(dict)
    for p in tag_dir.iterdir():
        m = EXPERT_FILE.match(p.name)
        if not m:
            continue
        if int(m.group(3)) != 0:
            raise ValueError(f"{p}: checkpoints with model (tensor) parallel size > 1 are not "
                             "supported by consolidate()")
        files[int(m.group(1))][int(m.group(2))] = p
    return files


def _stacked_name(m: "re.Match") -> str:
    # Our container (w1/w2, biases b1/b2): MoELayer.full_state_dict()'s naming. Anything else
    # (DeepSpeed's native experts): the ModuleList level `deepspeed_experts.<id>` becomes dim 0.
    if m.group(3) in ("w1", "w2", "b1", "b2"):
        return f"{m.group(1)}.{m.group(3)}"
    return f"{m.group(1)}.deepspeed_moe.experts.{m.group(3)}"


def consolidate(ckpt_dir: PathLike, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The global fp32 state dict of a DeepSpeed checkpoint, experts stacked (ZeRO 0-2 here;
    ZeRO-3: checkpoint/zero3.consolidate).

    Reads `<ckpt_dir>/<tag or latest>/`; `ckpt_dir` may also be the run directory or one step_N
    directory. Raises ValueError naming the first missing, truncated or changed file (checked
    against the manifest), or the first missing expert file if any expert id 0..E-1 of any MoE
    layer is absent (e.g. an expert-parallel rank did not save).
    """
    try:
        _, tag_dir, _ = manifest.select(ckpt_dir, tag)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{ckpt_dir}: {e}") from None
    main = tag_dir / MAIN_FILE
    if not main.is_file():
        if (tag_dir / ZERO3_MAIN_FILE).is_file():
            from tagmoe_dist.checkpoint import zero3 as zero3_checkpoint
            return zero3_checkpoint.consolidate(tag_dir)
        raise FileNotFoundError(f"{main} not found: is {tag_dir} a DeepSpeed checkpoint?")
    if (tag_dir / TP_MAIN_FILE).is_file():
        raise ValueError(f"{tag_dir}: checkpoints with model (tensor) parallel size > 1 are not "
                         "supported by consolidate()")
    state = loading.load(main, deepspeed_objects=True)
    if "module" not in state or state["module"] is None:
        raise ValueError(f"{main} holds no 'module' state dict (a pipeline-engine checkpoint?)")
    out: Dict[str, torch.Tensor] = {k: _fp32(v) for k, v in state["module"].items()}

    files = _expert_files(tag_dir)
    num_experts = list(state.get("num_experts") or [])
    # The engine counts MoE modules in named_modules() order: layer L has num_experts[L] experts.
    layers = sorted(set(files) | set(range(len(num_experts))))
    for layer in layers:
        have = files.get(layer, {})
        E = num_experts[layer] if layer < len(num_experts) else max(have) + 1
        missing = [e for e in range(E) if e not in have]
        if missing:
            want = tag_dir / expert_file(layer, missing[0])
            raise ValueError(f"incomplete checkpoint: MoE layer {layer} has {E} experts but "
                             f"{want} is missing ({len(missing)} expert file(s) absent: ids "
                             f"{missing}); was it written by every expert-parallel rank?")
        extra = sorted(e for e in have if e >= E)
        if extra:
            raise ValueError(f"{tag_dir}: MoE layer {layer} has {E} experts but files for expert "
                             f"ids {extra} exist; the directory mixes two checkpoints")
        stacks: Dict[str, list] = defaultdict(list)
        for e in range(E):
            expert_sd = loading.load(have[e])
            for key, t in expert_sd.items():
                m = _EXPERT_KEY.match(key)
                if m is None or int(m.group(2)) != e:
                    raise ValueError(f"{have[e]}: unexpected key {key!r} (expected "
                                     f"'<prefix>.deepspeed_moe.experts.deepspeed_experts.{e}.<name>')")
                stacks[_stacked_name(m)].append(_fp32(t))
        for name, parts in stacks.items():
            if len(parts) != E:
                raise ValueError(f"{tag_dir}: MoE layer {layer}: {name} is present in "
                                 f"{len(parts)} of {E} expert files")
            if name in out:
                raise ValueError(f"{tag_dir}: {name} appears both in {MAIN_FILE} and in the "
                                 "expert files")
            out[name] = torch.stack(parts)
    return out


def save_safetensors(state_dict: Dict[str, torch.Tensor], path: PathLike) -> Path:
    """Write `state_dict` as safetensors, atomically (temporary name in the same directory, then
    rename), so a reader never sees a half-written file."""
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ImportError("save_safetensors needs safetensors: pip install safetensors "
                          "(or export to a .pt file)") from e
    # safetensors refuses tensors that share storage (the per-expert views of one stack).
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()
               if isinstance(v, torch.Tensor)}
    return atomic.write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def save_torch(state_dict: Dict[str, torch.Tensor], path: PathLike) -> Path:
    """torch.save, atomically."""
    return atomic.write_file(path, lambda tmp: torch.save(state_dict, tmp))
