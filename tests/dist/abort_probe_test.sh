#!/usr/bin/env bash
# One failing rank ends the whole job: runs abort_probe (see abort_probe.cpp) and requires a
# non-zero exit, the failing rank's one-line message on stderr, and no hang (timeout 20 s).
#   abort_probe_test.sh throw|stuck|env_mismatch MPIRUN PROBE
set -u
mode=$1
mpirun=$2
probe=$3
limit=20
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
case "$mode" in
  throw | stuck)
    timeout -k 5 "$limit" "$mpirun" --oversubscribe -np 3 "$probe" "$mode" \
      >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    want="[rank 2] abort_probe: rank 2 failed on purpose"
    ;;
  env_mismatch)
    # A torchrun-style environment but no MPI launcher: a singleton MPI world of size 1.
    env -u OMPI_COMM_WORLD_SIZE -u OMPI_COMM_WORLD_RANK WORLD_SIZE=4 RANK=0 \
      timeout -k 5 "$limit" "$probe" throw >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    want="abort_probe: rank environment: WORLD_SIZE=4 but MPI says world size 1"
    ;;
  *)
    echo "unknown mode $mode" >&2
    exit 2
    ;;
esac
elapsed=$((SECONDS - start))

fail() {
  echo "FAIL ($mode): $*"
  echo "--- exit status $rc after ${elapsed}s; stderr:"
  cat "$tmp/stderr"
  echo "--- stdout:"
  cat "$tmp/stdout"
  exit 1
}
[ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || fail "did not end within ${limit}s (hang)"
[ "$rc" -ne 0 ] || fail "exit status 0"
grep -qF -- "$want" "$tmp/stderr" || fail "stderr lacks: $want"
if [ "$mode" = env_mismatch ]; then
  grep -qF -- "mpirun -np 4" "$tmp/stderr" || fail "the message does not say how to launch"
  lines=$(grep -c . "$tmp/stderr")
  [ "$lines" -eq 1 ] || fail "expected one line on stderr, got $lines"
fi
echo "ok ($mode): exit status $rc after ${elapsed}s"
