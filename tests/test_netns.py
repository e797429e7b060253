"""Ranks as separate hosts in Linux network namespaces (tagmoe_lab.netns).

These need root / CAP_NET_ADMIN and iproute2 (ensure_tools installs it with apt-get). Where
namespaces cannot be created the tests FAIL with the reason instead of skipping: the overlap
benchmark is meaningless without them, and a silently skipped test would hide that.
"""

import subprocess
import sys
import textwrap
import time

import pytest

from tagmoe_lab import netns

RATE_MBIT = 40
NBYTES = 1 << 20

GLOO_SCRIPT = textwrap.dedent("""
    import os, socket, time, json
    from datetime import timedelta
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    r = dist.get_rank()
    t = torch.full((4,), float(r + 1))
    dist.all_reduce(t)
    x = torch.zeros({nbytes} // 4)
    dist.barrier()
    t0 = time.perf_counter()
    if r == 0:
        dist.send(x, 1)
    else:
        dist.recv(x, 0)
    dt = time.perf_counter() - t0        # on the receiver: when the last byte arrived
    ifaces = sorted(n for _, n in socket.if_nameindex())
    print(json.dumps(dict(rank=r, sum=t.tolist(), seconds=dt, ifaces=ifaces,
                          master=os.environ["MASTER_ADDR"], ifname=os.environ["GLOO_SOCKET_IFNAME"])))
    dist.barrier()
    dist.destroy_process_group()
""")


def _require_netns():
    reason = netns.netns_support(install_tools=True)
    if reason is not None:
        pytest.fail(f"network namespaces cannot be created here: {reason}. The overlap "
                    "benchmark (tools/bench_overlap.py) needs them: run as root with iproute2.")


def _ours(cluster):
    return [n for n in netns.list_namespaces() if n.startswith(cluster.prefix)]


def test_namespaces_can_be_created():
    _require_netns()


def test_gloo_across_namespaces_over_a_rate_limited_link(tmp_path):
    _require_netns()
    import json
    script = tmp_path / "gloo_pair.py"
    script.write_text(GLOO_SCRIPT.format(nbytes=NBYTES))
    with netns.NetnsCluster(n=2, rate_mbit=RATE_MBIT, fallback=False) as c:
        assert c.isolated and c.fallback_reason is None
        assert len(_ours(c)) == 3                      # two hosts and the switch
        res = c.run([sys.executable, str(script)], env={"OMP_NUM_THREADS": "1"}, timeout=50)
        res.check()
        out = [json.loads(r.stdout.strip().splitlines()[-1]) for r in res.ranks]
    assert _ours(c) == []                              # cleaned up
    assert all(o["sum"] == [3.0] * 4 for o in out)     # 1 + 2 over gloo
    assert all(o["master"] == "10.200.0.1" and o["ifname"] == "eth0" for o in out)
    assert all(o["ifaces"] == ["eth0", "lo"] for o in out)   # nothing of the host's network
    # the receiver cannot get the bytes faster than the link allows; both tbf buckets may
    # start full, so allow two bursts
    burst = 2 * max(64 * 1024 + 1500, RATE_MBIT * 1e6 / 8 * 0.002)
    expected = (NBYTES - burst) * 8 / (RATE_MBIT * 1e6)
    assert out[1]["seconds"] >= expected, (out[1]["seconds"], expected)
    assert out[1]["seconds"] < 20 * NBYTES * 8 / (RATE_MBIT * 1e6)     # and the link works
    # the 10.200.0.0/24 addresses never appear in the caller's namespace
    assert "10.200." not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout


def test_failed_rank_is_reported_and_namespaces_removed():
    _require_netns()
    with pytest.raises(RuntimeError, match="rank 1: exit 3"):
        with netns.NetnsCluster(n=2, fallback=False) as c:
            t0 = time.monotonic()
            # rank 0 would wait 60 s; rank 1 fails at once; rank 0 is killed after fail_fast_s
            res = c.run([sys.executable, "-c",
                         "import os, sys, time; r = int(os.environ['RANK']); "
                         "time.sleep(60) if r == 0 else sys.exit(3)"], fail_fast_s=1.0, timeout=30)
            assert time.monotonic() - t0 < 20
            assert not res.ok and res[0].returncode != 0
            res.check()
    assert _ours(c) == []


def test_loopback_is_flagged():
    c = netns.NetnsCluster(n=2, loopback=True)
    with c:
        res = c.run(["sh", "-c", "echo $RANK $MASTER_ADDR $GLOO_SOCKET_IFNAME"], timeout=20).check()
    assert not res.isolated and "loopback" in res.fallback_reason
    assert [r.stdout.split() for r in res.ranks] == [["0", "127.0.0.1", "lo"], ["1", "127.0.0.1", "lo"]]


def test_unsupported_delay_is_an_error_not_a_silent_fallback():
    _require_netns()
    c = netns.NetnsCluster(n=1, rate_mbit=100, delay_ms=1.0, fallback=True)
    try:
        c.start()
    except netns.ShapingUnsupported as e:      # kernels without sch_netem
        assert "netem" in str(e)
        assert _ours(c) == []
    else:                                      # kernels with it: the delay is applied
        try:
            out = c.exec(0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
            assert "netem" in out and "tbf" in out
        finally:
            c.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="rate_mbit"):
        netns.NetnsCluster(n=2, rate_mbit=0)
    with pytest.raises(ValueError, match="n must be"):
        netns.NetnsCluster(n=0)
