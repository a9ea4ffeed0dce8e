#!/usr/bin/env bash
# The sharded trainer's communication, measured with real MPI processes on this machine:
#  1. bench_gather_dequantize at np 1, 2, 4: all_gather + dequantize of a LLaMA-7B-sized block
#     unit (104 MB of NF4), beside memcpy of the same bytes;
#  2. train_probe (tests/dist) on the small preset (12 layers, hidden 768, NF4 + double quant,
#     fp32 compute) for a few steps at np 2 and 4 with prefetch 0 and 1: the share of the step
#     the main thread spends blocked on collectives, and step time.
# Builds nothing. Usage: bench/run_sharded.sh [BUILD_DIR (default build)] [STEPS (4)]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
steps=${2:-4}
[[ $build = /* ]] || build=$root/$build
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
for bin in "$build/bench/bench_gather_dequantize" "$build/tests/dist/train_probe" "$build/qlora_dist"; do
  [[ -x $bin ]] || { echo "run_sharded.sh: $bin not built (cmake --build $build)" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
echo "# $cpu, $(nproc --all) cpus, $(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "## gather + dequantize of one 7B-sized block unit (best of 5)"
for np in 1 2 4; do
  mpirun --oversubscribe -np "$np" "$build/bench/bench_gather_dequantize" 5
done

echo "## training steps, small preset, global batch 8 x 64 tokens, $steps steps (first one dropped)"
"$build/qlora_dist" init-model --preset small --out "$tmp/small" >/dev/null
"$build/qlora_dist" quantize --model "$tmp/small" --out "$tmp/small.h5" --format h5 >/dev/null
printf "%-4s %-9s %-12s %-14s %-16s %-14s\n" np prefetch "step s" "wait share" "gathered MB/step" "peak gathered MB"
for np in 2 4; do
  for prefetch in 0 1; do
    out=$tmp/run-$np-$prefetch
    mkdir -p "$out"
    mpirun --oversubscribe -np "$np" "$build/tests/dist/train_probe" --model "$tmp/small.h5" \
      --out "$out" --steps "$steps" --global-batch 8 --seq 64 --rows 64 --prefetch "$prefetch" \
      >/dev/null
    python3 - "$out" "$np" "$prefetch" <<'PYEOF'
import json, sys
out, np_, prefetch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ranks = [json.load(open(f"{out}/rank{r}.json")) for r in range(np_)]
step = max(sum(r["seconds"][1:]) / len(r["seconds"][1:]) for r in ranks)
share = max(sum(r["comm_wait_seconds"][1:]) / sum(r["seconds"][1:]) for r in ranks)
g = ranks[0]["comm_bytes_gathered"][-1] / 1e6
peak = max(r["peak_gathered_bytes"] for r in ranks) / 1e6
print(f"{np_:<4} {prefetch:<9} {step:<12.3f} {share:<14.3f} {g:<16.1f} {peak:<14.1f}")
PYEOF
  done
done
