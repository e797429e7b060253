"""Every on-disk name of a run and its checkpoints, defined once.

A run directory (`train.log_dir`) holds `checkpoints/`, `steps.jsonl` and `tb/`. A checkpoint root (`<train.log_dir>/checkpoints`, what `--resume`, `export`, `reshard` and
`upcycle --format tagmoe` read and write):

    latest                  the tag (step_N) to resume from; written last, after the manifest
    model_config.yaml       our model config (with the effective train.* settings)
    task_schema.yaml        the task schema, when the model has one
    run.json                the command line's config path, train.* and DeepSpeed settings
    upcycle_metadata.json   provenance, in checkpoints written by tagmoe_dist.upcycle
    <tag>/                  one checkpoint, DeepSpeed's files plus our manifest:
        mp_rank_00_model_states.pt                          non-expert weights, 'num_experts'
        layer_<L>_expert_<E>_mp_rank_00_model_states.pt     one expert (global id E) of MoE layer L
        [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  ZeRO 1/2 optimizer partition of rank r
        tagmoe_manifest.json                                what a complete <tag> holds
"""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"
MODEL_CONFIG = "model_config.yaml"
TASK_SCHEMA = "task_schema.yaml"
RUN_JSON = "run.json"
MANIFEST = "tagmoe_manifest.json"
UPCYCLE_METADATA = "upcycle_metadata.json"   # provenance written by tagmoe_dist.upcycle
CHECKPOINTS = "checkpoints"              # <train.log_dir>/checkpoints
STEPS_JSONL = "steps.jsonl"              # <train.log_dir>/steps.jsonl: one JSON record per step
TENSORBOARD = "tb"                       # <train.log_dir>/tb: TensorBoard event files

MAIN_FILE = "mp_rank_00_model_states.pt"
TP_MAIN_FILE = "mp_rank_01_model_states.pt"   # present only with tensor (model) parallel size > 1
ZERO3_MAIN_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
ZERO_FILE = re.compile(r"^((?:bf16_)?zero_pp_rank_)(\d+)_mp_rank_00_optim_states\.pt$")
STEP_TAG = re.compile(r"^step_(\d+)$")


def expert_file(layer: int, expert: int, mp_rank: int = 0) -> str:
    """DeepSpeed's per-expert file name (`DeepSpeedEngine._get_expert_ckpt_name`)."""
    return f"layer_{layer}_expert_{expert}_mp_rank_{mp_rank:02d}_model_states.pt"


def zero_file(prefix: str, rank: int) -> str:
    """DeepSpeed's ZeRO 1/2 optimizer file of `rank`; prefix 'zero_pp_rank_' or 'bf16_zero_pp_rank_'."""
    return f"{prefix}{rank}_mp_rank_00_optim_states.pt"


def step_tag(step: int) -> str:
    return f"step_{step}"


def is_train_checkpoint(src: Path) -> bool:
    """Whether `src` looks like a tagmoe_dist.train checkpoint (root, tag or run directory)."""
    src = Path(src)
    return ((src / LATEST).is_file() and (src / MODEL_CONFIG).is_file()
            or (src / CHECKPOINTS / LATEST).is_file()
            or (src / MAIN_FILE).is_file() and (src.parent / MODEL_CONFIG).is_file())
