"""Run N ranks as separate "hosts" in Linux network namespaces, joined by shaped links.

Why: on one machine every rank talks over loopback at memory speed, so an all-to-all costs almost
nothing and no communication/computation overlap can be measured. Here each rank gets its own
network namespace and a veth link of a chosen bandwidth, so gloo's TCP traffic between ranks
behaves like traffic between hosts on a slow network.

Topology (nothing is added to the caller's own namespace; every name carries a unique prefix,
so parallel runs do not collide):

    ns <prefix>-h0: eth0 10.200.0.1/24 ==veth== p0 \
    ns <prefix>-h1: eth0 10.200.0.2/24 ==veth== p1 --- br0     (ns <prefix>-sw: the switch)
    ...                                            /

The 10.200.0.0/24 addresses exist only inside these namespaces: packets to them never leave the
veth pairs and bridge created here. Each link is shaped in both directions with `tbf` (a token
bucket) at `rate_mbit`: on the host's eth0 egress (upload) and on its switch port's egress
(download), i.e. a full-duplex NIC of that rate. `delay_ms` adds a one-way delay with `netem` on
the host's egress, where the kernel has sch_netem (CONFIG_NET_SCH_NETEM); where it does not,
asking for a delay raises ShapingUnsupported (no fallback: it would drop the shaping too).

Needs: root (or CAP_NET_ADMIN) and `ip` / `tc` from iproute2. `ensure_tools()` installs
iproute2 with apt-get when they are missing (Debian/Ubuntu, as root). Where namespaces cannot be
created, `NetnsCluster(fallback=True)` runs the ranks on loopback instead, without shaping, and
says so: `cluster.isolated` is False and `cluster.fallback_reason` gives the reason (also printed
to stderr and returned in every `ClusterResult`).

    with NetnsCluster(n=2, rate_mbit=300) as c:
        res = c.run([sys.executable, "train.py"], env={"OMP_NUM_THREADS": "1"})
        res.check()                     # raises with each failed rank's stderr tail
        print(res.isolated, res[0].stdout)

Each rank's process gets RANK, WORLD_SIZE, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR (rank 0's
namespace address), MASTER_PORT and GLOO_SOCKET_IFNAME (the veth inside its namespace), so
`torch.distributed.init_process_group("gloo")` works unchanged. Arguments of the command may use
{rank}, {world_size}, {master_addr}, {master_port}. Namespaces are removed on `close()` / context
exit (also after an exception) and at interpreter exit; processes still running are killed by
their process group (each rank is started in a new session).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from tagmoe_dist.ports import free_port

PREFIX = "tmoe"
SUBNET = "10.200.0"          # /24, inside the namespaces only
HOST_IF = "eth0"             # the veth end inside each host namespace
CAP_NET_ADMIN = 12


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be set up on this machine; the message says why."""


class ShapingUnsupported(NetnsUnavailable):
    """Namespaces work but the link shaping asked for does not (e.g. a delay without sch_netem).
    Never answered by the loopback fallback: that would silently drop the shaping too."""


# ---------------------------------------------------------------------------------- tools
def ensure_tools(install: bool = True) -> Dict[str, str]:
    """Paths of `ip` and `tc`; installs iproute2 with apt-get if they are missing and `install`.

    Raises NetnsUnavailable when they are missing and cannot be installed (not root, no apt-get).
    """
    def find():
        return {t: shutil.which(t) or next((p for p in (f"/usr/sbin/{t}", f"/sbin/{t}")
                                            if os.access(p, os.X_OK)), None) for t in ("ip", "tc")}
    paths = find()
    if all(paths.values()):
        return paths
    missing = [t for t, p in paths.items() if not p]
    if not install:
        raise NetnsUnavailable(f"{missing} not found (package iproute2); call ensure_tools(install=True)"
                               " as root or `apt-get install iproute2`")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise NetnsUnavailable(f"{missing} not found and cannot install iproute2 (needs root and "
                               "apt-get); install it with your package manager")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "iproute2"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise NetnsUnavailable(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-500:]}")
    paths = find()
    if not all(paths.values()):
        raise NetnsUnavailable(f"iproute2 installed but {[t for t, p in paths.items() if not p]} "
                               "still not found on PATH")
    return paths


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def netns_support(install_tools: bool = True) -> Optional[str]:
    """None if namespaces can be created here, else the reason they cannot."""
    if sys.platform != "linux":
        return f"network namespaces are Linux-only (platform {sys.platform})"
    if not _has_cap_net_admin():
        return "no CAP_NET_ADMIN (run as root, or grant the capability)"
    try:
        ensure_tools(install=install_tools)
    except NetnsUnavailable as e:
        return str(e)
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def list_namespaces(prefix: str = PREFIX) -> List[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def cleanup_stale(prefix: str = PREFIX) -> List[str]:
    """Delete namespaces left by a killed run of this module (its creator pid no longer exists).
    Only names of the form <prefix>-<pid>-<hex>-<role> are touched. Returns the names deleted."""
    gone = []
    for name in list_namespaces(prefix):
        parts = name.split("-")
        if len(parts) < 4 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue                      # creator still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        gone.append(name)
    return gone


# ---------------------------------------------------------------------------------- results
@dataclasses.dataclass
class RankResult:
    rank: int
    returncode: Optional[int]     # negative: killed by that signal (timeout or a failed peer)
    stdout: str
    stderr: str
    seconds: float


@dataclasses.dataclass
class ClusterResult:
    ranks: List[RankResult]
    isolated: bool                      # True: ran in namespaces over shaped links
    fallback_reason: Optional[str]      # why not, when isolated is False
    timed_out: bool = False

    def __getitem__(self, rank: int) -> RankResult:
        return self.ranks[rank]

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(r.returncode == 0 for r in self.ranks)

    def check(self) -> "ClusterResult":
        if not self.ok:
            lines = [f"rank {r.rank}: exit {r.returncode} after {r.seconds:.1f}s\n"
                     f"{r.stderr[-2000:]}" for r in self.ranks if r.returncode != 0]
            raise RuntimeError(("timed out; " if self.timed_out else "") + "ranks failed:\n" +
                               "\n".join(lines))
        return self


def _run(cmd: Sequence[str]) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")


# ---------------------------------------------------------------------------------- the cluster
class NetnsCluster:
    """N hosts in namespaces on one bridge, each link shaped to `rate_mbit` (None: unshaped)
    with an optional one-way `delay_ms`. See the module docstring.

    fallback: where namespaces cannot be created, run on loopback (flagged) instead of raising
    NetnsUnavailable. loopback: do not try namespaces at all (a smoke run; also flagged).
    """

    def __init__(self, n: int = 2, rate_mbit: Optional[float] = None, delay_ms: float = 0.0,
                 subnet: str = SUBNET, mtu: int = 1500, burst_bytes: Optional[int] = None,
                 queue_bytes: Optional[int] = None,
                 fallback: bool = True, install_tools: bool = True, loopback: bool = False):
        if not isinstance(n, int) or not 1 <= n <= 250:
            raise ValueError(f"NetnsCluster n must be an integer in [1, 250], got {n!r}")
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError(f"NetnsCluster rate_mbit must be > 0 or None (unshaped), got {rate_mbit!r}")
        if delay_ms < 0:
            raise ValueError(f"NetnsCluster delay_ms must be >= 0, got {delay_ms!r}")
        self.n, self.rate_mbit, self.delay_ms, self.subnet, self.mtu = n, rate_mbit, delay_ms, subnet, mtu
        self.burst_bytes, self.queue_bytes = burst_bytes, queue_bytes
        self.fallback, self.install_tools, self.loopback = fallback, install_tools, loopback
        self.prefix = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(n)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(n)]
        self.isolated = False
        self.fallback_reason: Optional[str] = None
        self._created: List[str] = []
        self._started = False
        self._procs: List[subprocess.Popen] = []

    # ------------------------------------------------------------------ set-up / tear-down
    @property
    def master_addr(self) -> str:
        return self.addresses[0] if self.isolated else "127.0.0.1"

    @property
    def ifname(self) -> str:
        return HOST_IF if self.isolated else "lo"

    def start(self) -> "NetnsCluster":
        if self._started:
            return self
        self._started = True
        atexit.register(self.close)
        reason = "loopback=True asked for" if self.loopback else netns_support(self.install_tools)
        if reason is None:
            try:
                self._build()
                self.isolated = True
                return self
            except ShapingUnsupported:
                self._teardown()
                raise
            except NetnsUnavailable as e:
                self._teardown()
                reason = str(e)
        if not self.fallback and not self.loopback:
            raise NetnsUnavailable(reason)
        self.fallback_reason = reason
        print(f"[netns] namespaces unavailable ({reason}); FALLING BACK to loopback: ranks share "
              "one network stack, no bandwidth limit or delay", file=sys.stderr, flush=True)
        return self

    def _tbf(self, ns: str, dev: str, parent: Sequence[str]) -> None:
        rate_Bps = self.rate_mbit * 1e6 / 8
        # burst: >= one GSO super-packet (64 KiB) so veth's large segments pass, and ~2 ms of
        # traffic so the token refill timer does not throttle below the rate; queue ~100 ms.
        burst = self.burst_bytes or int(max(64 * 1024 + self.mtu, rate_Bps * 0.002))
        limit = self.queue_bytes or int(max(4 * burst, rate_Bps * 0.1))
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "tbf",
              "rate", f"{self.rate_mbit:g}mbit", "burst", str(burst), "limit", str(limit)])

    def _build(self) -> None:
        # 1. the switch namespace with a bridge
        for ns in [self.switch] + self.hosts:
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        # 2. one veth pair per host: eth0 in the host, p<i> on the bridge (created in place,
        #    never visible in the caller's namespace); no IPv6 link-local addresses, so gloo's
        #    interface lookup finds the IPv4 address
        for i, (ns, addr) in enumerate(zip(self.hosts, self.addresses)):
            port = f"p{i}"
            _run(["ip", "-n", ns, "link", "add", HOST_IF, "mtu", str(self.mtu), "type", "veth",
                  "peer", "name", port, "netns", self.switch])
            _run(["ip", "-n", ns, "link", "set", HOST_IF, "addrgenmode", "none"])
            _run(["ip", "-n", self.switch, "link", "set", port, "addrgenmode", "none"])
            _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", self.switch, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", HOST_IF])
            _run(["ip", "-n", ns, "link", "set", HOST_IF, "up"])
            # 3. shaping: upload on the host side (after the delay), download on the switch port
            if self.delay_ms > 0:
                try:
                    _run(["tc", "-n", ns, "qdisc", "add", "dev", HOST_IF, "root", "handle", "1:",
                          "netem", "delay", f"{self.delay_ms:g}ms", "limit", "100000"])
                except NetnsUnavailable as e:
                    raise ShapingUnsupported(
                        f"delay_ms={self.delay_ms} needs the netem qdisc, which this kernel lacks "
                        f"(CONFIG_NET_SCH_NETEM); use delay_ms=0 ({e})") from None
                if self.rate_mbit:
                    self._tbf(ns, HOST_IF, ["parent", "1:1", "handle", "10:"])
            elif self.rate_mbit:
                self._tbf(ns, HOST_IF, ["root"])
            if self.rate_mbit:
                self._tbf(self.switch, port, ["root"])

    def _teardown(self) -> None:
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created = []

    def close(self) -> None:
        for p in self._procs:
            _kill(p)
        self._procs = []
        self._teardown()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def __enter__(self) -> "NetnsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ running
    def prefix_cmd(self, rank: int) -> List[str]:
        """What to put before a command to run it on host `rank` (empty on loopback)."""
        return ["ip", "netns", "exec", self.hosts[rank]] if self.isolated else []

    def exec(self, rank: int, cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run one short command on host `rank` and wait (e.g. `ip addr`, a ping)."""
        self.start()
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.prefix_cmd(rank) + list(cmd), **kw)

    def run(self, cmd: Union[Sequence[str], Callable[[int], Sequence[str]]],
            env: Optional[Mapping[str, str]] = None, timeout: float = 600.0,
            master_port: Optional[int] = None, cwd: Optional[str] = None,
            fail_fast_s: float = 20.0) -> ClusterResult:
        """Start one process per host and wait for all of them.

        cmd: an argv list (its strings may use {rank}, {world_size}, {master_addr},
        {master_port}) or a function rank -> argv. If a rank fails, the others get `fail_fast_s`
        to finish before they are killed (a peer waiting in a collective would hang until its
        timeout otherwise). After `timeout` seconds all are killed and `timed_out` is set.
        """
        self.start()
        port = master_port or (29500 + secrets.randbelow(20000) if self.isolated else free_port("127.0.0.1"))
        fields = dict(world_size=self.n, master_addr=self.master_addr, master_port=port)
        outs = []
        self._procs = []
        t0 = time.monotonic()
        for r in range(self.n):
            argv = cmd(r) if callable(cmd) else [_fill(str(a), dict(fields, rank=r)) for a in cmd]
            e = dict(os.environ)
            e.update(env or {})
            e.update(RANK=str(r), WORLD_SIZE=str(self.n), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR=self.master_addr, MASTER_PORT=str(port),
                     GLOO_SOCKET_IFNAME=self.ifname)
            o, er = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            outs.append((o, er))
            self._procs.append(subprocess.Popen(self.prefix_cmd(r) + list(argv), env=e, cwd=cwd,
                                                stdout=o, stderr=er, start_new_session=True))
        ends: Dict[int, float] = {}
        timed_out, first_fail = False, None
        while len(ends) < self.n:
            now = time.monotonic()
            for r, p in enumerate(self._procs):
                if r not in ends and p.poll() is not None:
                    ends[r] = now - t0
                    if p.returncode != 0 and first_fail is None:
                        first_fail = now
            if len(ends) == self.n:
                break
            if now - t0 > timeout or (first_fail is not None and now - first_fail > fail_fast_s):
                timed_out = now - t0 > timeout
                for r, p in enumerate(self._procs):
                    if r not in ends:
                        _kill(p)
                        ends[r] = now - t0
                break
            time.sleep(0.02)
        results = []
        for r, (p, (o, er)) in enumerate(zip(self._procs, outs)):
            o.seek(0)
            er.seek(0)
            results.append(RankResult(r, p.returncode, o.read(), er.read(), ends[r]))
            o.close()
            er.close()
        self._procs = []
        return ClusterResult(results, self.isolated, self.fallback_reason, timed_out)


def _fill(arg: str, fields: Mapping[str, object]) -> str:
    """Replace {name} for the known names only (other braces, e.g. JSON, pass through)."""
    for k, v in fields.items():
        arg = arg.replace("{" + k + "}", str(v))
    return arg


def _kill(p: subprocess.Popen) -> None:
    """Kill a rank we started, with its children (it leads its own process group)."""
    if p.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            continue
