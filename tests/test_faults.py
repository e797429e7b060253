"""tagmoe_dist.faults: the lost-rank watchdog. Pure parts without a process group; then two real
processes (gloo, torchrun-style environment, no launcher) where one is killed, stopped, fails or
leaves early, and the other must exit with EXIT_LOST_RANK naming it, or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tagmoe_dist import faults
from tagmoe_dist.faults import (EXIT_LOST_RANK, HeartbeatTracker, Lost, ProcessId, node_peers,
                                watched_peers)
from tagmoe_dist.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_", "PMIX_", "PMI_",
               "TORCHELASTIC_")


# ---- pure parts ----------------------------------------------------------------------------

def test_watched_peers_ring():
    assert watched_peers(0, 2, 2) == [1]
    assert watched_peers(3, 4, 2) == [0, 1]
    assert watched_peers(0, 1, 2) == []
    # every rank is watched by exactly `fanout` others
    world, fanout = 7, 3
    counts = [0] * world
    for r in range(world):
        for p in watched_peers(r, world, fanout):
            counts[p] += 1
    assert counts == [fanout] * world


def test_node_peers_contiguous_block():
    assert node_peers(rank=5, local_rank=1, local_world=4, world=8) == [4, 6, 7]
    assert node_peers(rank=0, local_rank=0, local_world=1, world=8) == []
    assert node_peers(rank=1, local_rank=1, local_world=2, world=2) == [0]


def test_heartbeat_tracker_counts_silence_from_last_change():
    t = HeartbeatTracker([1, 2], now=0.0)
    t.observe(1, 5, now=1.0)
    t.observe(2, 7, now=1.0)
    t.observe(1, 6, now=4.0)   # rank 1 keeps beating
    t.observe(2, 7, now=4.0)   # rank 2 stopped at 7
    assert t.silent(now=4.5, timeout_s=3.0) == [(2, 3.5)]
    assert HeartbeatTracker([3], now=0.0).silent(now=10.0, timeout_s=5.0) == [(3, 10.0)]


def test_process_id_alive_until_exit_or_zombie():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc = ProcessId(**{**ProcessId.mine().__dict__, "pid": p.pid,
                            "start": faults._start_ticks(p.pid)})
        assert proc.alive()
        assert not ProcessId(**{**proc.__dict__, "start": proc.start + 1}).alive()  # reused pid
        p.kill()
        time.sleep(0.5)          # not yet reaped: a zombie counts as gone
        assert not proc.alive()
    finally:
        p.kill()
        p.wait()
    assert not proc.alive()
    assert ProcessId.mine().same_kernel(ProcessId.mine())


def test_lost_round_trip_and_message():
    lost = Lost(3, "no heartbeat for 12 s")
    assert Lost.decode(lost.encode().encode()) == lost
    assert lost.message(0) == ("watchdog: rank 0: lost rank 3 (no heartbeat for 12 s); "
                               f"exiting with code {EXIT_LOST_RANK}")
    assert "lost torchrun's agent" in Lost(None, "x").message(1)


def test_start_validates_and_is_off_when_alone():
    with pytest.raises(ValueError, match="timeout_s"):
        faults.Watchdog.start(timeout_s=-1)
    with pytest.raises(ValueError, match="twice"):
        faults.Watchdog.start(timeout_s=1, interval_s=1,
                              env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": "1", "LOCAL_RANK": "0"})
    alone = {"RANK": "0", "WORLD_SIZE": "1"}
    for timeout_s, env in [(0, {**alone, "WORLD_SIZE": "2", "MASTER_ADDR": "h",
                                "MASTER_PORT": "1", "LOCAL_RANK": "0"}), (30, alone)]:
        with faults.Watchdog.start(timeout_s=timeout_s, env=env) as wd:
            wd.stop()


# ---- two processes -------------------------------------------------------------------------

# argv: mode, timeout_s. Modes: "collectives" (all-reduce in a loop), "idle" (no collectives),
# "raise" (all-reduce 5 times, then ValueError), "leave" (leave the watchdog after 1 s, exit 0),
# "linger" (idle 3 s after start, leave, exit 0), "progress" (all-reduce and report progress in
# a loop, as the trainer does), "fifo" (as "progress", then at step 20 "write a checkpoint" into
# the FIFO $FIFO that nobody reads: open() blocks in the kernel, the watchdog thread runs on).
WORKER = r"""
import os, sys, time
import torch, torch.distributed as dist
from tagmoe_dist import faults
from tagmoe_dist.launch import init_distributed

mode, timeout_s = sys.argv[1], float(sys.argv[2])
info = init_distributed("gloo", timeout_s=300)
t = torch.ones(1)
dist.all_reduce(t)
with faults.Watchdog.start(timeout_s=timeout_s, interval_s=0.2) as wd:
    print(f"rank {info.rank} ready, store {wd.store_name}", flush=True)
    t0 = time.time()
    for step in range(10 ** 9):
        if mode in ("collectives", "raise", "progress", "fifo"):
            dist.all_reduce(t)
        if mode in ("progress", "fifo"):
            wd.progress(f"step {step}")
        if mode == "fifo" and step == 20:
            wd.progress("writing checkpoint step_20")
            with open(os.environ["FIFO"], "wb") as f:
                f.write(b"weights")
        if mode == "raise" and step == 5:
            raise ValueError("boom on purpose")
        if mode == "leave" and time.time() - t0 > 1:
            break
        if mode == "linger" and time.time() - t0 > 3:
            break
        time.sleep(0.05)
print(f"rank {info.rank} left normally", flush=True)
"""


def _start(modes, timeout_s, tmp_path, **extra_env):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
    env.update(extra_env)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(len(modes)),
               LOCAL_WORLD_SIZE=str(len(modes)), OMP_NUM_THREADS="1")
    procs = []
    for rank, mode in enumerate(modes):
        out = open(tmp_path / f"rank{rank}.txt", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, mode, str(timeout_s)], cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    deadline = time.time() + 120
    while not all(f"rank {r} ready" in _log(tmp_path, r) for r in range(len(modes))):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            _kill(procs)
            pytest.fail("workers did not start:\n" + "\n".join(
                _log(tmp_path, r) for r in range(len(modes))))
        time.sleep(0.1)
    time.sleep(0.5)  # a few beats and collectives
    return procs


def _log(tmp_path, rank) -> str:
    path = tmp_path / f"rank{rank}.txt"
    return path.read_text(errors="replace") if path.exists() else ""


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _wait(p, timeout):
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0-store-host"])
def test_killed_rank_is_named_by_the_survivor(tmp_path, victim):
    procs = _start(["collectives", "collectives"], timeout_s=10, tmp_path=tmp_path)
    survivor = 1 - victim
    try:
        procs[victim].send_signal(signal.SIGKILL)
        t0 = time.time()
        rc = _wait(procs[survivor], timeout=30)
        took = time.time() - t0
    finally:
        _kill(procs)
    log = _log(tmp_path, survivor)
    assert rc == EXIT_LOST_RANK, f"rc {rc}:\n{log}"
    assert f"watchdog: rank {survivor}: lost rank {victim} (its process" in log, log
    assert took < 10, f"the survivor took {took:.1f} s"


def test_hung_rank_is_found_by_its_silent_heartbeat(tmp_path):
    """SIGSTOP: the process exists and its sockets stay open, so gloo would wait for the whole
    process-group timeout (300 s here); the heartbeat stops, and the peer exits after 2 s."""
    procs = _start(["collectives", "collectives"], timeout_s=2, tmp_path=tmp_path)
    try:
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        rc = _wait(procs[0], timeout=30)
        took = time.time() - t0
    finally:
        _kill(procs)
    log = _log(tmp_path, 0)
    assert rc == EXIT_LOST_RANK, f"rc {rc}:\n{log}"
    assert "watchdog: rank 0: lost rank 1 (no heartbeat for 2 s)" in log, log
    assert 1.5 <= took < 10, f"took {took:.1f} s"  # silent since the last beat before SIGSTOP


def test_failing_rank_is_named_with_its_error(tmp_path):
    procs = _start(["collectives", "raise"], timeout_s=10, tmp_path=tmp_path)
    try:
        rcs = [_wait(p, timeout=30) for p in procs]
    finally:
        _kill(procs)
    assert rcs == [EXIT_LOST_RANK, 1], f"{rcs}\n{_log(tmp_path, 0)}\n{_log(tmp_path, 1)}"
    assert "ValueError: boom on purpose" in _log(tmp_path, 1)
    assert ("watchdog: rank 0: lost rank 1 (it failed: ValueError: boom on purpose)"
            in _log(tmp_path, 0)), _log(tmp_path, 0)


def test_ranks_leaving_normally_are_not_reported(tmp_path):
    """Rank 0 (which hosts the store) leaves first; rank 1 keeps its watchdog running for 2 s
    more, with the store gone: neither exit is a fault."""
    procs = _start(["leave", "linger"], timeout_s=1, tmp_path=tmp_path)
    try:
        rcs = [_wait(p, timeout=30) for p in procs]
    finally:
        _kill(procs)
    logs = _log(tmp_path, 0) + _log(tmp_path, 1)
    assert rcs == [0, 0], logs
    assert "lost rank" not in logs and logs.count("left normally") == 2, logs


def test_rank_stuck_writing_a_checkpoint_is_named(tmp_path):
    """Rank 1 blocks in I/O (opening a FIFO nobody reads, as a checkpoint write to a hung file
    system would) while its watchdog thread keeps beating; rank 0 waits for it in an all-reduce.
    Rank 1's own progress check names it, with what it was doing, within the timeout."""
    fifo = tmp_path / "step_20.pt"
    os.mkfifo(fifo)
    procs = _start(["progress", "fifo"], timeout_s=3, tmp_path=tmp_path, FIFO=str(fifo))
    try:
        t0 = time.time()
        rcs = [_wait(p, timeout=30) for p in procs]
        took = time.time() - t0
    finally:
        _kill(procs)
    logs = [_log(tmp_path, r) for r in (0, 1)]
    assert rcs == [EXIT_LOST_RANK, EXIT_LOST_RANK], f"{rcs}\n{logs[0]}\n{logs[1]}"
    want = "lost rank 1 (no training progress for 3 s while writing checkpoint step_20; main thread"
    assert f"watchdog: rank 0: {want}" in logs[0], logs[0]
    assert "watchdog: rank 1: stuck (no training progress" in logs[1], logs[1]
    assert took < 15, f"took {took:.1f} s"


def _listening(port: int) -> set:
    """Local addresses (ip, as in /proc/net/tcp) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.add(ip)
    return found


def test_store_is_loopback_only_and_forged_verdicts_are_ignored(tmp_path):
    """Single machine: the watchdog's store listens on 127.0.0.1 only. A process that reaches it
    anyway (here: on this machine) and writes a "lost" verdict, "done" marks or a fake process
    announcement without the run's key does not stop the job or hide a rank."""
    import datetime
    import torch.distributed as dist
    procs = _start(["progress", "progress"], timeout_s=2, tmp_path=tmp_path)
    try:
        line = next(ln for ln in _log(tmp_path, 0).splitlines() if "ready, store" in ln)
        host, port = line.rsplit(" ", 1)[1].split(":")
        assert host == "127.0.0.1"
        assert _listening(int(port)) == {"0100007F"}, _listening(int(port))   # 127.0.0.1 only
        outsider = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=10))
        forged = Lost(1, "forged by an outsider").encode()
        outsider.set(f"{faults.PREFIX}lost", forged)
        outsider.append(f"{faults.PREFIX}lost", "\n" + faults.sign(b"guess", "x", forged) + "\n")
        for r in (0, 1):
            outsider.set(f"{faults.PREFIX}done/{r}", "1")
        time.sleep(3)                           # 15 watchdog intervals
        assert all(p.poll() is None for p in procs), [_log(tmp_path, r) for r in (0, 1)]
        # the forged "done" marks hide nothing: a killed rank is still reported
        procs[1].send_signal(signal.SIGKILL)
        rc = _wait(procs[0], timeout=30)
    finally:
        _kill(procs)
    log = _log(tmp_path, 0)
    assert rc == EXIT_LOST_RANK and "lost rank 1 (its process" in log, log
    assert "forged" not in log


def test_signed_values():
    key = b"k" * 32
    raw = faults.sign(key, "a", "payload")
    assert faults.verify(key, "a", raw) == "payload"
    assert faults.verify(key, "b", raw) is None                  # not replayable under another key
    assert faults.verify(b"x" * 32, "a", raw) is None
    assert faults.verify(key, "a", b"garbage") is None and faults.verify(key, "a", "[1, 2]") is None
