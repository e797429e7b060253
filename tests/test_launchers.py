"""launchers/*.sh and launchers/slurm/*.sbatch on real launchers: torchrun (c10d rendezvous), the
deepspeed launcher with a `localhost slots=2` hostfile, Open MPI's mpirun, and a real one-node
SLURM cluster (sbatch + srun). Each trains 2 processes for a few steps; SLURM also preemption
(signal, checkpoint, requeue, resume); then faults: a rank killed mid-training makes the job exit
non-zero within a bounded time with a line naming it, and a bad config fails at once under srun and
mpirun. Cluster set-up comes from tests/cluster/ through test_cluster_launch's fixtures: a piece
that cannot start FAILS the test with the reason. Every subprocess has a timeout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tagmoe_dist.ports import free_port
from tests.test_cluster_launch import BASE_ENV, mpi, slurm  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"
FAST = ["batch_size_per_rank=4", "eval_interval=0", "log_interval=1", "warmup_steps=2"]
ENV = {**BASE_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TAGMOE_ROOT": str(ROOT),
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                              str(ROOT / ".torch_extensions"))}
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
KILL_BOUND_S = 60  # a rank killed mid-training: the job must be over within this
# Outputs are read with errors="replace": two ranks' progress bars interleave in one stream and
# can cut a multi-byte character.


def _script(name: str, *args: str, log_dir: Path, steps: int):
    return ["bash", str(LAUNCHERS / name), *args, "--set", f"steps={steps}",
            f"log_dir={log_dir}", *FAST]


def _run(cmd, timeout, env=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                              errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout}s\n"
                    f"{e.stdout or ''}{e.stderr or ''}")


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _steps(log_dir: Path) -> list:
    path = log_dir / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _assert_two_ranks_checkpointed(log_dir: Path, step: int):
    ckpt = log_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{step}"
    shards = sorted(p.name for p in (ckpt / f"step_{step}").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, f"expected one ZeRO shard per rank, got {shards}"


def _rank_pids(log_dir: Path) -> dict:
    """rank -> pid of the trainer processes of this run (python ... tagmoe_dist.train ...
    log_dir=<log_dir>), the rank read from the variable their launcher set."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if not (Path(argv[0]).name.startswith("python") and "tagmoe_dist.train" in argv
                    and f"log_dir={log_dir}" in argv):
                continue
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes()
                       .decode(errors="replace").split("\0") if "=" in kv)
        except OSError:
            continue  # exited meanwhile
        var = next((v for v in RANK_VARS if v in env), None)
        if var is not None:
            found[int(env[var])] = int(pid)
    return found


def _wait_for_steps(log_dir: Path, n: int, proc, timeout: float, what: str):
    deadline = time.time() + timeout
    while len(_steps(log_dir)) < n:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited (rc {proc.returncode}) before {n} training steps")
        if time.time() > deadline:
            pytest.fail(f"{what}: no {n} training steps after {timeout}s")
        time.sleep(0.3)


def _kill_rank_midway(cmd, log_dir: Path, out: Path, victim: int = 1, env=None):
    """Start `cmd`, wait for 2 training steps, SIGKILL rank `victim`'s process; returns (rc,
    seconds from the kill until `cmd` exited). `cmd`'s output goes to `out`."""
    with open(out, "a") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or ENV, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_steps(log_dir, 2, proc, 240, " ".join(map(str, cmd)))
        pids = _rank_pids(log_dir)
        assert sorted(pids) == [0, 1], f"trainer processes by rank: {pids}"
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.time()
        try:
            rc = proc.wait(timeout=KILL_BOUND_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {KILL_BOUND_S + 30}s after rank {victim} was killed "
                        f"(hang):\n{_text(out)[-3000:]}")
        return rc, time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its children
            proc.wait()
        for pid in _rank_pids(log_dir).values():
            os.kill(pid, signal.SIGKILL)


def _assert_lost_rank_named(text: str, launcher_line: str, victim: int = 1):
    """The watchdog's line from a survivor (tagmoe_dist.faults), or the launcher's own report."""
    watchdog = rf"watchdog: rank \d+: lost rank {victim} \("
    assert re.search(watchdog, text) or re.search(launcher_line, text), (
        f"no line naming the lost rank {victim}:\n{text[-4000:]}")


# ---- the scripts' own checks (no launch) ---------------------------------------------------

def test_scripts_parse_and_refuse_bad_settings(tmp_path):
    for script in [*LAUNCHERS.glob("*.sh"), *LAUNCHERS.glob("slurm/*.sbatch")]:
        r = _run(["bash", "-n", str(script)], timeout=30)
        assert r.returncode == 0, f"{script}: {r.stderr}"
    r = _run(["bash", str(LAUNCHERS / "torchrun.sh")], timeout=60,
             env={**ENV, "NNODES": "2", "RDZV_ENDPOINT": ""})
    assert r.returncode != 0 and "needs RDZV_ENDPOINT" in r.stderr, r.stderr
    # train.sbatch must know log_dir to resume from it, so it is LOG_DIR, not --set log_dir=
    r = _run(["bash", str(LAUNCHERS / "slurm/train.sbatch"), "--set", "log_dir=/x"], timeout=60,
             env={**ENV, "SLURM_JOB_NAME": "t", "SLURM_JOB_ID": "1"})
    assert r.returncode != 0 and "set LOG_DIR instead" in r.stderr, r.stderr
    r = _run(["bash", str(LAUNCHERS / "slurm/upcycle.sbatch")], timeout=60)
    assert r.returncode != 0 and "set SRC and DST" in r.stderr, r.stderr


def test_compiled_code_cache_is_private_and_outside_the_repository(tmp_path):
    # Every script's TORCH_EXTENSIONS_DIR default (DeepSpeed's JIT op and the native kernel are
    # loaded from it): under the user's cache, created 0700, never inside the repository.
    scripts = [*LAUNCHERS.glob("*.sh"), *LAUNCHERS.glob("slurm/*.sbatch"),
               ROOT / "scripts" / "setup.sh"]
    for script in scripts:
        lines = [ln for ln in script.read_text().splitlines()
                 if ln.startswith(("export TORCH_EXTENSIONS_DIR=", "(umask 077"))]
        if not any("TORCH_EXTENSIONS_DIR" in ln for ln in lines):
            continue                                   # local.sh: takes setup.sh's
        home = tmp_path / script.stem
        env = {"PATH": ENV["PATH"], "HOME": str(home), "ROOT": str(ROOT)}
        r = subprocess.run(["bash", "-c", "\n".join(lines) + '\necho "$TORCH_EXTENSIONS_DIR"'],
                           env=env, capture_output=True, text=True, timeout=30)
        where = Path(r.stdout.strip())
        assert r.returncode == 0 and home in where.parents, (script, r.stdout, r.stderr)
        assert oct(where.stat().st_mode & 0o777) == "0o700", script


# ---- clean runs ----------------------------------------------------------------------------

def test_deepspeed_sh_hostfile_trains(tmp_path):
    log_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {**ENV, "HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port())}
    r = _run(_script("deepspeed.sh", log_dir=log_dir, steps=3), timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "WORLD INFO DICT: {'localhost': [0, 1]}" in r.stdout + r.stderr
    assert "launch: 2 processes via the deepspeed launcher" in r.stdout + r.stderr
    assert _steps(log_dir) == [1, 2, 3]
    _assert_two_ranks_checkpointed(log_dir, 3)


def test_mpirun_sh_trains(mpi, tmp_path):
    log_dir = tmp_path / "run"
    env = {**ENV, "MPIRUN_ARGS": "--oversubscribe"}
    r = _run(_script("mpirun.sh", log_dir=log_dir, steps=3), timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "launch: 2 processes via mpirun (Open MPI)" in r.stdout + r.stderr
    assert _steps(log_dir) == [1, 2, 3]
    _assert_two_ranks_checkpointed(log_dir, 3)


# ---- SLURM: train, preempt, requeue, resume ------------------------------------------------

def _slurm_job(slurm_env, name: str) -> dict:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], env=slurm_env,
                         capture_output=True, text=True, timeout=30).stdout.split()
    return {"id": out[0], "state": out[1]} if len(out) >= 2 else {}


def _restarts(slurm_env, job_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_env, capture_output=True,
                         text=True, timeout=30).stdout
    m = re.search(r"Restarts=(\d+)", out)
    return int(m.group(1)) if m else -1


def _sbatch_wait(slurm_env, tmp_path, script: str, *args, env_extra=None, options=()):
    """sbatch --wait [options] script args, in the background; returns (Popen, job name,
    output file)."""
    name = f"tagmoe-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "job.out"
    cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={out}", *options,
           str(LAUNCHERS / "slurm" / script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **slurm_env, **(env_extra or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    return proc, name, out


def _cancel(slurm_env, name):
    subprocess.run(["scancel", "--name", name], env=slurm_env, capture_output=True, timeout=30)


def _never_starts(slurm_env, name) -> str:
    """The reason a pending job can never start (its request exceeds what the partition has),
    or "" while it may still start."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%T %r"], env=slurm_env,
                         capture_output=True, text=True, timeout=30).stdout.split()
    return out[1] if out[:1] == ["PENDING"] and out[1:2] == ["PartitionConfig"] else ""


def _finish(proc, timeout, out: Path, slurm_env=None, name=None) -> int:
    """sbatch --wait's exit code; fails at once when the job can never start (instead of
    waiting for the timeout), and when it does not end within `timeout`."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if slurm_env is not None and (why := _never_starts(slurm_env, name)):
            _cancel(slurm_env, name)
            proc.kill()
            proc.communicate()
            pytest.fail(f"job {name} can never start here (Reason={why})")
        if time.time() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"sbatch --wait did not return in {timeout}s:\n{_text(out)[-3000:]}")
        time.sleep(0.5)
    proc.communicate()
    return proc.returncode


def test_sbatch_trains_is_preempted_requeued_and_resumes(slurm, tmp_path):
    """train.sbatch with 2 tasks: after 2 steps the job gets the time-limit warning exactly as
    `--signal=B:USR1@120` delivers it (SIGUSR1 to the batch shell); the tasks checkpoint and stop,
    the script requeues the job, the second start resumes from the checkpoint and finishes."""
    log_dir, steps = tmp_path / "run", 30
    proc, name, out = _sbatch_wait(slurm, tmp_path, "train.sbatch", "--set", f"steps={steps}",
                                   *FAST, env_extra={"LOG_DIR": str(log_dir)})
    try:
        _wait_for_steps(log_dir, 2, proc, 240, "train.sbatch")
        job = _slurm_job(slurm, name)
        assert job.get("state") == "RUNNING", job
        subprocess.run(["scancel", "--batch", "--signal=USR1", job["id"]], env=slurm,
                       check=True, timeout=30)
        deadline = time.time() + 120
        while not (_restarts(slurm, job["id"]) >= 1 and _slurm_job(slurm, name).get("state")
                   == "PENDING"):
            assert time.time() < deadline and proc.poll() is None, (
                f"job not requeued:\n{_text(out)[-3000:]}")
            time.sleep(0.3)
        # SLURM holds a requeued job ~120 s (its credential lifetime); release it now. The 2 s
        # make the new launch credential newer than the revoked one (1 s resolution).
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job['id']}", "StartTime=now"], env=slurm,
                       check=True, timeout=30)
        rc = _finish(proc, 300, out, slurm, name)
    finally:
        if proc.poll() is None:
            _cancel(slurm, name)
            proc.kill()
    text = _text(out)
    assert rc == 0, text[-4000:]
    assert "launch: 2 processes via srun (SLURM)" in text, text[-4000:]
    m = re.search(r"stopped by signal at step (\d+); checkpoint written", text)
    assert m, text[-4000:]
    stopped = int(m.group(1))
    assert 2 <= stopped < steps
    assert "train.sbatch: start 0: no checkpoint" in text
    assert f"train.sbatch: start 1: resuming from {log_dir}/checkpoints/step_{stopped}" in text
    assert _steps(log_dir) == list(range(1, steps + 1)), "steps must continue after the checkpoint"
    _assert_two_ranks_checkpointed(log_dir, steps)


def test_sbatch_term_leaves_an_unfinished_run_failed_not_completed(slurm, tmp_path):
    """`scancel --signal=TERM <job>` (no time-limit warning): the tasks checkpoint and exit 143,
    so the job does not end COMPLETED 0:0 (sbatch --wait returns the job's exit code)."""
    log_dir = tmp_path / "run"
    proc, name, out = _sbatch_wait(slurm, tmp_path, "train.sbatch", "--set", "steps=100000",
                                   *FAST, env_extra={"LOG_DIR": str(log_dir)})
    try:
        _wait_for_steps(log_dir, 2, proc, 240, "train.sbatch")
        job = _slurm_job(slurm, name)
        subprocess.run(["scancel", "--signal=TERM", job["id"]], env=slurm, check=True, timeout=30)
        rc = _finish(proc, 120, out, slurm, name)
    finally:
        if proc.poll() is None:
            _cancel(slurm, name)
            proc.kill()
    text = _text(out)
    assert "stopped by signal at step" in text and "requeueing job" not in text, text[-3000:]
    assert rc != 0 and "train.sbatch: training step ended (exit 143)" in text, (rc, text[-3000:])


def test_warning_after_the_last_step_does_not_requeue(slurm, tmp_path):
    """The time-limit warning arrives once every step is done (final checkpoint, answers,
    teardown): the job ends COMPLETED, it is not requeued to do nothing minutes later."""
    log_dir, steps = tmp_path / "run", 3
    proc, name, out = _sbatch_wait(slurm, tmp_path, "train.sbatch", "--set", f"steps={steps}",
                                   *FAST, env_extra={"LOG_DIR": str(log_dir)})
    try:
        _wait_for_steps(log_dir, steps, proc, 240, "train.sbatch")
        job = _slurm_job(slurm, name)
        if job:                  # still tearing down (it usually is: checkpoint, answers)
            subprocess.run(["scancel", "--batch", "--signal=USR1", job["id"]], env=slurm,
                           timeout=30)
        rc = _finish(proc, 120, out, slurm, name)
    finally:
        if proc.poll() is None:
            _cancel(slurm, name)
            proc.kill()
    text = _text(out)
    assert rc == 0 and "requeueing job" not in text, text[-3000:]
    assert text.count("train.sbatch: start ") == 1, text[-3000:]
    if job:
        assert "time-limit warning during teardown of a finished run: not requeueing" in text


def test_request_the_node_cannot_hold_is_refused_at_submission(slurm, tmp_path):
    """More CPUs than the node has: refused by sbatch (EnforcePartLimits=ALL in
    tests/cluster/setup_slurm.sh), not left PENDING with Reason=PartitionConfig forever."""
    cpus = os.cpu_count()
    r = subprocess.run(["sbatch", f"--cpus-per-task={cpus + 1}", "--wrap", "true"], env=slurm,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "More processors requested than permitted" in r.stderr, (
        r.stdout + r.stderr)
    # and the node has every CPU of the machine, whatever OMP_NUM_THREADS (the fixture sets 1)
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], env=slurm, capture_output=True,
                         text=True, timeout=30).stdout.split()
    assert out == [str(cpus)], out


# ---- faults: a rank killed mid-training ----------------------------------------------------

def test_torchrun_sh_c10d_rendezvous_rank_killed(tmp_path):
    """Also the multi-node path of torchrun.sh (c10d rendezvous endpoint + id), on one node;
    torchrun's clean exit is covered by test_train."""
    log_dir = tmp_path / "run"
    env = {**ENV, "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RDZV_ID": uuid.uuid4().hex}
    rc, took = _kill_rank_midway(_script("torchrun.sh", log_dir=log_dir, steps=10 ** 6),
                                 log_dir, tmp_path / "out.txt", env=env)
    text = _text(tmp_path / "out.txt")
    assert rc != 0 and took < KILL_BOUND_S, (rc, took, text[-3000:])
    _assert_lost_rank_named(text, r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9")


def test_deepspeed_sh_rank_killed(tmp_path):
    log_dir = tmp_path / "run"
    env = {**ENV, "MASTER_PORT": str(free_port())}
    rc, took = _kill_rank_midway(_script("deepspeed.sh", log_dir=log_dir, steps=10 ** 6),
                                 log_dir, tmp_path / "out.txt", env=env)
    text = _text(tmp_path / "out.txt")
    assert rc != 0 and took < KILL_BOUND_S, (rc, took, text[-3000:])
    _assert_lost_rank_named(text, r"'--local_rank=1'.*exits with return code = -9")


def test_mpirun_sh_rank_killed(mpi, tmp_path):
    log_dir = tmp_path / "run"
    env = {**ENV, "MPIRUN_ARGS": "--oversubscribe"}
    rc, took = _kill_rank_midway(_script("mpirun.sh", log_dir=log_dir, steps=10 ** 6),
                                 log_dir, tmp_path / "out.txt", env=env)
    text = _text(tmp_path / "out.txt")
    assert rc != 0 and took < KILL_BOUND_S, (rc, took, text[-3000:])
    _assert_lost_rank_named(text, r"process rank 1 with PID \d+ on node \S+ exited on signal 9")


def test_sbatch_rank_killed(slurm, tmp_path):
    log_dir = tmp_path / "run"
    name = f"tagmoe-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "job.out"
    cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={out}",
           str(LAUNCHERS / "slurm/train.sbatch"), "--set", "steps=1000000", *FAST]
    try:
        rc, took = _kill_rank_midway(cmd, log_dir, tmp_path / "sbatch.txt",
                                     env={**ENV, **slurm, "LOG_DIR": str(log_dir)})
    finally:
        _cancel(slurm, name)
    text = _text(out)
    assert rc != 0 and took < KILL_BOUND_S, (rc, took, text[-3000:])
    _assert_lost_rank_named(text, r"srun: error: \S+: task 1: Killed")
    assert "start 1" not in text, "a failed job must not be requeued"


# ---- faults: a bad config fails on every rank before any process group waits ---------------

def test_bad_config_fails_fast_under_srun(slurm, tmp_path):
    t0 = time.time()
    proc, name, out = _sbatch_wait(slurm, tmp_path, "train.sbatch", "--set", "ep_size=3",
                                   env_extra={"LOG_DIR": str(tmp_path / "run")})
    try:
        rc = _finish(proc, 120, out, slurm, name)
    finally:
        _cancel(slurm, name)
    text = _text(out)
    assert rc != 0, text[-3000:]
    assert "train.ep_size=3 does not divide the 2 processes" in text, text[-3000:]
    assert time.time() - t0 < 60


def test_bad_config_fails_fast_under_mpirun(mpi, tmp_path):
    t0 = time.time()
    r = _run(["bash", str(LAUNCHERS / "mpirun.sh"), "--set", "stepz=3"], timeout=120,
             env={**ENV, "MPIRUN_ARGS": "--oversubscribe"})
    assert r.returncode != 0
    assert "unknown train.* key(s) ['stepz']" in r.stdout + r.stderr, r.stderr[-3000:]
    assert time.time() - t0 < 60


# ---- upcycling as one SLURM task -----------------------------------------------------------

def test_upcycle_sbatch(slurm, tmp_path):
    import torch
    import transformers  # the [hf] extra, installed by scripts/setup.sh
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    proc, name, out = _sbatch_wait(slurm, tmp_path, "upcycle.sbatch", env_extra={
        "SRC": str(tmp_path / "dense"), "DST": str(tmp_path / "moe"), "NUM_EXPERTS": "4",
        "TOP_K": "2"})                      # CPUs as the node has them: no workaround
    try:
        rc = _finish(proc, 180, out, slurm, name)
    finally:
        _cancel(slurm, name)
    assert rc == 0, _text(out)[-3000:]
    moe = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert moe["num_local_experts"] == 4 and moe["num_experts_per_tok"] == 2, moe
