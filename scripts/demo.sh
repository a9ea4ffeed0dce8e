#!/usr/bin/env bash
# The main job, on a real model: set up (which also turns SmolLM2-135M-Instruct's GGUF into a
# cached Hugging Face directory, .models/smollm2), build a small instruction dataset from the
# NAME lines of this machine's man pages, quantize the model to NF4 units, ask the base model
# the held-back questions, fine-tune a LoRA with 2 MPI ranks (sharded, ZeRO-3 style, neat
# packing, evaluation), plot the curves, and ask the tuned model the same questions: the answers
# side by side. Prints the wall time of each phase. Each run writes a new directory under out/
# and never touches an earlier one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh" qlora_dist  # the only binary it runs; scripts/test.sh builds the rest
cd "$root"
bin=${QLORA_BUILD_DIR:-build}/qlora_dist
np=${QLORA_NP:-2}
model=.models/smollm2
run_dir=out/demo-$(date +%Y%m%d-%H%M%S)-$$
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mkdir -p "$run_dir"

times=()
phase() {  # phase NAME COMMAND...: runs it and records its wall time
  local name=$1 start end
  shift
  echo
  echo "== $name"
  start=$(date +%s%N)
  "$@"
  end=$(date +%s%N)
  local ds=$(( (end - start) / 100000000 ))
  times+=("$(printf '%-16s %4d.%d s' "$name" $((ds / 10)) $((ds % 10)))")
}

phase "data" python3 scripts/demo_data.py "$run_dir/data"
phase "quantize" "$bin" quantize --model "$model" --out "$run_dir/smollm2-nf4.h5" --format h5
phase "base answers" sh -c "'$bin' generate --model '$run_dir/smollm2-nf4.h5' --tokenizer '$model' \
  --template smollm2 --threads 2 \
  --prompts '$run_dir/data/prompts.jsonl' --max_new_tokens 32 > '$run_dir/answers_base.jsonl'"
phase "train (np $np)" mpirun --oversubscribe -np "$np" "$bin" configs/demo.ini \
  --model.model_name_or_path="$run_dir/smollm2-nf4.h5" --model.tokenizer_name_or_path="$model" \
  --data.dataset="$run_dir/data/train.jsonl" --output.output_dir="$run_dir/run"
phase "plot" "$bin" plot "$run_dir/run" --out "$run_dir/curves.png"
phase "tuned answers" sh -c "'$bin' generate --model '$run_dir/smollm2-nf4.h5' --tokenizer '$model' \
  --adapter '$run_dir/run' \
  --template smollm2 --threads 2 --prompts '$run_dir/data/prompts.jsonl' --max_new_tokens 32 \
  > '$run_dir/answers_tuned.jsonl'"

echo
echo "== held-back questions (not in the training data): base model, tuned adapter, man page"
python3 - "$run_dir" <<'PY'
import json, sys
run = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{run}/{name}")]
for p, b, t in zip(rows("data/prompts.jsonl"), rows("answers_base.jsonl"), rows("answers_tuned.jsonl")):
    print(f"Q: {p['prompt']}")
    print(f"   base : {b['answer'].strip()[:150]!r}")
    print(f"   tuned: {t['answer'].strip()[:150]!r}")
    print(f"   man  : {p['reference']!r}")
m = [json.loads(l) for l in open(f"{run}/run/metrics.jsonl")]
train = [x for x in m if "loss" in x]
evals = [x for x in m if "eval_loss" in x]
print(f"\ntrain loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} "
      f"(step {train[-1]['step']}); eval loss {evals[0]['eval_loss']:.3f} (step {evals[0]['step']}) "
      f"-> {evals[-1]['eval_loss']:.3f} (step {evals[-1]['step']})")
PY
echo
echo "== wall time per phase (after set-up)"
printf '%s\n' "${times[@]}"
echo "Outputs in $run_dir: data/ (train.jsonl, prompts.jsonl), smollm2-nf4.h5 (4-bit units),"
echo "  run/ (adapter, checkpoints, metrics.jsonl, data/ = the tokenized rows), curves.png,"
echo "  answers_base.jsonl, answers_tuned.jsonl"
