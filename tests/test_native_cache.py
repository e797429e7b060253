"""The native kernel cache runs only libraries that this user built (tagmoe_dist/paths.py).

A "planted" library is a shared object under the exact name the loader looks for, whose
constructor writes a marker file when it is loaded. A positive control shows the harness sees a
load; then each unsafe place (a group-writable cache directory, a cache inside a directory others
can rename in, a library owned by another user, a group-writable library, a symbolic link) must
leave the marker absent while the layer still gets the native kernel, built somewhere safe.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tagmoe_dist import paths
from tagmoe_dist.kernels import native

ROOT = Path(__file__).resolve().parents[1]
_PROBE = ("import warnings; warnings.simplefilter('always')\n"
          "from tagmoe_dist.kernels import native\n"
          "print(native.status())\n")


def _cc() -> str:
    cc = native._compiler()
    if cc is None:
        pytest.fail("no C compiler: the native kernel tests need one (install gcc)")
    return cc


def _plant(lib: Path, marker: Path) -> None:
    src = lib.parent.parent / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }} }}\n')
    subprocess.run([_cc(), "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)


def _load_in_child(cache: Path):
    env = dict(os.environ, TAGMOE_NATIVE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("TAGMOE_NATIVE", None)
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


@pytest.fixture
def planted(tmp_path):
    """(cache dir, library path, marker path) with the planted library in a private cache."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    lib = cache / native.library_name(_cc())
    marker = tmp_path / "planted-ran"
    _plant(lib, marker)
    os.chmod(lib, 0o700)
    return cache, lib, marker


def test_control_a_private_planted_library_is_loaded(planted):
    # Without this, "the marker is absent" below would prove nothing.
    cache, lib, marker = planted
    status, _ = _load_in_child(cache)
    assert marker.exists(), "the harness did not see the library load"
    assert status.startswith("PyTorch kernel:") and "tm_abi_version" in status, status


def test_group_writable_cache_dir_is_not_used(planted):
    cache, lib, marker = planted
    os.chmod(cache, 0o770)
    status, err = _load_in_child(cache)
    assert not marker.exists(), "a library from a group-writable directory was loaded"
    assert status.startswith("native CPU kernel"), status          # built elsewhere instead
    assert f"not using the native kernel cache {cache}" in err and "writable by group" in err, err
    assert lib.read_bytes().find(b"tm_forward") < 0, "the untrusted directory was written to"


def test_cache_inside_a_directory_others_can_rename_in(planted, tmp_path):
    cache, lib, marker = planted
    os.chmod(tmp_path, 0o777 & ~stat.S_ISVTX)        # not sticky: anyone may swap `cache`
    try:
        status, err = _load_in_child(cache)
    finally:
        os.chmod(tmp_path, 0o700)
    assert not marker.exists()
    assert status.startswith("native CPU kernel") and f"directory {tmp_path} is writable" in err


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                    reason="giving a file to another user needs root")
def test_library_owned_by_another_user_is_rebuilt(planted):
    import pwd
    cache, lib, marker = planted
    nobody = pwd.getpwnam("nobody")
    os.chown(lib, nobody.pw_uid, nobody.pw_gid)
    status, err = _load_in_child(cache)
    assert not marker.exists(), "a library owned by another user was loaded"
    assert status.startswith("native CPU kernel"), status
    assert lib.stat().st_uid == os.getuid() and b"tm_forward" in lib.read_bytes()  # ours now
    assert "not using" not in err


@pytest.mark.parametrize("how", ["group-writable", "symlink"])
def test_group_writable_or_linked_library_is_rebuilt(planted, how):
    cache, lib, marker = planted
    if how == "group-writable":
        os.chmod(lib, 0o770)
    else:
        elsewhere = lib.parent.parent / "elsewhere.so"
        shutil.move(lib, elsewhere)
        lib.symlink_to(elsewhere)
    status, _ = _load_in_child(cache)
    assert not marker.exists(), f"a {how} library was loaded"
    assert status.startswith("native CPU kernel"), status
    assert not lib.is_symlink() and stat.S_IMODE(lib.stat().st_mode) == 0o700


def test_fresh_cache_is_created_private(tmp_path):
    cache = tmp_path / "new" / "nested"
    old = os.umask(0o002)                  # a permissive umask must not leak into the cache
    try:
        status, err = _load_in_child(cache)
    finally:
        os.umask(old)
    assert status.startswith("native CPU kernel"), (status, err)
    for d in (tmp_path / "new", cache):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    (lib,) = cache.iterdir()
    assert stat.S_IMODE(lib.stat().st_mode) == 0o700 and paths.untrusted_reason(lib) is None


def test_untrusted_reason_rules(tmp_path):
    d = paths.private_dir(tmp_path / "a")
    f = d / "x.so"
    f.write_bytes(b"")
    assert paths.untrusted_reason(d) is None and paths.untrusted_reason(f) is None
    os.chmod(f, 0o646)
    assert "writable by group or others (mode 0646)" in paths.untrusted_reason(f)
    os.chmod(f, 0o600)
    os.chmod(d, 0o1777)               # sticky, but the directory itself must still be private
    assert "writable by group or others" in paths.untrusted_reason(d)
    os.chmod(d, 0o700)
    os.chmod(tmp_path, 0o1777)        # a sticky parent (like /tmp) is fine
    try:
        assert paths.untrusted_reason(f) is None
    finally:
        os.chmod(tmp_path, 0o700)
    assert "No such file" in paths.untrusted_reason(d / "missing.so")
