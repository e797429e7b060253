"""The run directory (train.log_dir) of a fresh run: refused when it holds an earlier run, unless
the user names it as output with --overwrite; then only the trainer's own outputs are removed."""

from __future__ import annotations

import shutil
from pathlib import Path

from tagmoe_dist.checkpoint.files import CHECKPOINTS, STEPS_JSONL, TENSORBOARD

OUTPUTS = (CHECKPOINTS, STEPS_JSONL, TENSORBOARD)


def check_fresh(log_dir: Path, resume: bool, overwrite: bool) -> None:
    """ValueError if a fresh run (no --resume, no --overwrite) would write into a log_dir that
    holds an earlier run's outputs (other files there, e.g. the user's config, are no run);
    and for --resume together with --overwrite."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the "
                         "run in train.log_dir, --overwrite starts a new one there")
    log_dir = Path(log_dir)
    held = [name for name in OUTPUTS if (log_dir / name).exists()]
    if resume or overwrite or not held:
        return
    raise ValueError(f"train.log_dir={log_dir} holds an earlier run ({', '.join(held)}): pass "
                     "--resume to continue that run, "
                     "--overwrite to replace it (its checkpoints/, steps.jsonl and tb/ are "
                     "deleted), or choose another train.log_dir (--set log_dir=DIR)")


def clear(log_dir: Path) -> list:
    """Remove the trainer's outputs from `log_dir` (nothing else in it). Returns what was removed."""
    removed = []
    for name in OUTPUTS:
        p = Path(log_dir) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed
