#!/usr/bin/env bash
# The main job: set up, make the tiny LLaMA (4 layers, hidden 256) and a synthetic copy-task
# dataset, quantize the model to NF4 units, fine-tune a LoRA on it with 2 MPI ranks (sharded,
# ZeRO-3 style) while evaluating, and check the saved adapter with peft. Each run writes a new
# directory under out/ and never touches an earlier one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh" qlora_dist  # the only binary it runs; scripts/test.sh builds the rest
cd "$root"
bin=${QLORA_BUILD_DIR:-build}/qlora_dist
np=${QLORA_NP:-2}
run_dir=out/demo-$(date +%Y%m%d-%H%M%S)-$$
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
echo
"$bin" init-model --preset tiny --out "$run_dir/tiny" --seed 0
"$bin" quantize --model "$run_dir/tiny" --out "$run_dir/tiny.h5" --format h5
"$bin" synth-data --out "$run_dir/train.h5" --vocab 64 --seq-len 64 --rows 2400 --task copy --seed 1
"$bin" synth-data --out "$run_dir/eval.h5" --vocab 64 --seq-len 64 --rows 64 --task copy --seed 2
echo
mpirun --oversubscribe -np "$np" "$bin" configs/demo.ini \
  --model.model_name_or_path="$run_dir/tiny.h5" \
  --data.train_file="$run_dir/train.h5" --data.eval_file="$run_dir/eval.h5" \
  --output.output_dir="$run_dir/run"
echo
echo "Loading the adapter with peft on the base model (the reference stack, CPU):"
.venv/bin/python - "$run_dir" <<'PY' 2>&1 | grep -v -i -E "warn|kernels-community|Loading weights"
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
run = sys.argv[1]
metrics = [json.loads(l) for l in open(f"{run}/run/metrics.jsonl")]
train = [m for m in metrics if "loss" in m]
evals = [m for m in metrics if "eval_loss" in m]
print(f"  train loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} "
      f"(step {train[-1]['step']}); eval loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}")
base = AutoModelForCausalLM.from_pretrained(f"{run}/tiny", torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, f"{run}/run")
n = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
prompt = torch.tensor([[5, 17, 33, 9, 41, 12, 60, 3, 2]])
with torch.no_grad():
    logits = model(prompt).logits
print(f"  peft loaded {n} LoRA tensors; logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
PY
echo "Outputs in $run_dir: tiny/ (base), tiny.h5 (4-bit units), train.h5 + eval.h5, run/ (adapter, checkpoints, metrics.jsonl)"
