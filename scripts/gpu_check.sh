#!/usr/bin/env bash
# The GPU check: on a GPU machine without network access and without our Debian packages, builds
# qlora_dist and the tests against that machine's torch, with Open MPI, HDF5, Boost, GoogleTest,
# nlohmann-json, PCRE2 and utf8proc from the bundle of scripts/gpu_bundle.sh, then runs the ctest
# label gpu (then unit, while the time budget allows). Also runs where no GPU is visible: the gpu
# tests then skip. Prints what it found (GPUs, nvcc, torch) and the time of every phase.
#
# Usage (from anywhere; it works in the repository root):
#   scripts/gpu_check.sh [.gpu_bundle/qlora_gpu_bundle.tar.xz | UNPACKED_BUNDLE_DIR]
# Environment:
#   QLORA_GPU_CHECK_BUILD_DIR  build folder (default build-gpu)
#   QLORA_GPU_CHECK_UNIT       1 (default): also run -L unit when the budget allows; 0: gpu only
#   QLORA_GPU_CHECK_BUDGET_S   seconds the whole check may take (default 480); unit tests are
#                              skipped when less than 90 s are left after the gpu label
#   QLORA_JOBS                 build and test jobs (default nproc)
#   OUT                        when set (the device tool's output folder), the log is also
#                              written to $OUT/gpu_check.log
# Needs python3 with torch (2.11 or newer), cmake, make, a C++ compiler; nvcc for the CUDA code.
# Exit status: non-zero when the build or any gpu test failed (unit failures are reported and
# also make it non-zero).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bundle=${1:-$root/.gpu_bundle/qlora_gpu_bundle.tar.xz}
build=${QLORA_GPU_CHECK_BUILD_DIR:-build-gpu}
jobs=${QLORA_JOBS:-$(nproc)}
budget=${QLORA_GPU_CHECK_BUDGET_S:-480}
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
t_start=$SECONDS
t_phase=$SECONDS
phase_name=""
timings=()
log() { printf '[gpu_check] %s\n' "$*"; }
phase() {  # phase NAME: ends the current phase (its time goes to the summary) and starts NAME
  [ -z "$phase_name" ] || timings+=("$(printf '%-28s %5d s' "$phase_name" $((SECONDS - t_phase)))")
  phase_name=$1
  t_phase=$SECONDS
  [ -z "$1" ] || log "---- $1 (at $((SECONDS - t_start)) s)"
}
die() { printf '[gpu_check] error: %s\n' "$*" >&2; exit 1; }

phase "bundle"
if [ -d "$bundle" ]; then
  bdir=$(cd "$bundle" && pwd)
  [ -f "$bdir/qlora_env.sh" ] || bdir=$bdir/qlora_gpu_bundle
elif [ -f "$bundle" ]; then
  dest=/tmp/qlora_gpu_check_bundle
  rm -rf "$dest" && mkdir -p "$dest"
  if command -v xz >/dev/null; then
    tar -C "$dest" -xJf "$bundle"
  else  # no xz binary: Python's tarfile reads .tar.xz
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle" "$dest"
  fi
  bdir=$dest/qlora_gpu_bundle
else
  die "$bundle: no such bundle (make it with scripts/gpu_bundle.sh on a Debian bookworm machine, then carry .gpu_bundle)"
fi
[ -f "$bdir/qlora_env.sh" ] || die "$bdir: not an unpacked qlora_gpu_bundle (no qlora_env.sh)"
# shellcheck disable=SC1091
source "$bdir/qlora_env.sh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
log "bundle $bdir ($(sed -n 1p "$bdir/MANIFEST" | sed 's/^# //'))"
log "bundle libraries used because the system lacks them: ${QLORA_BUNDLE_DEPS_USED:-none}"
for exe in mpirun mpicxx h5pcc; do
  [ "$(command -v "$exe")" = "$bdir/usr/bin/$exe" ] || log "note: $exe is $(command -v "$exe" || echo missing), not the bundle's"
done
missing=$(ldd "$bdir/usr/bin/orterun" "$bdir"/usr/lib/x86_64-linux-gnu/libhdf5_openmpi.so.* 2>&1 | grep 'not found' | sort -u || true)
[ -z "$missing" ] || die "bundle libraries do not load here: $missing"

phase "machine"
command -v nvidia-smi >/dev/null && { nvidia-smi -L || true; } || log "nvidia-smi: not found (no GPU driver; gpu tests will skip)"
if command -v nvcc >/dev/null; then nvcc --version | tail -2
elif [ -x /usr/local/cuda/bin/nvcc ]; then /usr/local/cuda/bin/nvcc --version | tail -2
else log "nvcc: not found (the CUDA code is not built)"; fi
python=$(command -v python3) || die "python3 not found"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "| GPUs visible:", torch.cuda.device_count())' ||
  die "$python cannot import torch (the check builds against this Python's torch)"
torch_prefix=$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake --version | head -1
log "$(nproc) cores, $jobs jobs; build folder $build"

phase "configure"
# QLORA_PYTHON: the pytest entries of ctest run with this Python (the machine's, with torch and
# pytest). PLplot is not in the bundle (cairo/pango); benchmarks are not built.
if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$torch_prefix;$bdir/usr" \
     -DQLORA_BUILD_BENCH=OFF -DQLORA_WITH_PLPLOT=OFF -DQLORA_PYTHON="$python" >"$build.configure.log" 2>&1; then
  tail -40 "$build.configure.log"
  die "configure failed (full log $build.configure.log)"
fi
grep -E 'qlora_dist:|Found (MPI|HDF5|Boost|GTest|nlohmann)' "$build.configure.log" || true
# Where CMake found our dependencies: every one should be inside the bundle.
grep -E '^(MPI_CXX_COMPILER|HDF5_C_COMPILER_EXECUTABLE|HDF5_C_LIBRARY_hdf5|GTest_DIR|Boost_DIR|nlohmann_json_DIR|PCRE2_LIBRARY|UTF8PROC_LIBRARY|QLORA_MPIRUN|Torch_DIR):' \
  "$build/CMakeCache.txt" | sed 's/^/  /'

phase "build"
# Every target (the unit tests need most of the libraries anyway); the gpu label alone would be
# qlora_dist plus the targets of tests/gpu.
if ! cmake --build "$build" -j "$jobs" >"$build.build.log" 2>&1; then
  grep -E -B2 -A6 'error|Error' "$build.build.log" | head -80
  die "build failed (full log $build.build.log)"
fi
log "built $(grep -c 'Building \(CXX\|CUDA\|C\) object' "$build.build.log") compile units"

phase "ctest -L gpu"
status=0
gpu_tests=$(ctest --test-dir "$build" -L gpu -N | sed -n 's/^Total Tests: //p')
if [ "${gpu_tests:-0}" -eq 0 ]; then
  log "no test carries the label gpu in this tree"
  status=1
else
  ctest --test-dir "$build" -L gpu --output-on-failure -j 1 || status=1
  # Skipped tests and their reasons (a GoogleTest skip, a pytest skip).
  grep -h -E '\[  SKIPPED \]|SKIPPED|skipped' "$build"/Testing/Temporary/LastTest.log 2>/dev/null | sort -u | head -20 || true
fi

if [ "${QLORA_GPU_CHECK_UNIT:-1}" = 1 ]; then
  left=$((budget - (SECONDS - t_start)))
  if ((left >= 90)); then
    phase "ctest -L unit (at most $((left - 30)) s)"
    ctest --test-dir "$build" -L unit -j "$jobs" --stop-time "$(date -d "+$((left - 30)) seconds" +%H:%M:%S)" \
      --output-on-failure >"$build.unit.log" 2>&1 || status=1
    grep -E 'tests passed|Total Test time|\*\*\*Failed|\*\*\*Timeout|Not Run' "$build.unit.log" | head -30
  else
    log "ctest -L unit skipped: $left s of the $budget s budget left"
  fi
fi
phase ""
log "timings:"
printf '[gpu_check]   %s\n' "${timings[@]}"
log "total $((SECONDS - t_start)) s; exit status $status"
exit "$status"
