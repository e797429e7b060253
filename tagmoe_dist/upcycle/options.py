"""Typed, validated options of the upcycling converter (one field per CLI flag).

User errors are ValueErrors that name the flag and say how to fix it. Checks that need the source
checkpoint (layer indices in range, intermediate size divisible by the granularity) live in
`plan.py`, which raises in the same style.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from tagmoe_dist.paths import check_output_dir
from tagmoe_dist.upcycle.recipes import ROUTER_INITS, SCALINGS

FORMATS = ("tagmoe", "hf")
ROUTERS = ("topk", "task_aware")
LAYER_KEYWORDS = ("all", "every-other")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '64KiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 200MB or 1048576")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """Which decoder layers become MoE: 'all', 'every-other' or a comma list like '1,3,5'.

    'every-other' is layers 1, 3, 5, ...: the second of every pair, as in sparse upcycling
    (Switch/ST-MoE) and Qwen2-MoE's decoder_sparse_step=2.
    """
    if spec == "all":
        return tuple(range(num_layers))
    if spec == "every-other":
        return tuple(range(1, num_layers, 2))
    layers = sorted({int(tok) for tok in spec.split(",")})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--layers {spec!r}: layer(s) {bad} out of range for a {num_layers}-layer "
                         f"model; use indices 0..{num_layers - 1}")
    return tuple(layers)


@dataclasses.dataclass(frozen=True)
class UpcycleOptions:
    src: Path
    dst: Path
    num_experts: int
    top_k: int
    format: str = "hf"
    layers: str = "all"
    granularity: int = 1
    router: str = "topk"
    task_schema: Path | None = None
    ep_size: int = 1
    router_init: str = "normal"
    scaling: str = "down"
    expert_noise: float = 0.0
    drop_ratio: float = 0.0
    force: bool = False
    seed: int = 0
    max_shard_size: str | int = "5GB"

    def __post_init__(self):
        object.__setattr__(self, "src", Path(self.src))
        object.__setattr__(self, "dst", Path(self.dst))
        if self.task_schema is not None:
            object.__setattr__(self, "task_schema", Path(self.task_schema))
        self._check_format()
        self._check_counts()
        self._check_recipes()
        parse_size(self.max_shard_size)
        if self.layers not in LAYER_KEYWORDS and re.fullmatch(r"\d+(,\d+)*", self.layers) is None:
            raise ValueError(f"--layers {self.layers!r}: use 'all', 'every-other' or a comma list of "
                             "layer indices such as '1,3,5'")
        # --force replaces --dst and nothing else: refuse a --dst that is, holds or sits in --src
        check_output_dir(self.src, self.dst)

    def _check_format(self):
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r} is not one of {FORMATS}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router {self.router!r} is not one of {ROUTERS}")
        if self.format == "hf" and self.router == "task_aware":
            raise ValueError("--router task_aware needs task embeddings, which the Hugging Face "
                             "Mixtral/Qwen2-MoE layouts cannot hold; use --router topk with "
                             "--format hf, or --format tagmoe")
        if self.task_schema is not None and self.router != "task_aware":
            raise ValueError("--task-schema only applies to --router task_aware (with --format "
                             "tagmoe); drop --task-schema or add --router task_aware")

    def _check_counts(self):
        for flag, value in (("--num-experts", self.num_experts), ("--top-k", self.top_k),
                            ("--granularity", self.granularity), ("--ep-size", self.ep_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"--top-k {self.top_k} is larger than --num-experts "
                             f"{self.num_experts}; lower --top-k or raise --num-experts")
        if self.num_experts % self.granularity:
            raise ValueError(f"--num-experts {self.num_experts} is not a multiple of --granularity "
                             f"{self.granularity}: every slice needs the same number of copies; "
                             f"use a multiple of {self.granularity}")
        if self.top_k % self.granularity:
            raise ValueError(f"--top-k {self.top_k} is not a multiple of --granularity "
                             f"{self.granularity}: top-k must pick whole virtual groups (one copy "
                             f"of every slice); use a multiple of {self.granularity}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"--ep-size {self.ep_size} does not divide --num-experts "
                             f"{self.num_experts}; every expert-parallel rank must hold the same "
                             "number of experts")

    def _check_recipes(self):
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"--router-init {self.router_init!r} is not one of {ROUTER_INITS}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"--scaling {self.scaling!r} is not one of {SCALINGS}")
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise ValueError(f"--drop-ratio {self.drop_ratio} must lie in [0, 1] (0.5 is the "
                             "Drop-Upcycling paper's choice; 0 disables it)")
        if self.expert_noise < 0:
            raise ValueError(f"--expert-noise {self.expert_noise} must be >= 0 (0 disables it)")

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("src", "dst", "task_schema"):
            out[key] = None if out[key] is None else str(out[key])
        return out
