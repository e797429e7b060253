"""Checkpoints through DeepSpeed, plus what DeepSpeed does not keep: our effective configuration
and task schema, and a manifest that lets a load verify the checkpoint is whole and unchanged
before touching the model.

Saving step N (`save`), on every rank:
  1. The weights are checked finite on every rank; a NaN/inf model is never written.
  2. Rank 0 removes `step_N/tagmoe_manifest.json` if `step_N` exists (a rerun rewriting it):
     from here until step 4 the tag reads as incomplete, never as the old checkpoint.
  3. DeepSpeed writes its files into `step_N/` (without touching `latest`).
  4. Every rank hashes its share of the files; rank 0 writes the manifest (sizes, hashes, step,
     effective configuration), then `latest` = step_N, each atomically (temporary name + rename).
  5. With `keep_last: K`, rank 0 removes the step_* directories older than the newest K.
A job killed anywhere in 1-4 leaves `latest` naming the previous, complete checkpoint.

Resuming (`prepare_resume`, then `load`): the tag `latest` names is verified (sizes on every rank,
content hashes split over the ranks); a damaged or absent `latest` falls back to the newest intact
step_N with a message. The saved effective configuration is compared with this run's, and every
difference is named; the saved optimizer layout (world size, expert-parallel size) must match.
DeepSpeed then loads through `loading.restricted` (weights_only=True).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import yaml

from tagmoe_dist.checkpoint import atomic, loading, manifest as mf
from tagmoe_dist.checkpoint.files import (LATEST, MODEL_CONFIG, RUN_JSON, STEP_TAG, TASK_SCHEMA,
                                          step_tag)

# train.* settings that may change on resume without changing the training trajectory.
RESUME_FREE_KEYS = frozenset({"steps", "log_dir", "log_interval", "eval_interval",
                              "eval_samples_per_task", "checkpoint_interval", "keep_last",
                              "heartbeat_timeout_s", "ep_size"})


class NonFiniteError(ValueError):
    """The model or the loss went NaN/inf; nothing is saved and `latest` is left as it was."""


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(obj) -> List[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _print0(msg: str) -> None:
    if _rank_world()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def has_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / LATEST).is_file()


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` on every rank is finite (one all-reduce)."""
    ok = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    flag = torch.tensor([1.0 if ok else 0.0], device=next(module.parameters()).device)
    if _rank_world()[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def save(engine, ckpt_dir: Path, step: int, config: Optional[dict] = None,
         keep_last: int = 0) -> Path:
    """Write checkpoint `step_<step>` and point `latest` at it (see the module docstring)."""
    ckpt_dir = Path(ckpt_dir)
    tag = step_tag(step)
    tag_dir = ckpt_dir / tag
    rank, world = _rank_world()
    if not weights_finite(engine.module):
        raise NonFiniteError(f"step {step}: the model weights hold NaN or inf; checkpoint {tag_dir} "
                             f"not written, 'latest' unchanged ({_latest_text(ckpt_dir)})")
    if rank == 0 and tag_dir.is_dir():
        mf.remove(tag_dir)
    _barrier()
    try:
        # ZeRO-3 models add their layout (checkpoint/zero3.client_state)
        client = {"step": step, **getattr(engine.module, "tagmoe_client_state", {})}
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    except (OSError, RuntimeError) as e:
        raise atomic.write_failed(tag_dir, e) from e
    _barrier()
    files = mf.data_files(tag_dir)
    shares = _gather(mf.hash_files(files[rank::world], tag_dir))
    if rank == 0:
        hashes = {k: v for share in shares for k, v in share.items()}
        fields = {"step": step, **({"config": _plain(config)} if config is not None else {})}
        mf.write(tag_dir, hashes, **fields)
        atomic.write_text(ckpt_dir / LATEST, tag)
        if keep_last:
            prune(ckpt_dir, keep_last)
    _barrier()
    return tag_dir


def _latest_text(ckpt_dir: Path) -> str:
    latest = Path(ckpt_dir) / LATEST
    return f"latest: {latest.read_text().strip()}" if latest.is_file() else "no checkpoint yet"


def prune(ckpt_dir: Path, keep_last: int) -> List[Path]:
    """Remove the step_* directories older than the newest `keep_last`; never the one `latest`
    names. Returns the removed directories."""
    ckpt_dir = Path(ckpt_dir)
    latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    removed = []
    for tag_dir in mf.steps(ckpt_dir)[keep_last:]:
        if tag_dir.name != latest and STEP_TAG.match(tag_dir.name):
            shutil.rmtree(tag_dir)
            removed.append(tag_dir)
    return removed


def _verify_shared(tag_dir: Path) -> dict:
    """mf.check split over the ranks: sizes everywhere, each rank hashes its share; every rank
    raises the same ValueError if any share is damaged."""
    rank, world = _rank_world()
    try:
        manifest, problem = mf.check_sizes(tag_dir), None
        mf.check_hashes(tag_dir, manifest, sorted(manifest["files"])[rank::world])
    except ValueError as e:
        manifest, problem = None, str(e)
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise ValueError(problems[0])
    return manifest


def choose(ckpt_dir: Path) -> Tuple[Path, dict]:
    """(tag directory, manifest) to resume from, verified; see manifest.select."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / LATEST).is_file() and not mf.steps(ckpt_dir):
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir} (no 'latest' file); run "
                                "without --resume, or set train.log_dir to the run to continue")
    try:
        _, tag_dir, manifest = mf.select(ckpt_dir, verify=_verify_shared, log=_print0)
    except ValueError as e:
        raise ValueError(f"--resume: {e}") from None
    if manifest is None:
        raise ValueError(f"--resume: {tag_dir} has no manifest; tagmoe_dist.train resumes only "
                         "checkpoints written by tagmoe_dist (train, upcycle, reshard)")
    return tag_dir, manifest


def config_differences(saved: dict, now: dict, prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every setting that differs."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<unset>"), now.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b)):
            out.append((f"{prefix}{key}", a, b))
    return out


def _plain(config: dict) -> dict:
    """As stored in a manifest (JSON): tuples become lists, so that equal settings compare equal."""
    return json.loads(json.dumps(config, default=str))


def _saved_config(tag_dir: Path, manifest: dict) -> Optional[dict]:
    if manifest.get("config"):
        return manifest["config"]
    path = tag_dir.parent / MODEL_CONFIG
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def prepare_resume(ckpt_dir: Path, config: Optional[dict], explicit: Iterable[str], world: int,
                   ep_size: Optional[int]) -> Tuple[Path, dict]:
    """Choose and verify the tag to resume from and compare it with this run: (tag dir, manifest).

    `config`: this run's effective configuration (model fields, `train` after every --set), or
    None to skip the comparison;
    `explicit`: the train.* keys given with --set on this command line (deliberate changes);
    `ep_size`: None for a dense model. Raises ValueError naming every difference that would
    change the run, and the fix."""
    tag_dir, manifest = choose(ckpt_dir)
    root = tag_dir.parent
    saved = _saved_config(tag_dir, manifest) if config is not None else None
    if saved is not None:
        saved, config = _plain(saved), _plain(config)
        model = [d for d in config_differences({k: v for k, v in saved.items() if k != "train"},
                                               {k: v for k, v in config.items() if k != "train"})
                 if d[0] != "task_schema"]
        if model:
            raise ValueError(
                f"--resume: the model of checkpoint {tag_dir} differs from --config: "
                + "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in model)
                + f". A checkpoint resumes only into the model it was saved from: pass --config "
                  f"{root / MODEL_CONFIG} (the saved model and settings), or start a new run in "
                  "another train.log_dir")
        train = config_differences(saved.get("train") or {}, config.get("train") or {}, "train.")
        explicit = {f"train.{k}" for k in explicit}
        refused = [d for d in train if d[0] not in explicit
                   and d[0].split(".", 1)[1] not in RESUME_FREE_KEYS]
        if refused and not manifest.get("weights_only"):
            raise ValueError(
                f"--resume: this run's settings differ from those checkpoint {tag_dir} was trained "
                "with: " + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in refused)
                + f". Resume with the saved settings (--config {root / MODEL_CONFIG}), or change a "
                  "setting deliberately with --set KEY=VALUE on the command line")
        if train:
            _print0("note: resuming with changed settings: "
                    + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in train))
    if ep_size is not None and not manifest.get("weights_only") and not manifest.get("universal"):
        from tagmoe_dist.checkpoint.reshard import saved_layout
        layout = saved_layout(tag_dir)
        if layout["ep_size"] not in (None, ep_size) or layout["world_size"] != world:
            raise ValueError(
                f"--resume: checkpoint {tag_dir} was saved at ep_size={layout['ep_size']} on "
                f"{layout['world_size']} processes; resuming at ep_size={ep_size} on {world} "
                "would scramble the experts' optimizer state (its partitions depend on both). "
                "Reshard it first: python -m tagmoe_dist.reshard --src "
                f"{root} --dst <new run>/checkpoints --ep-size {ep_size} --world-size {world}")
    return tag_dir, manifest


def load(engine, ckpt_dir: Path, ep_size: Optional[int] = None,
         resume: Optional[Tuple[Path, dict]] = None) -> int:
    """Load a checkpoint into the engine; returns the step to continue from.

    `resume`: what `prepare_resume` returned; without it the latest intact tag is chosen and
    verified here (and, with `ep_size`, its optimizer layout checked against this run)."""
    ckpt_dir = Path(ckpt_dir)
    if resume is None:
        tag_dir, manifest = prepare_resume(ckpt_dir, None, (), _rank_world()[1], ep_size)
    else:
        tag_dir, manifest = resume
    root, tag = tag_dir.parent, tag_dir.name
    if manifest.get("universal"):
        # any EP and world size; the engine was configured with checkpoint.load_universal
        # (universal_config), the loader is DeepSpeed's, with two of its defects undone
        from tagmoe_dist.checkpoint.zero3 import load_universal
        with loading.restricted(engine):
            load_universal(engine, root, tag)
        _print0(f"note: resumed from the universal checkpoint {tag_dir}")
        return int(manifest.get("step", 0))
    with loading.restricted(engine):
        if manifest.get("weights_only") and engine.zero_optimization_partition_weights():
            # ZeRO-3 engines cannot load ZeRO 0-2 module files: whole weights, then partitioned
            from tagmoe_dist.checkpoint import consolidate
            from tagmoe_dist.checkpoint.zero3 import load_weights
            load_weights(engine, consolidate(root, tag))
            return int(manifest.get("step", 0))
        if manifest.get("weights_only"):
            # Upcycled or optimizer-reset checkpoints (tagmoe_dist.upcycle / checkpoint.reshard)
            # have no optimizer files: load the module only; DeepSpeed then refreshes ZeRO's fp32
            # master partitions from the loaded weights, and Adam starts from zero moments.
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=False,
                                             load_lr_scheduler_states=False, load_module_only=True)
            if path is None:
                raise ValueError(f"DeepSpeed could not load {tag_dir}")
            _print0(f"note: {tag_dir} holds model weights only "
                    f"({manifest.get('note', 'no optimizer state')})")
            return int(manifest.get("step", 0))
        path, client = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise ValueError(f"DeepSpeed could not load {tag_dir}")
    return int(client["step"])


def universal_config(ds_config: Dict[str, Any], resume: Optional[Tuple[Path, dict]]
                     ) -> Dict[str, Any]:
    """The DeepSpeed config to build the engine with when resuming `resume` (prepare_resume's
    result): a universal checkpoint needs `checkpoint.load_universal` and ZeRO-3."""
    if resume is None or not resume[1].get("universal"):
        return ds_config
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage != 3:
        raise ValueError(f"--resume: {resume[0]} is a universal checkpoint of a ZeRO-3 run "
                         f"(python -m tagmoe_dist.reshard); resume it with a ZeRO-3 DeepSpeed "
                         f"config (configs/deepspeed/zero3.json), not ZeRO stage {stage}; or "
                         "reshard the ZeRO-3 source with --reset-optimizer for ZeRO 0-2")
    return {**ds_config, "checkpoint": {**(ds_config.get("checkpoint") or {}),
                                        "load_universal": True}}


def write_run_config(ckpt_dir: Path, config_path: str, cfg, schema, train: Dict[str, Any],
                     ds_config: Dict[str, Any]) -> None:
    """Our model config with the effective train.* settings (after every --set) and the task
    schema beside DeepSpeed's files, for resume (`--config <ckpt>/model_config.yaml`),
    resharding and upcycling."""
    ckpt_dir = Path(ckpt_dir)
    atomic.write_text(ckpt_dir / MODEL_CONFIG,
                      yaml.safe_dump(effective_config(cfg, train), sort_keys=False))
    if schema is not None:
        atomic.write_text(ckpt_dir / TASK_SCHEMA, yaml.safe_dump(schema.to_dict(), sort_keys=False))
    atomic.write_text(ckpt_dir / RUN_JSON, json.dumps({"config": str(config_path), "train": train,
                                                       "deepspeed": ds_config}, indent=1, default=str))


def effective_config(cfg, train: Dict[str, Any]) -> dict:
    """The model config as a dict with `train` replaced by the effective settings."""
    return {**cfg.to_dict(), "train": dict(train)}
