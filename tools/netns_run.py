#!/usr/bin/env python
"""Run a command as N ranks, each on its own "host" (Linux network namespace) joined by links
of a given bandwidth: a thin CLI over tagmoe_lab.netns.NetnsCluster (needs root; falls back to
loopback, and says so, where namespaces cannot be created).

    python tools/netns_run.py -n 2 --rate-mbit 300 -- python my_gloo_script.py --rank {rank}
    python tools/netns_run.py --check            # can namespaces be created here? why not?
    python tools/netns_run.py --cleanup-stale    # remove namespaces left by killed runs

Each rank gets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME. Output: every
rank's stdout/stderr prefixed with [rank], then one summary line; the exit code is 0 only if all
ranks succeeded (3 if --require-netns and namespaces were unavailable).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tagmoe_lab import netns  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--nprocs", type=int, default=2, help="ranks (hosts)")
    ap.add_argument("--rate-mbit", type=float, default=None, help="link bandwidth, Mbit/s (default unshaped)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (needs sch_netem)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--require-netns", action="store_true", help="fail instead of falling back to loopback")
    ap.add_argument("--check", action="store_true", help="only report whether namespaces work here")
    ap.add_argument("--cleanup-stale", action="store_true", help="delete namespaces of dead runs")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command (may use {rank}, {world_size}, ...)")
    a = ap.parse_args(argv)
    # SIGTERM -> SystemExit, so the `with` block below removes the namespaces
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.check:
        reason = netns.netns_support()
        print("network namespaces: OK" if reason is None else f"network namespaces: UNAVAILABLE ({reason})")
        return 0 if reason is None else 3
    if a.cleanup_stale:
        print("deleted:", netns.cleanup_stale() or "nothing")
        return 0
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give a command after --")
    try:
        with netns.NetnsCluster(a.nprocs, rate_mbit=a.rate_mbit, delay_ms=a.delay_ms,
                                fallback=not a.require_netns) as c:
            res = c.run(cmd, timeout=a.timeout)
    except netns.NetnsUnavailable as e:
        print(f"network namespaces unavailable: {e}", file=sys.stderr)
        return 3
    for r in res.ranks:
        for stream, text in (("out", r.stdout), ("err", r.stderr)):
            for line in text.splitlines():
                print(f"[{r.rank}{'' if stream == 'out' else ' err'}] {line}",
                      file=sys.stdout if stream == "out" else sys.stderr)
    where = ("namespaces, " + (f"{a.rate_mbit:g} Mbit/s links" if a.rate_mbit else "unshaped links")
             if res.isolated else f"LOOPBACK FALLBACK ({res.fallback_reason})")
    print(f"[netns_run] {a.nprocs} ranks on {where}: exit codes {[r.returncode for r in res.ranks]}"
          + (" (timed out)" if res.timed_out else ""))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
