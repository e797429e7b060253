"""Megatron-core distributed checkpointing of our MoE layer: its ShardedStateDict.

`megatron.core.dist_checkpointing` saves each tensor as a shard of a global tensor (a
`ShardedTensor`: key, local data, global shape, offset of this shard, and a replica id; only the
replica with id all-zeros writes). A checkpoint holds global tensors, so it loads at any layout.
Global tensors of one MoE layer (the layout of `MoELayer.full_state_dict`):

    experts.w1 [E, D, H]   axis 0 sharded over EP (contiguous expert blocks), H over expert-TP
    experts.w2 [E, F, D]   axis 0 over EP, F over expert-TP
    experts.b1 [E, H], experts.b2 [E, D]   axis 0 over EP
    shared_expert.mlp.w1 [D, H], .w2 [F, D]  over TP (column / row parallel)
    everything else (router, gates, task embeddings, alignment head): replicated

SwiGLU (H = 2F, gate | up): a rank's column shard is [gate_f | up_f] (parallel/tensor.py), two
pieces of the global tensor, so it is saved as two ShardedTensors under one key through a
ShardedTensorFactory, as Megatron does for its own GLU projections (transformer/mlp.py
`apply_swiglu_sharded_factory`); the factory's merge concatenates them back on load.

Replica ids follow Megatron's (PP, TP, DP) convention: replicated tensors (0, tp_rank, dp_rank)
as `make_sharded_tensor_for_checkpoint`; TP-sharded ones (0, 0, dp_rank); expert tensors
(0, 0, expert-data-parallel rank), as SequentialMLP's. Parameters are passed as they are (no
copy), so Megatron's optimizers can map their states onto the same shards.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from tagmoe_dist.layer import MoELayer

# name inside the layer -> (axis of the local tensor cut by the TP group, is it a gated [gate|up]
# column shard); the expert tensors' axis 0 is the expert axis
_EXPERT_TP = {"w1": (2, True), "w2": (1, False), "b1": (1, True), "b2": (None, False)}
_SHARED_TP = {"w1": (1, True), "w2": (0, False)}


def _rank(group) -> int:
    from megatron.core.utils import get_pg_rank
    return get_pg_rank(group)


def _tensor(key: str, t: torch.Tensor, offsets, prepend: int, tp: Optional[Tuple[int, int, int]],
            gated: bool, replica_id):
    """ShardedTensor (or GLU factory) of local tensor `t`: `offsets` are (axis, rank, parts) over
    the global axes; `tp` = (axis of t, rank, size) of its tensor-parallel cut, or None."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    if tp is None or tp[2] == 1:
        extra = () if tp is None else ((tp[0] + prepend, 0, 1),)
        return ShardedTensor.from_rank_offsets(key, t, *offsets, *extra, replica_id=replica_id,
                                               prepend_axis_num=prepend)
    axis, rank, size = tp
    if not gated:
        return ShardedTensor.from_rank_offsets(key, t, *offsets, (axis + prepend, rank, size),
                                               replica_id=replica_id, prepend_axis_num=prepend)

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise ValueError(f"{key}: flattened (legacy distributed-optimizer) shards of a gated "
                             "tensor-parallel weight are not supported; use the torch_dist format")
        gate, up = (p.contiguous() for p in data.chunk(2, dim=axis))
        return [ShardedTensor.from_rank_offsets(key, part, *offsets,
                                                (axis + prepend, rank + i * size, 2 * size),
                                                replica_id=replica_id, prepend_axis_num=prepend)
                for i, part in enumerate((gate, up))]

    def merge(parts):
        with torch.no_grad():
            return torch.cat(parts, dim=axis)

    return ShardedTensorFactory(key, t, build, merge, replica_id)


def sharded_state_dict(layer: MoELayer, prefix: str = "", sharded_offsets: tuple = (),
                       metadata: Optional[dict] = None) -> Dict[str, object]:
    """The ShardedStateDict of `layer` (keys `prefix + state_dict key`), in the signature of
    Megatron's `sharded_state_dict(prefix, sharded_offsets, metadata)`. `sharded_offsets`: the
    offsets a parent prepends (the layer axis of a homogeneous TransformerBlock)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
    from megatron.core.utils import make_sharded_tensor_for_checkpoint

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    g, cfg = layer.groups, layer.cfg
    dp_rank = _rank(metadata["dp_cp_group"])
    edp_rank = _rank(g.edp_group)
    prepend = len(sharded_offsets)
    ep_offset = (prepend, g.ep_rank, g.ep_size)         # expert axis = axis 0 of the local tensor
    gated = cfg.activation == "swiglu"

    def replicated(key, t):
        return make_sharded_tensor_for_checkpoint(t, key, sharded_offsets,
                                                  replica_id=(0, g.tp_rank, dp_rank))

    out: Dict[str, object] = {}
    for name, t in layer.state_dict(prefix="", keep_vars=True).items():
        key = prefix + name
        parts = name.split(".")
        if parts[0] == "experts":
            axis, glu = _EXPERT_TP[parts[1]]
            tp = None if axis is None else (axis, g.etp_rank, g.etp_size)
            # b2 is replicated over the expert-TP group: its TP rank tells the copies apart
            replica = (0, g.etp_rank if axis is None else 0, edp_rank)
            out[key] = _tensor(key, t, (*sharded_offsets, ep_offset), prepend, tp, glu and gated,
                               replica)
        elif name.startswith("shared_expert.mlp.") and g.tp_size > 1:
            if len(parts) != 3 or parts[2] not in _SHARED_TP:
                raise ValueError(f"{name}: no tensor-parallel layout known for this shared-expert "
                                 "tensor (biases are not sharded over TP)")
            axis, glu = _SHARED_TP[parts[2]]
            out[key] = _tensor(key, t, sharded_offsets, prepend, (axis, g.tp_rank, g.tp_size),
                               glu and gated, (0, 0, dp_rank))
        else:
            out[key] = replicated(key, t)
    return out


def replicated_state_dict(module: nn.Module, tp_group, prefix: str = "",
                          sharded_offsets: tuple = (), metadata: Optional[dict] = None):
    """ShardedStateDict of a module replicated over TP and DP (Megatron's default for a plain
    torch module), with the TP group given rather than read from parallel_state."""
    from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                 sharded_state_dict_default)
    return sharded_state_dict_default(module, prefix, sharded_offsets,
                                      ensure_metadata_has_dp_cp_group(metadata), tp_group=tp_group)
