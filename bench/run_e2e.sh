#!/usr/bin/env bash
# End to end, side by side, one rank: QLoRA training of a real model with qlora_dist (np 1) and
# with transformers + bitsandbytes + peft (bench/e2e_reference.py), the same token rows, batch 4,
# LoRA r 8 / alpha 16 on all seven linears, AdamW, clipping 1.0, 2 threads, interleaved runs
# (ours first in odd pairs, theirs first in even ones). For each model x sequence x dtype x
# checkpointing it prints tokens/s (of the median timed step: steps vary by up to 1.4x on this
# shared VM), peak RSS, our achieved GFLOP/s (4 x linear params per token:
# forward and input-gradient products, what a step must do; the recompute is not counted) beside
# the GEMM peak torch measures for the block's shapes in the same libtorch, and the ratios.
#
# Builds nothing; needs scripts/setup.sh's venv and SmolLM2 (.models/smollm2).
# Usage: bench/run_e2e.sh [BUILD_DIR (build)]
# Knobs (environment): MODELS="smollm2 1b" SEQS="256 1024" DTYPES="fp32 bf16" CKPT="on off"
#   STEPS (timed steps, 3) WARMUP (1) PAIRS (1) WORK (a folder kept between runs, default a
#   temporary one). The 1b model is init-model's --preset 1b (random weights, TinyLlama's shape).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
[[ $build = /* ]] || build=$root/$build
bin=$build/qlora_dist
py=${PYTHON:-$root/.venv/bin/python}
MODELS=${MODELS:-smollm2}; SEQS=${SEQS:-256 1024}; DTYPES=${DTYPES:-fp32 bf16}
CKPT=${CKPT:-on off}; STEPS=${STEPS:-3}; WARMUP=${WARMUP:-1}; PAIRS=${PAIRS:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=2
if [[ -n ${WORK:-} ]]; then mkdir -p "$WORK"; tmp=$WORK; else tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; fi
batch=4
rows=$((batch * (STEPS + WARMUP + 2)))

echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc --all) cpus," \
     "bf16: $(grep -o -m1 -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo || echo none)," \
     "$(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-8s %5s %5s %4s | %9s %9s %6s | %9s %9s %6s | %7s %7s %6s\n' model seq dtype ckpt \
  "ours t/s" "ref t/s" ratio "ours MiB" "ref MiB" ratio "GFLOP/s" "peak" "%peak"

model_dir() {  # the Hugging Face directory of a model name
  case $1 in
    smollm2) echo "$root/.models/smollm2" ;;
    1b) [[ -d $tmp/1b ]] || "$bin" init-model --preset 1b --out "$tmp/1b" >/dev/null; echo "$tmp/1b" ;;
    *) echo "unknown model $1 (smollm2 | 1b)" >&2; exit 2 ;;
  esac
}

for model in $MODELS; do
  hf=$(model_dir "$model")
  [[ -f $tmp/$model.h5 ]] || "$bin" quantize --model "$hf" --out "$tmp/$model.h5" --format h5 >/dev/null
  [[ -d $tmp/$model-q4 ]] || "$bin" quantize --model "$hf" --out "$tmp/$model-q4" >/dev/null
  read -r hidden ffn linear_params < <("$py" - "$hf/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
h, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
d = c.get("head_dim") or h // c["num_attention_heads"]
q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
print(h, f, L * (h * q + 2 * h * kv + q * h + 3 * h * f) + v * h)  # block linears + lm_head
PY
)
  for seq in $SEQS; do
    data=$tmp/$model-train$seq.h5
    if [[ ! -f $data ]]; then
      if [[ $model = smollm2 ]]; then
        # Real text: Debian's documentation as instruction data, packed, loss on every token.
        [[ -f $tmp/docs/train.jsonl ]] || "$py" "$root/scripts/demo_data.py" "$tmp/docs" --max-rows 4000 >/dev/null
        printf '[model]\nmodel_name_or_path = %s\n[data]\ndataset = %s\ntemplate = smollm2\ncutoff_len = %s\npacking = true\ntrain_on_prompt = true\n[output]\noutput_dir = %s\n' \
          "$hf" "$tmp/docs/train.jsonl" "$seq" "$tmp/prep-out" > "$tmp/prep$seq.ini"
        "$bin" prep "$tmp/prep$seq.ini" --out "$data" >/dev/null
      else
        "$bin" synth-data --out "$data" --vocab 32000 --seq-len "$seq" --rows "$rows" >/dev/null
      fi
    fi
    peak=$("$py" "$root/bench/e2e_reference.py" --gemm-peak "$hidden" "$ffn" $((batch * seq)))
    for dtype in $DTYPES; do
      for ckpt in $CKPT; do
        gc=$([[ $ckpt = on ]] && echo true || echo false)
        for pair in $(seq 1 "$PAIRS"); do
          ours_run() {
            rm -rf "$tmp/run"
            mpirun --bind-to none -np 1 "$bin" train --model.model_name_or_path="$tmp/$model.h5" \
              --data.train_file="$data" --data.cutoff_len="$seq" \
              --train.per_device_train_batch_size=$batch --train.max_steps=$((STEPS + WARMUP)) \
              --train.do_eval=false --train.learning_rate=1e-4 --train.gradient_checkpointing=$gc \
              --finetuning.lora_rank=8 --finetuning.lora_alpha=16 --model.compute_dtype="$dtype" \
              --output.output_dir="$tmp/run" --output.logging_steps=1 --output.save_steps=0 \
              >"$tmp/ours.log" 2>&1 </dev/null || { tail -5 "$tmp/ours.log" >&2; return 1; }
            ours=$("$py" -c "
import json
m = [json.loads(l) for l in open('$tmp/run/metrics.jsonl') if '\"loss\"' in l][$WARMUP:]
t = sorted(x['tokens_per_second'] for x in m)
print((t[len(t) // 2] + t[(len(t) - 1) // 2]) / 2, max(x['max_rss_bytes'] for x in m))")
          }
          ref_run() {
            ref=$("$py" "$root/bench/e2e_reference.py" "$tmp/$model-q4" "$data" --steps "$STEPS" \
                  --warmup "$WARMUP" --batch $batch --seq "$seq" --compute "$dtype" \
                  --checkpointing "$ckpt" 2>"$tmp/ref.log" | tail -1) || { tail -5 "$tmp/ref.log" >&2; return 1; }
          }
          if (( pair % 2 )); then ours_run; ref_run; else ref_run; ours_run; fi
          "$py" - "$model" "$seq" "$dtype" "$ckpt" "$ours" "$ref" "$peak" "$linear_params" <<'PY'
import json, sys
model, seq, dtype, ckpt, ours, ref, peak, params = sys.argv[1:]
ours_tps, ours_rss = map(float, ours.split())
r = json.loads(ref)
peak = json.loads(peak)[dtype]
gflops = ours_tps * 4 * int(params) / 1e9
mib = 1 << 20
print(f"{model:<8} {seq:>5} {dtype:>5} {ckpt:>4} | {ours_tps:9.1f} {r['tokens_per_second']:9.1f} "
      f"{ours_tps / r['tokens_per_second']:5.2f}x | {ours_rss / mib:9.0f} {r['peak_rss_bytes'] / mib:9.0f} "
      f"{ours_rss / r['peak_rss_bytes']:5.2f}x | {gflops:7.1f} {peak:7.1f} {100 * gflops / peak:5.0f}%")
PY
        done
      done
    done
  done
done
