#!/usr/bin/env bash
# The embedded default: set-up, then a small multi-task TAG-MoE GPT trained on 2 local CPU
# processes with expert parallelism 2 (ZeRO-2), a few minutes. Extra arguments go to the trainer,
# e.g. `bash launchers/local.sh --set steps=100` or `--resume`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-configs/models/tiny_tag.yaml}"
DS_CONFIG="${DS_CONFIG:-configs/deepspeed/zero2.json}"
exec python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m tagmoe_dist.train --config "$CONFIG" --deepspeed_config "$DS_CONFIG" "$@"
