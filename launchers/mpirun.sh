#!/usr/bin/env bash
# Training with Open MPI's mpirun: it starts NP processes and gives them OMPI_COMM_WORLD_RANK /
# SIZE / LOCAL_RANK; tagmoe_dist.launch reads those and, with mpi4py installed, broadcasts rank 0's
# host and a free port over MPI (so no MASTER_ADDR is needed, also across nodes). MPI carries no
# training traffic: torch.distributed (gloo on CPU, NCCL on GPU) does.
#
#   one node:  bash launchers/mpirun.sh --set steps=100
#   N nodes:   NP=16 HOSTFILE=hosts bash launchers/mpirun.sh ...   (hosts: "node0 slots=8" lines)
#
# When a process dies, mpirun kills the others and names the rank ("mpirun noticed that process
# rank 1 ... exited on signal 9"). Open MPI refuses to run as root without --allow-run-as-root,
# which is added when this script runs as root; more processes than cores need --oversubscribe.
set -euo pipefail

NP="${NP:-2}"                              # processes in total
HOSTFILE="${HOSTFILE:-}"                   # Open MPI hostfile; empty: this machine only
MPIRUN_ARGS="${MPIRUN_ARGS:-}"             # extra mpirun options, e.g. "--oversubscribe"
CONFIG="${CONFIG:-configs/models/tiny_tag.yaml}"
DS_CONFIG="${DS_CONFIG:-configs/deepspeed/zero2.json}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "mpirun.sh: $*" >&2; exit 1; }
# The project's virtual environment (scripts/setup.sh creates it); on a cluster every node needs
# it at the same path (a shared file system), or set TAGMOE_VENV.
VENV="${TAGMOE_VENV:-$ROOT/.venv}"
if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
elif ! python -c "import tagmoe_dist, deepspeed" 2>/dev/null; then
    die "no virtual environment at $VENV and this python cannot import tagmoe_dist + deepspeed; run '. scripts/setup.sh' once, or set TAGMOE_VENV"
fi
command -v mpirun >/dev/null || die "mpirun is not on PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)"
# Compiled code is loaded from this cache (DeepSpeed's JIT op, the native MoE kernel): keep it
# per user and private, never in the repository (often group-writable; see docs/reliability.md).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tagmoe_dist/torch_extensions}"
(umask 077 && mkdir -p "$TORCH_EXTENSIONS_DIR")
export PYTHONUNBUFFERED=1
cd "$ROOT"

# --bind-to none: Open MPI pins each rank to one core by default, which starves torch's threads.
# -x: export these variables to the ranks on other nodes too.
ARGS=(-np "$NP" --bind-to none -x PATH -x TORCH_EXTENSIONS_DIR -x PYTHONUNBUFFERED)
[ -n "${OMP_NUM_THREADS:-}" ] && ARGS+=(-x OMP_NUM_THREADS)
[ -n "$HOSTFILE" ] && ARGS+=(--hostfile "$HOSTFILE")
[ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec mpirun "${ARGS[@]}" $MPIRUN_ARGS \
    python -m tagmoe_dist.train --config "$CONFIG" --deepspeed_config "$DS_CONFIG" "$@"
