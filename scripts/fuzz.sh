#!/usr/bin/env bash
# Builds one libFuzzer harness of tests/fuzz with clang (-fsanitize=fuzzer,address,undefined)
# into build-fuzz/ and runs it for SECONDS on its seed corpus.
#   scripts/fuzz.sh NAME SECONDS [--merge] [libFuzzer options...]
#   scripts/fuzz.sh --list
# NAME: safetensors, hf_config, adapter_config, train_config, h5_dataset, unit_layout, tokenizer,
# json_dataset (scripts/fuzz.sh --list).
# New inputs go to build-fuzz/corpus/NAME (kept between runs, not committed); with --merge, the
# ones that add coverage are then merged into the committed seeds tests/fuzz/corpus/NAME (check
# their size before committing). A crash, leak, timeout (-timeout=10 s per input) or
# out-of-memory (-rss_limit_mb=2048) stops the run with its reproducer in
# build-fuzz/artifacts/NAME/; fix it, then add the reproducer to tests/fuzz/corpus/NAME as a
# regression seed (the ctest fuzz.NAME replays every seed in the normal build).
# Needs scripts/setup.sh first (the .venv with libtorch; clang and libclang-rt-dev).
# Environment: QLORA_FUZZ_BUILD_DIR (default build-fuzz), QLORA_JOBS (default nproc).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
harnesses=$(sed -n 's/^qlora_fuzz_harness(\([a-z_0-9]*\).*/\1/p' tests/fuzz/CMakeLists.txt)
if [ "${1:-}" = "--list" ]; then echo "$harnesses"; exit 0; fi
if [ $# -lt 2 ] || ! grep -qx -- "$1" <<<"$harnesses" || ! [[ "$2" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh NAME SECONDS [--merge] [libFuzzer options...]; NAME one of:" \
    $harnesses >&2
  exit 2
fi
name=$1 seconds=$2
shift 2
merge=0
if [ "${1:-}" = "--merge" ]; then merge=1; shift; fi

if ! command -v clang++ >/dev/null || [ -z "$(clang++ -print-file-name=libclang_rt.fuzzer-x86_64.a 2>/dev/null | grep /)" ]; then
  echo "[fuzz] no clang++ with libFuzzer (Debian: clang, libclang-rt-dev): run scripts/setup.sh" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "[fuzz] no .venv (libtorch): run scripts/setup.sh first" >&2
  exit 1
fi

build=${QLORA_FUZZ_BUILD_DIR:-build-fuzz}
export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=1 CCACHE_SLOPPINESS=pch_defines,time_macros
if [ ! -f "$build/CMakeCache.txt" ]; then
  torch_prefix=$(.venv/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
  # -O1 -g without NDEBUG: library asserts (nlohmann::json's among them) stay on.
  flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  # A CUDA-enabled libtorch needs the NCCL and CUDA libraries of its wheel at link time (what the
  # top-level CMakeLists.txt adds when it builds CUDA; the fuzz build does not).
  site=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  link="-Wl,-rpath-link,$site/nvidia/nccl/lib:$site/nvidia/cu13/lib"
  echo "[fuzz] configuring $build (clang, $flags)"
  cmake -S . -B "$build" -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
    -DQLORA_FUZZ=ON -DQLORA_WITH_CUDA=OFF -DQLORA_BUILD_TESTS=OFF -DQLORA_BUILD_BENCH=OFF \
    -DCMAKE_EXE_LINKER_FLAGS="$link" -DCMAKE_PREFIX_PATH="$torch_prefix" >"$build.configure.log" 2>&1 ||
    { cat "$build.configure.log"; exit 1; }
fi
echo "[fuzz] building fuzz_$name in $build"
if ! cmake --build "$build" -j "${QLORA_JOBS:-$(nproc)}" --target "fuzz_$name" >"$build.build.log" 2>&1; then
  grep -E -B2 -A6 "error" "$build.build.log" | head -80
  echo "[fuzz] build failed; full log: $build.build.log" >&2
  exit 1
fi

# Harnesses write each input to a scratch file: in memory when /dev/shm is there.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
seeds=tests/fuzz/corpus/$name
work=$build/corpus/$name
artifacts=$build/artifacts/$name/
mkdir -p "$seeds" "$work" "$artifacts"
echo "[fuzz] running fuzz_$name for ${seconds}s (-rss_limit_mb=2048 -timeout=10)"
status=0
"$build/fuzz_$name" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
  -artifact_prefix="$artifacts" -print_final_stats=1 "$@" "$work" "$seeds" || status=$?
if ((status != 0)); then
  echo "[fuzz] fuzz_$name stopped with status $status; reproducers in $artifacts:" >&2
  ls -l "$artifacts" >&2
  exit "$status"
fi
if ((merge)); then
  echo "[fuzz] merging inputs that add coverage into $seeds"
  "$build/fuzz_$name" -merge=1 -rss_limit_mb=2048 -timeout=10 "$seeds" "$work"
  du -sh "$seeds"
fi
