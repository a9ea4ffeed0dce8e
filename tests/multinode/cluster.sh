#!/usr/bin/env bash
# Emulated nodes for the multinode tests: each node is a network namespace (its own veth
# interface `qlmn0` on a host bridge, its own address 10.77.K.1x/24), a UTS namespace (its own
# hostname qlmnK-nI) and a mount namespace (its own /etc/hosts naming every node; otherwise the
# host's file system, shared as on a cluster), held open by one `sleep` per node whose
# /proc/PID/ns/* every other node can enter. Root only (ip, unshare, nsenter: iproute2 and
# util-linux).
#
#   cluster.sh up DIR N           create N nodes; state, hostfile, rsh agent and env in DIR
#   cluster.sh down DIR           remove everything `up` (and `slurm-start`) made; idempotent
#   cluster.sh run N DIR -- CMD   up, CMD (with the cluster's env), down on exit (even on failure)
#   cluster.sh exec DIR I CMD...  run CMD inside node I (0-based)
#   cluster.sh slurm-start DIR    munged + slurmctld on the host, one slurmd inside every node;
#                                 prints the SLURM_CONF path (port: QLORA_SLURM_PORT, default 16817)
#   cluster.sh slurm-stop DIR     stops them (down does too)
#
# DIR/env (sourced by `run`, read by the tests) sets QLMN_NODES (hostnames), QLMN_ADDRS,
# QLMN_NETNS, QLMN_IF (the interface name inside every node) and OMPI_MCA_plm_rsh_agent:
# DIR/rsh_agent, which Open MPI's rsh launcher calls as `rsh_agent HOST COMMAND...` to start its
# daemon (orted) on HOST; it runs COMMAND inside that node's namespaces, as ssh would on a real
# node. DIR/hostfile lists the nodes with slots=8.
#
# Names: bridge qlmnK-br, namespaces qlmnK-nI, host-side veths qlmnK-nIh, addresses 10.77.K.0/24,
# with K (1..250) the first number no other cluster holds (claimed by creating the bridge). A
# cluster whose owner (--owner PID, default the caller) has died is removed by the next `up`.
set -euo pipefail
registry=/run/qlmn-clusters
log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

node_enter() {  # DIR I: the nsenter prefix for node I
  local dir=$1 i=$2
  # shellcheck disable=SC1091
  source "$dir/env"
  local pids=($QLMN_PIDS)
  echo "nsenter -t ${pids[i]} -n -u -m --"
}

down() {
  local dir=$1
  [[ -f $dir/env ]] || return 0
  # shellcheck disable=SC1091
  source "$dir/env"
  slurm_stop "$dir" || true
  local k=$QLMN_K i
  for ((i = 0; i < QLMN_N; i++)); do
    # Whatever still runs inside the node (a rank, a daemon) goes with it.
    local pids
    pids=$(ip netns pids "qlmn$k-n$i" 2>/dev/null || true)
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
  done
  for ((i = 0; i < QLMN_N; i++)); do
    ip netns del "qlmn$k-n$i" 2>/dev/null || true
    ip link del "qlmn$k-n${i}h" 2>/dev/null || true
  done
  ip link del "qlmn$k-br" 2>/dev/null || true
  rm -f "$registry/$k" "$dir/env"
}

# Clusters whose owner died without `down` (a test killed by a timeout).
reap_orphans() {
  [[ -d $registry ]] || return 0
  local f owner dir
  for f in "$registry"/*; do
    [[ -f $f ]] || continue
    read -r owner dir < "$f" || continue
    if ! kill -0 "$owner" 2>/dev/null; then
      log "removing cluster ${f##*/} of dead process $owner ($dir)"
      if [[ -f $dir/env ]]; then down "$dir"; else rm -f "$f"; fi
    fi
  done
}

up() {
  local dir=$1 n=$2 owner=$3 k i
  [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 8 )) || die "N must be 1..8, not '$n'"
  (( EUID == 0 )) || die "needs root (network namespaces)"
  command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null ||
    die "needs ip (iproute2), nsenter and unshare (util-linux)"
  mkdir -p "$dir" "$registry"
  dir=$(realpath "$dir")
  [[ -f $dir/env ]] && die "$dir already holds a cluster (cluster.sh down $dir first)"
  reap_orphans
  for ((k = 1; k <= 250; k++)); do
    ip link add "qlmn$k-br" type bridge 2>/dev/null && break
  done
  (( k <= 250 )) || die "no free cluster number (250 bridges qlmn*-br exist)"
  echo "$owner $dir" > "$registry/$k"
  local nodes=() addrs=() netns=()
  for ((i = 0; i < n; i++)); do
    nodes+=("qlmn$k-n$i"); addrs+=("10.77.$k.$((10 + i))"); netns+=("qlmn$k-n$i")
  done
  cat > "$dir/env" <<ENV
QLMN_K=$k
QLMN_N=$n
QLMN_DIR=$dir
QLMN_NODES="${nodes[*]}"
QLMN_ADDRS="${addrs[*]}"
QLMN_NETNS="${netns[*]}"
QLMN_IF=qlmn0
QLMN_HOST_ADDR=10.77.$k.1
OMPI_MCA_plm_rsh_agent=$dir/rsh_agent
export QLMN_K QLMN_N QLMN_DIR QLMN_NODES QLMN_ADDRS QLMN_NETNS QLMN_IF QLMN_HOST_ADDR OMPI_MCA_plm_rsh_agent
ENV
  # From here a failure removes what was made.
  trap 'log "up failed; removing the partial cluster"; down "$dir"' ERR
  ip addr add "10.77.$k.1/24" dev "qlmn$k-br"
  ip link set "qlmn$k-br" up
  { echo "127.0.0.1 localhost"
    for ((i = 0; i < n; i++)); do echo "${addrs[i]} ${nodes[i]}"; done; } > "$dir/hosts"
  : > "$dir/hostfile"
  for ((i = 0; i < n; i++)); do
    ip netns add "${netns[i]}"
    ip link add "qlmn$k-n${i}h" type veth peer name qlmn0 netns "${netns[i]}"
    ip link set "qlmn$k-n${i}h" master "qlmn$k-br" up
    ip -n "${netns[i]}" addr add "${addrs[i]}/24" dev qlmn0
    ip -n "${netns[i]}" link set qlmn0 up
    ip -n "${netns[i]}" link set lo up
    ip -n "${netns[i]}" route add default via "10.77.$k.1"
    # The node's holder; slave: mounts made on the host later still show inside the node, not
    # the other way round.
    # Each node also has a directory of its own at DIR/node-tmp (node-local scratch: SLURM's
    # PMIx client directories, whose names hold only the job and step, not the node).
    rm -f "$dir/node$i.pid"
    mkdir -p "$dir/node-tmp" "$dir/node$i-tmp"
    setsid nsenter --net="/run/netns/${netns[i]}" unshare --uts --mount --propagation slave \
      sh -c "hostname ${nodes[i]} && mount --bind $dir/hosts /etc/hosts && mount --bind $dir/node$i-tmp $dir/node-tmp && echo \$\$ > $dir/node$i.pid && exec sleep infinity" \
      </dev/null >/dev/null 2>&1 &
    echo "${nodes[i]} slots=8" >> "$dir/hostfile"
  done
  local pids=()
  for ((i = 0; i < n; i++)); do
    for _ in $(seq 100); do [[ -s $dir/node$i.pid ]] && break; sleep 0.05; done
    [[ -s $dir/node$i.pid ]] || { log "node $i did not start"; false; }
    pids+=("$(cat "$dir/node$i.pid")")
  done
  echo "QLMN_PIDS=\"${pids[*]}\"; export QLMN_PIDS" >> "$dir/env"
  # Open MPI's rsh launcher: `rsh_agent HOST CMD...`; like sshd, the command is one shell line.
  cat > "$dir/rsh_agent" <<AGENT
#!/usr/bin/env bash
host=\$1; shift
nodes=(${nodes[*]}) pids=(${pids[*]})
for i in "\${!nodes[@]}"; do
  if [[ \${nodes[i]} == "\$host" ]]; then
    exec nsenter -t "\${pids[i]}" -n -u -m -- /bin/sh -c "cd / && \$*"
  fi
done
echo "rsh_agent: unknown host '\$host' (nodes: \${nodes[*]})" >&2
exit 255
AGENT
  chmod +x "$dir/rsh_agent"
  trap - ERR
  # Every node reaches every other one.
  for ((i = 0; i < n; i++)); do
    local j=$(( (i + 1) % n ))
    $(node_enter "$dir" "$i") getent hosts "${nodes[j]}" >/dev/null ||
      { down "$dir"; die "node $i does not resolve ${nodes[j]}"; }
  done
  log "up: ${nodes[*]} (${addrs[*]}) on bridge qlmn$k-br; state in $dir"
}

slurm_stop() {
  local dir=$1 f
  [[ -d $dir/slurm ]] || return 0
  local pids=() pid
  for f in "$dir"/slurm/*.pid; do
    pid=$(cat "$f" 2>/dev/null) || continue  # a daemon removes its pid file as it ends
    [[ -n $pid ]] && pids+=("$pid") && kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$dir"/slurm/*.pid
}

# One slurmctld (and munged) on the host at the bridge address, one slurmd per node inside its
# namespaces with NodeName = its hostname and NodeAddr = its address. Debian's slurm-wlm 22.05;
# root (SlurmUser/SlurmdUser root); no cgroups (proctrack/linuxproc, task/none). One munged with
# one key serves the controller and every node through its socket on the shared file system (on
# a real cluster each node runs munged with the same key).
slurm_start() {
  local dir=$1 s=$1/slurm port=${QLORA_SLURM_PORT:-16817} i
  # shellcheck disable=SC1091
  source "$dir/env"
  local nodes=($QLMN_NODES) addrs=($QLMN_ADDRS)
  mkdir -p "$s"/{munge,state,log} "$s/spool"
  chmod 700 "$s/munge"
  dd if=/dev/urandom of="$s/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$s/munge/munge.key"
  munged --force --key-file="$s/munge/munge.key" --socket="$s/munge/munge.socket" \
    --pid-file="$s/munged.pid" --log-file="$s/log/munged.log" --seed-file="$s/munge/seed"
  local host mem
  host=$(hostname -s)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / QLMN_N - 512 ))
  { cat <<CONF
ClusterName=qlmn$QLMN_K
SlurmctldHost=$host($QLMN_HOST_ADDR)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$s/munge/munge.socket
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool/%n
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd.%n.pid
SlurmctldLogFile=$s/log/slurmctld.log
SlurmdLogFile=$s/log/slurmd.%n.log
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
SlurmdTimeout=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
CONF
    for ((i = 0; i < QLMN_N; i++)); do
      echo "NodeName=${nodes[i]} NodeAddr=${addrs[i]} CPUs=8 RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } > "$s/slurm.conf"
  echo "PMIxCliTmpDirBase=$dir/node-tmp" > "$s/mpi.conf"
  export SLURM_CONF=$s/slurm.conf
  slurmctld -c -f "$SLURM_CONF"
  for ((i = 0; i < QLMN_N; i++)); do
    mkdir -p "$s/spool/${nodes[i]}"
    $(node_enter "$dir" "$i") slurmd -f "$SLURM_CONF" -N "${nodes[i]}"
  done
  for _ in $(seq 150); do
    if [[ $(sinfo -h -o '%T %D' 2>/dev/null) == "idle $QLMN_N" ]]; then echo "$SLURM_CONF"; return 0; fi
    sleep 0.2
  done
  log "error: the nodes did not come up; logs in $s/log"
  sinfo >&2 || true
  tail -5 "$s"/log/*.log >&2 || true
  slurm_stop "$dir"
  return 1
}

cmd=${1:-}
case $cmd in
  up)
    dir=${2:?DIR}; n=${3:?N}; owner=$PPID
    [[ ${4:-} == --owner ]] && owner=${5:?PID}
    up "$dir" "$n" "$owner" ;;
  down) down "$(realpath -m "${2:?DIR}")" ;;
  run)
    n=${2:?N}; dir=${3:?DIR}; [[ ${4:-} == -- ]] || die "usage: cluster.sh run N DIR -- CMD..."
    shift 4
    up "$dir" "$n" $$
    dir=$(realpath "$dir")
    trap 'down "$dir"' EXIT
    trap 'exit 130' INT TERM
    # shellcheck disable=SC1091
    source "$dir/env"
    "$@" ;;
  exec)
    dir=$(realpath "${2:?DIR}"); i=${3:?I}; shift 3
    exec $(node_enter "$dir" "$i") "$@" ;;
  slurm-start) slurm_start "$(realpath "${2:?DIR}")" ;;
  slurm-stop) slurm_stop "$(realpath "${2:?DIR}")" ;;
  *) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
