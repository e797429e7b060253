#!/usr/bin/env bash
# Training with torchrun (torch.distributed.run): it starts NPROC_PER_NODE processes on this node
# and gives them RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, which tagmoe_dist.launch reads.
#
#   one node:  bash launchers/torchrun.sh --set steps=100
#   N nodes:   run the same line on every node, e.g. on each of 2 nodes:
#              NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=run42 \
#                  bash launchers/torchrun.sh --set log_dir=/shared/runs/run42
#
# Multi-node rendezvous (c10d): every node connects to RDZV_ENDPOINT, a host:port on one of the
# nodes (the first node to arrive hosts the store there), and the nodes agree on ranks; no node
# needs to be started first. RDZV_ID names the job: the same on every node, new for each job.
# On a single node (NNODES=1, no RDZV_ENDPOINT) --standalone picks a free local port instead.
# Extra arguments go to the trainer (`--resume`, `--set key=value ...`). When one process dies,
# torchrun stops the others and reports the failed rank and its exit code ("Root Cause").
set -euo pipefail

NNODES="${NNODES:-1}"                      # nodes in the job (or MIN:MAX for an elastic range)
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"      # processes per node: one per GPU, or CPU processes
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"         # host:port reachable from every node; empty: standalone
RDZV_ID="${RDZV_ID:-tagmoe}"               # job id shared by the nodes of one job
MAX_RESTARTS="${MAX_RESTARTS:-0}"          # torchrun restarts of the whole worker group on failure
CONFIG="${CONFIG:-configs/models/tiny_tag.yaml}"
DS_CONFIG="${DS_CONFIG:-configs/deepspeed/zero2.json}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "torchrun.sh: $*" >&2; exit 1; }
# The project's virtual environment (scripts/setup.sh creates it); on a cluster every node needs
# it at the same path (a shared file system), or set TAGMOE_VENV.
VENV="${TAGMOE_VENV:-$ROOT/.venv}"
if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
elif ! python -c "import tagmoe_dist, deepspeed" 2>/dev/null; then
    die "no virtual environment at $VENV and this python cannot import tagmoe_dist + deepspeed; run '. scripts/setup.sh' once, or set TAGMOE_VENV"
fi
# Compiled code is loaded from this cache (DeepSpeed's JIT op, the native MoE kernel): keep it
# per user and private, never in the repository (often group-writable; see docs/reliability.md).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tagmoe_dist/torch_extensions}"
(umask 077 && mkdir -p "$TORCH_EXTENSIONS_DIR")
cd "$ROOT"

if [ -n "$RDZV_ENDPOINT" ]; then
    RDZV=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
elif [ "$NNODES" = 1 ]; then
    RDZV=(--standalone)
else
    die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (a port on one node that all nodes reach)"
fi
exec python -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    "${RDZV[@]}" --max-restarts "$MAX_RESTARTS" \
    -m tagmoe_dist.train --config "$CONFIG" --deepspeed_config "$DS_CONFIG" "$@"
