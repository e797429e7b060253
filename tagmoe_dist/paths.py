"""Path safety shared by the commands that write or load files.

1. Outputs never swallow their inputs. `check_output_dir(src, dst)` refuses an output directory
   that equals, contains or lies inside the input (symlinks resolved), before anything is read
   or written, so that `--force` (which removes `--dst` itself and nothing else) can never take
   the source or its neighbours with it. Used by `python -m tagmoe_dist.upcycle`; the checkpoint
   `export` and `reshard` commands call it the same way.
2. Code is loaded only from private places. `private_dir(path)` creates a directory `0700` and
   `untrusted_reason(path)` says why a file or directory we are about to execute from could have
   been written by someone else: not owned by us, writable by group or others, or inside a
   directory that others can rename things in (the rules of OpenSSH's StrictModes).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


# ---- 1. outputs ------------------------------------------------------------------------------

def check_output_dir(src: PathLike, dst: PathLike, src_flag: str = "--src",
                     dst_flag: str = "--dst") -> None:
    """ValueError unless `dst` and `src` are disjoint trees (after resolving symlinks).

    Refused: dst == src, dst inside src (the output would be written into the input) and src
    inside dst (replacing dst would delete the input)."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s:
        raise ValueError(f"{dst_flag} {dst} is {src_flag} {src} itself; choose an output "
                         f"directory outside {src_flag}")
    if s in d.parents:
        raise ValueError(f"{dst_flag} {dst} lies inside {src_flag} {src}; choose an output "
                         f"directory outside {src_flag}")
    if d in s.parents:
        raise ValueError(f"{dst_flag} {dst} contains {src_flag} {src}: replacing it would delete "
                         f"the source; choose an output directory that does not contain "
                         f"{src_flag}")


# ---- 2. private places for code we load ------------------------------------------------------

def _uid() -> Optional[int]:
    return os.getuid() if hasattr(os, "getuid") else None


def _bad_mode(st: os.stat_result, what: str, path: Path, me: Optional[int],
              allow_root: bool) -> Optional[str]:
    owners = {me} | ({0} if allow_root else set())
    if st.st_uid not in owners:
        return f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {me})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if not (allow_root and sticky):
            return (f"{what} {path} is writable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def untrusted_reason(path: PathLike, st: Optional[os.stat_result] = None) -> Optional[str]:
    """None if only this user (or root) can have put `path` there and changed it; else why not.

    `path` itself (a file or a directory; `st` its stat when already opened) must be owned by this
    user and not writable by group/others. Every directory above it must be owned by this user or
    root and not writable by group/others, unless sticky (like /tmp: others cannot rename our
    entries). Without POSIX ownership (Windows) nothing can be checked: returns None."""
    me = _uid()
    if me is None:
        return None
    p = Path(os.path.abspath(path))
    try:
        st = st if st is not None else os.lstat(p)
    except OSError as e:
        return f"{p}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{p} is a symbolic link"
    bad = _bad_mode(st, "directory" if stat.S_ISDIR(st.st_mode) else "file", p, me, False)
    if bad:
        return bad
    for parent in p.parents:
        try:
            pst = os.stat(parent)
        except OSError as e:
            return f"{parent}: {e.strerror}"
        bad = _bad_mode(pst, "directory", parent, me, True)
        if bad:
            return bad
    return None


def private_dir(path: PathLike) -> Path:
    """Create `path` and any missing parents with mode 0700 (whatever the umask); returns it.
    Existing directories are left as they are: `untrusted_reason` says whether they can be used."""
    p = Path(os.path.abspath(path))
    for d in [*reversed(p.parents), p]:
        if d.is_dir():
            continue
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    return p
