#!/usr/bin/env bash
# One rank, same work, side by side: a QLoRA training step of the small preset (12 layers, hidden
# 768, vocab 32000; NF4 blocksize 64 + double quantization; LoRA r 8 on all seven linears; fp32
# compute; AdamW; batch 8 x 64 tokens; 2 threads) with qlora_dist (np 1, sharding full = no
# communication) and with transformers + bitsandbytes + peft (bench/e2e_reference.py, checkpointing on).
# Builds nothing. Usage: bench/run_train_step.sh [BUILD_DIR (build)] [STEPS (8)]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}; steps=${2:-8}
[[ $build = /* ]] || build=$root/$build
bin=$build/qlora_dist
py=${PYTHON:-$root/.venv/bin/python}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc --all) cpus, $(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" init-model --preset small --out "$tmp/small" >/dev/null
"$bin" quantize --model "$tmp/small" --out "$tmp/small.h5" --format h5 >/dev/null
"$bin" quantize --model "$tmp/small" --out "$tmp/q4" >/dev/null
"$bin" synth-data --out "$tmp/train.h5" --vocab 1000 --seq-len 64 --rows 400 >/dev/null
for compute in fp32 bf16; do
  rm -rf "$tmp/run"
  mpirun --bind-to none -np 1 "$bin" train --model.model_name_or_path="$tmp/small.h5" --data.train_file="$tmp/train.h5" \
    --data.cutoff_len=64 --train.per_device_train_batch_size=8 --train.max_steps=$((steps + 2)) \
    --train.do_eval=false --output.output_dir="$tmp/run" --output.logging_steps=1 \
    --finetuning.lora_rank=8 --finetuning.lora_alpha=16 --model.compute_dtype=$compute \
    >/dev/null 2>&1 </dev/null
  ours=$("$py" -c "
import json
m=[json.loads(l) for l in open('$tmp/run/metrics.jsonl')][2:]
print(sum(x['tokens_per_second'] for x in m)/len(m))")
  ref=$("$py" "$root/bench/e2e_reference.py" "$tmp/q4" "$tmp/train.h5" --steps "$steps" \
        --warmup 2 --batch 8 --seq 64 --compute $compute --checkpointing on 2>/dev/null | tail -1)
  "$py" - "$ours" "$ref" "$compute" <<'PY'
import json, sys
ours = float(sys.argv[1]); ref = json.loads(sys.argv[2])["tokens_per_second"]
print(f"{sys.argv[3]}: qlora_dist (np 1) {ours:6.0f} tokens/s, transformers + bitsandbytes + peft "
      f"{ref:6.0f} tokens/s: {ours / ref:.2f}x")
PY
done
