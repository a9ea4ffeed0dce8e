#!/usr/bin/env bash
# Side-by-side 4-bit dequantize rates, one thread: our kernels (bench_dequantize: ref, avx2,
# memcpy) and bitsandbytes' CPU kernel (bnb_dequantize.py), in one run, as one table.
# Builds nothing. Usage: bench/run_dequantize.sh [BUILD_DIR (default build)] [MIN_TIME s (0.5)]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
min_time=${2:-0.5}
[[ $build = /* ]] || build=$root/$build
bin=$build/bench/bench_dequantize
py=${PYTHON:-$root/.venv/bin/python}
if [[ ! -x $bin ]]; then
  echo "run_dequantize.sh: $bin not found; build it first:" \
       "cmake --build $build --target bench_dequantize" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
echo "# $cpu, $(nproc) cpus, $(date -u '+%Y-%m-%d %H:%M UTC'), min_time ${min_time}s," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)"
# Google Benchmark's console table goes to stderr, the JSON to a file for the merged table.
"$bin" --benchmark_min_time="$min_time" --benchmark_out="$tmp/ours.json" \
       --benchmark_out_format=json 1>&2
"$py" "$root/bench/bnb_dequantize.py" --min-time "$min_time" --json 2>/dev/null >"$tmp/bnb.json"

"$py" - "$tmp/ours.json" "$tmp/bnb.json" <<'PYEOF'
import json, sys
ours, bnb = (json.load(open(p)) for p in sys.argv[1:3])
rows = []  # (kernel, shape, dtype, ms, GB/s)
for b in ours["benchmarks"]:
    if b.get("error_occurred"):
        print(f"# {b['name']}: {b.get('error_message')}")
        continue
    _, kernel, dtype, shape = b["name"].split("/")[:4]
    rows.append((kernel, shape, dtype, b["real_time"], b["bytes_per_second"] / 1e9))
for r in bnb["rows"]:
    rows.append((r["kernel"], r["shape"], r["dtype"], r["seconds"] * 1e3, r["gbps"]))
rate = {(k, s, d): g for k, s, d, _, g in rows}
order = ["memcpy", "torch_copy", "ref", "bnb_api", "bnb", "avx2"]
rows.sort(key=lambda r: (r[1], r[2] != "fp32", order.index(r[0])))
print(f"# torch {bnb['torch']}, bitsandbytes {bnb['bitsandbytes']}; "
      "bytes = n/2 packed + n/16 absmax + n*4 (fp32) or n*2 (bf16) out")
print("| kernel | shape | dtype | ms | GB/s | % of memcpy | vs bnb |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
for k, s, d, ms, g in rows:
    mc = rate.get(("memcpy", s, d))
    bn = rate.get(("bnb", s, d))
    pct = f"{100 * g / mc:.0f}%" if mc else ""
    vs = f"{g / bn:.2f}x" if bn else ""
    print(f"| {k} | {s} | {d} | {ms:.2f} | {g:.2f} | {pct} | {vs} |")
PYEOF
