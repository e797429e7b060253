"""The manifest of one checkpoint tag, and choosing the tag a command reads.

`<tag>/tagmoe_manifest.json` lists every file of a complete checkpoint with its size and content
hash, plus what DeepSpeed does not record (the step, the effective configuration, whether it holds
weights only, where it came from). Writers remove it before they (re)write a tag and write it after
every other file, so a tag with a manifest whose hashes match is whole and from one writer.

`select` picks the tag to read: the one named, or the one `latest` names; when `latest` is absent,
empty, or names a damaged tag, the newest intact `step_N` instead, with a message saying why.
Checkpoints from elsewhere (DeepSpeed's own, without our manifest and without `model_config.yaml`
beside them) are read unverified, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from tagmoe_dist.checkpoint import atomic
from tagmoe_dist.checkpoint.files import CHECKPOINTS, LATEST, MAIN_FILE, MANIFEST, MODEL_CONFIG, STEP_TAG

PathLike = Union[str, os.PathLike]
HASH = "sha256"          # hashlib name; recorded in every manifest (docs/reliability.md: cost)
_CHUNK = 1 << 22


def file_hash(path: PathLike, algorithm: str = HASH) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_name(tag_dir: PathLike, path: Path) -> str:
    """A file's name in the manifest: its path relative to the tag ('zero/<param>/fp32.pt' in
    DeepSpeed universal checkpoints)."""
    return Path(path).relative_to(tag_dir).as_posix()


def hash_files(paths: Iterable[Path], tag_dir: PathLike) -> Dict[str, str]:
    return {file_name(tag_dir, p): file_hash(p) for p in paths}


def data_files(tag_dir: PathLike) -> List[Path]:
    """Every file of a tag, sub-directories included, but the manifest (and our own temporary
    files), sorted by name."""
    tag_dir = Path(tag_dir)
    return [p for p in sorted(tag_dir.rglob("*"), key=lambda q: file_name(tag_dir, q))
            if p.name != MANIFEST and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(tag_dir).parts)]


def remove(tag_dir: PathLike) -> None:
    """Drop the manifest before a tag is rewritten: until the new one is written the tag reads
    as incomplete, never as the old checkpoint with some new files."""
    try:
        os.unlink(Path(tag_dir) / MANIFEST)
    except FileNotFoundError:
        pass


def write(tag_dir: PathLike, hashes: Optional[Dict[str, str]] = None, **fields) -> dict:
    """List every file of `tag_dir` in its manifest, with its size and hash, and `fields`.
    `hashes`: {file name: hex digest} already computed (e.g. by every rank for its share)."""
    tag_dir = Path(tag_dir)
    files = {file_name(tag_dir, p): p for p in data_files(tag_dir)}
    if hashes is None:
        hashes = hash_files(files.values(), tag_dir)
    missing = sorted(set(files) - set(hashes))
    if missing:
        raise ValueError(f"{tag_dir}: no hash for {missing}")
    manifest = {**fields, "hash": HASH,
                "files": {n: {"bytes": p.stat().st_size, HASH: hashes[n]} for n, p in files.items()}}
    atomic.write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read(tag_dir: PathLike) -> Optional[dict]:
    """The manifest of `tag_dir`, None if it has none; ValueError if it is not readable JSON."""
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e})") from None


def _entry(manifest: dict, name: str) -> Tuple[int, Optional[str]]:
    spec = manifest["files"][name]
    if isinstance(spec, int):            # manifests written before hashes: sizes only
        return spec, None
    return int(spec["bytes"]), spec.get(manifest.get("hash", HASH))


def check_sizes(tag_dir: PathLike) -> dict:
    """The manifest after the cheap checks (present, every file there with its size)."""
    tag_dir = Path(tag_dir)
    manifest = read(tag_dir)
    if manifest is None:
        raise ValueError(f"checkpoint {tag_dir} has no {MANIFEST}: it was not written completely "
                         "(a save interrupted, or a tag being rewritten)")
    for name in manifest["files"]:
        size, _ = _entry(manifest, name)
        p = tag_dir / name
        if not p.is_file():
            raise ValueError(f"checkpoint file {p} is missing")
        if p.stat().st_size != size:
            raise ValueError(f"checkpoint file {p} is truncated or damaged: {p.stat().st_size} "
                             f"bytes, the manifest says {size}")
    return manifest


def check_hashes(tag_dir: PathLike, manifest: dict, names: Optional[Iterable[str]] = None) -> None:
    """Compare the content hash of `names` (default: every listed file) with the manifest."""
    tag_dir = Path(tag_dir)
    algorithm = manifest.get("hash", HASH)
    for name in (manifest["files"] if names is None else names):
        _, want = _entry(manifest, name)
        if want is not None and file_hash(tag_dir / name, algorithm) != want:
            raise ValueError(f"checkpoint file {tag_dir / name} does not match its manifest "
                             f"({algorithm} differs): the file was changed or damaged after the "
                             "checkpoint was written")


def check(tag_dir: PathLike) -> dict:
    """The manifest of `tag_dir` after checking every file it lists, size and content; ValueError
    naming the first missing or damaged file, or the absent manifest."""
    manifest = check_sizes(tag_dir)
    check_hashes(tag_dir, manifest)
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
        if not tag:
            raise FileNotFoundError(f"{latest} is empty: pass the tag (the step_* directory name) "
                                    "explicitly")
    tag_dir = ckpt_dir / str(tag)
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {tag_dir} does not exist")
    return tag_dir


def root_of(src: PathLike) -> Path:
    """The checkpoint root of a root or a run directory (train.log_dir)."""
    src = Path(src)
    if not (src / LATEST).is_file() and (src / CHECKPOINTS).is_dir() and (
            (src / CHECKPOINTS / LATEST).exists() or steps(src / CHECKPOINTS)):
        return src / CHECKPOINTS
    return src


def locate(src: PathLike, tag: Optional[str] = None) -> Tuple[Path, Path]:
    """(checkpoint root, tag directory) of a checkpoint root, a run directory (train.log_dir) or
    one step_N directory; no verification."""
    src = root_of(src)
    if (src / MAIN_FILE).is_file() and tag is None:
        return src.parent, src
    return src, resolve_tag(src, tag)


def steps(root: PathLike) -> List[Path]:
    """The step_N directories of a checkpoint root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_TAG.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def ours(root: PathLike) -> bool:
    """Whether a checkpoint root was written by tagmoe_dist (train, upcycle, reshard): those
    always carry a manifest, so a tag without one is incomplete rather than foreign."""
    return (Path(root) / MODEL_CONFIG).is_file()


Verify = Callable[[Path], dict]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def select(src: PathLike, tag: Optional[str] = None, verify: Optional[Verify] = None,
           log: Callable[[str], None] = _stderr) -> Tuple[Path, Path, Optional[dict]]:
    """(root, tag directory, manifest or None for a foreign checkpoint) to read from `src` (a
    checkpoint root, run directory or step_N directory).

    A tag named explicitly (or a step_N directory given) must be intact: ValueError otherwise.
    Without one, `latest` is used if it names an intact tag; else the newest intact step_N, with
    a message through `log` saying what was wrong with `latest`. `verify(tag_dir)` checks a
    tag and returns its manifest (default `check`: sizes and hashes, in this process)."""
    verify = verify or check
    src = Path(src)
    root = root_of(src)
    if (root / MAIN_FILE).is_file() and tag is None:      # one step_N directory
        root, tag = root.parent, root.name
    if tag is not None:
        tag_dir = root / str(tag)
        if not tag_dir.is_dir():
            raise ValueError(f"checkpoint directory {tag_dir} does not exist")
        return root, tag_dir, _verified(root, tag_dir, verify)
    problem = None
    latest = root / LATEST
    if not latest.is_file():
        problem = f"{latest} does not exist"
    else:
        name = latest.read_text(errors="replace").strip()
        if not name:
            problem = f"{latest} is empty"
        elif not (root / name).is_dir():
            problem = f"{latest} names {name!r}, which does not exist"
        else:
            try:
                return root, root / name, _verified(root, root / name, verify)
            except ValueError as e:
                problem = str(e)
    for tag_dir in steps(root):
        try:
            manifest = verify(tag_dir)
        except ValueError:
            continue
        log(f"WARNING: {problem}; using {tag_dir.name}, the newest intact checkpoint in {root}")
        return root, tag_dir, manifest
    if not latest.is_file() and not steps(root):
        raise FileNotFoundError(f"no checkpoint in {root} (no 'latest' file, no step_* directory)")
    raise ValueError(f"{problem}, and no other step_* directory in {root} is intact")


def _verified(root: Path, tag_dir: Path, verify: Verify) -> Optional[dict]:
    if read(tag_dir) is None and not ours(root):
        return None                      # DeepSpeed's own checkpoint: nothing to verify against
    return verify(tag_dir)
