#!/usr/bin/env bash
# The main job for now: set up, generate a small LLaMA-architecture model, quantize it to a
# bitsandbytes NF4 checkpoint, and show what was done. Each run writes a new directory under
# out/ and never touches an earlier one. Training arrives with the trainer issues.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
bin=${QLORA_BUILD_DIR:-build}/qlora_dist
run_dir=out/demo-$(date +%Y%m%d-%H%M%S)-$$
echo
"$bin" init-model --preset "${QLORA_PRESET:-small}" --out "$run_dir/base" --seed 0
"$bin" quantize --model "$run_dir/base" --out "$run_dir/nf4" \
  --quantization_type nf4 --quantization_blocksize 64 --double_quantization true --quant_storage uint8
echo
"$bin" inspect --model "$run_dir/nf4"
echo
echo "Loading it with transformers + bitsandbytes (the reference stack, CPU):"
.venv/bin/python - "$run_dir/nf4" <<'PY' 2>&1 | grep -v -i -E "warn|kernels-community|Loading weights"
import sys, torch, bitsandbytes as bnb
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu")
n = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
logits = model(torch.tensor([[1, 42, 7, 99]])).logits
print(f"  {n} Linear4bit layers, logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
PY
echo "Outputs in $run_dir"
