"""The manifest of one checkpoint tag, and finding the tag a command should read.

`<tag>/tagmoe_manifest.json` lists every file of a complete checkpoint with its size, plus what
DeepSpeed does not record (the step, whether it holds weights only, where it came from). It is
written after every other file of the tag; a tag without it was not written completely.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple, Union

from tagmoe_dist.checkpoint import atomic
from tagmoe_dist.checkpoint.files import CHECKPOINTS, LATEST, MAIN_FILE, MANIFEST

PathLike = Union[str, os.PathLike]


def write(tag_dir: PathLike, **fields) -> dict:
    """List every file of `tag_dir` (but the manifest) in its manifest, with `fields`."""
    tag_dir = Path(tag_dir)
    files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.name != MANIFEST}
    manifest = {**fields, "files": files}
    atomic.write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read(tag_dir: PathLike) -> Optional[dict]:
    """The manifest of `tag_dir`, None if it has none."""
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check(tag_dir: PathLike) -> dict:
    """The manifest of `tag_dir` after checking every file it lists; ValueError naming the first
    missing or damaged file, or the absent manifest."""
    tag_dir = Path(tag_dir)
    manifest = read(tag_dir)
    if manifest is None:
        raise ValueError(f"checkpoint {tag_dir} has no {MANIFEST}: it was not written completely")
    for name, size in manifest["files"].items():
        p = tag_dir / name
        if not p.is_file():
            raise ValueError(f"checkpoint file {p} is missing")
        if p.stat().st_size != size:
            raise ValueError(f"checkpoint file {p} is truncated or damaged (expected {size} bytes)")
    return manifest


def resolve_tag(ckpt_dir: PathLike, tag: Optional[str] = None) -> Path:
    """`<ckpt_dir>/<tag>`, where tag defaults to the content of `<ckpt_dir>/latest`."""
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        latest = ckpt_dir / LATEST
        if not latest.is_file():
            raise FileNotFoundError(f"{ckpt_dir} has no 'latest' file: pass the tag (the step_* "
                                    "directory name) explicitly, or point at the checkpoint root")
        tag = latest.read_text().strip()
    tag_dir = ckpt_dir / str(tag)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {tag_dir} does not exist")
    return tag_dir


def locate(src: PathLike, tag: Optional[str] = None) -> Tuple[Path, Path]:
    """(checkpoint root, tag directory) of a checkpoint root, a run directory (train.log_dir) or
    one step_N directory."""
    src = Path(src)
    if (src / CHECKPOINTS / LATEST).is_file() and not (src / LATEST).is_file():
        src = src / CHECKPOINTS
    if (src / MAIN_FILE).is_file() and tag is None:
        return src.parent, src
    return src, resolve_tag(src, tag)
