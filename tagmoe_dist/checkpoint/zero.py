"""ZeRO stage 1/2 optimizer partitions (DeepSpeed 0.19's `DeepSpeedZeroOptimizer`): the index math,
as pure functions on tensors, so that it is tested without a process group.

Legend: W world (= data-parallel) size, P expert-parallel size, E experts of a layer, Q the size of
the process group one optimizer parameter group is partitioned over (W for dense groups, W/P, the
expert-data-parallel size, for expert groups), n numel.

How DeepSpeed lays out one optimizer parameter group on rank r (runtime/zero/stage_1_and_2.py):
  1. The group's parameters, in group order, are flattened into one buffer that is padded at the end
     to a multiple of 2*Q (`nccl_start_alignment_factor` * Q). Per-parameter alignment padding
     (zero_optimization.parameter_alignment) is refused here.
  2. The buffer is cut into Q equal partitions; the rank with index i in the group's process group
     owns partition i: the fp32 master copy and the Adam moments of that slice.
  3. `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` stores, per group g:
       single_partition_of_fp32_groups[g]   that fp32 partition WITHOUT the end padding
       base_optimizer_state['state'][g]     the moments WITH the padding, and a scalar 'step'
       group_paddings[g]                    how much of the partition is padding
       partition_count[g] = Q; param_slice_mappings[g] = {name: fragment_address(numel, start)}
  4. Dense groups are partitioned over all W ranks. Expert groups (`moe: True`, named
     'ep_size_<P>') over the expert-data-parallel group of the rank: ranks e, e+P, e+2P, ... for
     EP rank e = r % P, each of which holds experts [e*E/P, (e+1)*E/P) of every MoE layer under the
     same parameter name (so an expert parameter's shape is [E/P, ...] and depends on P).
  5. `split_params_into_different_moe_groups_for_optimizer` cuts an expert group whose parameters
     exceed `max_group_size` numel (summed in order) into several groups; the cut points depend
     on E/P, so they are undone (`merge_split_groups`) and redone (`split_group`) when P changes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ALIGNMENT_FACTOR = 2              # DeepSpeedZeroOptimizer.nccl_start_alignment_factor
MAX_GROUP_SIZE = 178956971        # default max_group_size of split_params_into_different_moe_groups_for_optimizer
FP32 = "fp32"                     # key of the master weights in GroupState.tensors
_EP_NAME = re.compile(r"^ep_size_(\d+)$")


def ep_size_of_group(hyper: dict) -> Optional[int]:
    """P of an expert parameter group (None for a dense group)."""
    if not hyper.get("moe"):
        return None
    m = _EP_NAME.match(str(hyper.get("name", "")))
    if m is None:
        raise ValueError(f"expert optimizer group named {hyper.get('name')!r}; expected 'ep_size_<P>' "
                         "(DeepSpeed's expert group naming)")
    return int(m.group(1))


def group_ranks(world: int, ep_size: Optional[int]) -> List[List[int]]:
    """For each EP rank e, the ranks that partition a group among them, in partition order."""
    if ep_size is None:
        return [list(range(world))]
    return [list(range(e, world, ep_size)) for e in range(ep_size)]


def partition_size(total: int, q: int) -> int:
    """Numel of each of the q partitions of a group of `total` numel (after end padding)."""
    align = ALIGNMENT_FACTOR * q
    return int(math.ceil(total / align)) * align // q


def partition_padding(total: int, q: int, index: int) -> int:
    """How much of partition `index` is end padding (DeepSpeed's groups_padding)."""
    ps = partition_size(total, q)
    return max(0, min(ps, (index + 1) * ps - total))


def fragments(numels: Sequence[int], q: int, index: int) -> List[Tuple[int, int, int]]:
    """(param position, start within partition `index`, numel) of every parameter overlapping it."""
    ps = partition_size(sum(numels), q)
    lo, hi = index * ps, (index + 1) * ps
    out, offset = [], 0
    for pos, n in enumerate(numels):
        a, b = max(offset, lo), min(offset + n, hi)
        if b > a:
            out.append((pos, a - lo, b - a))
        offset += n
    return out


@dataclasses.dataclass
class GroupState:
    """One optimizer parameter group, consolidated: every parameter whole (experts: all E)."""

    hyper: dict                                   # hyperparameters of the group, without 'params'
    names: List[str]                              # parameters, in flat (partition) order
    tensors: Dict[str, Dict[str, torch.Tensor]]   # name -> {'fp32' | 'exp_avg' | ...: full tensor}
    scalars: Dict[str, object]                    # unpartitioned state entries, e.g. Adam's 'step'
    keys: List[str] = dataclasses.field(default_factory=list)   # state entries, in saved order

    @property
    def ep_size(self) -> Optional[int]:
        return ep_size_of_group(self.hyper)


def consolidate_group(g: int, hyper: dict, shapes: "OrderedDict[str, torch.Size]",
                      rank_sds: Sequence[dict], world: int) -> GroupState:
    """Rebuild group g from the `optimizer_state_dict` of every rank (index = global rank).

    `shapes`: the group's parameters in flat order with their per-rank shapes (the main file's
    param_shapes[g]; for experts the local [E/P, ...] shape).
    """
    ep = ep_size_of_group(hyper)
    names = list(shapes)
    numels = [int(torch.Size(s).numel()) for s in shapes.values()]
    total = sum(numels)
    per_slot: List[Dict[str, List[torch.Tensor]]] = []
    scalars: Dict[str, object] = {}
    for ranks in group_ranks(world, ep):
        q = len(ranks)
        flats: Dict[str, List[torch.Tensor]] = {FP32: []}
        for i, r in enumerate(ranks):
            osd = rank_sds[r]
            if osd["partition_count"][g] != q:
                raise ValueError(f"rank {r}: optimizer group {g} is partitioned {osd['partition_count'][g]} "
                                 f"ways, expected {q} for world size {world} and ep_size {ep}")
            if any(osd["param_alignment_paddings"][g]):
                raise ValueError("checkpoints saved with zero_optimization.parameter_alignment are "
                                 "not supported; use --reset-optimizer")
            fp32 = osd["single_partition_of_fp32_groups"][g]
            padding = osd["group_paddings"][g]
            ps = partition_size(total, q)
            if fp32.numel() + padding != ps or padding != partition_padding(total, q, i):
                raise ValueError(f"rank {r}: optimizer group {g} partition has {fp32.numel()} + "
                                 f"{padding} values, expected {ps} for {total} values over {q} ranks")
            _check_slice_mappings(osd, g, names, numels, q, i, r)
            flats[FP32].append(fp32.reshape(-1))
            for key, value in _base_state(osd, g).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if value.numel() != ps:
                        raise ValueError(f"rank {r}: optimizer state {key!r} of group {g} has "
                                         f"{value.numel()} values, expected the partition size {ps}")
                    flats.setdefault(key, []).append(value.reshape(-1))
                elif key in scalars and not _same(scalars[key], value):
                    raise ValueError(f"optimizer state {key!r} of group {g} differs between ranks")
                else:
                    scalars[key] = value
        per_slot.append(flats)
    tensors: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in names}
    for key in per_slot[0]:
        locals_per_slot = []
        for flats in per_slot:
            if len(flats.get(key, [])) != len(flats[FP32]):
                raise ValueError(f"optimizer state {key!r} of group {g} is missing on some ranks")
            flat = torch.cat(flats[key])[:total]
            locals_per_slot.append(flat.split(numels))
        for pos, name in enumerate(names):
            parts = [local[pos].view(shapes[name]) for local in locals_per_slot]
            tensors[name][key] = torch.cat(parts, 0) if ep is not None else parts[0]
    keys = list(_base_state(rank_sds[0], g))
    return GroupState(dict(hyper), names, tensors, scalars, keys)


def _base_state(osd: dict, g: int) -> dict:
    return osd["base_optimizer_state"]["state"].get(g, {})


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def _check_slice_mappings(osd: dict, g: int, names, numels, q: int, i: int, rank: int) -> None:
    """DeepSpeed's own record of the partition must match the layout computed here."""
    saved = osd.get("param_slice_mappings")
    if saved is None:
        return
    want = {names[pos]: (start, n) for pos, start, n in fragments(numels, q, i)}
    got = {name: (int(f.start), int(f.numel)) for name, f in saved[g].items()}
    if got != want:
        raise ValueError(f"rank {rank}: optimizer group {g} is not laid out as ZeRO 1/2 of DeepSpeed "
                         f"0.19 lays it out (param_slice_mappings {got} != {want}); use "
                         "--reset-optimizer")


def local_shape(group: GroupState, name: str, ep_size: Optional[int]) -> torch.Size:
    shape = group.tensors[name][FP32].shape
    if ep_size is None:
        return shape
    return torch.Size([shape[0] // ep_size, *shape[1:]])


def merge_split_groups(groups: Sequence[GroupState], max_group_size: int = MAX_GROUP_SIZE):
    """Undo DeepSpeed's max_group_size split of expert groups: a group continues the previous one
    when both are expert groups with the same hyperparameters and the previous group's numel plus
    the first parameter's would have exceeded max_group_size (the only reason to cut there)."""
    out: List[GroupState] = []
    for grp in groups:
        prev = out[-1] if out else None
        if (prev is not None and grp.ep_size is not None and prev.hyper == grp.hyper
                and _local_numel(prev) + _local_numel(grp, grp.names[:1]) > max_group_size):
            prev.names.extend(grp.names)
            prev.tensors.update(grp.tensors)
            if prev.scalars.keys() != grp.scalars.keys() or not all(
                    _same(prev.scalars[k], grp.scalars[k]) for k in prev.scalars):
                raise ValueError("split expert optimizer groups disagree on their step counts")
            continue
        out.append(GroupState(dict(grp.hyper), list(grp.names), dict(grp.tensors), dict(grp.scalars),
                              list(grp.keys)))
    return out


def _local_numel(grp: GroupState, names=None) -> int:
    ep = grp.ep_size or 1
    return sum(grp.tensors[n][FP32].numel() // ep for n in (grp.names if names is None else names))


def split_group(grp: GroupState, max_group_size: int = MAX_GROUP_SIZE) -> List[GroupState]:
    """DeepSpeed's greedy max_group_size split of an expert group, at the group's (new) ep_size."""
    if grp.ep_size is None:
        return [grp]
    pieces: List[List[str]] = []
    current: List[str] = []
    size = 0
    for name in grp.names:
        n = _local_numel(grp, [name])
        if size + n <= max_group_size:
            current.append(name)
            size += n
        else:
            pieces.append(current)
            current, size = [name], n
    if current:
        pieces.append(current)
    if any(not names for names in pieces):
        raise ValueError(f"expert parameter {grp.names[0]!r} alone exceeds DeepSpeed's max_group_size "
                         f"({max_group_size} values) at ep_size {grp.ep_size}, where DeepSpeed would "
                         "build an empty optimizer group; use --reset-optimizer or a larger ep_size")
    return [GroupState(dict(grp.hyper), names, {n: grp.tensors[n] for n in names}, dict(grp.scalars),
                       list(grp.keys))
            for names in pieces]


def with_ep_size(grp: GroupState, ep_size: int) -> GroupState:
    """The same group renamed for another expert-parallel size (dense groups unchanged)."""
    if grp.ep_size is None:
        return grp
    return GroupState({**grp.hyper, "name": f"ep_size_{ep_size}"}, grp.names, grp.tensors,
                      grp.scalars, grp.keys)


def partition_group(grp: GroupState, world: int, rank: int):
    """Rank `rank`'s share of a consolidated group at `world` ranks and the group's ep_size:
    (fp32 partition without end padding, base optimizer state entry {key: padded partition or a
    copy of the scalar}, padding, partition count, [(name, start, numel)] fragments)."""
    ep = grp.ep_size
    if ep is None:
        q, index, slot = world, rank, 0
    else:
        q, index, slot = world // ep, rank // ep, rank % ep
    numels = [_local_numel(grp, [n]) if ep else grp.tensors[n][FP32].numel() for n in grp.names]
    total = sum(numels)
    ps = partition_size(total, q)
    lo = index * ps
    padding = partition_padding(total, q, index)
    parts = {}
    for key in grp.tensors[grp.names[0]]:
        pieces = []
        for name, n in zip(grp.names, numels):
            t = grp.tensors[name][key]
            if ep is not None:
                t = t[slot * (t.shape[0] // ep):(slot + 1) * (t.shape[0] // ep)]
            pieces.append(t.reshape(-1))
        flat = torch.cat(pieces)
        part = flat.new_zeros(ps)
        stop = min(lo + ps, total)
        if stop > lo:
            part[:stop - lo] = flat[lo:stop]
        parts[key] = part
    fp32 = parts.pop(FP32)[:ps - padding].clone()
    # Scalars are copied: a step tensor shared by two groups would be incremented twice per step.
    state = {k: parts[k] if k in parts else _copy(grp.scalars[k]) for k in grp.keys}
    frags = [(grp.names[pos], start, n) for pos, start, n in fragments(numels, q, index)]
    return fp32, state, padding, q, frags


def _copy(value):
    return value.clone() if torch.is_tensor(value) else value
