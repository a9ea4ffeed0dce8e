#!/usr/bin/env bash
# The whole test suite: set-up (idempotent; installs and builds what is missing), then every
# ctest label: unit (GoogleTest), cli (the binary on good and bad input), mpi, slurm, multinode
# (two emulated nodes; root), reference (against the real bitsandbytes / transformers in .venv).
# Extra arguments go to ctest, e.g. -L unit.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
exec ctest --test-dir "${QLORA_BUILD_DIR:-build}" --output-on-failure -j "${QLORA_JOBS:-$(nproc)}" "$@"
