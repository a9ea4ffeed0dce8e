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
echo "The checkpoint loads in transformers (bitsandbytes 4-bit); its quantization_config:"
.venv/bin/python - "$run_dir/nf4" <<'PY'
import json, sys
print(json.dumps(json.load(open(f"{sys.argv[1]}/config.json"))["quantization_config"], indent=2))
PY
echo "Outputs in $run_dir"
