#!/usr/bin/env bash
# The body both sbatch scripts exec (so it runs as the batch shell and gets its signals):
#   srun --mpi=pmix qlora_dist config.ini [--section.key=value ...]
# SIGUSR1 / SIGTERM to the batch shell (--signal=B:USR1@120 before the time limit, scancel
# --signal, preemption) are forwarded to the job step; qlora_dist then finishes the step, writes a
# checkpoint and exits 75, and this script requeues the job, which resumes from that checkpoint
# (resume_from_checkpoint = auto). Any other exit status is the job's.
set -uo pipefail
(( $# )) || { echo "usage: sbatch slurm/qlora.sbatch config.ini [--section.key=value ...]" >&2; exit 2; }
home=${QLORA_HOME:-${SLURM_SUBMIT_DIR:-.}}
bin=${QLORA_DIST:-$home/build/qlora_dist}
[[ -x $bin ]] || { echo "qlora_step.sh: $bin not found (set QLORA_DIST or submit from the repository)" >&2; exit 2; }
echo "qlora_step.sh: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} ranks"

srun --mpi=pmix --kill-on-bad-exit=1 "$bin" "$@" &
step=$!
forward() { echo "qlora_step.sh: $1 -> job step"; kill -"$1" "$step" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
while :; do
  wait "$step"; status=$?
  kill -0 "$step" 2>/dev/null || break   # a trapped signal interrupted wait: wait again
done
if (( status == 75 )) && [[ -n ${SLURM_JOB_ID:-} ]]; then
  echo "qlora_step.sh: checkpointed after a stop signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
