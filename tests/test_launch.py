"""Rank discovery: every launcher's environment mapping, the SLURM parsers, stale extension locks,
and a real 2-process `python -m tagmoe_dist.launch --check` under torchrun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tagmoe_dist import launch
from tagmoe_dist.launch import LaunchInfo, discover, expand_nodelist, expand_tasks_per_node

CHILD_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_",
                                  "PMIX_", "PMI_"))}


# ---- parsers ------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("vm", ["vm"]),
    ("a,b", ["a", "b"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("node[008-010],x", ["node008", "node009", "node010", "x"]),
    ("r[1-2]-n[8-9]", ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]),  # same order as scontrol
    ("gpu-a100-[3,5]", ["gpu-a100-3", "gpu-a100-5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[01-", "node[3-1]", "a,,b", "n[x]", "n]1["])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("2(3)")


def test_slurm_port_deterministic_and_below_ephemeral_range():
    assert launch.slurm_port(12345) == launch.slurm_port(12345)
    assert launch.slurm_port(12345, 1) != launch.slurm_port(12345, 0)
    assert all(10000 <= launch.slurm_port(j, s) < 30000 for j in range(0, 10**6, 997)
               for s in range(4))


# ---- precedence ---------------------------------------------------------------------------

SRUN_ENV = {"SLURM_PROCID": "3", "SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6",
            "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "4242", "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
            "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_NODELIST": "node[01-03]",
            "SLURM_STEP_NODELIST": "node[01-03]"}
TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "h0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
OMPI_ENV = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "PMIX_RANK": "1", "PMIX_NAMESPACE": "2110652417"}
BATCH_ENV = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "vm"}  # an sbatch script itself: no step id


@pytest.mark.parametrize("env, name", [
    ({}, "single"),
    (TORCHRUN_ENV, "torchrun"),
    ({**SRUN_ENV, **TORCHRUN_ENV}, "torchrun"),  # srun torchrun ...: explicit vars win
    ({k: v for k, v in TORCHRUN_ENV.items() if k != "LOCAL_WORLD_SIZE"} | {"LOCAL_SIZE": "2"},
     "deepspeed"),
    (SRUN_ENV, "slurm"),
    ({**BATCH_ENV, **OMPI_ENV}, "ompi"),  # mpirun inside an sbatch script
    (BATCH_ENV, "single"),  # python run directly in the batch script is one process
    ({"PMIX_RANK": "0"}, "mpi4py"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpi4py"),
])
def test_detect_launcher(env, name):
    assert launch.detect_launcher(env) == name


# ---- one mapping per launcher -------------------------------------------------------------

def test_torchrun():
    assert discover(TORCHRUN_ENV) == LaunchInfo(1, 2, 1, 2, "h0", 29500, "torchrun")


def test_deepspeed_launcher_vars():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
           "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    assert discover(env) == LaunchInfo(3, 4, 1, 2, "h0", 29500, "deepspeed")


def test_torchrun_single_process_needs_no_master():
    info = discover({"RANK": "0", "WORLD_SIZE": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr) == (0, 1, 0, "127.0.0.1")


@pytest.mark.parametrize("env, match", [
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({**TORCHRUN_ENV, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({**TORCHRUN_ENV, "RANK": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
    ({**TORCHRUN_ENV, "MASTER_ADDR": ""}, "MASTER_ADDR and MASTER_PORT must be set"),
    ({**TORCHRUN_ENV, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({k: v for k, v in TORCHRUN_ENV.items() if k != "LOCAL_RANK"}, "LOCAL_RANK is not set"),
])
def test_torchrun_errors_name_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        discover(env)


def test_slurm():
    assert discover(SRUN_ENV) == LaunchInfo(3, 6, 1, 2, "node01", launch.slurm_port(4242, 0),
                                            "slurm")


def test_slurm_uneven_tasks_per_node_and_explicit_master():
    env = {**SRUN_ENV, "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_NODEID": "2",
           "SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "5", "SLURM_LOCALID": "0",
           "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    assert discover(env) == LaunchInfo(4, 5, 0, 1, "head", 1234, "slurm")


def test_slurm_old_variable_names():
    env = {"SLURM_PROCID": "0", "SLURM_NPROCS": "2", "SLURM_LOCALID": "0", "SLURM_STEPID": "1",
           "SLURM_JOBID": "9", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "gpu[5-6]"}
    assert discover(env) == LaunchInfo(0, 2, 0, 2, "gpu5", launch.slurm_port(9, 1), "slurm")


def test_slurm_errors_name_the_variable():
    with pytest.raises(ValueError, match="SLURM_JOB_ID is not set; set MASTER_PORT"):
        discover({k: v for k, v in SRUN_ENV.items() if k != "SLURM_JOB_ID"})
    with pytest.raises(ValueError, match=r"SLURM_PROCID=6 is not in \[0, SLURM_NTASKS=6\)"):
        discover({**SRUN_ENV, "SLURM_PROCID": "6"})
    with pytest.raises(ValueError, match="SLURM_LOCALID='x' is not an integer; run the program"):
        discover({**SRUN_ENV, "SLURM_LOCALID": "x"})


def test_slurm_falls_back_to_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && echo weird-host-0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    info = discover({**SRUN_ENV, "SLURM_STEP_NODELIST": "weird{0-1}]"})
    assert info.master_addr == "weird-host-0"


def test_slurm_unparseable_nodelist_without_scontrol(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="node list"):
        discover({**SRUN_ENV, "SLURM_STEP_NODELIST": "weird{0-1}]"})


def test_ompi_single_node_without_mpi4py():
    info = launch.from_ompi(OMPI_ENV, comm=None)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size,
            info.master_addr, info.launcher) == (1, 2, 1, 2, "127.0.0.1", "ompi")
    rank0 = launch.from_ompi({**OMPI_ENV, "OMPI_COMM_WORLD_RANK": "0"})
    assert info.master_port == rank0.master_port  # both ranks hash the same PMIx namespace


def test_ompi_multi_node_needs_master_or_mpi4py():
    env = {**OMPI_ENV, "OMPI_COMM_WORLD_SIZE": "4"}
    with pytest.raises(ValueError, match="MASTER_ADDR is not set; pip install mpi4py"):
        launch.from_ompi(env, comm=None)
    info = launch.from_ompi({**env, "MASTER_ADDR": "h0", "MASTER_PORT": "2000"}, comm=None)
    assert (info.world_size, info.master_addr, info.master_port) == (4, "h0", 2000)


class FakeComm:
    """mpi4py's COMM_WORLD as seen by one rank of a job whose ranks run on `hosts`."""

    def __init__(self, rank, hosts, root_master=("h0", 4321)):
        self.rank, self.hosts, self.root_master = rank, hosts, root_master

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.hosts)

    def allgather(self, _mine):
        return list(self.hosts)

    def bcast(self, obj, root):
        assert root == 0 and (obj is None) == (self.rank != 0)
        return obj if self.rank == 0 else self.root_master


def test_mpi4py_local_ranks_from_hostnames(monkeypatch):
    hosts = ["a", "b", "a", "b", "b"]
    infos = [launch.from_mpi4py(FakeComm(r, hosts), {}) for r in range(1, 5)]
    assert [(i.local_rank, i.local_world_size) for i in infos] == [(0, 3), (1, 2), (1, 3), (2, 3)]
    assert {(i.master_addr, i.master_port, i.launcher) for i in infos} == {("h0", 4321, "mpi4py")}
    monkeypatch.setattr(launch.socket, "gethostname", lambda: "a")
    root = launch.from_mpi4py(FakeComm(0, hosts), {"MASTER_PORT": "5555"})
    assert (root.rank, root.local_world_size, root.master_addr, root.master_port) == \
        (0, 2, "a", 5555)


def test_single_and_as_env():
    info = discover({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")
    env = LaunchInfo(1, 4, 1, 2, "h0", 29500, "slurm").as_env()
    assert env == {"MASTER_ADDR": "h0", "MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "4",
                   "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_unknown_launcher():
    with pytest.raises(ValueError, match="choose one of"):
        discover({}, launcher="pbs")


# ---- stale torch-extension build locks ----------------------------------------------------

def _lock(root, age_s, name="fused_adam"):
    build = root / "py311_cpu" / name
    build.mkdir(parents=True)
    (build / "build.ninja").write_text("")
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - age_s
    for p in build.iterdir():
        os.utime(p, (old, old))
    return lock


def test_old_unheld_lock_is_stale(tmp_path):
    lock = _lock(tmp_path, 3600)
    assert launch.find_stale_extension_locks(300, [tmp_path]) == [lock]
    with pytest.raises(RuntimeError) as err:
        launch.check_extension_locks(roots=[tmp_path])
    assert str(lock) in str(err.value) and "TORCH_EXTENSIONS_DIR" in str(err.value)
    assert launch.check_extension_locks(remove=True, roots=[tmp_path]) == [lock]
    assert not lock.exists()
    assert launch.check_extension_locks(roots=[tmp_path]) == []


def test_recent_lock_is_not_stale(tmp_path):
    _lock(tmp_path, 10)
    assert launch.find_stale_extension_locks(300, [tmp_path]) == []


def test_lock_held_open_by_a_process_is_not_stale(tmp_path):
    lock = _lock(tmp_path, 3600)
    with open(lock):  # what torch's FileBaton does while the build runs
        assert launch.find_stale_extension_locks(300, [tmp_path]) == []
    assert launch.find_stale_extension_locks(300, [tmp_path]) == [lock]


def test_lock_is_not_stale_while_its_build_compiles(tmp_path):
    lock = _lock(tmp_path, 3600)
    ninja = tmp_path / "bin" / "ninja"
    ninja.parent.mkdir()
    ninja.symlink_to(shutil.which("sleep"))  # /proc/<pid>/comm reads the link's name: ninja
    in_build = subprocess.Popen([str(ninja), "30"], cwd=lock.parent)  # as torch runs ninja
    try:
        time.sleep(0.2)
        assert launch.find_stale_extension_locks(300, [tmp_path]) == []
    finally:
        in_build.kill()
        in_build.wait()
    elsewhere = subprocess.Popen([str(ninja), "30"], cwd=tmp_path)  # some other build
    try:
        time.sleep(0.2)
        assert launch.find_stale_extension_locks(300, [tmp_path]) == [lock]
    finally:
        elsewhere.kill()
        elsewhere.wait()


def test_extension_roots_follow_torch(tmp_path):
    assert launch.extension_roots({"TORCH_EXTENSIONS_DIR": str(tmp_path)}) == [tmp_path]
    assert launch.extension_roots({"XDG_CACHE_HOME": "/c"}) == [launch.Path("/c/torch_extensions")]


# ---- real processes -----------------------------------------------------------------------

def test_check_under_torchrun_two_processes():
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(launch.free_port()), "-m", "tagmoe_dist.launch", "--check",
         "--timeout-s", "60"],
        env=CHILD_ENV, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank}/2 local {rank} master " in out.stdout, out.stdout + out.stderr
    assert out.stdout.count("launcher torchrun ok") == 2, out.stdout


def test_check_fails_instead_of_hanging_when_a_rank_is_missing():
    env = {**CHILD_ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launch.free_port())}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tagmoe_dist.launch", "--check",
                          "--timeout-s", "3"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "rank 0/2 FAILED" in out.stderr, out.stdout + out.stderr
    assert time.monotonic() - start < 60
