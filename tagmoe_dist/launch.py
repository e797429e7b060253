"""Rank discovery for torchrun / DeepSpeed, SLURM, Open MPI, mpi4py and single-process runs.

Precedence (the first match wins; `discover(launcher=...)` forces one):
  1. torchrun / deepspeed: RANK and WORLD_SIZE set. Explicit vars win, so `srun torchrun ...` and
     `deepspeed` inside an allocation work.
  2. ompi: OMPI_COMM_WORLD_RANK set (mpirun/orterun; also beats the SLURM_* vars that mpirun
     inside an sbatch script inherits from the batch step).
  3. slurm: SLURM_PROCID and SLURM_STEP_ID set, i.e. a task of an `srun` step. The batch script
     itself also has SLURM_PROCID=0 SLURM_NTASKS=N but is one process; it is treated as single.
  4. mpi4py: PMIX_RANK or PMI_RANK set (an MPI launcher without OMPI vars, e.g. MPICH hydra) and
     mpi4py importable; rank/size from COMM_WORLD, master = rank 0's host + a free port.
  5. single: world 1, 127.0.0.1, a free port.
MASTER_ADDR / MASTER_PORT from the environment always win over derived values.
`python -m tagmoe_dist.launch --check` verifies a launch end to end with a gloo all-reduce.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Mapping

LAUNCHERS = ("auto", "torchrun", "deepspeed", "ompi", "slurm", "mpi4py", "single")


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, world_size={self.world_size}) "
                             f"({self.launcher}); check the launcher's task count")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local_rank {self.local_rank} not in [0, local_world_size="
                             f"{self.local_world_size}) ({self.launcher})")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT={self.master_port} is not a TCP port; set 1..65535")

    def as_env(self) -> dict[str, str]:
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
                "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size)}


# ---- pure parsers -------------------------------------------------------------------------

def _int(env: Mapping[str, str], name: str, fix: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{name} is not set; {fix}")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; {fix}") from None


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced brackets in {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in {text!r}")
    return parts + [text[start:]]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5."""
    hosts = []
    for item in _split_top(nodelist.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", item)
        if not m:
            if not item or re.search(r"[\[\]\s]", item):
                raise ValueError(f"bad host {item!r} in node list {nodelist!r}")
            hosts.append(item)
            continue
        prefix, ranges, rest = m.groups()
        suffixes = expand_nodelist(rest) if rest else [""]
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) < int(lo):
                raise ValueError(f"bad range {rng!r} in node list {nodelist!r}")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts += [f"{prefix}{n:0{len(lo)}d}{s}" for s in suffixes]
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node item {item!r} in {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_port(job_id: int, step_id: int = 0) -> int:
    """Port in [10000, 30000), below Linux's ephemeral range; the step id separates steps."""
    return 10000 + (job_id * 8 + step_id) % 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---- one mapping per launcher -------------------------------------------------------------

def _master(env, addr: str, port: int) -> tuple[str, int]:
    fix = "set MASTER_PORT to a free TCP port, or unset it"
    return env.get("MASTER_ADDR") or addr, _int(env, "MASTER_PORT", fix, default=port)


def from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    fix = "torchrun/deepspeed set it; set RANK, WORLD_SIZE, LOCAL_RANK together or unset all"
    world = _int(env, "WORLD_SIZE", fix)
    if world > 1 and not env.get("MASTER_ADDR"):
        raise ValueError("MASTER_ADDR is not set but WORLD_SIZE > 1; export the rank-0 host "
                         "(torchrun --master_addr / deepspeed --master_addr set it)")
    local_rank = _int(env, "LOCAL_RANK", fix, default=0 if world == 1 else None)
    local_world = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or str(world)
    launcher = "deepspeed" if "LOCAL_SIZE" in env and "TORCHELASTIC_RUN_ID" not in env else "torchrun"
    addr, port = _master(env, "127.0.0.1", 0 if world > 1 else free_port())
    if port == 0:
        raise ValueError("MASTER_PORT is not set but WORLD_SIZE > 1; export rank 0's port")
    return LaunchInfo(_int(env, "RANK", fix), world, local_rank, int(local_world), addr, port,
                      launcher)


def first_slurm_host(nodelist: str) -> str:
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError:
        if not shutil.which("scontrol"):
            raise
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if not out:
            raise ValueError(f"scontrol show hostnames {nodelist!r} printed nothing") from None
        return out[0]


def from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    fix = "run the program as a task of `srun`, which sets it"
    # srun sets SLURM_STEP_NUM_TASKS; SLURM_NTASKS/NPROCS describe the whole allocation
    world_var = next((v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
                      if env.get(v)), "SLURM_NTASKS")
    world = _int(env, world_var, fix)
    per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
                or env.get("SLURM_TASKS_PER_NODE") or str(world))
    counts = expand_tasks_per_node(per_node)
    node = _int(env, "SLURM_NODEID", fix, default=0)
    local_world = counts[node] if node < len(counts) else counts[-1]
    nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                or env.get("SLURM_NODELIST"))
    if not nodelist and not env.get("MASTER_ADDR"):
        raise ValueError("SLURM_JOB_NODELIST is not set; set MASTER_ADDR to the rank-0 host")
    addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
    step = _int(env, "SLURM_STEP_ID", fix, default=_int(env, "SLURM_STEPID", fix, default=0))
    port = env.get("MASTER_PORT") or slurm_port(
        _int(env, "SLURM_JOB_ID", "set MASTER_PORT, or run under sbatch/salloc"), step)
    addr, port = _master(env, addr, int(port))
    return LaunchInfo(_int(env, "SLURM_PROCID", fix), world, _int(env, "SLURM_LOCALID", fix, 0),
                      local_world, addr, port, "slurm")


def from_ompi(env: Mapping[str, str], comm=None) -> LaunchInfo:
    """Open MPI vars; the master comes from MASTER_ADDR/PORT, else from `comm` (mpi4py), else,
    when all ranks share one node, 127.0.0.1 and a port hashed from the job's PMIx namespace."""
    fix = "mpirun sets it; do not set OMPI_COMM_WORLD_* by hand"
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK", fix), _int(env, "OMPI_COMM_WORLD_SIZE", fix)
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", fix)
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", fix)
    if comm is not None and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        info = from_mpi4py(comm, env)
        addr, port = info.master_addr, info.master_port
    elif local_world == world or env.get("MASTER_ADDR"):
        job = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid") or "0"
        addr, port = _master(env, "127.0.0.1", 10000 + zlib.crc32(job.encode()) % 20000)
    else:
        raise ValueError("ranks span nodes but MASTER_ADDR is not set; pip install mpi4py, or "
                         "pass `mpirun -x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=<port>`")
    return LaunchInfo(rank, world, local_rank, local_world, addr, port, "ompi")


def from_mpi4py(comm, env: Mapping[str, str]) -> LaunchInfo:
    """Collective over `comm` (mpi4py COMM_WORLD): every rank must call it.
    1. allgather hostnames; local rank = earlier ranks on my host, local size = ranks on it.
    2. rank 0 picks (its hostname, a free port), or MASTER_ADDR/PORT if set, and broadcasts it."""
    rank, world = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    master = _master(env, hosts[0], free_port()) if rank == 0 else None
    addr, port = comm.bcast(master, root=0)
    return LaunchInfo(rank, world, hosts[:rank].count(hosts[rank]), hosts.count(hosts[rank]),
                      addr, port, "mpi4py")


def _mpi_comm():
    from mpi4py import MPI  # initializes MPI; only imported when an MPI launch is detected
    return MPI.COMM_WORLD


def discover(env: Mapping[str, str] | None = None, launcher: str = "auto") -> LaunchInfo:
    env = os.environ if env is None else env
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}; choose one of {LAUNCHERS}")
    if launcher == "auto":
        if "RANK" in env or "WORLD_SIZE" in env:
            launcher = "torchrun"
        elif "OMPI_COMM_WORLD_RANK" in env:
            launcher = "ompi"
        elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
            launcher = "slurm"
        elif "PMIX_RANK" in env or "PMI_RANK" in env:
            launcher = "mpi4py"
        else:
            launcher = "single"
    if launcher in ("torchrun", "deepspeed"):
        return from_torchrun(env)
    if launcher == "slurm":
        return from_slurm(env)
    if launcher == "ompi":
        try:
            comm = _mpi_comm()
        except ImportError:
            comm = None
        return from_ompi(env, comm)
    if launcher == "mpi4py":
        try:
            return from_mpi4py(_mpi_comm(), env)
        except ImportError as e:
            raise ValueError(f"MPI launch detected but mpi4py is not importable ({e}); "
                             "pip install mpi4py, or launch with torchrun/srun") from None
    addr, port = _master(env, "127.0.0.1", free_port())
    return LaunchInfo(0, 1, 0, 1, addr, port, "single")


def init_distributed(backend: str | None = None, timeout_s: float = 300.0,
                     info: LaunchInfo | None = None) -> LaunchInfo:
    """Discover (unless `info` is given), export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
    and init the default process group; gloo on CPU, nccl when CUDA is available."""
    import datetime
    import torch
    import torch.distributed as dist

    info = info or discover()
    os.environ.update(info.as_env())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend, init_method="env://", rank=info.rank,
                            world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return info


# ---- stale torch-extension build locks ----------------------------------------------------

BUILD_PROCESSES = {"ninja", "cc1plus", "cc1", "c++", "g++", "gcc", "cc", "clang", "clang++",
                   "nvcc", "cicc", "ptxas", "hipcc", "ld"}


def extension_roots(env: Mapping[str, str] | None = None) -> list[Path]:
    """TORCH_EXTENSIONS_DIR, else torch's default ~/.cache/torch_extensions (all py*_* dirs)."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return [Path(env["TORCH_EXTENSIONS_DIR"])]
    return [Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"]


def _proc_scan() -> tuple[set[str], bool]:
    """(files held open by any local process, whether a compiler/ninja process is running)."""
    held, building = set(), False
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            building |= Path(f"/proc/{pid}/comm").read_text().strip() in BUILD_PROCESSES
            for fd in os.listdir(f"/proc/{pid}/fd"):
                held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # process exited or is not ours to read
    return held, building


def find_stale_extension_locks(max_age_s: float = 300.0,
                               roots: list[Path] | None = None) -> list[Path]:
    """`lock` files (torch's FileBaton, held open by the building process) that no local process
    holds, whose build dir saw no write for max_age_s, while no ninja/compiler runs here."""
    locks = [p for root in (roots or extension_roots()) if Path(root).is_dir()
             for p in Path(root).glob("**/lock") if len(p.relative_to(root).parts) <= 3]
    if not locks:
        return []
    held, building = _proc_scan()
    now, stale = time.time(), []
    for lock in locks:
        try:
            last_write = max(p.stat().st_mtime for p in [lock, *lock.parent.iterdir()])
        except OSError:
            continue  # removed while we looked: the build finished
        if str(lock.resolve()) not in held and now - last_write >= max_age_s and not building:
            stale.append(lock)
    return stale


def check_extension_locks(remove: bool = False, max_age_s: float = 300.0,
                          roots: list[Path] | None = None) -> list[Path]:
    """Raise RuntimeError naming stale locks (or delete them when remove=True, returning them)."""
    stale = find_stale_extension_locks(max_age_s, roots)
    if stale and not remove:
        names = "\n  ".join(map(str, stale))
        raise RuntimeError(
            f"stale PyTorch extension build lock(s), left by a build that was killed:\n  {names}\n"
            "every JIT op build waits on them forever. Fix: delete the file(s) (rm), call "
            "check_extension_locks(remove=True), or point TORCH_EXTENSIONS_DIR at a fresh dir.")
    for lock in stale:
        lock.unlink(missing_ok=True)
    return stale


# ---- python -m tagmoe_dist.launch --check -------------------------------------------------

def _check(args) -> int:
    def expire():
        print(f"launch --check: FAILED: no result after {deadline:.0f} s (watchdog)",
              file=sys.stderr, flush=True)
        os._exit(124)

    deadline = 2 * args.timeout_s + 10
    watchdog = threading.Timer(deadline, expire)  # fires only if something ignored its timeout
    watchdog.daemon = True
    watchdog.start()
    who = "rank ?"
    try:
        import torch
        import torch.distributed as dist

        check_extension_locks(remove=args.remove_stale_locks)
        info = discover(launcher=args.launcher)
        who = f"rank {info.rank}/{info.world_size}"
        init_distributed("gloo", args.timeout_s, info)
        total = torch.tensor([info.rank], dtype=torch.int64)
        dist.all_reduce(total)
        expected = info.world_size * (info.world_size - 1) // 2
        if total.item() != expected:
            raise RuntimeError(f"all-reduce of ranks gave {total.item()}, expected {expected}")
        dist.destroy_process_group()
    except Exception as e:  # the CLI reports any failure as one line and a non-zero exit
        print(f"launch --check: {who} FAILED: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        return 1
    print(f"{who} local {info.local_rank} master {info.master_addr}:{info.master_port} "
          f"launcher {info.launcher} ok", flush=True)
    watchdog.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tagmoe_dist.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="init gloo and all-reduce the ranks")
    p.add_argument("--launcher", default="auto", choices=LAUNCHERS)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--remove-stale-locks", action="store_true")
    args = p.parse_args(argv)
    if not args.check:
        print(discover(launcher=args.launcher))
        return 0
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
