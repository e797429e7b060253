"""Lost-rank watchdog: when a rank dies or hangs, the others exit within a bounded time, with a
message naming it, instead of waiting in a collective until the process-group timeout.

    tds.init_distributed()
    with faults.Watchdog.start(timeout_s=60):
        ...train...

Every rank runs a daemon thread that, every `interval_s`:
  1. bumps its own heartbeat counter in the watchdog's TCPStore (through a connection of its own,
     so a main thread blocked in a store wait never delays a beat);
  2. reads the `lost` verdicts: appended by whichever rank first finds a lost rank, so one
     detection stops every rank within one interval;
  3. reads the counters of `fanout` ring neighbours (rank+1, rank+2, ...; O(world) store traffic in
     all): a counter unchanged for `timeout_s` means a hung (e.g. SIGSTOPped) or unreachable rank;
  4. checks the processes of ranks on this machine (same kernel boot and pid namespace, announced
     in the store at start): a vanished or zombie process means a dead rank, found at once;
  5. checks this rank's own training progress: the training loop calls `progress(what)` at every
     step and before every long phase (evaluation, a checkpoint write). When the last call is
     older than `timeout_s` and the main thread is not waiting in a collective (its Python stack
     holds no torch.distributed / DeepSpeed communication frame), the rank is stuck by itself,
     e.g. in I/O: it names itself, what it was doing and where its main thread is. Ranks waiting
     in a collective for it do not blame themselves; they read its verdict. Progress is tracked
     from the first `progress()` call, so start-up (JIT builds, loading) is watched for liveness
     only.
Store and trust: rank 0 hosts a TCPStore of the watchdog's own, listening on 127.0.0.1 when every
rank runs on this machine (on all interfaces otherwise), and shares its port and a random per-run
key with the others over the process group, never through the store. Every value that can stop
or calm the job (a verdict, a "done" mark, a process announcement) carries an HMAC under that
key; values failing it are ignored, so a process that can reach the store cannot stop the job
without a checkpoint or hide a lost rank. (Heartbeat counters are plain `add`s: forging them can
only delay the detection of a hung rank, which step 5 and the collective timeout still catch.)
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
import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

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


# Python frames of these files mean "this thread waits for the other ranks" (a collective).
_COMM_FILES = ("torch/distributed/distributed_c10d.py", "torch/distributed/c10d_logger.py",
               "torch/distributed/_functional_collectives", "deepspeed/comm/",
               "tagmoe_dist/dispatch/alltoall.py", "tagmoe_dist/dispatch/overlap.py")


def thread_state(frame) -> Tuple[bool, str]:
    """(waiting in a collective, innermost location) of a thread's Python stack (a frame from
    sys._current_frames()). A thread blocked in a system call (a write, an open of a FIFO) shows
    the Python line that made it."""
    waiting, where = False, ""
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if not where:
            short = name.split("site-packages/")[-1]
            where = f"{short}:{frame.f_lineno} in {frame.f_code.co_name}"
        waiting = waiting or any(m in name for m in _COMM_FILES)
        frame = frame.f_back
    return waiting, where


def _mac(key: bytes, name: str, payload: str) -> str:
    return hmac.new(key, f"{name}\0{payload}".encode(), hashlib.sha256).hexdigest()[:32]


def sign(key: bytes, name: str, payload: str) -> str:
    """A store value for key `name` that only holders of `key` can produce."""
    return json.dumps([payload, _mac(key, name, payload)])


def verify(key: bytes, name: str, raw) -> Optional[str]:
    """The payload of a value made by `sign(key, name, ...)`, or None for anything else."""
    try:
        payload, mac = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(payload, str) or not isinstance(mac, str):
        return None
    return payload if hmac.compare_digest(mac, _mac(key, name, payload)) else None


@dataclasses.dataclass(frozen=True)
class Lost:
    rank: Optional[int]  # None: torchrun's agent, whose store the workers share
    reason: str

    def message(self, me: int) -> str:
        who = "torchrun's agent" if self.rank is None else f"rank {self.rank}"
        what = "stuck" if self.rank == me else f"lost {who}"
        return f"watchdog: rank {me}: {what} ({self.reason}); exiting with code {EXIT_LOST_RANK}"

    def encode(self) -> str:
        return json.dumps([self.rank, self.reason])

    @classmethod
    def decode(cls, raw: bytes) -> "Lost":
        rank, reason = json.loads(raw)
        return cls(rank, reason)


def _serve(bind: str):
    """A TCPStore server listening on `bind` ("" = every interface) at a free port; returns
    ((server, socket), bind, port). TCPStore given a host still listens on every interface, hence
    the socket bound here and handed over."""
    import torch.distributed as dist
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = dist.TCPStore(bind or "0.0.0.0", port, is_master=True, wait_for_workers=False,
                           master_listen_fd=sock.fileno())
    return (server, sock), bind, port


# ---- the watchdog --------------------------------------------------------------------------

class Watchdog:
    """See the module docstring. `Watchdog.start(...)` after the default process group exists;
    use it as a context manager, or call `stop()` on the way out."""

    def __init__(self, store, rank: int, world: int, local_rank: int, local_world: int,
                 timeout_s: float, interval_s: float, fanout: int, store_owner: Optional[int],
                 store_name: str, key: bytes = b"", server=None):
        self.store, self.rank, self.world = store, rank, world
        self.key, self.server = key, server  # server: rank 0 keeps its store alive
        self.progress_at: Optional[Tuple[float, str]] = None  # (monotonic time, what) of the
        self.main_ident = threading.main_thread().ident       # main thread's last progress()
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
        """Collective over the default process group (every rank calls it): rank 0 starts the
        watchdog's store (loopback-only when all ranks share this machine) and a per-run key,
        both sent to the others over the process group; every rank connects, announces its
        process and starts the thread. timeout_s == 0 or a single process: a watchdog that does
        nothing. Rank numbering comes from the launcher's variables (tagmoe_dist.launch)."""
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
        if not dist.is_initialized():
            raise RuntimeError("watchdog: start it after init_distributed (it shares its store's "
                               "address and key over the default process group)")
        me = ProcessId.mine()
        machines: List[Optional[str]] = [None] * info.world_size
        dist.all_gather_object(machines, me.kernel or None)
        one_machine = None not in machines and len(set(machines)) == 1
        server, offer = None, [None]
        if info.rank == 0:
            server, host, port = _serve("127.0.0.1" if one_machine else "")
            offer = [("127.0.0.1" if one_machine else info.master_addr, port,
                      secrets.token_hex(32))]
        dist.broadcast_object_list(offer, src=0)
        host, port, key = offer[0]
        name = f"{host}:{port}"
        try:
            store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=max(5.0, 2 * interval_s)))
        except Exception as e:  # rank 0's host unreachable from here: say which and why
            raise RuntimeError(f"watchdog: cannot reach rank 0's watchdog store at {name}: {e}"
                               ) from e
        wd = cls(store, info.rank, info.world_size, info.local_rank, info.local_world_size,
                 timeout_s, interval_s, fanout, 0, name, bytes.fromhex(key), server)
        wd._set_signed(f"{PREFIX}proc/{wd.rank}", json.dumps(dataclasses.asdict(wd.me)))
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

    def progress(self, what: str) -> None:
        """Called by the training loop (main thread): it is alive and now doing `what` (e.g.
        "step 12", "writing checkpoint step_30"). No I/O: the watchdog thread reads it."""
        self.progress_at = (time.monotonic(), what)

    def stop(self) -> None:
        """Leave normally: stop watching and mark this rank done, so no peer reports it."""
        self._halt()
        self._set_signed(f"{PREFIX}done/{self.rank}", "1")
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
        lost = self._dead_local_peer() or self._stuck_myself(now)
        if lost is not None:
            return lost
        if (self.store_failed_at is not None and now - self.store_failed_at > self.timeout_s
                and self.store_owner not in self.done):
            return Lost(self.store_owner, f"the store it hosts at {self.store_name} has been "
                        f"unreachable for {now - self.store_failed_at:.0f} s: {self.store_error}")
        return None

    def _stuck_myself(self, now: float) -> Optional[Lost]:
        """Step 5: no progress() for timeout_s, and the main thread not in a collective."""
        if self.progress_at is None or now - self.progress_at[0] <= self.timeout_s:
            return None
        frame = sys._current_frames().get(self.main_ident)
        waiting, where = thread_state(frame)
        if waiting:
            return None                     # waiting for a peer: its own watchdog names it
        since, what = self.progress_at
        return Lost(self.rank, f"no training progress for {now - since:.0f} s while {what}; "
                               f"main thread at {where or 'an unknown place'}")

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

    def _set_signed(self, name: str, payload: str) -> None:
        self._store_op(lambda s: s.set(name, sign(self.key, name, payload)))

    def _get_signed(self, name: str) -> Optional[str]:
        """The signed payload at `name`; None when absent or not made with this run's key."""
        if not self._store_op(lambda s: s.check([name])):
            return None
        raw = self._store_op(lambda s: s.get(name))
        return None if raw is None else verify(self.key, name, raw)

    def _published(self) -> Optional[Lost]:
        """The first verdict signed with this run's key (one line each; others are skipped)."""
        key = f"{PREFIX}lost"
        if self._store_op(lambda s: s.check([key])):
            raw = self._store_op(lambda s: s.get(key))
            for line in (raw or b"").splitlines():
                payload = verify(self.key, key, line)
                if payload is not None:
                    found = Lost.decode(payload)
                    return found if found.rank != self.rank else None
        return None

    def _publish(self, lost: Lost) -> None:
        # Appended, so that nothing written before (by anyone) can block it; readers take the
        # first signed line, so every rank reports the same verdict.
        key = f"{PREFIX}lost"
        self._store_op(lambda s: s.append(key, sign(self.key, key, lost.encode()) + "\n"))

    def _refresh_done(self, peers: Iterable[int]) -> None:
        for peer in set(peers) - self.done:
            if self._get_signed(f"{PREFIX}done/{peer}") == "1":
                self.done.add(peer)

    def _learn_local_procs(self) -> None:
        for peer in self.local:
            if peer in self.procs:
                continue
            raw = self._get_signed(f"{PREFIX}proc/{peer}")
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

    def progress(self, what: str) -> None:
        pass

    def stop(self) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass
