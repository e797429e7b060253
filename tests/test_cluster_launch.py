"""`python -m tagmoe_dist.launch --check` under real launchers: Open MPI's mpirun (OMPI vars, and
mpi4py alone) and a real one-node SLURM cluster (sbatch + srun). The bring-up scripts live in
tests/cluster/ and need root + apt the first time; if a piece cannot start the test FAILS with
the scripts' output. Every subprocess has a timeout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLUSTER = Path(__file__).parent / "cluster"
SLURM_DIR = Path(os.environ.get("TAGMOE_SLURM_DIR", "/tmp/tagmoe-slurm"))
CHECK = [sys.executable, "-m", "tagmoe_dist.launch", "--check", "--timeout-s", "60"]
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
# Children must discover their own launcher, not inherit one from whoever runs pytest.
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_",
                                 "PMIX_", "PMI_"))}
BASE_ENV["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _run(cmd, timeout, env=None, cwd=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env or BASE_ENV, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout}s\n"
                    f"{e.stdout or ''}{e.stderr or ''}")


def _script(name, timeout, env=None) -> str:
    out = _run(["bash", str(CLUSTER / name)], timeout, env)
    if out.returncode != 0:
        pytest.fail(f"{name} failed (rc {out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def _assert_ranks_ok(text: str, launcher: str, world: int = 2):
    for rank in range(world):
        pattern = rf"^rank {rank}/{world} local {rank} master \S+:\d+ launcher {launcher} ok$"
        assert re.search(pattern, text, re.M), f"no ok line for rank {rank}:\n{text}"


@pytest.fixture(scope="module")
def mpi():
    _script("setup_mpi.sh", timeout=600, env={**BASE_ENV, "PYTHON": sys.executable})
    if not shutil.which("mpirun"):
        pytest.fail("setup_mpi.sh succeeded but mpirun is not on PATH")


def test_mpirun_ompi_env(mpi):
    out = _run(MPIRUN + CHECK, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    _assert_ranks_ok(out.stdout, "ompi")


def test_mpirun_mpi4py_discovery_only(mpi):
    # Hide Open MPI's rank variables: rank, size, local rank and the master come from mpi4py.
    hide = ["env"] + [f"-u{v}" for v in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                         "OMPI_COMM_WORLD_LOCAL_RANK",
                                         "OMPI_COMM_WORLD_LOCAL_SIZE")]
    out = _run(MPIRUN + hide + CHECK, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    _assert_ranks_ok(out.stdout, "mpi4py")


@pytest.fixture(scope="module")
def slurm(mpi):  # mpi: the srun --mpi=pmix step below needs mpi4py
    # OMP_NUM_THREADS=1, as clusters and our own scripts export it: the node must still get
    # every CPU (nproc --all), or 2-task jobs could never start.
    env = {**BASE_ENV, "TAGMOE_SLURM_DIR": str(SLURM_DIR), "OMP_NUM_THREADS": "1"}
    _script("setup_slurm.sh", timeout=600, env=env)
    yield {**env, "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    _script("stop_slurm.sh", timeout=120, env=env)


def test_sbatch_srun_check(slurm, tmp_path):
    check = " ".join(CHECK)
    job = tmp_path / "check.sbatch"
    job.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --time=5
#SBATCH --output={tmp_path}/out.txt
set -e
echo "== batch step"; {check}
echo "== srun"; srun --ntasks=2 {check}
echo "== srun --mpi=pmix, mpi4py"; srun --ntasks=2 --mpi=pmix {check} --launcher mpi4py
""")
    out = _run(["sbatch", "--wait", "--chdir", str(tmp_path), str(job)], timeout=300, env=slurm)
    text = (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists() else ""
    assert out.returncode == 0, f"sbatch rc {out.returncode}\n{out.stdout}{out.stderr}\n{text}"
    batch, srun, pmix = text.split("== ")[1:]
    # The batch script is one process even though SLURM_NTASKS=2 there.
    _assert_ranks_ok(batch, "single", world=1)
    _assert_ranks_ok(srun, "slurm")
    _assert_ranks_ok(pmix, "mpi4py")
