#!/usr/bin/env bash
# One prepared run of the throughput benchmarks on a GPU machine without network (see bench/README.md, "GPU").
#
# Needs, carried next to the repo (both are git-ignored):
#   .cache/gpu-bench   `python bench/_common.py stage-gpu`: qwen2.5-coder-0.5b config + tokenizer (weights are
#                      random there: throughput does not depend on their values) and the benchmark data (~18 MB)
#   .whl               wheels of what the machine's Python lacks for the training bench (datasets, dill,
#                      multiprocess; see bench/README.md)
# Writes hardware_limit.json, encode_throughput.json, train_throughput.json and log.txt to $OUT
# (default bench/results/gpu). Each step is time-boxed (570 s in all: run it with timeout_s=600); a failing
# step does not stop the next.
# DEVICE / DTYPE / THREADS / EXTRA_ENCODE / EXTRA_TRAIN override settings (a later flag wins), e.g. for a quick
# CPU rehearsal of this script.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
STAGE=${STAGE:-.cache/gpu-bench}
MODEL=${MODEL:-qwen2.5-coder-0.5b}
PEAK=${PEAK_TFLOPS:-989}          # dense bf16 peak of an H100 SXM / H200 (spec sheet)
OUT=${OUT:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
$PY -c 'import importlib.metadata as md, importlib.util as u
print({n: md.version(n) for n in ("torch", "transformers", "sentence-transformers", "peft", "accelerate",
       "pyarrow", "datasets") if u.find_spec(n.replace("-", "_"))})'

COMMON=(--model "$STAGE/$MODEL" --random-init --dtype "${DTYPE:-bfloat16}" --device "$DEVICE"
        --threads "${THREADS:-0}" --peak-tflops "$PEAK")
PARTS=${PARTS:-limit encode train}   # also: memory (bench/train_memory.py: batch 16/64/256, gradient cache, varlen)
part() { [[ " $PARTS " == *" $1 "* ]]; }
if part memory; then
  timeout ${MEMORY_TIMEOUT:-420} $PY bench/train_memory.py "${COMMON[@]}" --train-dir "$STAGE/train" \
    --batch-sizes ${MEMORY_BATCHES:-16 64 256} ${MEMORY_SETTINGS:+--settings $MEMORY_SETTINGS} --steps 3 --warmup 1 --budget-s ${MEMORY_BUDGET:-330} \
    --output "$OUT/train_memory.json" || echo "train_memory failed"
  timeout ${STSB_TIMEOUT:-120} $PY bench/train_memory.py "${COMMON[@]}" --train-dir "$STAGE/train" \
    --dataset stsb_pairs_en --num-hard-neg 0 --batch-sizes 64 --settings ours ours_varlen st_mnrl --steps 5 \
    --warmup 2 --budget-s 90 --output "$OUT/train_memory_stsb.json" || echo "train_memory stsb failed"
fi
part limit && { timeout 60 $PY bench/hardware_limit.py --device "$DEVICE" --seconds 2 --output "$OUT/hardware_limit.json" \
  || echo "hardware_limit failed"; }
part encode && { timeout 180 $PY bench/encode_throughput.py "${COMMON[@]}" --corpus "$STAGE/eval/scifact_mini/corpus.jsonl" \
  --docs 0 --rounds 3 --repeat 5 --output "$OUT/encode_throughput.json" ${EXTRA_ENCODE:-} || echo "encode_throughput failed"; }
part train && { timeout 330 $PY bench/train_throughput.py "${COMMON[@]}" --train-dir "$STAGE/train" --steps 10 --warmup 3 \
  --rounds 2 --output "$OUT/train_throughput.json" ${EXTRA_TRAIN:-} || echo "train_throughput failed"; }
