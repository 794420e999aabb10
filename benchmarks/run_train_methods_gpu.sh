#!/usr/bin/env bash
# GPU check of the training methods, in one command from the repository root:
#   1. the GPU tests of tests/train (pytest -m gpu: test_gpu_methods.py, test_gpu.py),
#   2. benchmarks/train_methods.py (QLoRA vs LoRA at 8B shape, DPO and full at 0.5B shape).
# Everything lands in $OUT (default ./bench-out): pytest.txt, junit.xml, train_methods.json,
# train_methods.log, summary.txt. The benchmark runs even when tests fail.
#
#   OUT=/some/dir bash benchmarks/run_train_methods_gpu.sh
#   TOTAL_BUDGET=540 TEST_TIMEOUT=150 BENCH_ARGS="--steps 20 --steps-8b 12" bash benchmarks/run_train_methods_gpu.sh
set -u

OUT="${OUT:-$PWD/bench-out}"
TOTAL_BUDGET="${TOTAL_BUDGET:-500}"  # seconds for everything; the benchmark gets what the tests leave
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"  # seconds for the GPU tests (typically ~1-2 minutes)
BENCH_ARGS="${BENCH_ARGS:-}"
BENCH_WORK="${BENCH_WORK:-/tmp/ftk-bench}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

t0=$(date +%s)
{
  echo "== environment $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF' 2>&1
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
for d in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "finetune-kit"):
    try:
        print(d, m.version(d))
    except m.PackageNotFoundError:
        print(d, "not installed")
EOF
  df -h /tmp 2>&1 | tail -1
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

echo "== GPU tests (timeout ${TEST_TIMEOUT}s)"
t1=$(date +%s)
timeout --kill-after=20 "$TEST_TIMEOUT" "$PY" -m pytest tests/train/test_gpu_methods.py tests/train/test_gpu.py \
  -m gpu -v -rA --durations=15 -p no:cacheprovider --junitxml="$OUT/junit.xml" > "$OUT/pytest.txt" 2>&1
test_rc=$?
t2=$(date +%s)
tail -n 40 "$OUT/pytest.txt"

BENCH_TIMEOUT="${BENCH_TIMEOUT:-$((TOTAL_BUDGET - (t2 - t0) - 20))}"
[ "$BENCH_TIMEOUT" -lt 120 ] && BENCH_TIMEOUT=120
echo "== benchmark (timeout ${BENCH_TIMEOUT}s)"
# SIGINT first: finetune_kit stops training at the end of the step (saving a checkpoint), the benchmark
# records what finished and exits; the JSON is also rewritten after each finished run
# shellcheck disable=SC2086
timeout --signal=INT --kill-after=45 "$BENCH_TIMEOUT" "$PY" benchmarks/train_methods.py \
  --work "$BENCH_WORK" --out "$OUT/train_methods.json" $BENCH_ARGS > "$OUT/train_methods.stdout" 2> "$OUT/train_methods.log"
bench_rc=$?
t3=$(date +%s)
tail -n 15 "$OUT/train_methods.log"

{
  echo "== summary"
  echo "tests:     rc=$test_rc ($((t2 - t1))s)  $(grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$OUT/pytest.txt" | tail -1)"
  echo "benchmark: rc=$bench_rc ($((t3 - t2))s of ${BENCH_TIMEOUT}s)  (124/130 = timed out; the JSON keeps what finished)"
  if [ -f "$OUT/train_methods.json" ]; then
    "$PY" - "$OUT/train_methods.json" <<'EOF' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
hw = r.get("hardware", {})
print(f"device: {hw.get('gpu_name', 'cpu')} x{hw.get('gpu_count', 0)}, driver {hw.get('driver')}, cuda {hw.get('torch_cuda')}")
for name, res in r.get("results", {}).items():
    for variant, v in res.items():
        if isinstance(v, dict) and ("tokens_per_s" in v or "skipped" in v or "error" in v):
            if "skipped" in v or "error" in v:
                why = v.get("skipped") or f"{v['error'].get('type')}: {v['error'].get('message', '')[:300]}"
                print(f"{name:18s} {variant:11s} {'skipped' if 'skipped' in v else 'ERROR'}: {why}")
                continue
            print(
                f"{name:18s} {variant:11s} {v.get('tokens_per_s')} tok/s, step {v.get('step_s_mean')}s, "
                f"peak {v.get('peak_allocated_gib')} GiB alloc / {v.get('peak_reserved_gib')} reserved, "
                f"load {v.get('load_s')}s, loss {v.get('loss_first')} -> {v.get('loss_last')}"
            )
    if "ratios" in res:
        print(f"{name:18s} ratios      {json.dumps(res['ratios'])}")
for name, err in r.get("errors", {}).items():
    print(f"ERROR {name}: {err.get('type')}: {err.get('message', '')[:300]}")
print(f"benchmark wall {r.get('wall_s')}s, finished_at {r.get('finished_at', 'not finished')}")
EOF
  else
    echo "no train_methods.json"
  fi
  echo "total: $(( $(date +%s) - t0 ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
} | tee "$OUT/summary.txt"
exit 0
