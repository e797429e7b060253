#!/usr/bin/env bash
# Idempotent bring-up of a real one-node SLURM cluster (recipe: /work/shared/CLUSTER.md).
#   1. apt-get install slurm-wlm munge, only if missing (needs root).
#   2. Start munged unless `munge -n | unmunge` already works.
#   3. Write slurm.conf into $TAGMOE_SLURM_DIR (default /tmp/tagmoe-slurm); start slurmctld and
#      slurmd unless their pid files name live processes.
#   4. Wait (bounded, $TAGMOE_SLURM_WAIT_S, default 60 s) until `sinfo` shows the node idle.
# Clients need the config too:  export SLURM_CONF=$TAGMOE_SLURM_DIR/slurm.conf
# Stop with tests/cluster/stop_slurm.sh.
set -euo pipefail

STATE="${TAGMOE_SLURM_DIR:-/tmp/tagmoe-slurm}"
WAIT_S="${TAGMOE_SLURM_WAIT_S:-60}"
HOST="$(hostname -s)"
# Every CPU of the machine: `nproc` alone obeys OMP_NUM_THREADS (often exported as 1 on
# clusters), which would make a 1-CPU node on which 2-task jobs pend forever.
CPUS="$(nproc --all)"
export SLURM_CONF="$STATE/slurm.conf"
say() { echo "setup_slurm: $*"; }
die() { echo "setup_slurm: FAILED: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# 1. packages
missing=()
for p in slurm-wlm munge; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then
    say "apt packages already installed: slurm-wlm munge"
else
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    log=/tmp/tagmoe-apt-slurm.log
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        apt-get update >>"$log" 2>&1
        apt-get install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1 \
            || die "apt-get install ${missing[*]} failed, see $log"
    fi
fi

# 2. munge
mkdir -p "$STATE/state" "$STATE/spool"
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$STATE/munged.ours"   # stop_slurm.sh stops munged only if we started it
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munge -n | unmunge fails after starting munged"
    say "started munged (pid $(cat /run/munge/munged.pid 2>/dev/null || echo '?'))"
fi

# 3. config + daemons
cat >"$STATE/slurm.conf.new" <<CONF
ClusterName=tagmoe
SlurmctldHost=${HOST}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# sbatch --wait polls at 2 s, then 4x longer (10 s, 42 s, ...) unless 2 s >= MinJobAge/2:
# keep job records briefly so short test jobs are noticed within 2 s.
MinJobAge=4
# Refuse at submission a job the partition can never run (more CPUs than the node has) instead
# of leaving it PENDING with Reason=PartitionConfig forever.
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
    cmp -s "$STATE/slurm.conf.new" "$SLURM_CONF" \
        || say "WARNING: daemons running with an older slurm.conf; run stop_slurm.sh to apply"
    rm -f "$STATE/slurm.conf.new"
    say "slurmctld and slurmd already running"
else
    mv "$STATE/slurm.conf.new" "$SLURM_CONF"
    alive "$STATE/slurmctld.pid" || { slurmctld -f "$SLURM_CONF" || die "slurmctld failed, see $STATE/slurmctld.log"; say "started slurmctld"; }
    alive "$STATE/slurmd.pid" || { slurmd -f "$SLURM_CONF" || die "slurmd failed, see $STATE/slurmd.log"; say "started slurmd"; }
fi

# 4. wait for the node
state=""
for _ in $(seq $((WAIT_S * 5))); do
    state="$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1 || true)"
    case "$state" in idle|mixed|allocated) break ;; esac
    sleep 0.2
done
case "$state" in
    idle|mixed|allocated) ;;
    *) tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 2>/dev/null || true
       die "node $HOST not idle after ${WAIT_S}s (sinfo state: '${state:-no answer}')" ;;
esac
srun --mpi=list 2>&1 | grep -q pmix || say "WARNING: srun --mpi=list shows no pmix plugin; MPI jobs need it"
say "ok: node $HOST $state; export SLURM_CONF=$SLURM_CONF"
