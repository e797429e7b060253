"""Rank discovery for torchrun / DeepSpeed, SLURM, Open MPI, mpi4py and single-process runs.

Precedence (the first match wins; `discover(launcher=...)` forces one):
  1. torchrun / deepspeed: RANK or WORLD_SIZE set. Explicit vars win, so `srun torchrun ...` and
     `deepspeed` inside an allocation work.
  2. ompi: OMPI_COMM_WORLD_RANK set by mpirun. Beats SLURM because mpirun inside an sbatch script
     inherits the batch step's SLURM_PROCID=0 in every rank.
  3. slurm: SLURM_PROCID and SLURM_STEP_ID set, i.e. a task of an `srun` step. The batch script
     itself has SLURM_PROCID=0 SLURM_NTASKS=N but no step id and is one process: single.
  4. mpi4py: PMIX_RANK or PMI_RANK set (an MPI launcher without OMPI vars, e.g. MPICH hydra);
     rank/size from COMM_WORLD, master = rank 0's hostname and a free port, broadcast.
  5. single: world 1, 127.0.0.1, a free port.
MASTER_ADDR / MASTER_PORT from the environment always win over derived values.
`python -m tagmoe_dist.launch --check` verifies a launch end to end with a gloo all-reduce.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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

from tagmoe_dist.ports import free_port  # noqa: F401  (also tagmoe_dist.launch.free_port)

LAUNCHERS = ("auto", "torchrun", "deepspeed", "ompi", "slurm", "mpi4py", "single")
# Where rank, world_size, local_rank, local_world_size come from (named in validation errors).
VARS = {"torchrun": "RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE",
        "deepspeed": "RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE",
        "slurm": "SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_TASKS_PER_NODE",
        "ompi": "OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK "
                "OMPI_COMM_WORLD_LOCAL_SIZE",
        "mpi4py": "COMM_WORLD.rank COMM_WORLD.size host-count host-count",
        "single": "rank world_size local_rank local_world_size"}


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
        r, w, lr, lw = VARS[self.launcher].split()
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"{r}={self.rank} is not in [0, {w}={self.world_size}); relaunch "
                             f"with one task count, or unset stale copies of these variables")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"{lr}={self.local_rank} is not in [0, {lw}="
                             f"{self.local_world_size}); fix the per-node task count")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT={self.master_port} is not a TCP port; use 1..65535")

    def as_env(self) -> dict[str, str]:
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
                "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size)}


# ---- pure parsers -------------------------------------------------------------------------

def _int(env: Mapping[str, str], fix: str, *names: str, default: int | None = None) -> int:
    """The first of `names` that is set, as an int; a ValueError naming it and `fix` if bad."""
    name = next((n for n in names if env.get(n)), None)
    if name is None:
        if default is None:
            raise ValueError(f"{names[0]} is not set; {fix}")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer; {fix}") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5."""
    hosts = []
    for item in re.split(r",(?![^\[]*\])", nodelist.strip()):  # commas outside brackets
        m = re.fullmatch(r"([^\[\],]*)\[([\d,-]+)\](.*)", item)
        if not m:
            if not re.fullmatch(r"[^\[\],\s]+", item):
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


# ---- one mapping per launcher -------------------------------------------------------------

def from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    fix = "torchrun/deepspeed set it; set RANK, WORLD_SIZE, LOCAL_RANK together or none"
    world = _int(env, fix, "WORLD_SIZE")
    one = world == 1
    if not one and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise ValueError("MASTER_ADDR and MASTER_PORT must be set when WORLD_SIZE > 1; export "
                         "rank 0's host and a free port (torchrun and deepspeed do)")
    return LaunchInfo(_int(env, fix, "RANK"), world,
                      _int(env, fix, "LOCAL_RANK", default=0 if one else None),
                      _int(env, fix, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world),
                      env.get("MASTER_ADDR") or "127.0.0.1",
                      _int(env, "use a free TCP port", "MASTER_PORT", default=free_port()),
                      detect_launcher(env))


def first_slurm_host(nodelist: str) -> str:
    """First host of a hostlist: the pure parser, else `scontrol show hostnames` if present."""
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError:
        if not shutil.which("scontrol"):
            raise
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30).stdout.split()
        if not out:
            raise ValueError(f"cannot parse SLURM node list {nodelist!r} (nor can scontrol); "
                             "set MASTER_ADDR to the rank-0 host") from None
        return out[0]


def from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    fix = "run the program as a task of `srun`, which sets it"
    # srun's SLURM_STEP_* describe this step; SLURM_NTASKS etc. the whole allocation
    world = _int(env, fix, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get(
        "SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world))
    node = _int(env, fix, "SLURM_NODEID", default=0)
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get(
        "SLURM_NODELIST")
    if not nodes and not env.get("MASTER_ADDR"):
        raise ValueError("SLURM_JOB_NODELIST is not set; set MASTER_ADDR to the rank-0 host")
    if env.get("MASTER_PORT"):
        port = _int(env, "use a free TCP port", "MASTER_PORT")
    else:
        job = _int(env, "set MASTER_PORT, or run inside sbatch/salloc", "SLURM_JOB_ID",
                   "SLURM_JOBID")
        port = slurm_port(job, _int(env, fix, "SLURM_STEP_ID", "SLURM_STEPID", default=0))
    return LaunchInfo(_int(env, fix, "SLURM_PROCID"), world, _int(env, fix, "SLURM_LOCALID"),
                      per_node[min(node, len(per_node) - 1)],
                      env.get("MASTER_ADDR") or first_slurm_host(nodes), port, "slurm")


def from_ompi(env: Mapping[str, str], comm=None) -> LaunchInfo:
    """Ranks from OMPI vars. Master from MASTER_ADDR/PORT, else broadcast over `comm` (mpi4py),
    else (all ranks on one node) 127.0.0.1 and a port hashed from the job's PMIx namespace."""
    fix = "mpirun sets it; do not set OMPI_COMM_WORLD_* by hand"
    world = _int(env, fix, "OMPI_COMM_WORLD_SIZE")
    local_world = _int(env, fix, "OMPI_COMM_WORLD_LOCAL_SIZE")
    if comm is not None and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        master = from_mpi4py(comm, env)
        addr, port = master.master_addr, master.master_port
    elif local_world == world or env.get("MASTER_ADDR"):
        job = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid") or "0"
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        port = _int(env, "use a free TCP port", "MASTER_PORT",
                    default=10000 + zlib.crc32(job.encode()) % 20000)
    else:
        raise ValueError("ranks span nodes but MASTER_ADDR is not set; pip install mpi4py, or "
                         "pass `mpirun -x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=<port>`")
    return LaunchInfo(_int(env, fix, "OMPI_COMM_WORLD_RANK"), world,
                      _int(env, fix, "OMPI_COMM_WORLD_LOCAL_RANK"), local_world, addr, port, "ompi")


def from_mpi4py(comm, env: Mapping[str, str]) -> LaunchInfo:
    """Collective over `comm` (mpi4py COMM_WORLD); every rank must call it.
    1. allgather hostnames: local rank = earlier ranks on my host, local size = ranks on it.
    2. rank 0 broadcasts (MASTER_ADDR or its hostname, MASTER_PORT or a free port)."""
    rank, world = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    master = None
    if rank == 0:
        master = (env.get("MASTER_ADDR") or hosts[0],
                  _int(env, "use a free TCP port", "MASTER_PORT", default=free_port()))
    addr, port = comm.bcast(master, root=0)
    return LaunchInfo(rank, world, hosts[:rank].count(hosts[rank]), hosts.count(hosts[rank]),
                      addr, port, "mpi4py")


def _comm_world():
    try:
        from mpi4py import MPI  # initializes MPI, so only imported for MPI launches
    except ImportError:
        return None
    return MPI.COMM_WORLD


def detect_launcher(env: Mapping[str, str]) -> str:
    """The precedence rules of the module docstring, as a pure function of the environment."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return "deepspeed" if "LOCAL_SIZE" in env and "LOCAL_WORLD_SIZE" not in env else "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "ompi"
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return "slurm"
    return "mpi4py" if "PMIX_RANK" in env or "PMI_RANK" in env else "single"


_LAUNCHER_NAMES = {"torchrun": "torchrun", "deepspeed": "the deepspeed launcher",
                   "slurm": "srun (SLURM)", "ompi": "mpirun (Open MPI)",
                   "mpi4py": "MPI (mpi4py)", "single": "no launcher (one process)"}


def launcher_name(launcher: str) -> str:
    """How a user calls the launcher `detect_launcher` found (for the trainer's launch line)."""
    return _LAUNCHER_NAMES.get(launcher, launcher)


def discover(env: Mapping[str, str] | None = None, launcher: str = "auto") -> LaunchInfo:
    env = os.environ if env is None else env
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}; choose one of {LAUNCHERS}")
    launcher = detect_launcher(env) if launcher == "auto" else launcher
    if launcher in ("torchrun", "deepspeed"):
        return from_torchrun(env)
    if launcher == "slurm":
        return from_slurm(env)
    if launcher == "ompi":
        return from_ompi(env, _comm_world())
    if launcher == "mpi4py":
        if (comm := _comm_world()) is None:
            raise ValueError("MPI launch detected (PMIX_RANK/PMI_RANK) but mpi4py is not "
                             "importable; pip install mpi4py, or launch with torchrun/srun")
        return from_mpi4py(comm, env)
    return LaunchInfo(0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1",
                      _int(env, "use a free TCP port", "MASTER_PORT", default=free_port()),
                      "single")


def init_distributed(backend: str | None = None, timeout_s: float = 300.0,
                     info: LaunchInfo | None = None) -> LaunchInfo:
    """Discover (unless given `info`), export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK and
    init the default process group (gloo on CPU, nccl when CUDA is available)."""
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


def _scan_processes() -> tuple[set[str], set[str]]:
    """(paths held open by local processes, working dirs of local ninja/compiler processes;
    torch runs ninja in the build dir; "?" stands for a build whose dir we cannot read)."""
    held, building = set(), set()
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() in BUILD_PROCESSES:
                building.add(_readlink(f"/proc/{pid}/cwd") or "?")
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # exited, or not ours to read
        held.update(filter(None, (_readlink(f"/proc/{pid}/fd/{fd}") for fd in fds)))
    return held, building


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def find_stale_extension_locks(max_age_s: float = 300.0,
                               roots: list[Path] | None = None) -> list[Path]:
    """`lock` files (torch's FileBaton; the building process holds it open) that no local process
    holds, in a build dir unwritten for max_age_s, with no ninja/compiler running in that dir.
    Builds on other hosts sharing the directory are only seen through the age."""
    locks = [p for root in map(Path, roots or extension_roots()) if root.is_dir()
             for p in root.glob("**/lock") if len(p.relative_to(root).parts) <= 3]
    if not locks:
        return []
    held, building = _scan_processes()
    stale = []
    for lock in locks:
        try:
            idle_s = time.time() - max(p.stat().st_mtime for p in [lock, *lock.parent.iterdir()])
        except OSError:
            continue  # removed while we looked: the build finished
        here = str(lock.parent.resolve())
        if (idle_s >= max_age_s and str(lock.resolve()) not in held
                and not building & {here, "?"}):
            stale.append(lock)
    return stale


def check_extension_locks(remove: bool = False, max_age_s: float = 300.0,
                          roots: list[Path] | None = None) -> list[Path]:
    """Raise RuntimeError naming stale locks, or delete them when `remove` (and return them)."""
    stale = find_stale_extension_locks(max_age_s, roots)
    if stale and not remove:
        names = "\n  ".join(map(str, stale))
        raise RuntimeError(
            f"stale PyTorch extension build lock(s) left by a killed build:\n  {names}\n"
            "every later JIT op build (DeepSpeed ops) waits on them forever. Fix: delete the "
            "file(s), or call check_extension_locks(remove=True) (CLI: --remove-stale-locks), "
            "or set TORCH_EXTENSIONS_DIR to a fresh directory.")
    for lock in stale:
        lock.unlink(missing_ok=True)
    return stale


# ---- python -m tagmoe_dist.launch --check -------------------------------------------------

def _say(stream, line: str) -> None:
    # One write per line: print() writes text and "\n" separately when unbuffered
    # (PYTHONUNBUFFERED=1), and mpirun/srun then interleave the ranks mid-line.
    stream.write(line + "\n")
    stream.flush()


def _check(args) -> int:
    def expire():
        _say(sys.stderr, f"launch --check: {who} FAILED: no result after {deadline:.0f} s "
             "(watchdog)")
        os._exit(124)

    who, deadline = "rank ?", 2 * args.timeout_s + 10
    watchdog = threading.Timer(deadline, expire)  # only fires if something ignores its timeout
    watchdog.daemon = True
    watchdog.start()
    try:
        import torch
        import torch.distributed as dist

        info = discover(launcher=args.launcher)
        who = f"rank {info.rank}/{info.world_size}"
        check_extension_locks(remove=args.remove_stale_locks)
        init_distributed("gloo", args.timeout_s, info)
        total = torch.tensor([info.rank], dtype=torch.int64)
        dist.all_reduce(total)
        if total.item() != info.world_size * (info.world_size - 1) // 2:
            raise RuntimeError(f"all-reduce of the ranks gave {total.item()}; a rank is wrong")
        dist.destroy_process_group()
    except Exception as e:  # the CLI reports any failure as one line and a non-zero exit
        _say(sys.stderr, f"launch --check: {who} FAILED: {type(e).__name__}: {e}")
        os._exit(1)  # no teardown: a half-built process group can block interpreter exit
    watchdog.cancel()
    _say(sys.stdout, f"{who} local {info.local_rank} master {info.master_addr}:"
         f"{info.master_port} launcher {info.launcher} ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tagmoe_dist.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="init gloo, all-reduce the ranks")
    p.add_argument("--launcher", default="auto", choices=LAUNCHERS)
    p.add_argument("--timeout-s", type=float, default=60.0, help="process-group timeout")
    p.add_argument("--remove-stale-locks", action="store_true",
                   help="delete stale torch-extension build locks instead of failing")
    args = p.parse_args(argv)
    if args.check:
        return _check(args)
    print(discover(launcher=args.launcher))
    return 0


if __name__ == "__main__":
    sys.exit(main())
