"""`from_pretrained`: a Hugging Face causal LM with its MoE blocks (or dense MLPs, upcycled) replaced
by `MoELayer`s holding this rank's experts. Attention, norms, rotary embeddings, the LM head and
`generate` stay Hugging Face's own.

  1. Check the input (directory, config.json, model_type, upcycle=, moe= overrides, EP size, task
     schema) before anything is loaded.
  2. Build the source's architecture on the meta device and stream its safetensors files
     (streaming.py): no rank reads another rank's experts. Sources the streamer cannot read
     (no safetensors, unknown names) are loaded whole by transformers, with a warning.
  3. Per decoder layer whose `mlp` is the family's sparse block (or dense MLP): build the MoE
     layer, load the source's weights (this rank's experts only), swap it in, free the old one.
  4. task_aware: add the alignment head (train-only) and its hook on the final norm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from tagmoe_dist.config import MoEConfig
from tagmoe_dist.gating.task_aware import TaskAlignment
from tagmoe_dist.integrations.hf import families, streaming
from tagmoe_dist.integrations.hf.block import (CONTEXT_ATTR, HEAD_ATTR, AlignmentHook,
                                               HFMoEBlock)
from tagmoe_dist.layer import MoELayer, register_moe_layers
from tagmoe_dist.parallel import ParallelGroups
from tagmoe_dist.task_context import TaskContext
from tagmoe_dist.tasks import TaskSchema

INFO_ATTR = "tagmoe_info"
# fields fixed by the source's weights: an override would not match them
_STRUCTURAL = ("hidden_size", "ffn_hidden_size", "num_experts", "num_shared_experts",
               "shared_expert_ffn_hidden_size", "shared_expert_gate", "activation",
               "input_layout")


def read_source_config(src: Union[str, Path]) -> Dict[str, Any]:
    """config.json of a local Hugging Face directory, with the errors a user can act on."""
    path = Path(src)
    if not path.is_dir():
        raise ValueError(f"from_pretrained: src {str(src)!r} is not a local directory; pass a "
                         "Hugging Face model directory (config.json + weights) or a built "
                         "PreTrainedModel. Nothing is downloaded.")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ValueError(f"from_pretrained: {path} has no config.json; save the model with "
                         "save_pretrained() or copy its config.json next to the weights")
    return json.loads(cfg.read_text())


def build_moe_config(hf_config, model_type: str, moe: Optional[Mapping[str, Any]],
                     upcycle: Optional[Mapping[str, Any]]) -> MoEConfig:
    """The MoEConfig of every converted layer: the family's rule, then the user's overrides."""
    moe = dict(moe or {})
    if families.is_dense(model_type):
        up = families.UpcycleSpec.from_dict(upcycle)
        fields = families.dense_fields(hf_config, model_type, up)
    else:
        if upcycle is not None:
            raise ValueError(f"from_pretrained: upcycle= applies to dense sources "
                             f"{list(families.DENSE_FAMILIES)}; {model_type} is already MoE: "
                             "drop upcycle=")
        fields = families.moe_fields(hf_config, model_type)
    fixed = sorted(k for k in moe if k in _STRUCTURAL and moe[k] != fields.get(k, moe[k]))
    fixed += sorted(k for k in moe if k in ("hidden_size", "activation", "input_layout"))
    if fixed:
        raise ValueError(f"moe.{fixed[0]}: fixed by the source model's weights ({model_type}); "
                         f"remove it from moe= (structural fields: {list(_STRUCTURAL)})")
    fields.update(moe)
    fields["input_layout"] = "bsh"
    try:
        return MoEConfig.from_dict(fields)
    except ValueError as e:
        raise ValueError(f"moe: {e}") from e


def check_ep(cfg: MoEConfig, ep_size: int) -> None:
    if cfg.num_experts % ep_size:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the expert-parallel "
                         f"size {ep_size}; choose ep_size among "
                         f"{[d for d in range(1, cfg.num_experts + 1) if cfg.num_experts % d == 0]}"
                         " (or upcycle to a multiple of it)")


def _load_source(src, dtype):
    from transformers import AutoModelForCausalLM, PreTrainedModel
    if isinstance(src, PreTrainedModel):
        return src, None
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, local_files_only=True), \
        str(Path(src).resolve())


def _reader(src) -> Optional[streaming.SafetensorsReader]:
    """The safetensors reader of a directory source; None for a built model, or (with a
    warning) a directory without safetensors weights: those are loaded whole."""
    from transformers import PreTrainedModel
    if isinstance(src, PreTrainedModel):
        return None                      # already built by the caller
    reader = streaming.SafetensorsReader.open(Path(src))
    if reader is None:
        streaming.warn_whole(Path(src), "no safetensors weights")
    return reader


def _unstreamable(reader, model: nn.Module, model_type: str) -> Optional[str]:
    """Why the files cannot fill the skeleton `model` tensor by tensor; None if they can."""
    wanted = families.replaced_class(model_type)
    layers = decoder_layers(model)
    prefixes = streaming.layer_prefixes(model, layers)
    blocks = []
    for i, layer in enumerate(layers):
        if type(layer.mlp).__name__ != wanted:
            continue
        pre = prefixes[i]
        blocks.append(f"{pre}mlp.")
        if families.is_dense(model_type):
            ok = all(f"{pre}mlp.{k}" in reader for k in layer.mlp.state_dict())
        else:
            ok = streaming.expert_layout(reader, pre, model_type) is not None
        if not ok:
            return f"layer {i}'s MLP tensors have names this loader does not know"
    missing = streaming.missing_from(reader, model, skip=tuple(blocks))
    return f"{missing[:3]} are not in its safetensors files" if missing else None


def _load_layer(layer: MoELayer, sd: Dict[str, torch.Tensor]) -> None:
    """The MoE layer's own state with `sd` (converted source weights) put in, in its dtypes."""
    full = dict(layer.state_dict())
    unknown = sorted(set(sd) - set(full))
    assert not unknown, unknown
    full.update({k: v.to(full[k].dtype) for k, v in sd.items()})
    layer.load_state_dict(full)


def _stream_block(block: HFMoEBlock, old_meta: nn.Module, reader, prefix: str, model_type: str,
                  index: int, up, router_std: float, dtype: torch.dtype) -> None:
    ids = block.moe.experts.global_ids
    if up is not None:
        mlp = streaming.dense_mlp(reader, prefix, old_meta, dtype)
        sd = families.upcycled_state(mlp, index, up, ids, router_std)
    else:
        sd = streaming.expert_state(reader, prefix, model_type, ids, dtype)
    block.to(dtype=dtype)
    _load_layer(block.moe, sd)


def _finish_streamed(model: nn.Module, src: Path) -> None:
    """What transformers' from_pretrained also does: generation config, name, eval mode."""
    from transformers import GenerationConfig
    if (src / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(src),
                                                                   local_files_only=True)
    model.config._name_or_path = str(src)
    model.eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.base_model.layers")
    return layers


def from_pretrained(src, moe: Optional[Mapping[str, Any]] = None,
                    task_schema: Optional[Union[TaskSchema, str, Path]] = None,
                    groups: Optional[ParallelGroups] = None,
                    upcycle: Optional[Mapping[str, Any]] = None,
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of `src` (a local Hugging Face directory or a built PreTrainedModel) with
    every MoE block - or, for a dense source with `upcycle=`, every MLP - replaced by MoELayer.

    moe: MoEConfig overrides (router 'topk' | 'task_aware' | 'task_level', aux_loss_coeff,
    z_loss_coeff, align_*, capacity_factor, expert_bias, ...). The routing rule and sizes come
    from the source (families.py). groups: ParallelGroups (EP); default one process. A built
    model is converted in place (and returned); a directory is loaded in `dtype`.
    Before training, the converted model's logits equal the source's (no capacity, no
    task conditioning; upcycled: the exact recipes).
    """
    from transformers import PreTrainedModel
    groups = groups or ParallelGroups.single()
    # 1. input checks, before anything is loaded
    if isinstance(src, PreTrainedModel):
        model_type = families.check_family(src.config.model_type, "from_pretrained(src=model)")
        hf_config = src.config
    else:
        raw = read_source_config(src)
        model_type = families.check_family(raw.get("model_type"), f"{src}/config.json")
        from transformers import AutoConfig
        hf_config = AutoConfig.from_pretrained(str(src), local_files_only=True)
    cfg = build_moe_config(hf_config, model_type, moe, upcycle)
    check_ep(cfg, groups.ep_size)
    if isinstance(task_schema, (str, Path)):
        task_schema = TaskSchema.from_yaml(task_schema)
    if cfg.uses_tasks and task_schema is None:
        raise ValueError(f"moe.router={cfg.router!r} needs task_schema= (a TaskSchema or a YAML "
                         "path, e.g. configs/tasks/text_tasks.yaml)")
    up = families.UpcycleSpec.from_dict(upcycle) if families.is_dense(model_type) else None

    # 2-3. load (streamed: this rank's experts only), then swap the blocks one layer at a time
    context = TaskContext(groups)
    wanted = families.replaced_class(model_type)
    router_std = float(getattr(hf_config, "initializer_range", 0.02))
    reader = _reader(src)
    if reader is not None:
        model, src_dir = streaming.skeleton(hf_config, dtype), str(Path(src).resolve())
        why = _unstreamable(reader, model, model_type)
        if why is not None:
            streaming.warn_whole(Path(src), why)
            reader = None
    if reader is None:
        model, src_dir = _load_source(src, dtype)
    layers = decoder_layers(model)
    prefixes = streaming.layer_prefixes(model, layers)
    converted: List[int] = []
    for i, layer in enumerate(layers):
        old = layer.mlp
        if type(old).__name__ != wanted:
            continue
        block = HFMoEBlock(cfg, groups, task_schema if cfg.uses_tasks else None, context, i)
        if reader is None:
            _load_block(block, old, model_type, i, up, router_std)
            param = next(old.parameters())
            block.to(dtype=param.dtype, device=param.device)
        else:
            _stream_block(block, old, reader, prefixes[i], model_type, i, up, router_std, dtype)
        layer.mlp = block
        layer.register_forward_pre_hook(block.decoder_pre_hook, with_kwargs=True)
        converted.append(i)
        del old
    if not converted:
        raise ValueError(f"from_pretrained: no {wanted} found in the decoder layers of "
                         f"{type(model).__name__}; was the model already converted?")
    if reader is not None:
        streaming.fill_rest(reader, model, hf_config, dtype)
        _finish_streamed(model, Path(src))
    # 4. the alignment head: train-only, fed by every layer, closed at the final norm
    hook = None
    if cfg.router == "task_aware":
        head = TaskAlignment(cfg, task_schema).to(device=next(model.parameters()).device)
        model.add_module(HEAD_ATTR, head)
        hook = AlignmentHook(model, head, context)
        model.base_model.norm.register_forward_hook(hook)
    model.config.output_router_logits = False     # our losses enter backward themselves
    object.__setattr__(model, CONTEXT_ATTR, context)
    object.__setattr__(model, INFO_ATTR, {
        "source": src_dir, "model_type": model_type, "moe": cfg.to_dict(),
        "upcycle": None if up is None else up.to_dict(), "moe_layers": converted,
        "task_schema": None if task_schema is None else task_schema.to_dict(),
        "alignment_hook": hook, "streamed": reader is not None,
        "source_bytes_read": None if reader is None else reader.bytes_read})
    register_moe_layers(model)          # aux_loss_reduction="mean": averaged over the MoE layers
    return model


def _load_block(block: HFMoEBlock, old: nn.Module, model_type: str, index: int,
                up: Optional[families.UpcycleSpec], router_std: float) -> None:
    layer: MoELayer = block.moe
    ids = layer.experts.global_ids
    if up is not None:
        sd = families.upcycled_state(old, index, up, ids, router_std)
    else:
        sd = families.sparse_block_state(old, model_type)
        sd["experts.w1"] = sd["experts.w1"][ids[0]:ids[-1] + 1]
        sd["experts.w2"] = sd["experts.w2"][ids[0]:ids[-1] + 1]
    _load_layer(layer, sd)


# ---------------------------------------------------------------------------------------------
# helpers for training loops


def moe_layers(model: nn.Module) -> List[MoELayer]:
    return [m.moe for m in model.modules() if isinstance(m, HFMoEBlock)]


def info(model: nn.Module) -> Dict[str, Any]:
    got = getattr(model, INFO_ATTR, None)
    if got is None:
        raise ValueError(f"{type(model).__name__} was not converted by "
                         "tagmoe_dist.hf.from_pretrained")
    return got


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """1/(gradient accumulation steps) when the main loss is averaged over micro-batches."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = scale
    hook = info(model)["alignment_hook"]
    if hook is not None:
        hook.aux_loss_scale = scale


def last_align(model: nn.Module) -> Dict[str, torch.Tensor]:
    hook = info(model)["alignment_hook"]
    return {} if hook is None else hook.last_align
