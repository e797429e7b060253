#!/usr/bin/env bash
# Training with the `deepspeed` launcher and an MPI-style hostfile ("<host> slots=<processes>" per
# line). Its processes get RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_SIZE / MASTER_ADDR / MASTER_PORT
# and a --local_rank argument, which tagmoe_dist.launch and the trainer read.
#
#   one node:  bash launchers/deepspeed.sh --set steps=100       (hostfile: "localhost slots=2")
#   N nodes without ssh (default): run the same line on every node with its own NODE_RANK:
#              HOSTFILE=hosts MASTER_ADDR=node0 NODE_RANK=0 bash launchers/deepspeed.sh ...  (node0)
#              HOSTFILE=hosts MASTER_ADDR=node0 NODE_RANK=1 bash launchers/deepspeed.sh ...  (node1)
#   N nodes over ssh: SSH=1 HOSTFILE=hosts MASTER_ADDR=node0 bash launchers/deepspeed.sh ... on
#              node0 only; DeepSpeed starts the other nodes with pdsh (needs passwordless ssh).
#
# Notes for DeepSpeed 0.19: with a hostfile the launcher checks `ssh <first host>` unless --no_ssh
# is given, and --no_ssh needs --node_rank; without --master_addr it asks the first host for its
# address over ssh. A single-host hostfile then runs deepspeed.launcher.launch locally. When one
# process dies the launcher terminates the others and exits with the failed process's code.
set -euo pipefail

NPROC_PER_NODE="${NPROC_PER_NODE:-2}"      # slots of the default one-line localhost hostfile
HOSTFILE="${HOSTFILE:-}"                   # "<host> slots=<n>" lines; empty: localhost slots=NPROC_PER_NODE
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"    # rank 0's node, reachable from every node
MASTER_PORT="${MASTER_PORT:-29500}"        # a free TCP port on MASTER_ADDR
NODE_RANK="${NODE_RANK:-0}"                # this node's line in HOSTFILE, from 0 (SSH=0 only)
SSH="${SSH:-0}"                            # 1: start all nodes from here over pdsh/ssh
CONFIG="${CONFIG:-configs/models/tiny_tag.yaml}"
DS_CONFIG="${DS_CONFIG:-configs/deepspeed/zero2.json}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "deepspeed.sh: $*" >&2; exit 1; }
# The project's virtual environment (scripts/setup.sh creates it); on a cluster every node needs
# it at the same path (a shared file system), or set TAGMOE_VENV.
VENV="${TAGMOE_VENV:-$ROOT/.venv}"
if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
elif ! python -c "import tagmoe_dist, deepspeed" 2>/dev/null; then
    die "no virtual environment at $VENV and this python cannot import tagmoe_dist + deepspeed; run '. scripts/setup.sh' once, or set TAGMOE_VENV"
fi
command -v deepspeed >/dev/null || die "the deepspeed launcher is not on PATH (pip install deepspeed)"
# Compiled code is loaded from this cache (DeepSpeed's JIT op, the native MoE kernel): keep it
# per user and private, never in the repository (often group-writable; see docs/reliability.md).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tagmoe_dist/torch_extensions}"
(umask 077 && mkdir -p "$TORCH_EXTENSIONS_DIR")
cd "$ROOT"

if [ -z "$HOSTFILE" ]; then
    HOSTFILE="${TMPDIR:-/tmp}/tagmoe-localhost-slots$NPROC_PER_NODE.hostfile"
    echo "localhost slots=$NPROC_PER_NODE" >"$HOSTFILE"
fi
[ -s "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE is missing or empty"
if [ "$SSH" = 1 ]; then
    MODE=()
else
    MODE=(--no_ssh --node_rank "$NODE_RANK")
fi
exec deepspeed --hostfile "$HOSTFILE" "${MODE[@]}" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --module tagmoe_dist.train \
    --config "$CONFIG" --deepspeed_config "$DS_CONFIG" "$@"
