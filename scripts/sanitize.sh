#!/usr/bin/env bash
# Sanitizer run: builds every target of ours with a sanitizer into a folder of its own and runs the
# unit, cli and mpi test labels there (the product's suite, not a special one).
#   scripts/sanitize.sh [asan|tsan] [extra ctest arguments, e.g. -R communicator]
#   asan: AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/); a report fails the test.
#   tsan: ThreadSanitizer (build-tsan/) on the communicator and its watchdog thread (the tests of
#         src/dist; libtorch's and Open MPI's threads are not instrumented, see tsan.supp).
# Suppressions for the libraries we do not build (Open MPI, HDF5, libtorch) are in
# scripts/sanitize/; none names a file of ours.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kind=${1:-asan}
[ $# -gt 0 ] && shift
supp=$root/scripts/sanitize
case "$kind" in
  asan)
    build=$root/build-asan
    cmake_args="-DQLORA_SANITIZE=address -DQLORA_WITH_CUDA=OFF -DQLORA_BUILD_BENCH=OFF"
    # Full unwinding at malloc (Open MPI and libc are built without frame pointers) and Open MPI's
    # components kept loaded, so that leaks at exit have stacks the suppressions can name.
    export ASAN_OPTIONS="abort_on_error=0:exitcode=86:detect_odr_violation=0:detect_leaks=1:alloc_dealloc_mismatch=0:fast_unwind_on_malloc=0"
    export OMPI_MCA_mca_base_component_disable_dlclose=1
    export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:suppressions=$supp/ubsan.supp"
    labels="unit|cli|mpi"
    targets=()
    ;;
  tsan)
    build=$root/build-tsan
    cmake_args="-DQLORA_SANITIZE=thread -DQLORA_WITH_CUDA=OFF -DQLORA_BUILD_BENCH=OFF"
    export TSAN_OPTIONS="exitcode=88:halt_on_error=1:second_deadlock_stack=1:suppressions=$supp/tsan.supp"
    export OMPI_MCA_mca_base_component_disable_dlclose=1
    labels="unit|mpi"
    # Only the communicator's tests: TSan needs every thread's memory accesses instrumented, and
    # libtorch's OpenMP pool is not, so the training tests would report its races, not ours.
    targets=(test_communicator test_watchdog abort_probe)
    ;;
  *) echo "sanitize.sh: unknown kind '$kind': use asan or tsan" >&2; exit 2 ;;
esac
# The tests run under mpirun and pytest inherit these; setup.sh builds (and gtest discovery runs
# the test binaries) with them too.
QLORA_BUILD_DIR=$build QLORA_CMAKE_ARGS=$cmake_args "$root/scripts/setup.sh" ${targets[@]+"${targets[@]}"}
cd "$root"
start=$(date +%s)
status=0
if [ "$kind" = tsan ]; then
  ctest --test-dir "$build" --output-on-failure -j "${QLORA_JOBS:-$(nproc)}" -L "$labels" \
    -R '^dist\.(test_communicator|abort_probe)|Watchdog' "$@" || status=$?
else
  ctest --test-dir "$build" --output-on-failure -j "${QLORA_JOBS:-$(nproc)}" -L "$labels" "$@" ||
    status=$?
fi
echo "sanitize.sh $kind: ctest exit $status after $(( $(date +%s) - start )) s" >&2
exit $status
