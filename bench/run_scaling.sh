#!/usr/bin/env bash
# Scale on one machine: the 1b preset (TinyLlama-1.1B's shape, NF4 + double quant HDF5 units)
# trained at np 1, 2, 4 (mpirun --oversubscribe --bind-to none), LoRA r 8 on all seven linears,
# batch 1 per rank, sequence 128, a few steps. Per np: bytes each rank read at load, its resident
# shard, each rank's peak RSS (VmHWM, from /usr/bin/time), tokens/s and comm wait share (the last
# metrics line: steps after the first), and the terms of the goal "peak RSS per rank <= libtorch
# baseline + shard + 2 largest units". The baseline is bench_rss_baseline at the same np and
# threads. Also the peak RSS of init-model --preset 1b and of quantize --format h5.
# Builds nothing. Usage:
#   bench/run_scaling.sh [BUILD_DIR (build)] [STEPS (3)] [COMPUTE_DTYPES ("fp32 bf16")]
# SCALING_DIR=DIR keeps the model and data there between runs (default: a temporary directory,
# removed at the end; the safetensors model, 2.1 GiB, is deleted once quantized).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
steps=${2:-3}
dtypes=${3:-fp32 bf16}
[[ $build = /* ]] || build=$root/$build
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
for bin in "$build/qlora_dist" "$build/bench/bench_rss_baseline"; do
  [[ -x $bin ]] || { echo "run_scaling.sh: $bin not built (cmake --build $build --target ${bin##*/})" >&2; exit 1; }
done
if [[ -n ${SCALING_DIR:-} ]]; then
  work=$SCALING_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
q=$build/qlora_dist
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
echo "# $cpu, $(nproc --all) cpus, $(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"

mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }  # kB -> MiB
if [[ ! -f $work/1b.h5 ]]; then
  /usr/bin/time -f "%M" -o "$work/init.rss" "$q" init-model --preset 1b --out "$work/1b" >/dev/null
  /usr/bin/time -f "%M" -o "$work/quant.rss" "$q" quantize --model "$work/1b" --out "$work/1b.h5" \
    --format h5 >/dev/null
  echo "init-model --preset 1b: $(du -m "$work/1b/model.safetensors" | cut -f1) MiB written," \
    "peak RSS $(mib "$(tail -1 "$work/init.rss")") MiB; quantize --format h5:" \
    "$(du -m "$work/1b.h5" | cut -f1) MiB, peak RSS $(mib "$(tail -1 "$work/quant.rss")") MiB"
  rm -rf "$work/1b"
fi
[[ -f $work/train.h5 ]] ||
  "$q" synth-data --out "$work/train.h5" --vocab 32000 --seq-len 128 --rows 64 --seed 1 >/dev/null

cat >"$work/scaling.ini" <<EOF
[model]
model_name_or_path = $work/1b.h5
[finetuning]
lora_rank = 8
lora_alpha = 16
lora_target = all
[data]
train_file = $work/train.h5
cutoff_len = 128
[train]
per_device_train_batch_size = 1
max_steps = $steps
[output]
logging_steps = $((steps > 1 ? steps - 1 : 1))
report_to = jsonl
EOF

printf "%-5s %-3s %-13s %-11s %-22s %-9s %-9s %-11s %-9s %s\n" dtype np "read MiB/rk" "shard MiB" \
  "peak RSS MiB per rank" "baseline" "2 units" "goal bound" "tok/s" "comm wait"
for dtype in $dtypes; do
  for np in 1 2 4; do
    threads=$(( $(nproc --all) / np )); (( threads >= 1 )) || threads=1
    base=$(mpirun --oversubscribe --bind-to none -np "$np" "$build/bench/bench_rss_baseline" "$threads" |
      sed -n 's/.*VmHWM \([0-9]*\) kB.*/\1/p' | sort -n | tail -1)
    out=$work/run-$dtype-$np
    rm -rf "$out"
    mkdir -p "$out"
    mpirun --oversubscribe --bind-to none -np "$np" sh -c \
      '/usr/bin/time -f "%M" -o "$0/rss.$OMPI_COMM_WORLD_RANK" "$@"' "$out" \
      "$q" train "$work/scaling.ini" --model.compute_dtype="$dtype" --output.output_dir="$out" \
      >"$out/log" 2>&1 || { cat "$out/log"; exit 1; }
    python3 - "$out" "$np" "$base" "$dtype" <<'PYEOF'
import json, re, sys
out, np_, base_kb, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
log = open(f"{out}/log").read()
m = re.search(r"this rank holds ([\d.]+) MiB of ([\d.]+) MiB of 4-bit base units \(read ([\d.]+) MiB\)", log)
shard, read = float(m.group(1)), float(m.group(3))
rss = [int(open(f"{out}/rss.{r}").read().split()[-1]) / 1024 for r in range(np_)]
last = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"loss"' in l][-1]
# The two largest units: embed and head, bf16 [32000, 2048] each (+ the final norm, padding).
units = 2 * (32000 * 2048 * 2 + 64 * 2) / 2**20
base = base_kb / 1024
bound = base + shard + units
print(f"{dtype:<5} {np_:<3} {read:<13.1f} {shard:<11.1f} {' '.join(f'{r:.0f}' for r in rss):<22} "
      f"{base:<9.0f} {units:<9.0f} {bound:<11.0f} {last['tokens_per_second']:<9.1f} "
      f"{100 * last['comm_wait_share']:.1f}%  {'met' if max(rss) <= bound else 'over by %.0f MiB' % (max(rss) - bound)}")
PYEOF
  done
done
