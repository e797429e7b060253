#!/usr/bin/env bash
# The GPU validation, one command, on a machine with CUDA GPUs:
#
#   bash tests/gpu/run.sh [--out DIR]          # exits 2 with a message where torch sees no CUDA GPU
#   bash tests/gpu/run.sh --cpu-smoke          # the same scripts on CPU (gloo, tiny shapes)
#
# 1. Correctness, NCCL: the layer at EP = 1 on one GPU, EP = 2 and 4 when there are that many GPUs
#    (torchrun), against a float64 CPU reference, fp32 and bf16, both GPU kernels
#    (tests/gpu/check_layer.py).
# 2. Device hygiene on CUDA: forward + backward under torch.cuda.set_sync_debug_mode("error")
#    at EP = 1 (at EP > 1 only the token-count exchange may sync) (tests/gpu/check_hygiene.py).
# 3. Megatron-core GPTModel with our spec against Megatron's own MoELayer, one GPU
#    (tests/gpu/test_megatron_gpu.py).
# 4. Speed and memory of one layer, bf16, against Megatron-core's MoELayer, DeepSpeed AutoEP's layer
#    and Hugging Face's Mixtral block at three shapes (tools/bench_gpu.py; extra arguments in
#    TAGMOE_GPU_BENCH_ARGS).
# Every step runs even if an earlier one failed; logs and JSON reports go to --out (default: a new
# temporary directory). Exit status: 0 if every step passed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
SMOKE=""
OUT=""
while (($#)); do
  case "$1" in
    --cpu-smoke) SMOKE="--cpu-smoke" ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "tests/gpu/run.sh: unknown argument '$1' (use --cpu-smoke or --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "$SMOKE" ]]; then
  NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
  if [[ "$NGPU" -lt 1 ]]; then
    echo "tests/gpu/run.sh: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)." >&2
    echo "Run it on a machine with CUDA GPUs; 'bash tests/gpu/run.sh --cpu-smoke' checks the scripts on CPU." >&2
    exit 2
  fi
  EP_SIZES="1"
  [[ "$NGPU" -ge 2 ]] && EP_SIZES="1 2"
  [[ "$NGPU" -ge 4 ]] && EP_SIZES="1 2 4"
else
  NGPU=0
  EP_SIZES="1 2"
fi

if [[ -z "$OUT" ]]; then
  OUT="$(mktemp -d "${TMPDIR:-/tmp}/tagmoe-gpu.XXXXXX")"
elif [[ -e "$OUT" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then
  echo "tests/gpu/run.sh: --out $OUT exists and is not empty; give a new or empty directory" >&2
  exit 2
fi
mkdir -p "$OUT"
echo "tests/gpu/run.sh: ${NGPU} GPU(s), EP sizes: ${EP_SIZES}${SMOKE:+ (CPU smoke)}; logs in $OUT"

failed=()
step() {   # step NAME COMMAND...: run, keep the log and the last JSON line it printed
  local name="$1"; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "  ok      $name ($((SECONDS - t0)) s)"
  else
    echo "  FAILED  $name ($((SECONDS - t0)) s): see $OUT/$name.log"
    grep -E '^\{' "$OUT/$name.log" | tail -1 | cut -c1-600
    grep -vE '^\{|^\|' "$OUT/$name.log" | tail -3
    failed+=("$name")
  fi
  grep -E '^\{' "$OUT/$name.log" | tail -1 >"$OUT/$name.json" || true
}

for ep in $EP_SIZES; do
  step "layer_ep$ep" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$ep" \
    tests/gpu/check_layer.py $SMOKE
done
for ep in $EP_SIZES; do
  step "hygiene_ep$ep" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$ep" \
    tests/gpu/check_hygiene.py $SMOKE
done
step megatron_parity "$PY" tests/gpu/test_megatron_gpu.py $SMOKE
# shellcheck disable=SC2086
step bench "$PY" tools/bench_gpu.py $SMOKE --json "$OUT/bench.json" ${TAGMOE_GPU_BENCH_ARGS:-}

echo
grep -E '^\|' "$OUT/bench.log" || true
echo
if ((${#failed[@]})); then
  echo "tests/gpu/run.sh: FAILED: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "tests/gpu/run.sh: all steps passed (reports in $OUT)"
