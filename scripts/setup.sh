#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch 2.13.0 (CPU build where that is
# what pip finds), DeepSpeed, Megatron-core, transformers, diffusers and this package (editable).
# Source it (`. scripts/setup.sh`) to get the environment in the current shell.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TAGMOE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.tagmoe-$(cat "$ROOT/setup.py" "$ROOT/scripts/setup.sh" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch==2.13.0 and tagmoe-dist[deepspeed,megatron,hf,diffusion,test] (a few minutes the first time)"
  pip install -q --disable-pip-version-check "torch==2.13.0" setuptools wheel ninja
  # DeepSpeed's setup imports torch: build it against the torch just installed, not a fresh one.
  pip install -q --disable-pip-version-check --no-build-isolation -e "$ROOT[deepspeed,megatron,hf,diffusion,test]"
  touch "$stamp"
fi
# Compiled code is loaded from this cache (DeepSpeed's JIT op, the native MoE kernel): keep it
# per user and private, never in the repository (often group-writable; see docs/reliability.md).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tagmoe_dist/torch_extensions}"
(umask 077 && mkdir -p "$TORCH_EXTENSIONS_DIR")
export TAGMOE_ROOT="$ROOT"
