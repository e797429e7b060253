"""Hierarchical task descriptors: names <-> per-level ids <-> multi-hot tag vectors.

A schema has ordered levels (e.g. scope / type / preservation). Each level has a list of values
and is single-valued (`multi: false`, exactly one value or unknown) or multi-valued (any subset).
The whole vocabulary of tags is the concatenation of all levels' values, in order; tag `j` of
level `l` has global index `offset(l) + j`.

Two batch forms are accepted everywhere (see `TaskSchema.to_multi_hot`):
  ids_BL       LongTensor [batch, levels], one value id per level, -1 = unknown / not annotated
  multihot_BN  float/bool tensor [batch, num_tags], all zeros in a level = unknown
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class TaskLevel:
    name: str
    values: tuple[str, ...]
    multi: bool = False

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"task level name must be a non-empty string, got {self.name!r}")
        if len(self.values) == 0:
            raise ValueError(f"task level {self.name!r}: 'values' is empty; list at least one value")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"task level {self.name!r}: duplicate values in {list(self.values)}")
        if UNKNOWN in self.values:
            raise ValueError(
                f"task level {self.name!r}: {UNKNOWN!r} is reserved for unannotated samples; "
                "remove it from 'values'")


def _value_list(level, values) -> tuple:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"task level {level!r}: 'values' must be a list, got {values!r}")
    for v in values:
        if not isinstance(v, str):
            # YAML turns unquoted yes/no/null/numbers into bool/None/float: make that visible.
            raise ValueError(f"task level {level!r}: value {v!r} is not a string; quote it in the "
                             "YAML (e.g. 'yes', '1')")
    return tuple(values)


class TaskSchema:
    """An ordered set of task levels with conversions between descriptors, ids and multi-hot."""

    def __init__(self, levels: Sequence[TaskLevel]):
        if len(levels) == 0:
            raise ValueError("TaskSchema needs at least one level under 'levels'")
        names = [lv.name for lv in levels]
        if len(set(names)) != len(names):
            raise ValueError(f"TaskSchema: duplicate level names {names}")
        self.levels = tuple(levels)
        offsets, total = [], 0
        for lv in self.levels:
            offsets.append(total)
            total += len(lv.values)
        self._offsets = tuple(offsets)
        self.num_tags = total

    # ---------------------------------------------------------------- construction / YAML
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskSchema":
        if not isinstance(d, Mapping) or "levels" not in d:
            raise ValueError("task schema must be a mapping with a 'levels' key, e.g. "
                             "levels: {scope: {values: [a, b], multi: false}}")
        raw = d["levels"]
        if not isinstance(raw, Mapping):
            raise ValueError("task schema 'levels' must be a mapping of level name -> values")
        levels = []
        for name, spec in raw.items():
            if isinstance(spec, (list, tuple)):
                levels.append(TaskLevel(str(name), _value_list(name, spec), False))
            elif isinstance(spec, Mapping):
                unknown_keys = set(spec) - {"values", "multi"}
                if unknown_keys:
                    raise ValueError(f"task level {name!r}: unknown keys {sorted(unknown_keys)}; "
                                     "allowed: values, multi")
                if "values" not in spec:
                    raise ValueError(f"task level {name!r}: missing 'values'")
                multi = spec.get("multi", False)
                if not isinstance(multi, bool):
                    raise ValueError(f"task level {name!r}: 'multi' must be true or false")
                levels.append(TaskLevel(str(name), _value_list(name, spec["values"]), multi))
            else:
                raise ValueError(f"task level {name!r}: expected a list of values or "
                                 "{values: [...], multi: bool}")
        return cls(levels)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TaskSchema":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task schema file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                d = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {e}") from e
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        return {"levels": {lv.name: {"values": list(lv.values), "multi": lv.multi}
                           for lv in self.levels}}

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def __eq__(self, other) -> bool:
        return isinstance(other, TaskSchema) and self.levels == other.levels

    def __repr__(self) -> str:
        return f"TaskSchema({', '.join(f'{lv.name}[{len(lv.values)}]' for lv in self.levels)})"

    # ---------------------------------------------------------------- vocabulary
    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def level_names(self) -> list[str]:
        return [lv.name for lv in self.levels]

    @property
    def tag_names(self) -> list[str]:
        return [f"{lv.name}={v}" for lv in self.levels for v in lv.values]

    def offset(self, level: int | str) -> int:
        return self._offsets[self._level_index(level)]

    def _level_index(self, level: int | str) -> int:
        if isinstance(level, int):
            if not 0 <= level < len(self.levels):
                raise ValueError(f"task level index {level} out of range 0..{len(self.levels) - 1}")
            return level
        for i, lv in enumerate(self.levels):
            if lv.name == level:
                return i
        raise ValueError(f"unknown task level {level!r}; levels are {self.level_names}")

    # ---------------------------------------------------------------- single descriptors
    def encode(self, descriptor: Mapping[str, Any] | None) -> list[list[int]]:
        """Descriptor dict -> per-level lists of value ids (empty list = unknown)."""
        descriptor = descriptor or {}
        if not isinstance(descriptor, Mapping):
            raise ValueError(f"task descriptor must be a mapping level -> value(s), got {descriptor!r}")
        extra = set(descriptor) - set(self.level_names)
        if extra:
            raise ValueError(f"task descriptor has unknown level(s) {sorted(extra)}; "
                             f"levels are {self.level_names}")
        out = []
        for lv in self.levels:
            v = descriptor.get(lv.name)
            if v is None or v == UNKNOWN:
                out.append([])
                continue
            if isinstance(v, str):
                vals = [v]
            elif isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
                vals = [x for x in v if x != UNKNOWN]
            else:
                raise ValueError(f"task level {lv.name!r}: value must be a string or a list of "
                                 f"strings, got {v!r}")
            if not lv.multi and len(vals) > 1:
                raise ValueError(f"task level {lv.name!r} is single-valued but got {vals}; "
                                 "give one value or declare the level 'multi: true'")
            ids = []
            for x in vals:
                if x not in lv.values:
                    raise ValueError(f"task level {lv.name!r}: unknown value {x!r}; "
                                     f"expected one of {list(lv.values)} or {UNKNOWN!r}")
                ids.append(lv.values.index(x))
            out.append(sorted(set(ids)))
        return out

    def decode(self, multihot_N: torch.Tensor) -> dict[str, Any]:
        """Multi-hot row [num_tags] -> descriptor dict (unknown levels are left out)."""
        out = {}
        for lv, off in zip(self.levels, self._offsets):
            ids = torch.nonzero(multihot_N[off:off + len(lv.values)]).flatten().tolist()
            if ids:
                names = [lv.values[i] for i in ids]
                out[lv.name] = names if lv.multi else names[0]
        return out

    def multi_hot(self, descriptors: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        """List of descriptor dicts -> float multi-hot [batch, num_tags]."""
        out_BN = torch.zeros(len(descriptors), self.num_tags)
        for b, d in enumerate(descriptors):
            for off, ids in zip(self._offsets, self.encode(d)):
                for i in ids:
                    out_BN[b, off + i] = 1.0
        return out_BN

    def ids(self, descriptors: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        """List of descriptor dicts -> LongTensor [batch, levels] (-1 = unknown).

        A multi-valued level with several values cannot be written in this form: use multi_hot.
        """
        out_BL = torch.full((len(descriptors), self.num_levels), -1, dtype=torch.long)
        for b, d in enumerate(descriptors):
            for l, ids in enumerate(self.encode(d)):
                if len(ids) > 1:
                    raise ValueError(f"sample {b}: level {self.levels[l].name!r} has several values "
                                     f"{ids}; the [batch, levels] id form holds one per level, use "
                                     "TaskSchema.multi_hot instead")
                if ids:
                    out_BL[b, l] = ids[0]
        return out_BL

    # ---------------------------------------------------------------- batch normalisation
    def to_multi_hot(self, task: torch.Tensor, batch_size: int | None = None,
                     field: str = "task", validate: bool = True) -> torch.Tensor:
        """Accept either batch form, validate it, return float multi-hot [batch, num_tags].

        `validate=False` checks shapes only (host-side metadata): no value checks, hence no host
        sync. Models validate a batch's descriptors once and hand every MoE layer the multi-hot
        with validate=False (MoELayer does so for multi-hot input)."""
        if not isinstance(task, torch.Tensor):
            raise TypeError(f"{field} must be a torch.Tensor (LongTensor [batch, {self.num_levels}] "
                            f"of level ids or multi-hot [batch, {self.num_tags}]), got {type(task).__name__}")
        if task.dim() != 2:
            raise ValueError(f"{field} must be 2-D: [batch, {self.num_levels}] level ids or "
                             f"[batch, {self.num_tags}] multi-hot; got shape {tuple(task.shape)}")
        if batch_size is not None and task.shape[0] != batch_size:
            raise ValueError(f"{field} has {task.shape[0]} rows but the input holds {batch_size} "
                             "samples; pass one task descriptor per sample")
        is_ids = (not task.dtype.is_floating_point and task.dtype != torch.bool
                  and task.shape[1] == self.num_levels)
        if is_ids:
            return self._ids_to_multi_hot(task, field, validate)
        if task.shape[1] != self.num_tags:
            raise ValueError(f"{field} has {task.shape[1]} columns: expected {self.num_levels} "
                             f"(integer level ids) or {self.num_tags} (multi-hot over the tags)")
        mh = task.to(torch.float32)
        if not validate:
            return mh
        if not bool(((mh == 0) | (mh == 1)).all()):
            raise ValueError(f"{field}: multi-hot entries must be 0 or 1")
        for lv, off in zip(self.levels, self._offsets):
            if not lv.multi and bool((mh[:, off:off + len(lv.values)].sum(1) > 1).any()):
                raise ValueError(f"{field}: single-valued level {lv.name!r} has more than one tag "
                                 "set in a row; set at most one")
        return mh

    def _ids_to_multi_hot(self, ids_BL: torch.Tensor, field: str,
                          validate: bool = True) -> torch.Tensor:
        sizes_L = torch.tensor([len(lv.values) for lv in self.levels], device=ids_BL.device)
        offsets_L = torch.tensor(self._offsets, device=ids_BL.device)
        if not validate:     # no boolean-mask indexing: unknown (-1) entries add a zero
            known_BL = (ids_BL >= 0).to(torch.float32)
            cols_BL = torch.minimum(ids_BL.clamp(min=0), sizes_L - 1) + offsets_L
            return torch.zeros(ids_BL.shape[0], self.num_tags, device=ids_BL.device).scatter_add_(
                1, cols_BL, known_BL)
        bad_BL = (ids_BL < -1) | (ids_BL >= sizes_L)
        if bool(bad_BL.any()):
            b, l = (int(i) for i in torch.nonzero(bad_BL)[0])
            lv = self.levels[l]
            raise ValueError(f"{field}[{b}, {l}] = {int(ids_BL[b, l])} is out of range for level "
                             f"{lv.name!r}: use 0..{len(lv.values) - 1} or -1 for unknown")
        known_BL = ids_BL >= 0
        out_BN = torch.zeros(ids_BL.shape[0], self.num_tags, device=ids_BL.device)
        cols = (ids_BL.clamp(min=0) + offsets_L)[known_BL]
        rows = torch.arange(ids_BL.shape[0], device=ids_BL.device)[:, None].expand_as(ids_BL)[known_BL]
        out_BN[rows, cols] = 1.0
        return out_BN
