#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: Debian packages, the Python reference stack (.venv, which
# also carries libtorch), then configure and build into build/. On a machine where everything is
# present it only rebuilds what changed. Usage: scripts/setup.sh [TARGET ...]: build only these
# CMake targets (scripts/demo.sh asks for qlora_dist alone), default every target (tests and
# benchmarks included). Environment: QLORA_VENV_DIR (where the venv lives), QLORA_BUILD_DIR
# (default build), QLORA_JOBS (default: nproc).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[setup] %s\n' "$*"; }

apt_packages=(cmake g++ make ccache pkg-config python3 python3-venv libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev libboost-program-options-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libpcre2-dev libutf8proc-dev slurm-wlm munge libplplot-dev plplot-driver-cairo procps hostname)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The venv is keyed by the requirements and the Python version, and kept outside the work tree
# (a fresh clone reuses it), with .venv a link to it.
py=$(command -v python3)
key=$( (cat scripts/requirements.txt; "$py" --version) | sha256sum | cut -c1-12)
venv=${QLORA_VENV_DIR:-$HOME/.cache/qlora_dist/venv-$key}
if [ ! -f "$venv/.complete" ]; then
  log "creating the reference venv in $venv (torch, bitsandbytes, transformers, peft, ...)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q -r scripts/requirements.txt
  touch "$venv/.complete"
fi
ln -sfn "$venv" .venv

build=${QLORA_BUILD_DIR:-build}
jobs=${QLORA_JOBS:-$(nproc)}
export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=1 CCACHE_SLOPPINESS=pch_defines,time_macros
torch_prefix=$(.venv/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
if [ ! -f "$build/CMakeCache.txt" ]; then
  log "configuring $build"
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DQLORA_PYTHON="$root/.venv/bin/python" >"$build.configure.log" 2>&1 ||
    { cat "$build.configure.log"; exit 1; }
fi
targets=("$@")
log "building ${targets[*]:-every target} in $build with $jobs jobs (ccache: ${CCACHE_DIR:-~/.cache/ccache})"
if ! cmake --build "$build" -j "$jobs" ${targets[@]+--target "${targets[@]}"} >"$build.build.log" 2>&1; then
  grep -E -B2 -A6 "error|Error" "$build.build.log" | head -80
  log "build failed; full log: $build.build.log"
  exit 1
fi
log "done: $build/qlora_dist"
