"""Files and directories replaced atomically: written under a temporary name in the same directory,
then renamed, so a reader (or a job killed mid-write) never sees a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


class WriteError(OSError):
    """Writing an output failed (disk full, quota, permissions); the message names the path."""


def write_failed(path: PathLike, err: BaseException) -> WriteError:
    """A WriteError naming `path`, the cause and the free space where it was written. torch.save
    reports a full disk as `RuntimeError: ... unexpected pos N vs M`, without the errno."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return WriteError(f"writing {path} failed ({type(err).__name__}: {err}); {free}: is the disk "
                      "full or a quota reached?")


def write_file(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_name)`, fsync the result, rename it onto `path`. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            write(str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            raise write_failed(path, e) from e
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: PathLike, text: str) -> Path:
    """`path` holds `text` (UTF-8), atomically."""
    return write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def replace_dir(tmp: Path, dst: Path) -> None:
    """Put `tmp` at `dst` with renames only; an existing `dst` is removed after the swap."""
    tmp, dst = Path(tmp), Path(dst)
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rmdir(old)
    os.rename(dst, old)
    os.rename(tmp, dst)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def current_umask() -> int:
    """The process umask, read without changing it (Linux); else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def new_dir(dst: PathLike, label: str = "tmp") -> Iterator[Path]:
    """A fresh temporary directory beside `dst`, removed if the body raises. The body fills it and
    calls `replace_dir(tmp, dst)` (or uses it as scratch space)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{label}-", dir=dst.parent))
    # mkdtemp makes it 0700; the output gets the mode any directory made here would get.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
