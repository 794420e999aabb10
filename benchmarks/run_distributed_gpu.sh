#!/usr/bin/env bash
# Several-GPU proof in steps that each fit a 10-minute window, from the repository root:
#   STEP=vram   benchmarks/vram_plan.py on every GPU (planner vs measured)
#   STEP=ddp    benchmarks/distributed.py --phase ddp (1/2/4 GPUs, 0.5B and 8B shapes, Python path)
#   STEP=zero3  benchmarks/distributed.py --phase zero3 (ZeRO-3 LoRA and full fine-tuning, 8B shape)
#   STEP=tests  the GPU tests (pytest -m gpu) of tests/train and tests/cli
# Models and data are built once under $WORK (default /tmp/ftk-bench) and reused by later steps.
# Results land in $OUT (default ./bench-out): <step>.json, <step>.log and, for failed runs, their logs.
#
#   STEP=ddp OUT=/some/dir bash benchmarks/run_distributed_gpu.sh
#   STEP=zero3 ONLY=zero3_full_8b_2gpu bash benchmarks/run_distributed_gpu.sh
set -u

STEP="${STEP:?set STEP to vram, ddp, zero3 or tests}"
OUT="${OUT:-$PWD/bench-out}"
WORK="${WORK:-/tmp/ftk-bench}"
LIMIT="${LIMIT:-560}"  # seconds before the step is stopped (what finished is already in its JSON)
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"

only=()
[ -n "${ONLY:-}" ] && only=(--only "$ONLY")
case "$STEP" in
  vram)
    timeout "$LIMIT" "$PY" benchmarks/vram_plan.py --work "$WORK" --out "$OUT/vram.json" "${only[@]}" >"$OUT/vram.log" 2>&1
    ;;
  ddp | zero3)
    timeout "$LIMIT" "$PY" benchmarks/distributed.py --phase "$STEP" --work "$WORK" --out "$OUT/$STEP.json" \
      "${only[@]}" >"$OUT/$STEP.log" 2>&1
    ;;
  tests)
    timeout "$LIMIT" "$PY" -m pytest -q -m gpu tests/train tests/cli -p no:cacheprovider >"$OUT/tests.log" 2>&1
    ;;
  *)
    echo "unknown STEP=$STEP (vram, ddp, zero3 or tests)" >&2
    exit 2
    ;;
esac
code=$?
# the logs of runs that failed, for reading afterwards (a run's log is in $WORK/runs/<name>.log)
for log in "$WORK"/runs/*.log; do
  [ -f "$log" ] || continue
  grep -q "Training finished" "$log" || cp "$log" "$OUT/failed-$(basename "$log")"
done
tail -n 40 "$OUT/$STEP.log"
exit "$code"
