#!/usr/bin/env bash
# Stop the one-node cluster started by setup_slurm.sh: SIGTERM to the pids in its pid files,
# slurmd, then slurmctld, then munged (only if setup_slurm.sh started it). Idempotent.
set -uo pipefail

STATE="${TAGMOE_SLURM_DIR:-/tmp/tagmoe-slurm}"
say() { echo "stop_slurm: $*"; }

stop_pidfile() {  # name pidfile
    local pid
    if [ ! -s "$2" ] || ! pid="$(cat "$2")" || ! kill -0 "$pid" 2>/dev/null; then
        say "$1 not running"; rm -f "$2"; return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "$1 (pid $pid) still alive after 10 s"; return 1; fi
    rm -f "$2"; say "stopped $1 (pid $pid)"
}

rc=0
stop_pidfile slurmd "$STATE/slurmd.pid" || rc=1
stop_pidfile slurmctld "$STATE/slurmctld.pid" || rc=1
if [ -e "$STATE/munged.ours" ]; then
    stop_pidfile munged /run/munge/munged.pid && rm -f "$STATE/munged.ours" || rc=1
else
    say "munged not started by setup_slurm.sh; left alone"
fi
exit $rc
