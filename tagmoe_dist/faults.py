"""Lost-rank watchdog: when a rank dies or hangs, the others exit within a bounded time, with a
message naming it, instead of waiting in a collective until the process-group timeout.

    tds.init_distributed()
    with faults.Watchdog.start(timeout_s=60):
        ...train...

Every rank runs a daemon thread that, every `interval_s`:
  1. bumps its own heartbeat counter in the rendezvous TCPStore (MASTER_ADDR:MASTER_PORT, through
     a connection of its own, so a main thread blocked in a store wait never delays a beat);
  2. reads the `lost` verdict key: set once by whichever rank first finds a lost rank, so one
     detection stops every rank within one interval;
  3. reads the counters of `fanout` ring neighbours (rank+1, rank+2, ...; O(world) store traffic in
     all): a counter unchanged for `timeout_s` means a hung or unreachable rank;
  4. checks the processes of ranks on this machine (same kernel boot and pid namespace, announced
     in the store at start): a vanished or zombie process means a dead rank, found at once.
A verdict is published, printed as "watchdog: rank R: lost rank L (why); exiting with code 75" and
the process ends with os._exit(EXIT_LOST_RANK): the launcher (torchrun, srun, mpirun, deepspeed)
then tears the job down. Leaving the `with` block normally marks the rank done (never reported).
Leaving it with an exception first looks for a lost rank (a collective failing because a peer
died names that peer, not "connection reset"); failing that, it publishes its own failure so the
peers exit at once naming it, then re-raises.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

EXIT_LOST_RANK = 75  # sysexits EX_TEMPFAIL: the job failed through no fault of this rank
PREFIX = "tagmoe_watchdog/"


# ---- pure parts ----------------------------------------------------------------------------

def watched_peers(rank: int, world: int, fanout: int) -> List[int]:
    """The ring neighbours whose heartbeat `rank` reads: every rank is read by `fanout` others."""
    return [(rank + k) % world for k in range(1, min(fanout, world - 1) + 1)]


def node_peers(rank: int, local_rank: int, local_world: int, world: int) -> List[int]:
    """Ranks presumably on this node (launchers number a node's ranks contiguously); only a hint,
    each one is confirmed through its ProcessId before its pid is trusted."""
    first = rank - local_rank
    return [r for r in range(max(first, 0), min(first + local_world, world)) if r != rank]


class HeartbeatTracker:
    """When each watched peer's counter last changed, on this process's monotonic clock (no clock
    agreement between hosts is needed). A peer never seen counts from the tracker's start."""

    def __init__(self, peers: Iterable[int], now: float):
        self.last: Dict[int, tuple] = {p: (None, now) for p in peers}

    def observe(self, peer: int, counter: int, now: float) -> None:
        if self.last[peer][0] != counter:
            self.last[peer] = (counter, now)

    def silent(self, now: float, timeout_s: float) -> List[tuple]:
        """(peer, seconds silent) for peers silent longer than timeout_s."""
        return [(p, now - t) for p, (_, t) in self.last.items() if now - t > timeout_s]


@dataclasses.dataclass(frozen=True)
class ProcessId:
    """Enough to tell, from another process, whether this process still exists: its pid means
    something only in the same kernel boot and pid namespace; `start` (clock ticks after boot)
    guards against a reused pid."""
    host: str
    kernel: str  # boot id + pid namespace
    pid: int
    start: int

    @classmethod
    def mine(cls) -> "ProcessId":
        return cls(socket.gethostname(), _kernel_id(), os.getpid(), _start_ticks(os.getpid()) or 0)

    def same_kernel(self, other: "ProcessId") -> bool:
        return bool(self.kernel) and self.kernel == other.kernel

    def alive(self) -> bool:
        """False once the process has exited (or is a zombie waiting for its parent)."""
        stat = _stat(self.pid)
        return stat is not None and stat[0] != "Z" and int(stat[19]) == self.start


def _kernel_id() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""  # no /proc: pid checks are off, heartbeats still work


def _stat(pid: int) -> Optional[List[str]]:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> Optional[int]:
    stat = _stat(pid)
    return int(stat[19]) if stat else None


@dataclasses.dataclass(frozen=True)
class Lost:
    rank: Optional[int]  # None: torchrun's agent, whose store the workers share
    reason: str

    def message(self, me: int) -> str:
        who = "torchrun's agent" if self.rank is None else f"rank {self.rank}"
        return (f"watchdog: rank {me}: lost {who} ({self.reason}); exiting with code "
                f"{EXIT_LOST_RANK}")

    def encode(self) -> str:
        return json.dumps([self.rank, self.reason])

    @classmethod
    def decode(cls, raw: bytes) -> "Lost":
        rank, reason = json.loads(raw)
        return cls(rank, reason)


# ---- the watchdog --------------------------------------------------------------------------

class Watchdog:
    """See the module docstring. `Watchdog.start(...)` after the default process group exists;
    use it as a context manager, or call `stop()` on the way out."""

    def __init__(self, store, rank: int, world: int, local_rank: int, local_world: int,
                 timeout_s: float, interval_s: float, fanout: int, store_owner: Optional[int],
                 store_name: str):
        self.store, self.rank, self.world = store, rank, world
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.store_owner, self.store_name = store_owner, store_name  # owner: None = agent
        self.me = ProcessId.mine()
        self.watched = watched_peers(rank, world, fanout)
        self.local = node_peers(rank, local_rank, local_world, world)
        self.procs: Dict[int, ProcessId] = {}  # local peers, once announced and confirmed
        self.done: set = set()  # peers that left normally
        # whose "done" marks to read: the watched, the local and the store's host
        self.followed = set(self.watched + self.local) - {rank}
        if store_owner is not None and store_owner != rank:
            self.followed.add(store_owner)
        self.store_failed_at: Optional[float] = None
        self.store_error = ""
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.tracker = HeartbeatTracker(self.watched, time.monotonic())
        self.thread: Optional[threading.Thread] = None

    @classmethod
    def start(cls, timeout_s: float = 60.0, interval_s: float = 1.0, fanout: int = 2,
              env: Optional[Mapping[str, str]] = None) -> "Watchdog":
        """Connect to the rendezvous store named by MASTER_ADDR / MASTER_PORT (exported by
        tagmoe_dist.launch.init_distributed and by torchrun), announce this process, start the
        thread. timeout_s <= 0 or a single process: a watchdog that does nothing."""
        import torch.distributed as dist
        from tagmoe_dist.launch import from_torchrun

        if timeout_s < 0 or interval_s <= 0 or fanout < 1:
            raise ValueError(f"watchdog timeout_s={timeout_s}, interval_s={interval_s}, "
                             f"fanout={fanout}: need timeout_s >= 0 (0: off), interval_s > 0, "
                             "fanout >= 1")
        env = os.environ if env is None else env
        info = from_torchrun(env)  # what init_distributed exported
        if timeout_s == 0 or info.world_size == 1:
            return _Off()
        if timeout_s < 2 * interval_s:
            raise ValueError(f"watchdog timeout_s={timeout_s} must be at least twice "
                             f"interval_s={interval_s}")
        # torchrun's workers share its agent's store (which outlives them); otherwise rank 0 hosts
        # the store inside its process group.
        owner = None if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
        name = f"{info.master_addr}:{info.master_port}"
        try:
            store = dist.TCPStore(info.master_addr, info.master_port, is_master=False,
                                  wait_for_workers=False, timeout=datetime.timedelta(
                                      seconds=max(5.0, 2 * interval_s)))
        except Exception as e:  # a bad endpoint is a setup error: say which and why
            raise RuntimeError(f"watchdog: cannot reach the rendezvous store at {name}: {e}; "
                               "start the watchdog after init_distributed") from e
        wd = cls(store, info.rank, info.world_size, info.local_rank, info.local_world_size,
                 timeout_s, interval_s, fanout, owner, name)
        store.set(f"{PREFIX}proc/{wd.rank}", json.dumps(dataclasses.asdict(wd.me)))
        wd.thread = threading.Thread(target=wd._run, name="tagmoe-watchdog", daemon=True)
        wd.thread.start()
        return wd

    # -- leaving ----------------------------------------------------------------------------

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None or (kind is SystemExit and exc.code in (0, None)):
            self.stop()
        else:
            self.fail(exc)
        return False

    def stop(self) -> None:
        """Leave normally: stop watching and mark this rank done, so no peer reports it."""
        self._halt()
        self._store_op(lambda s: s.set(f"{PREFIX}done/{self.rank}", "1"))
        if self.rank == self.store_owner and self.store_failed_at is None:
            # The store dies with this process: give the peers' threads one pass to read "done"
            # first, or they would take the vanished store for a lost rank.
            time.sleep(1.5 * self.interval_s)

    def fail(self, exc: BaseException) -> None:
        """Leave on an exception: exit naming a lost rank if one is found within a few
        intervals (the usual cause of a failed collective); otherwise publish this rank's own
        failure, so the peers exit at once, and return (the caller re-raises)."""
        self._halt()
        deadline = time.monotonic() + min(self.timeout_s, 3 * self.interval_s)
        while True:
            lost = self._published() or self._dead_local_peer()
            if lost is not None or time.monotonic() >= deadline:
                break
            time.sleep(self.interval_s / 4)
        if lost is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            self._exit(lost)
        summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        self._publish(Lost(self.rank, f"it failed: {summary}"))
        if self.rank == self.store_owner:
            time.sleep(1.5 * self.interval_s)  # as in stop(): let the peers read the verdict

    def _halt(self) -> None:
        self.stopping.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=2 * self.interval_s + 5)

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                lost = self.check(time.monotonic())
            except Exception as e:  # a bug here must not pass for a healthy job: say so
                os.write(2, f"watchdog: rank {self.rank}: internal error, watchdog off: "
                            f"{type(e).__name__}: {e}\n".encode())
                return
            if lost is not None and not self.stopping.is_set():
                self._publish(lost)
                self._exit(lost)

    def check(self, now: float) -> Optional[Lost]:
        """One pass of steps 1-4 of the module docstring; the verdict, or None."""
        self._store_op(lambda s: s.add(f"{PREFIX}beat/{self.rank}", 1))
        lost = self._published()
        if lost is not None:
            return lost
        for peer in self.watched:
            counter = self._store_op(lambda s: s.add(f"{PREFIX}beat/{peer}", 0))
            if counter is not None:
                self.tracker.observe(peer, counter, now)
        self._refresh_done(self.followed)
        for peer, silent_s in self.tracker.silent(now, self.timeout_s):
            if peer not in self.done and self.store_failed_at is None:
                return Lost(peer, f"no heartbeat for {silent_s:.0f} s")
        lost = self._dead_local_peer()
        if lost is not None:
            return lost
        if (self.store_failed_at is not None and now - self.store_failed_at > self.timeout_s
                and self.store_owner not in self.done):
            return Lost(self.store_owner, f"the store it hosts at {self.store_name} has been "
                        f"unreachable for {now - self.store_failed_at:.0f} s: {self.store_error}")
        return None

    def _dead_local_peer(self) -> Optional[Lost]:
        self._learn_local_procs()
        for peer, proc in self.procs.items():
            if peer in self.done or proc.alive():
                continue
            self._refresh_done([peer])  # it may have left normally just now
            if peer in self.done:
                continue
            return self._published() or Lost(
                peer, f"its process {proc.pid} on {proc.host} has exited")
        return None

    # -- store access: every failure is remembered, never raised ----------------------------

    def _store_op(self, op):
        if self.store_failed_at is not None or self.store_owner in self.done:
            return None  # a TCPStore client does not reconnect; a host that left takes it along
        try:
            with self.lock:
                return op(self.store)
        except Exception as e:  # connection closed / refused / timed out
            self.store_failed_at = time.monotonic()
            self.store_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            return None

    def _published(self) -> Optional[Lost]:
        key = f"{PREFIX}lost"
        if self._store_op(lambda s: s.check([key])):
            raw = self._store_op(lambda s: s.get(key))
            if raw is not None:
                found = Lost.decode(raw)
                return found if found.rank != self.rank else None
        return None

    def _publish(self, lost: Lost) -> None:
        # The first verdict wins; later ones (the same rank, seen by others) are dropped.
        self._store_op(lambda s: s.compare_set(f"{PREFIX}lost", "", lost.encode()))

    def _refresh_done(self, peers: Iterable[int]) -> None:
        for peer in set(peers) - self.done:
            if self._store_op(lambda s: s.check([f"{PREFIX}done/{peer}"])):
                self.done.add(peer)

    def _learn_local_procs(self) -> None:
        for peer in self.local:
            key = f"{PREFIX}proc/{peer}"
            if peer in self.procs or not self._store_op(lambda s: s.check([key])):
                continue
            raw = self._store_op(lambda s: s.get(key))
            if raw is not None:
                proc = ProcessId(**json.loads(raw))
                if proc.same_kernel(self.me):
                    self.procs[peer] = proc
                else:
                    self.local = [r for r in self.local if r != peer]  # another machine
                    if peer not in self.watched and peer != self.store_owner:
                        self.followed.discard(peer)

    def _exit(self, lost: Lost) -> None:
        # One unbuffered write, before os._exit; the leading newline ends a progress-bar line.
        sys.stderr.flush()
        os.write(2, ("\n" + lost.message(self.rank) + "\n").encode())
        os._exit(EXIT_LOST_RANK)


class _Off:
    """The watchdog when disabled or alone: the same interface, doing nothing."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        return False

    def stop(self) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass
