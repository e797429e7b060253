"""The TAG-MoE authors' checkpoint layout: a MegaBlocks dMoE in `transformer_blocks.{i}.img_mlp`.

Source: ICTMCG/TAG-MoE `src/models/transformer_qwenimage_tagmoe.py` (the released inference code)
builds, for blocks 50..59 of Qwen-Image's 60,
    dMoE(Arguments(hidden_size=D, ffn_hidden_size=4 D, bias=True, activation_fn=gelu(tanh),
                   moe_num_experts=4, moe_top_k=1, moe_loss_weight=0.01, mlp_type="mlp",
                   mlp_impl="grouped", bf16=True, ...))
and calls `self.img_mlp(x)[0]`. From MegaBlocks (`layers/dmoe.py`, `moe.py`, `mlp.py`,
`router.py`) the parameters under `transformer_blocks.{i}.img_mlp.` are

    router.layer.weight   [E, D]      logits = x W^T (no bias); scores = softmax; top-1 weight is
                                      the score itself (moe_normalize_expert_weights=None)
    experts.mlp.w1        [E*F, D]    expert e owns rows e*F:(e+1)*F; h = x w1_e^T
    experts.mlp.w2        [E*F, D]    y = gelu_tanh(h) w2_e        (the experts have no biases)
    experts.bias          [D]         output bias; with return_bias=True (the default) dMoE
                                      returns (y, bias) and the block keeps [0]: unused

dMoE is dropless (moe_capacity_factor is ignored), so the output is, per token,
score_top1 * expert_top1(x). Our layer holds the same numbers as w1 [E, D, F] = w1_e^T stacked,
w2 [E, F, D], router.weight [E, D], expert biases zero and `dmoe_bias` = experts.bias (kept for
the round trip, unused as in the authors' forward). Nothing here downloads weights.

Notation: D hidden, F expert width, E experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Union

import torch
import torch.nn as nn

from tagmoe_dist.integrations.diffusers.block import DiffusersMoE
from tagmoe_dist.integrations.diffusers.convert import ALIGNMENT_ATTR, moe_blocks

DMOE_KEYS = ("router.layer.weight", "experts.mlp.w1", "experts.mlp.w2", "experts.bias")


def _check_layer(layer: DiffusersMoE, where: str) -> None:
    cfg = layer.moe.cfg
    problems = []
    if cfg.activation != "gelu":
        problems.append(f"activation={cfg.activation!r} (dMoE 'mlp' experts use gelu)")
    if cfg.router not in ("topk", "task_aware") or cfg.task_conditioning != "none":
        problems.append(f"router={cfg.router!r}/task_conditioning={cfg.task_conditioning!r} "
                        "(the dMoE router sees tokens only)")
    if cfg.num_shared_experts or cfg.expert_bias:
        problems.append("shared experts / expert_bias (not in the dMoE layout)")
    if problems:
        raise ValueError(f"{where}: the MegaBlocks dMoE layout cannot hold this layer: "
                         + "; ".join(problems))


def dmoe_to_layer(dmoe: Dict[str, torch.Tensor], layer: DiffusersMoE, where: str
                  ) -> Dict[str, torch.Tensor]:
    """One block's dMoE tensors (keys of DMOE_KEYS) -> the layer's `load_full_state_dict` dict."""
    _check_layer(layer, where)
    cfg = layer.moe.cfg
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size
    want = {"router.layer.weight": (E, D), "experts.mlp.w1": (E * F, D),
            "experts.mlp.w2": (E * F, D), "experts.bias": (D,)}
    missing = [k for k in want if k not in dmoe]
    if missing:
        raise ValueError(f"{where}: missing dMoE key(s) {missing}; expected {list(want)}")
    for k, shape in want.items():
        if tuple(dmoe[k].shape) != shape:
            raise ValueError(f"{where}.{k} has shape {tuple(dmoe[k].shape)}, expected {shape} "
                             f"(num_experts={E}, hidden {D}, ffn_hidden_size={F}); convert with "
                             "matching moe= settings")
    sd = {k: v.detach().clone() for k, v in layer.moe.state_dict().items()
          if not k.startswith("experts.")}
    sd["router.weight"] = dmoe["router.layer.weight"]
    sd["experts.w1"] = dmoe["experts.mlp.w1"].view(E, F, D).transpose(1, 2)
    sd["experts.w2"] = dmoe["experts.mlp.w2"].view(E, F, D)
    if cfg.expert_mlp_bias:
        sd["experts.b1"] = dmoe["experts.mlp.w1"].new_zeros(E, F)
        sd["experts.b2"] = dmoe["experts.mlp.w1"].new_zeros(E, D)
    return sd


def layer_to_dmoe(layer: DiffusersMoE, where: str) -> Dict[str, torch.Tensor]:
    """The layer's global weights in the dMoE layout. Collective over the EP group (gathers the
    experts): every rank calls it."""
    _check_layer(layer, where)
    full = layer.moe.full_state_dict()
    for b in ("experts.b1", "experts.b2"):
        if b in full and bool(full[b].ne(0).any()):
            raise ValueError(f"{where}: the expert biases are not zero, and MegaBlocks dMoE experts "
                             "have none: this layer cannot be written in the authors' layout "
                             "without changing its output (upcycled experts carry the dense FFN's "
                             "biases; keep our layout, tm.MoELayer.full_state_dict, for them)")
    E, F, D = full["experts.w2"].shape
    return {"router.layer.weight": full["router.weight"],
            "experts.mlp.w1": full["experts.w1"].transpose(1, 2).reshape(E * F, D).contiguous(),
            "experts.mlp.w2": full["experts.w2"].reshape(E * F, D).contiguous(),
            "experts.bias": layer.dmoe_bias.detach().clone()}


def _block_prefix(transformer: nn.Module, layer: DiffusersMoE) -> str:
    for name, m in transformer.named_modules():
        if m is layer:
            return name + "."
    raise AssertionError("layer not in transformer")


def load_authors_state_dict(transformer: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a whole transformer state dict in the authors' layout (dense keys as diffusers names
    them, dMoE keys under the converted blocks' FFN) into a converted transformer; each rank keeps
    its own experts. Missing or unexpected keys are an error naming them."""
    layers = {_block_prefix(transformer, m): m for m in moe_blocks(transformer).values()}
    rest = {}
    per_block: Dict[str, Dict[str, torch.Tensor]] = {p: {} for p in layers}
    for key, t in state_dict.items():
        prefix = next((p for p in layers if key.startswith(p)), None)
        if prefix is not None:
            per_block[prefix][key[len(prefix):]] = t
        else:
            rest[key] = t
    stray = sorted(k for k in rest if any(k.endswith("." + s) for s in DMOE_KEYS))
    if stray:
        raise ValueError(f"the state dict holds dMoE weights for blocks that were not converted: "
                         f"{stray[:4]}...; convert those blocks (moe_blocks=) first")
    for prefix, layer in layers.items():
        unknown = sorted(set(per_block[prefix]) - set(DMOE_KEYS))
        if unknown:
            raise ValueError(f"{prefix[:-1]}: unexpected key(s) {unknown} for a MegaBlocks dMoE "
                             f"(expected {list(DMOE_KEYS)})")
        layer.moe.load_full_state_dict(dmoe_to_layer(per_block[prefix], layer, prefix[:-1]))
        layer.dmoe_bias.copy_(per_block[prefix]["experts.bias"])
    ours = {k for k in transformer.state_dict()
            if not any(k.startswith(p) for p in layers) and not k.startswith(ALIGNMENT_ATTR + ".")}
    missing, unexpected = sorted(ours - set(rest)), sorted(set(rest) - ours)
    if missing or unexpected:
        raise ValueError(f"authors' state dict does not match the transformer: missing "
                         f"{missing[:6]}, unexpected {unexpected[:6]}")
    transformer.load_state_dict(rest, strict=False)


def authors_state_dict(transformer: nn.Module) -> Dict[str, torch.Tensor]:
    """The converted transformer's weights in the authors' layout (the alignment head, which is
    training-only, is left out). Collective over the EP group: every rank calls it."""
    layers = {_block_prefix(transformer, m): m for m in moe_blocks(transformer).values()}
    out = {k: v.detach().clone() for k, v in transformer.state_dict().items()
           if not any(k.startswith(p) for p in layers) and not k.startswith(ALIGNMENT_ATTR + ".")}
    for prefix, layer in sorted(layers.items()):
        out.update({prefix + k: v for k, v in layer_to_dmoe(layer, prefix[:-1]).items()})
    return out


def read_safetensors(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of the shards of a directory (with or without a
    `*.safetensors.index.json`). safetensors holds no code: nothing is executed on load."""
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_file():
        files: Iterable[Path] = [path]
    elif path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            files = [path / n for n in names]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path} holds no .safetensors files")
    else:
        raise ValueError(f"{path} does not exist")
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
