"""Checkpoints through DeepSpeed, plus what DeepSpeed does not keep: our config and task schema,
and a manifest that lets a load verify the checkpoint is whole before touching the model.

DeepSpeed writes `<dir>/<tag>/...` and updates `<dir>/latest` only after every file is written,
so a job killed mid-save leaves `latest` pointing at the previous, complete checkpoint. Our own
files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist
import yaml

from tagmoe_dist.checkpoint import atomic, manifest as mf
from tagmoe_dist.checkpoint.files import LATEST, MODEL_CONFIG, RUN_JSON, TASK_SCHEMA, step_tag


def has_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / LATEST).is_file()


def save(engine, ckpt_dir: Path, step: int) -> Path:
    tag = step_tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    if dist.is_initialized():
        dist.barrier()
    tag_dir = Path(ckpt_dir) / tag
    if not dist.is_initialized() or dist.get_rank() == 0:
        mf.write(tag_dir, step=step)
    if dist.is_initialized():
        dist.barrier()
    return tag_dir


def verify(ckpt_dir: Path) -> str:
    """The tag `latest` points to, after checking every file the manifest lists."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir} (no 'latest' file); run "
                                "without --resume, or set train.log_dir to the run to continue")
    tag = latest.read_text().strip()
    try:
        mf.check(ckpt_dir / tag)
    except ValueError as e:
        raise ValueError(f"{e}; the checkpoint is damaged: point 'latest' at an earlier step_* "
                         "directory") from None
    return tag


def load(engine, ckpt_dir: Path, ep_size: Optional[int] = None) -> int:
    """Load the latest checkpoint into the engine; returns the step to continue from.

    `ep_size`: the EP size of the running job. DeepSpeed loads a checkpoint saved at another EP
    size (same world size) without a word, copying expert optimizer partitions by position, so
    the first step scrambles the experts; such a load is refused with the reshard command."""
    tag = verify(ckpt_dir)
    manifest = mf.read(Path(ckpt_dir) / tag)
    if ep_size is not None and not manifest.get("weights_only"):
        from tagmoe_dist.checkpoint.reshard import saved_layout
        saved = saved_layout(Path(ckpt_dir) / tag)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved["ep_size"] not in (None, ep_size) or saved["world_size"] != world:
            raise ValueError(
                f"checkpoint {Path(ckpt_dir) / tag} was saved at ep_size={saved['ep_size']} on "
                f"{saved['world_size']} processes; resuming at ep_size={ep_size} on {world} would "
                "scramble the experts' optimizer state. Reshard it first: python -m "
                f"tagmoe_dist.reshard --src {ckpt_dir} --dst <new run>/checkpoints --ep-size {ep_size}")
    if manifest.get("weights_only"):
        # Upcycled or optimizer-reset checkpoints (tagmoe_dist.upcycle / checkpoint.reshard) have
        # no optimizer files: load the module only; DeepSpeed then refreshes ZeRO's fp32 master
        # partitions from the loaded weights, and Adam starts from zero moments.
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=False,
                                         load_lr_scheduler_states=False, load_module_only=True)
        if path is None:
            raise ValueError(f"DeepSpeed could not load {Path(ckpt_dir) / tag}")
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"note: {Path(ckpt_dir) / tag} holds model weights only "
                  f"({manifest.get('note', 'no optimizer state')})", file=sys.stderr)
        return int(manifest.get("step", 0))
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed could not load {Path(ckpt_dir) / tag}")
    return int(client["step"])


def write_run_config(ckpt_dir: Path, config_path: str, cfg, schema, train: Dict[str, Any],
                     ds_config: Dict[str, Any]) -> None:
    """Our model config and task schema beside DeepSpeed's files, for resume and upcycling."""
    ckpt_dir = Path(ckpt_dir)
    atomic.write_text(ckpt_dir / MODEL_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if schema is not None:
        atomic.write_text(ckpt_dir / TASK_SCHEMA, yaml.safe_dump(schema.to_dict(), sort_keys=False))
    atomic.write_text(ckpt_dir / RUN_JSON, json.dumps({"config": str(config_path), "train": train,
                                                     "deepspeed": ds_config}, indent=1, default=str))
