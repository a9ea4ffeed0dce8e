#!/usr/bin/env bash
# Makes the dependency bundle that scripts/gpu_check.sh needs on a GPU machine without network
# access and without our Debian packages: the Debian bookworm .debs of Open MPI (with PMIx, hwloc,
# libevent), parallel HDF5, Boost.Program_options, GoogleTest/GoogleMock, nlohmann-json, PCRE2 and
# utf8proc, plus the shared libraries they load at run time, unpacked with dpkg-deb -x into one
# prefix, trimmed (docs, man pages, Fortran, Java, OpenSHMEM, static libraries that have a shared
# twin, Open MPI / PMIx plugins whose libraries are not shipped: UCX, libfabric, verbs, PSM), and
# packed as OUT_DIR/qlora_gpu_bundle.tar.xz (at most 40 MiB; the device tool carries 64 MiB in all).
#
# Usage: scripts/gpu_bundle.sh [OUT_DIR]   (default .gpu_bundle, ignored by git). Run on Debian
# bookworm (it uses apt-get download; apt-get update first when the lists are missing) as root or
# a user that can run apt-get download; needs dpkg-deb, xz, tar and a C compiler (self-test).
#
# Layout of the tarball (one folder, qlora_gpu_bundle/):
#   usr/, etc/openmpi/   the core packages as Debian installs them
#   usr/lib/qlora-deps/  shared libraries of the dependency closure (zlib, OpenSSL, libcurl and
#                        its libraries, hwloc, libevent, munge, libaec, udev): used only where the
#                        target does not have that soname already (its copies are newer or equal;
#                        libc, libstdc++ and libgcc_s are never shipped)
#   qlora_env.sh         `source qlora_env.sh` sets everything up (below); needs bash
#   MANIFEST             packages and versions, plugins dropped
#
# Relocating Debian's Open MPI 4.1 (configured with --prefix=/usr, hard-coded paths under
# /usr/lib/x86_64-linux-gnu/openmpi, /usr/share/openmpi and /etc/openmpi), what qlora_env.sh sets:
#   OPAL_PREFIX=$B/usr                libdir, pkglibdir (plugins), pkgdatadir (help texts, the
#                                     mpicc/mpicxx wrapper data) and includedir follow it
#   OPAL_SYSCONFDIR=$B/etc/openmpi    openmpi-mca-params.conf (sysconfdir is an absolute /etc path)
#   PMIX_MCA_mca_base_component_path  PMIx's plugin folder (its own conf file hard-codes it; the
#                                     line is removed from the shipped copy)
#   PATH, LD_LIBRARY_PATH             $B/usr/bin; $B/usr/lib/x86_64-linux-gnu and the deps in use
#   LIBRARY_PATH                      $B/usr/lib/x86_64-linux-gnu: the -lsz -lcurl ... of h5pcc -show
#   CMAKE_PREFIX_PATH=$B/usr          GTest, Boost, nlohmann_json configs; find_library/find_path
#                                     (PCRE2, utf8proc); MPI and HDF5 come from the wrappers on PATH
#                                     (mpicxx, h5pcc: its prefix line is made self-locating)
# Open MPI 4.1 needs no PRRTE (mpirun is orterun, orted for remote nodes only).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=${1:-$root/.gpu_bundle}
name=qlora_gpu_bundle
max_mib=40
log() { printf '[gpu_bundle] %s\n' "$*"; }
die() { printf '[gpu_bundle] error: %s\n' "$*" >&2; exit 1; }

. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] ||
  die "this is ${PRETTY_NAME:-an unknown system}; the bundle is made from Debian bookworm packages (run it on bookworm)"
[ "$(dpkg --print-architecture)" = amd64 ] || die "architecture $(dpkg --print-architecture); the GPU machine is amd64"
for tool in apt-get apt-cache dpkg-deb xz tar readelf cc; do
  command -v "$tool" >/dev/null || die "$tool not found (needed to make the bundle)"
done

# Packages whose files go in as they are (headers, CMake configs, wrappers, the libraries we link).
core_runtime=(openmpi-bin libopenmpi3 openmpi-common libpmix2 libhdf5-openmpi-103-1 libhdf5-openmpi-hl-100
  libboost-program-options1.74.0 libpcre2-8-0 libutf8proc2)
core_dev=(libopenmpi-dev libhdf5-openmpi-dev libboost1.74-dev libboost-program-options1.74-dev
  libgtest-dev libgmock-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev)
# Never followed: the C/C++ runtime (the target's is newer or equal), Fortran (dropped), the
# high-speed network stacks (their plugins are dropped; TCP and shared memory remain), hwloc's
# GPU/X11 plugins.
not_followed=" $(echo libc6 libgcc-s1 libstdc++6 gcc-12-base libcrypt1 libgfortran5 libfabric1 libucx0 \
  libibverbs1 librdmacm1 libpsm2-2 libpsm-infinipath1 libnl-3-200 libnl-route-3-200 \
  libhwloc-plugins debconf) "
# Sonames every glibc system has (never shipped, never looked for).
base_sonames=" $(echo libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 ld-linux-x86-64.so.2 \
  libstdc++.so.6 libgcc_s.so.1 libutil.so.1 libresolv.so.2 libcrypt.so.1) "

# The run-time closure of the core packages (Depends and Pre-Depends, first alternative).
closure() {
  local -A seen=()
  local queue=("$@") p d
  while ((${#queue[@]})); do
    p=${queue[0]}; queue=("${queue[@]:1}")
    [[ -n ${seen[$p]:-} ]] && continue
    seen[$p]=1
    echo "$p"
    for d in $(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                 --no-replaces --no-enhances "$p" |
               awk '$1=="Depends:"||$1=="PreDepends:"{sub(/:any$/,"",$2); print $2}' | grep -v '^<'); do
      [[ $not_followed == *" $d "* ]] || queue+=("$d")
    done
  done
}
if ! apt-cache show "${core_runtime[0]}" >/dev/null 2>&1; then
  log "apt-get update (no package lists)"
  apt-get update -qq
fi
mapfile -t runtime < <(closure "${core_runtime[@]}")
deps=()
for p in "${runtime[@]}"; do
  [[ " ${core_runtime[*]} " == *" $p "* ]] || deps+=("$p")
done

work=$(mktemp -d /tmp/qlora_gpu_bundle.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/deps"
B=$work/$name
mkdir -p "$B"
log "downloading ${#core_runtime[@]} + ${#core_dev[@]} core and ${#deps[@]} dependency packages"
download() { (cd "$work/debs" && apt-get download "$@" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' || true); }
download "${core_runtime[@]}" "${core_dev[@]}" "${deps[@]}"
for p in "${core_runtime[@]}" "${core_dev[@]}" "${deps[@]}"; do
  compgen -G "$work/debs/${p}_*.deb" >/dev/null || die "apt-get download $p gave no .deb"
done
{
  echo "# qlora_dist GPU bundle, made $(date -u +%Y-%m-%dT%H:%M:%SZ) on ${PRETTY_NAME}"
  echo "# core packages (unpacked as they are):"
  for p in "${core_runtime[@]}" "${core_dev[@]}"; do dpkg-deb -f "$work"/debs/"${p}"_*.deb Package Version | paste -sd' '; done
  echo "# dependency packages (shared libraries only, in usr/lib/qlora-deps, used where the target lacks them):"
  for p in "${deps[@]}"; do dpkg-deb -f "$work"/debs/"${p}"_*.deb Package Version | paste -sd' '; done
} >"$B/MANIFEST"

for p in "${core_runtime[@]}" "${core_dev[@]}"; do dpkg-deb -x "$work"/debs/"${p}"_*.deb "$B"; done
for p in "${deps[@]}"; do dpkg-deb -x "$work"/debs/"${p}"_*.deb "$work/deps"; done
mkdir -p "$B/usr/lib/qlora-deps"
find "$work/deps/lib" "$work/deps/usr/lib" -maxdepth 2 -name '*.so.*' \( -type f -o -type l \) \
  -exec cp -a {} "$B/usr/lib/qlora-deps/" \;

log "trimming"
lib=$B/usr/lib/x86_64-linux-gnu
rm -rf "$B"/usr/share/{doc,man,info,lintian,locale,bug,java} "$B"/usr/src "$lib/fortran" \
  "$B/etc/openmpi/openmpi-totalview.tcl"
# Fortran, Java, OpenSHMEM, the MPI C++ profiling tools: nothing of ours uses them.
find "$B" \( -name '*fortran*' -o -name '*mpifh*' -o -name '*usempi*' -o -name '*.mod' \
  -o -name '*java*' -o -name 'mpi.jar' -o -name '*oshmem*' -o -name 'osh*' -o -name 'shmem*' \
  -o -name 'mpif77*' -o -name 'mpif90*' -o -name 'mpifort*' -o -name 'h5pfc*' -o -name '*hdf5_cpp*' \
  -o -name '*hdf5_hl_cpp*' -o -name 'libpcre2-16*' -o -name 'libpcre2-32*' -o -name 'libpcre2-posix*' \
  -o -name 'mpijavac*' -o -name 'libompitrace*' -o -name 'ompi_monitoring_prof*' \) -prune -exec rm -rf {} +
# Static libraries with a shared twin (GoogleTest/GoogleMock are static only and stay).
find "$B" -name '*.a' | while read -r a; do
  [ -e "${a%.a}.so" ] && rm -f "$a"
done
rm -f "$B"/usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.a "$lib"/hdf5/openmpi/*.a "$lib"/libhdf5_openmpi*.a
# Boost: the top-level modules that <boost/program_options.hpp> reaches (whole folders, so that
# another compiler's configuration branches find their headers too), plus config, detail, predef.
echo '#include <boost/program_options.hpp>
#include <boost/version.hpp>' >"$work/bpo.cpp"
keep=$(cc -x c++ -std=c++17 -M -nostdinc++ -I"$B/usr/include" "$work/bpo.cpp" 2>/dev/null ||
       c++ -std=c++17 -M -I"$B/usr/include" "$work/bpo.cpp")
keep=$(tr ' \\' '\n\n' <<<"$keep" | grep "$B/usr/include/boost/" | sed "s|$B/usr/include/boost/||" |
       cut -d/ -f1 | sort -u)
[ -n "$keep" ] || die "could not list the Boost headers <boost/program_options.hpp> needs"
for entry in "$B"/usr/include/boost/*; do
  e=$(basename "$entry")
  case "$e" in config|config.hpp|detail|predef|predef.h|version.hpp) continue ;; esac
  grep -qxF "$e" <<<"$keep" || rm -rf "$entry"
done
# Debian's alternatives (mpicc, mpirun, h5pcc) as plain links.
for t in mpicc mpicxx mpic++ mpiCC mpirun mpiexec h5pcc; do
  [ -e "$B/usr/bin/$t.openmpi" ] && ln -sfn "$t.openmpi" "$B/usr/bin/$t"
done
ln -sfn libmpi.so.40 "$lib/libmpi.so" 2>/dev/null || true
# h5pcc: its prefix is the folder above its own.
sed -i 's|^prefix="/usr"$|prefix="$(cd "$(dirname "$(readlink -f "$0")")/.." \&\& pwd)"|' "$B/usr/bin/h5pcc.openmpi"
grep -q 'readlink -f' "$B/usr/bin/h5pcc.openmpi" || die "h5pcc.openmpi: its prefix line was not found (changed upstream?)"
# ... and it links the shared libraries by default (the static ones are trimmed).
sed -i 's|^STATIC_AVAILABLE="yes"$|STATIC_AVAILABLE="no"|' "$B/usr/bin/h5pcc.openmpi"
sed -i '/^mca_base_component_path/d' "$lib/pmix2/share/pmix-mca-params.conf"
# Link-time names (libcurl.so, libz.so, ... that h5pcc -show lists) for the dependency libraries.
for so in "$B"/usr/lib/qlora-deps/*.so.*; do
  base=$(basename "$so"); dev=${base%%.so.*}.so
  [[ $base =~ \.so\.[0-9]+$ ]] || continue
  [ -e "$lib/$dev" ] || ln -sfn "../qlora-deps/$base" "$lib/$dev"
done

# Every ELF's NEEDED must resolve inside the bundle or be a base soname; plugins (and the
# libmca_common_* libraries they use) that need an unshipped library are dropped.
declare -A have=()
dropped=()
while :; do
  have=()
  while read -r f; do have[$(basename "$f")]=1; done < <(find "$B" \( -type f -o -type l \) -name '*.so*')
  changed=0
  while read -r f; do
    head -c4 "$f" | grep -q ELF || continue
    for n in $(readelf -d "$f" 2>/dev/null | awk '/\(NEEDED\)/{gsub(/[][]/,"",$NF); print $NF}'); do
      [[ $base_sonames == *" $n "* || -n ${have[$n]:-} ]] && continue
      case "$f" in
        */openmpi3/*|*/pmix2/lib/pmix/*|*/libmca_common_*|*/hwloc/*)
          dropped+=("${f#"$B"/} (needs $n)"); rm -f "$f"; changed=1; break ;;
        *) die "${f#"$B"/} needs $n, which is neither shipped nor a base library" ;;
      esac
    done
  done < <(find "$B" -type f \( -name '*.so*' -o -perm -u+x \))
  ((changed)) || break
done
find "$B" -xtype l -delete  # links to what was trimmed
{ echo "# plugins dropped (they need libraries not shipped):"; printf '%s\n' "${dropped[@]}"; } >>"$B/MANIFEST"

cat >"$B/qlora_env.sh" <<'ENV'
# Sourced (bash): sets up the unpacked qlora_dist GPU bundle in the folder of this file.
# Dependency libraries are used only where the system lacks that soname (its own are newer).
B=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_qlora_ldcache=$({ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null)
_qlora_has_soname() {  # in the loader's cache (and there), or in a default folder
  local d
  for d in $(awk -v n="$1" '$1==n && /x86-64/ {print $NF}' <<<"$_qlora_ldcache") \
           /lib/x86_64-linux-gnu/"$1" /usr/lib/x86_64-linux-gnu/"$1" /lib64/"$1" /usr/lib64/"$1"; do
    [ -e "$d" ] && return 0
  done
  return 1
}
rm -rf "$B/usr/lib/qlora-deps-used"; mkdir -p "$B/usr/lib/qlora-deps-used"
QLORA_BUNDLE_DEPS_USED=""
for _so in "$B"/usr/lib/qlora-deps/*.so.*; do
  _n=$(basename "$_so")
  [[ $_n =~ \.so\.[0-9]+$ ]] || continue  # sonames only (the fully versioned files are their targets)
  if ! _qlora_has_soname "$_n"; then
    ln -s "../qlora-deps/$_n" "$B/usr/lib/qlora-deps-used/$_n"
    QLORA_BUNDLE_DEPS_USED+="$_n "
  fi
done
unset _so _n _qlora_ldcache
export QLORA_BUNDLE_DIR=$B QLORA_BUNDLE_DEPS_USED
export OPAL_PREFIX=$B/usr OPAL_SYSCONFDIR=$B/etc/openmpi
export PMIX_MCA_mca_base_component_path=$B/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix
export PATH=$B/usr/bin:$PATH
export LD_LIBRARY_PATH=$B/usr/lib/x86_64-linux-gnu:$B/usr/lib/qlora-deps-used${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# -l names that h5pcc -show lists without a -L (sz, curl, crypto, z): the link-time links here.
export LIBRARY_PATH=$B/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}
export CMAKE_PREFIX_PATH=$B/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
ENV

log "self-test: mpicc, mpirun -np 2 and h5pcc from the bundle"
cat >"$work/hello.c" <<'C'
#include <mpi.h>
#include <stdio.h>
int main(int argc, char** argv) {
  int rank, size, sum;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) printf("bundle mpi ok: %d ranks, sum %d\n", size, sum);
  MPI_Finalize();
  return 0;
}
C
(
  cd "$work"  # h5pcc leaves its object file in the working folder
  # shellcheck disable=SC1091
  source "$B/qlora_env.sh"
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  mpicc "$work/hello.c" -o "$work/hello"
  [[ $(mpicc -showme:incdirs) == "$B"/* ]] || die "mpicc -showme:incdirs does not point into the bundle"
  mpirun --oversubscribe -np 2 "$work/hello"
  printf '#include <hdf5.h>\nint main(void) { return H5open() < 0 || !H5_HAVE_PARALLEL; }\n' >"$work/h5.c"
  h5pcc "$work/h5.c" -o "$work/h5" && "$work/h5" || die "h5pcc from the bundle: parallel HDF5 program failed"
)

mkdir -p "$out_dir"
tarball=$out_dir/$name.tar.xz
log "packing $tarball ($(du -sm "$B" | cut -f1) MiB unpacked)"
tar -C "$work" --owner=0 --group=0 -cf - "$name" | xz -9 -T0 >"$tarball.tmp"
mv "$tarball.tmp" "$tarball"
size=$(stat -c %s "$tarball")
mib=$(awk -v s="$size" 'BEGIN{printf "%.1f", s/1048576}')
((size <= max_mib * 1048576)) || die "$tarball is $mib MiB (limit $max_mib MiB)"
log "done: $tarball, $mib MiB ($(grep -vc '^#' "$B/MANIFEST") MANIFEST lines)"
