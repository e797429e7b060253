"""Which diffusers transformers can be converted, where their image-stream FFNs live, and which
blocks the user chose.

Notation: D hidden (the transformer's inner dim), F dense FFN width (4 D in all three families).

Every supported family is a dual-stream MMDiT whose blocks hold a diffusers `FeedForward` with
`activation_fn="gelu-approximate"` for the image tokens (`net[0]` = GELU(Linear(D, F), tanh),
`net[1]` = Dropout, `net[2]` = Linear(F, D), both linears with bias) and a separate one for the
text tokens, which stays dense:

  QwenImageTransformer2DModel  transformer_blocks[i].img_mlp   (txt_mlp stays dense)
  FluxTransformer2DModel       transformer_blocks[i].ff        (ff_context stays dense; the
                                                                single-stream blocks have no
                                                                separate FFN and are not offered)
  SD3Transformer2DModel        transformer_blocks[i].ff        (ff_context stays dense)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch.nn as nn

from tagmoe_dist.config import parse_moe_layers


@dataclasses.dataclass(frozen=True)
class Family:
    blocks: str        # attribute of the transformer holding the dual-stream blocks
    ffn: str           # attribute of a block holding the image-stream FFN


FAMILIES: Dict[str, Family] = {
    "QwenImageTransformer2DModel": Family("transformer_blocks", "img_mlp"),
    "FluxTransformer2DModel": Family("transformer_blocks", "ff"),
    "SD3Transformer2DModel": Family("transformer_blocks", "ff"),
}
SUPPORTED = tuple(FAMILIES)


def family_of(model: Any) -> Family:
    """The family of a diffusers transformer (subclasses count), or a ValueError naming the
    supported ones."""
    import diffusers
    for name, fam in FAMILIES.items():
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(model, cls):
            return fam
    raise ValueError(f"tm.diffusers.convert: {type(model).__module__}.{type(model).__name__} is not "
                     f"a supported diffusers transformer; supported: {list(SUPPORTED)} (load one "
                     "with e.g. diffusers.QwenImageTransformer2DModel.from_pretrained(..., "
                     "subfolder='transformer'))")


def parse_moe_blocks(spec: Any, num_layers: int, field: str = "moe_blocks") -> List[int]:
    """Which of a model's `num_layers` blocks (0-based) get an MoE FFN, sorted: the core's
    `parse_moe_layers` ("last:K", "all", "none" or a list of indices, negative from the end)."""
    return parse_moe_layers(spec, num_layers, field)


def dense_ffn_weights(ffn: nn.Module, where: str):
    """(w_in [F, D], b_in [F], w_out [D, F], b_out [D]) of a diffusers FeedForward with tanh-GELU
    and biases, or a ValueError saying what differs (`where` names the module)."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward
    if not isinstance(ffn, FeedForward):
        raise ValueError(f"{where} is a {type(ffn).__name__}, not a diffusers FeedForward: was this "
                         "block converted already?")
    act, out = ffn.net[0], ffn.net[2]
    if not isinstance(act, GELU) or act.approximate != "tanh":
        raise ValueError(f"{where}: only FeedForward(activation_fn='gelu-approximate') is supported "
                         f"(tanh-GELU experts), got {type(act).__name__}"
                         f"(approximate={getattr(act, 'approximate', None)!r})")
    if act.proj.bias is None or out.bias is None:
        raise ValueError(f"{where}: FeedForward without biases is not supported (the experts carry "
                         "the dense biases)")
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in ffn.net):
        raise ValueError(f"{where}: FeedForward with dropout > 0 is not supported")
    return (act.proj.weight.detach(), act.proj.bias.detach(), out.weight.detach(),
            out.bias.detach())
