#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, to try slurm/*.sbatch before a real cluster.
#
#   scripts/local_slurm.sh install   # apt-get install slurm-wlm munge when missing (as root)
#   scripts/local_slurm.sh up        # install if needed, write the config, start the daemons
#   scripts/local_slurm.sh status    # daemons, nodes, jobs
#   scripts/local_slurm.sh env       # prints `export SLURM_CONF=...`: eval "$(scripts/local_slurm.sh env)"
#   scripts/local_slurm.sh down      # cancel its jobs, stop the daemons it started
#
# One munged (its own key and socket), one slurmctld and two slurmd (`slurmd -N n1`, `-N n2`) run
# as this user without systemd. Nodes n1 and n2 (NodeAddr=127.0.0.1, their own Port=) have
# SCALELORA_SLURM_CPUS CPUs each (default 1) in one partition, `local`. Everything (config, keys,
# logs, state, pid files) is under SCALELORA_SLURM_DIR (default ${TMPDIR:-/tmp}/scalelora-slurm-$UID);
# `down` stops only the processes whose pid files are there. Jobs run as this user with the
# submitting environment (sbatch's default --export=ALL), so export PYTHONPATH etc. before sbatch.
set -euo pipefail

STATE=${SCALELORA_SLURM_DIR:-${TMPDIR:-/tmp}/scalelora-slurm-$(id -u)}
STATE=$(realpath -m "$STATE") # the daemons change directory: every path in the config is absolute
CONF=$STATE/slurm.conf
NODES=(n1 n2)
CPUS=${SCALELORA_SLURM_CPUS:-1}
MUNGE_SOCKET=$STATE/munge-socket/munge.socket
BINARIES=(munged mungekey slurmctld slurmd sbatch srun scontrol scancel sinfo squeue)

log() { echo "local_slurm: $*"; }
die() {
  echo "local_slurm: error: $*" >&2
  exit 1
}

missing_binaries() {
  local name
  for name in "${BINARIES[@]}"; do
    command -v "$name" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$name" >/dev/null 2>&1 || echo "$name"
  done
}

# Installs slurm-wlm and munge when a program is missing; without root (or apt-get) it says what to
# do and returns 1, which `make install` reports and ignores (the cluster tests then skip).
cmd_install() {
  if [[ -z $(missing_binaries) ]]; then
    return 0
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "local_slurm: slurm-wlm and munge are not installed and this is not root: sudo apt-get install slurm-wlm munge" >&2
    return 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "local_slurm: no apt-get here: install SLURM (slurmctld, slurmd, the clients) and munge yourself" >&2
    return 1
  fi
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q slurm-wlm munge >"${TMPDIR:-/tmp}/local_slurm-apt.log" 2>&1; then
    apt-get update -q >>"${TMPDIR:-/tmp}/local_slurm-apt.log" 2>&1
    apt-get install -y -q slurm-wlm munge >>"${TMPDIR:-/tmp}/local_slurm-apt.log" 2>&1 ||
      die "apt-get install slurm-wlm munge failed; see ${TMPDIR:-/tmp}/local_slurm-apt.log"
  fi
}

# name -> pid file the daemon writes; pid_alive checks the pid still runs that daemon with our paths
pid_file() {
  case $1 in
    munged) echo "$STATE/munge/munged.pid" ;;
    slurmctld) echo "$STATE/slurmctld.pid" ;;
    *) echo "$STATE/$1/slurmd.pid" ;;
  esac
}
DAEMONS=(munged slurmctld "${NODES[@]}")

# the pid of daemon $1 if it is running and was started by this script (its command line names $STATE)
running_pid() {
  local file pid
  file=$(pid_file "$1")
  [[ -s $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$STATE/" || return 1
  echo "$pid"
}

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {
  local user ports ctld_port i host
  user=$(id -un)
  host=$(hostname -s)
  read -r -a ports <<<"$(free_ports $((1 + ${#NODES[@]})))"
  ctld_port=${ports[0]}
  {
    echo "# written by scripts/local_slurm.sh up (state dir: $STATE)"
    echo "ClusterName=scalelora-local"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$ctld_port"
    echo "SlurmUser=$user"
    echo "SlurmdUser=$user"
    # cred_expire: a requeued job waits this long before it starts again (default 120 s); with the
    # 5 s scheduler passes below it starts about 12 s after `scontrol requeue` (measured)
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10"
    echo "CredType=cred/munge"
    echo "StateSaveLocation=$STATE/ctld"
    echo "SlurmctldPidFile=$STATE/slurmctld.pid"
    echo "SlurmctldLogFile=$STATE/slurmctld.log"
    echo "SlurmdSpoolDir=$STATE/%n/spool"
    echo "SlurmdPidFile=$STATE/%n/slurmd.pid"
    echo "SlurmdLogFile=$STATE/%n/slurmd.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=5,bf_interval=5"
    echo "MpiDefault=none"
    echo "SwitchType=switch/none"
    echo "JobCompType=jobcomp/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "ReturnToService=2"
    echo "KillWait=10"
    echo "MinJobAge=600"
    echo "InactiveLimit=0"
    i=1
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=$CPUS State=UNKNOWN"
      i=$((i + 1))
    done
    echo "PartitionName=local Nodes=$(
      IFS=,
      echo "${NODES[*]}"
    ) Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

wait_for() { # seconds, description, command...
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      die "$what did not happen within ${seconds}s; logs in $STATE"
    fi
    sleep 0.2
  done
}

nodes_idle() {
  local states
  states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %T')
  for node in "${NODES[@]}"; do
    grep -qE "^$node (idle|mixed|allocated)" <<<"$states" || return 1
  done
}

cmd_up() {
  cmd_install || die "SLURM is not installed"
  export PATH=$PATH:/usr/sbin:/sbin
  local alive=0 name
  for name in "${DAEMONS[@]}"; do
    if running_pid "$name" >/dev/null; then alive=$((alive + 1)); fi
  done
  if ((alive == ${#DAEMONS[@]})); then
    log "already up (${#NODES[@]} nodes); export SLURM_CONF=$CONF"
    return 0
  fi
  if ((alive > 0)); then
    log "partly up ($alive of ${#DAEMONS[@]} daemons): restarting"
    cmd_down
  fi

  rm -rf "$STATE/ctld" "${NODES[@]/#/$STATE/}"
  mkdir -p "$STATE/ctld" "$STATE/munge"
  chmod 0755 "$STATE" # munged needs the socket's folders searchable by all
  chmod 0700 "$STATE/munge"
  mkdir -p "$STATE/munge-socket"
  chmod 0755 "$STATE/munge-socket"
  for node in "${NODES[@]}"; do mkdir -p "$STATE/$node/spool"; done
  if [[ ! -s $STATE/munge/munge.key ]]; then
    mungekey --create --keyfile="$STATE/munge/munge.key" # as the Debian package does for /etc/munge
  fi
  write_config

  munged --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" --pid-file="$(pid_file munged)" \
    --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed" ||
    die "munged did not start; see $STATE/munge/munged.log"
  wait_for 10 "munged start" test -S "$MUNGE_SOCKET"
  slurmctld -f "$CONF" || die "slurmctld did not start; see $STATE/slurmctld.log"
  for node in "${NODES[@]}"; do
    slurmd -N "$node" -f "$CONF" || die "slurmd -N $node did not start; see $STATE/$node/slurmd.log"
  done
  wait_for 60 "both nodes idle" nodes_idle
  for name in "${DAEMONS[@]}"; do
    running_pid "$name" >/dev/null || die "$name exited after starting; see the logs in $STATE"
  done
  log "up: ${#NODES[@]} nodes x $CPUS CPU(s), partition local; export SLURM_CONF=$CONF"
}

cmd_down() {
  export PATH=$PATH:/usr/sbin:/sbin
  local name pid pids=() names=()
  if running_pid slurmctld >/dev/null; then
    # the cluster's jobs first, so no job step outlives its slurmd
    SLURM_CONF=$CONF scancel --quiet --user="$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while [[ -n $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do # slurmd, slurmctld, then munged
    name=${DAEMONS[$i]}
    if pid=$(running_pid "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      names+=("$name")
    fi
  done
  if ((${#pids[@]} == 0)); then
    log "not running (state dir $STATE)"
    return 0
  fi
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  done
  log "down: stopped ${names[*]}"
}

cmd_status() {
  export PATH=$PATH:/usr/sbin:/sbin
  local name pid up=0
  for name in "${DAEMONS[@]}"; do
    if pid=$(running_pid "$name"); then
      echo "$name: running (pid $pid)"
      up=$((up + 1))
    else
      echo "$name: stopped"
    fi
  done
  echo "config: $CONF"
  if running_pid slurmctld >/dev/null; then
    SLURM_CONF=$CONF sinfo -N -o '%N %T %c %P' || true
    SLURM_CONF=$CONF squeue || true
  fi
  ((up == ${#DAEMONS[@]}))
}

case ${1:-} in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 install|up|down|status|env" >&2
    exit 2
    ;;
esac
