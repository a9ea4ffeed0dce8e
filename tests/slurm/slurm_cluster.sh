#!/usr/bin/env bash
# A real one-node SLURM on localhost for the slurm tests, everything under one directory:
#   tests/slurm/slurm_cluster.sh start DIR   munged + slurmctld + slurmd; prints the SLURM_CONF path
#   tests/slurm/slurm_cluster.sh stop DIR    stops what start started (by pid files)
# Debian's slurm-wlm 22.05 and munge (scripts/setup.sh installs them). Runs as root (SlurmUser and
# SlurmdUser root); no cgroups (proctrack/linuxproc, task/none); ports from the environment
# (QLORA_SLURM_PORT, default 16817 and the next one).
set -euo pipefail
cmd=${1:?start|stop}; dir=$(realpath -m "${2:?DIR}")
host=$(hostname -s)
port=${QLORA_SLURM_PORT:-16817}

stop() {
  for p in slurmd slurmctld munged; do
    if [[ -f $dir/$p.pid ]]; then kill "$(cat "$dir/$p.pid")" 2>/dev/null || true; fi
  done
  for p in slurmd slurmctld munged; do
    for _ in $(seq 50); do
      [[ -f $dir/$p.pid ]] && kill -0 "$(cat "$dir/$p.pid")" 2>/dev/null || break
      sleep 0.1
    done
    [[ -f $dir/$p.pid ]] && kill -9 "$(cat "$dir/$p.pid")" 2>/dev/null || true
    rm -f "$dir/$p.pid"
  done
}

if [[ $cmd == stop ]]; then stop; exit 0; fi
[[ $cmd == start ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

mkdir -p "$dir"/{munge,state,spool,log}
chmod 700 "$dir/munge"
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
cpus=$(nproc --all)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=qlora
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=8 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "$SLURM_CONF"; exit 0; fi
  sleep 0.2
done
echo "slurm_cluster.sh: the node did not come up; logs in $dir/log" >&2
sinfo >&2 || true
tail -5 "$dir"/log/*.log >&2 || true
stop
exit 1
