"""The native CPU kernel's library (csrc/moe_cpu.c): build on first use, load, call.

The kernel is plain C with no torch headers, so it compiles in about a second with the system C
compiler (no ninja, no pybind11) and is loaded with ctypes. It is built for this machine's CPU
(-march=native) into a cache directory keyed by the source, the flags and the CPU, and is written
to a temporary name and renamed into place, so concurrent builds (several ranks starting at once)
and killed builds never leave a half-written library or a lock behind. Its GEMMs call the BLAS
that torch itself links (looked up in libtorch_cpu), so results use the same BLAS as torch.mm.

Loading a library runs its code as this user, so the cache must be private (tagmoe_dist/paths.py):
the directory is created 0700, and a cached library is loaded only if it and its directory are
owned by this user and writable by nobody else, and no directory above lets others rename
entries. The file is opened once, checked through that open descriptor and loaded from it, so it
cannot be swapped between check and load. A library failing the check is rebuilt over; a cache
directory failing it is not used: the kernel is built in a fresh private temporary directory,
with a warning naming the directory and why.

`python -m tagmoe_dist.dispatch` builds it now and says which kernel runs.

When anything is missing (no C compiler, a torch without an exported `sgemm_`, a dtype other
than float32) `MoEConfig.expert_kernel="auto"` uses the plain PyTorch kernel
(kernels/torch_kernel.py), which computes the same thing; `expert_kernel="torch"` chooses it
explicitly. `status()` says whether the library loads and why not.

Environment:
  TAGMOE_NATIVE_DIR=DIR      where built libraries are kept (default: $TORCH_EXTENSIONS_DIR/
                             tagmoe_native, else $XDG_CACHE_HOME or ~/.cache, /tagmoe_dist/native);
                             must be private to this user (see above)
  CC                         the C compiler (default: cc, then gcc, then clang)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from tagmoe_dist.paths import private_dir, untrusted_reason

SOURCE = Path(__file__).resolve().parent / "csrc" / "moe_cpu.c"
# -fno-trapping-math lets the compiler vectorise the activation loops (no FP exceptions are
# relied on); -march=native is why the cache key includes the CPU.
CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
ABI_VERSION = 2
ACTIVATIONS = {"gelu": 0, "swiglu": 1}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None           # why the native kernel is not used (None: not tried)
_origin = ""                            # where the loaded library was built
_tried = False


def cache_dir() -> Path:
    if os.environ.get("TAGMOE_NATIVE_DIR"):
        return Path(os.environ["TAGMOE_NATIVE_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "tagmoe_native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tagmoe_dist" / "native"


def _cpu_id() -> str:
    """Model and feature flags: a library built with -march=native only runs where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))          # one copy per distinct line


def _compiler() -> Optional[str]:
    for cc in filter(None, [os.environ.get("CC"), "cc", "gcc", "clang"]):
        if shutil.which(cc):
            return cc
    return None


def _sgemm_address() -> Optional[int]:
    """Address of the Fortran `sgemm_` exported by the BLAS inside libtorch_cpu (MKL on x86)."""
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = lib_dir / name
        if path.exists():
            try:
                return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):
                return None
    return None


class UntrustedCache(RuntimeError):
    """The cache directory could have been written by another user; nothing in it is loaded."""


def _compiler_or_raise() -> str:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    return cc


def library_name(cc: str) -> str:
    """moe_cpu_<key>.so, the key a hash of the source, the compiler and flags, and the CPU."""
    key = hashlib.sha1(b"\0".join([SOURCE.read_bytes(), " ".join([cc, *CFLAGS]).encode(),
                                   _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:16]
    return f"moe_cpu_{key}.so"


def build(verbose: bool = False) -> Path:
    """Compile csrc/moe_cpu.c for this CPU into cache_dir() (cached). Returns the library path;
    raises UntrustedCache when the directory is not private to this user, RuntimeError when
    the build fails."""
    cc = _compiler_or_raise()
    out = private_dir(cache_dir()) / library_name(cc)
    reason = untrusted_reason(out.parent)
    if reason is not None:
        raise UntrustedCache(reason)
    if os.path.lexists(out) and untrusted_reason(out) is None:
        return out
    return _compile(cc, out, verbose)     # absent, or not provably ours: built again over it


def _compile(cc: str, out: Path, verbose: bool = False) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *CFLAGS, "-o", tmp, str(SOURCE)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            err = res.stderr.strip()[-2000:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode})"
                               + (f":\n{err}" if err else ""))
        os.chmod(tmp, 0o700)                # the linker's mode follows the umask: not ours to keep
        if verbose:
            print(f"[tagmoe_dist] built {out}")
        os.replace(tmp, out)                # atomic: readers see no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _open_checked(path: Path) -> ctypes.CDLL:
    """dlopen `path` only if it is provably ours, checked on the very file that is loaded: open
    it (not following a link), check the descriptor's owner and mode and the directories above,
    then load through /proc/self/fd (where available) so a rename in between changes nothing."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        reason = untrusted_reason(path, os.fstat(fd))
        if reason is not None:
            raise UntrustedCache(reason)
        by_fd = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))
    finally:
        os.close(fd)


def _build_and_open() -> ctypes.CDLL:
    """The cached library; when the cache directory is not private, a build of our own in a
    fresh private temporary directory (removed once loaded: the mapping outlives the file)."""
    global _origin
    try:
        path = build()
        _origin = str(path)
        return _open_checked(path)
    except UntrustedCache as exc:
        warnings.warn(f"tagmoe_dist: not using the native kernel cache {cache_dir()}: {exc}. "
                      "Building in a private temporary directory instead; set TAGMOE_NATIVE_DIR "
                      "to a directory only you can write (created 0700 when missing).",
                      RuntimeWarning, stacklevel=4)
    tmp = Path(tempfile.mkdtemp(prefix="tagmoe_native-"))          # 0700, ours
    try:
        cc = _compiler_or_raise()
        _origin = f"built for this process only (the cache {cache_dir()} is not private)"
        return _open_checked(_compile(cc, tmp / library_name(cc)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load() -> ctypes.CDLL:
    sgemm = _sgemm_address()
    if not sgemm:
        raise RuntimeError("this torch build exports no BLAS `sgemm_` from libtorch_cpu")
    lib = _build_and_open()
    if lib.tm_abi_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.tm_abi_version()} != {ABI_VERSION}")
    lib.tm_set_sgemm(ctypes.c_void_p(sgemm))
    lib.tm_check_gemm.restype = ctypes.c_float
    err = lib.tm_check_gemm()
    if not err < 1e-4:                 # integer width or layout not what the kernel assumes
        raise RuntimeError(f"libtorch_cpu's sgemm_ failed the load-time check (error {err})")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tm_forward.argtypes = [i64, i64, i64, i32] + [p] * 5 + [i64] + [p] * 8
    lib.tm_forward.restype = None
    lib.tm_backward.argtypes = [i64, i64, i64, i32, i64] + [p] * 5 + [i64] + [p] * 15 + [i32]
    lib.tm_backward.restype = None
    lib.tm_topk.argtypes = [p, i64, i64, i64, p]
    lib.tm_topk.restype = None
    lib.tm_gather.argtypes = [p, p, p, i64, i64]
    lib.tm_gather.restype = None
    lib.tm_scatter_add.argtypes = [p, p, p, p, i64, i64]
    lib.tm_scatter_add.restype = None
    lib.tm_gather_scale_dot.argtypes = [p, p, p, p, p, p, i64, i64]
    lib.tm_gather_scale_dot.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, or None (then `status()` says why). Builds once per process."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib = _load()
        except Exception as exc:  # noqa: BLE001 - any failure means: use the torch kernel
            _reason = f"native CPU kernel unavailable ({exc}); using the PyTorch kernel"
            warnings.warn(f"tagmoe_dist: {_reason}", RuntimeWarning, stacklevel=3)
        _tried = True
    return _lib


def status() -> str:
    lib = library()
    return "native CPU kernel (csrc/moe_cpu.c)" if lib is not None else f"PyTorch kernel: {_reason}"


def usable(*tensors: torch.Tensor) -> bool:
    """x, w1, w2, w_N (the first four) are float32 CPU tensors, and the library loads."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if tensors[0].dtype != torch.float32 or any(t.dtype != torch.float32 for t in tensors[1:4]):
        return False
    return library() is not None


def plan_tensors(chunks: List[Tuple[int, int, list]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """expert_chunks' plan as two int64 tables: chunks [n, 4] = (start, stop, first piece, end
    piece) and pieces [P, 3] = (expert, first row, rows) with absolute rows."""
    chunk_rows, piece_rows = [], []
    for start, stop, pieces in chunks:
        first = len(piece_rows)
        piece_rows.extend((e, start + off, n) for e, off, n in pieces)
        chunk_rows.append((start, stop, first, len(piece_rows)))
    return (torch.tensor(chunk_rows, dtype=torch.int64, device="cpu").reshape(-1, 4),
            torch.tensor(piece_rows, dtype=torch.int64, device="cpu").reshape(-1, 3))


TOPK_MAX = 256            # the C kernel's per-row buffer


def topk_ids(scores: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """Ids of the top-k along the last dim, as a stable descending sort would order them (ties
    towards the lower index), or None where the native kernel does not apply."""
    if (scores.device.type != "cpu" or scores.dtype != torch.float32 or not 0 < k <= TOPK_MAX
            or k > scores.shape[-1] or library() is None):
        return None
    s = scores.detach().reshape(-1, scores.shape[-1]).contiguous()
    ids = torch.empty(s.shape[0], k, dtype=torch.int64, device=s.device)
    _lib.tm_topk(s.data_ptr(), s.shape[0], s.shape[1], k, ids.data_ptr())
    return ids.view(*scores.shape[:-1], k)


# ---- row movement (the sending side of dispatch/overlap.py); torch ops where native is off

def _rows_ok(*tensors: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and all(t.dtype == torch.float32 for t in tensors if t.dtype != torch.int64)
            and library() is not None)


def gather_rows(src_TD: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """src_TD[idx_N] as a new [N, D] tensor."""
    if not _rows_ok(src_TD, idx_N) or src_TD.dim() != 2:
        return src_TD.index_select(0, idx_N)
    out = src_TD.new_empty(idx_N.numel(), src_TD.shape[1])
    _lib.tm_gather(out.data_ptr(), src_TD.data_ptr(), idx_N.data_ptr(), idx_N.numel(),
                   src_TD.shape[1])
    return out


def scatter_add_rows(dst_TD: torch.Tensor, idx_N: torch.Tensor, src_ND: torch.Tensor,
                     w_N: Optional[torch.Tensor] = None) -> None:
    """dst_TD[idx_N[r]] += w_N[r] * src_ND[r] in place (w_N None: weight 1)."""
    extra = [w_N] if w_N is not None else []
    if not _rows_ok(dst_TD, idx_N, src_ND, *extra) or dst_TD.dim() != 2:
        dst_TD.index_add_(0, idx_N, src_ND if w_N is None else src_ND * w_N[:, None])
        return
    _lib.tm_scatter_add(dst_TD.data_ptr(), src_ND.data_ptr(), idx_N.data_ptr(),
                        _ptr(w_N), idx_N.numel(), dst_TD.shape[1])


def gather_scale_dot(src_TD: torch.Tensor, idx_N: torch.Tensor, w_N: torch.Tensor,
                     other_ND: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """g = src_TD[idx_N]; returns (w_N[:, None] * g, rowwise <g, other_ND>)."""
    if not _rows_ok(src_TD, idx_N, w_N, other_ND) or src_TD.dim() != 2:
        g_ND = src_TD.index_select(0, idx_N)
        return g_ND * w_N[:, None], (g_ND * other_ND).sum(1)
    out = src_TD.new_empty(idx_N.numel(), src_TD.shape[1])
    dot = src_TD.new_empty(idx_N.numel())
    _lib.tm_gather_scale_dot(out.data_ptr(), src_TD.data_ptr(), idx_N.data_ptr(), w_N.data_ptr(),
                             other_ND.data_ptr(), dot.data_ptr(), idx_N.numel(), src_TD.shape[1])
    return out, dot


def _ptr(t: Optional[torch.Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def main() -> int:
    """`python -m tagmoe_dist.dispatch`: build now (e.g. once per node type before a job) and
    say which kernel the layer will use; exit 1 when it is the slower PyTorch fallback."""
    import time
    t0 = time.perf_counter()
    lib = library()
    if lib is None:
        print(f"CPU expert kernel (expert_kernel=\"auto\", every EP size): {status()}")
        return 1
    print(f"CPU expert kernel (expert_kernel=\"auto\", every EP size): native, {_origin} (ready in {time.perf_counter() - t0:.1f} s)")
    return 0
