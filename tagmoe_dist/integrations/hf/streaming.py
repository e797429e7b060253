"""Build the converted model from a Hugging Face directory without materialising the source's
experts: each rank reads its own experts' tensors and nothing of the others'.

transformers' `from_pretrained` loads every expert of every layer on every process, which for an
expert-parallel (and ZeRO-3) job defeats the point of sharding them. Here instead:

  1. The model is built from its config on the meta device (no memory).
  2. Per converted layer, the MoE layer (this rank's experts) is filled from the safetensors
     files, reading only the rows of this rank's experts: the classic per-expert tensors
     (`experts.<e>.w1.weight`, `experts.<e>.gate_proj.weight`, ...) or the fused ones
     (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj` [E, D, F]) sliced by expert.
     A dense source's MLP (to upcycle) is read whole: one layer's MLP at a time.
  3. Every other tensor (attention, norms, embeddings, head) is read and assigned; tied weights
     are re-tied and buffers that are not saved (rotary frequencies) are rebuilt from the config.

`SafetensorsReader.bytes_read` counts what was read, so the claim is measured
(`model.tagmoe_info["source_bytes_read"]`). Sources without safetensors files (`.bin` only) or
with names this module does not know are loaded whole by transformers, with a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

INDEX = "model.safetensors.index.json"

# (module attribute on disk, router, per-expert (gate, up, down)) of each sparse family
_SPARSE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate.weight", ("w1.weight", "w3.weight", "w2.weight")),
    "qwen2_moe": ("mlp", "gate.weight", ("gate_proj.weight", "up_proj.weight", "down_proj.weight")),
    "qwen3_moe": ("mlp", "gate.weight", ("gate_proj.weight", "up_proj.weight", "down_proj.weight")),
}


class SafetensorsReader:
    """Tensors of a directory's safetensors files by name, opened lazily, read on demand."""

    def __init__(self, files: Dict[str, Path]):
        self._where = files                       # tensor name -> file
        self._open: Dict[Path, object] = {}
        self.bytes_read = 0

    @classmethod
    def open(cls, src: Path) -> Optional["SafetensorsReader"]:
        """None if `src` has no safetensors weights (e.g. only pytorch_model.bin)."""
        from safetensors import safe_open
        index = src / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls({k: src / f for k, f in weight_map.items()})
        files = sorted(src.glob("*.safetensors"))
        if not files:
            return None
        where = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                where.update({k: f for k in h.keys()})
        return cls(where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def _handle(self, name: str):
        from safetensors import safe_open
        f = self._where.get(name)
        if f is None:
            raise KeyError(name)
        if f not in self._open:
            self._open[f] = safe_open(str(f), "pt")
        return self._open[f]

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self._handle(name).get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t.to(dtype)

    def get_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start:stop of dim 0, without reading the others."""
        t = self._handle(name).get_slice(name)[start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t.to(dtype)


def expert_layout(reader: SafetensorsReader, layer_prefix: str, model_type: str,
                  first_id: int = 0) -> Optional[Tuple[str, bool]]:
    """(prefix of one sparse block's tensors in the files, fused?) for the layer at
    `layer_prefix` ('model.layers.<i>.'); None if the files hold neither the classic per-expert
    nor the fused expert names."""
    attr, router, (gate, _, _) = _SPARSE_NAMES[model_type]
    for pre in [f"{layer_prefix}{attr}."] + ([f"{layer_prefix}mlp."] if attr != "mlp" else []):
        if f"{pre}{router}" not in reader:
            continue
        if f"{pre}experts.{first_id}.{gate}" in reader:
            return pre, False
        if f"{pre}experts.gate_up_proj" in reader:
            return pre, True
    return None


def expert_state(reader: SafetensorsReader, layer_prefix: str, model_type: str,
                 ids: Sequence[int], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """MoELayer weights of one sparse block, experts `ids` only (names: `expert_layout`)."""
    _, router, (gate, up, down) = _SPARSE_NAMES[model_type]
    layout = expert_layout(reader, layer_prefix, model_type, ids[0])
    if layout is None:
        raise ValueError(f"from_pretrained: no expert tensors of {layer_prefix} in the source's "
                         "safetensors files")
    pre, fused = layout
    if fused:                                                     # transformers 5's layout
        lo, hi = ids[0], ids[-1] + 1
        w1_LDH = reader.get_rows(f"{pre}experts.gate_up_proj", lo, hi, dtype).transpose(1, 2)
        w2_LFD = reader.get_rows(f"{pre}experts.down_proj", lo, hi, dtype).transpose(1, 2)
    else:                                                         # classic, per expert
        w1_LDH = torch.stack([torch.cat([reader.get(f"{pre}experts.{e}.{gate}", dtype).t(),
                                         reader.get(f"{pre}experts.{e}.{up}", dtype).t()], dim=1)
                              for e in ids])
        w2_LFD = torch.stack([reader.get(f"{pre}experts.{e}.{down}", dtype).t() for e in ids])
    sd = {"router.weight": reader.get(f"{pre}{router}", dtype),
          "experts.w1": w1_LDH.contiguous(), "experts.w2": w2_LFD.contiguous()}
    se = f"{pre}shared_expert."
    if model_type == "qwen2_moe" and f"{se}gate_proj.weight" in reader:
        g, u = reader.get(f"{se}gate_proj.weight", dtype), reader.get(f"{se}up_proj.weight", dtype)
        if g.shape[0] > 0:
            sd["shared_expert.mlp.w1"] = torch.cat([g.t(), u.t()], dim=1)
            sd["shared_expert.mlp.w2"] = reader.get(f"{se}down_proj.weight", dtype).t()
            sd["shared_expert.gate.weight"] = reader.get(f"{pre}shared_expert_gate.weight", dtype)
    return sd


def dense_mlp(reader: SafetensorsReader, layer_prefix: str, mlp_meta: nn.Module,
              dtype: torch.dtype) -> nn.Module:
    """The dense MLP of one layer, materialised from the files (to be upcycled)."""
    mlp = mlp_meta.to_empty(device="cpu")
    sd = {k: reader.get(f"{layer_prefix}mlp.{k}", dtype) for k in mlp.state_dict()}
    mlp.load_state_dict(sd)
    return mlp


def skeleton(hf_config, dtype: torch.dtype) -> nn.Module:
    """The source architecture on the meta device: shapes, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def layer_prefixes(model: nn.Module, layers: nn.ModuleList) -> List[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] + "." for layer in layers]


def missing_from(reader: SafetensorsReader, model: nn.Module, skip: Tuple[str, ...] = ()
                 ) -> List[str]:
    """Persistent tensors still on the meta device that the files do not hold, but those under
    the `skip` prefixes (the blocks to replace) and tied ones (re-tied after loading)."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) \
        if getattr(model.config, "tie_word_embeddings", False) else set()
    return [k for k, t in model.state_dict().items()
            if t.is_meta and k not in reader and k not in tied and not k.startswith(skip)]


def fill_rest(reader: SafetensorsReader, model: nn.Module, hf_config, dtype: torch.dtype) -> None:
    """Read every tensor still on the meta device, re-tie, rebuild unsaved buffers; raise
    naming any tensor left without a value."""
    sd = {k: reader.get(k, dtype) for k, t in model.state_dict().items()
          if t.is_meta and k in reader}
    model.load_state_dict(sd, strict=False, assign=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            _rebuild(model, name, module, hf_config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"from_pretrained: {left[:5]} have no value in the source's safetensors "
                         "files; is the checkpoint complete?")


def _rebuild(model: nn.Module, name: str, module: nn.Module, hf_config) -> None:
    # buffers computed from the config at construction (rotary inv_freq), never saved
    try:
        fresh = type(module)(config=hf_config)
    except TypeError as e:
        raise ValueError(f"from_pretrained: {name} ({type(module).__name__}) has buffers that are "
                         f"not in the checkpoint and cannot be rebuilt from the config: {e}") from e
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, fresh)


def warn_whole(src: Path, why: str) -> None:
    warnings.warn(f"from_pretrained: {src}: {why}; loading the whole source with transformers "
                  "(every rank materialises every expert while converting)", stacklevel=3)
