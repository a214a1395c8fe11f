#!/usr/bin/env bash
# A real one-node SLURM 22.05 cluster (with accounting, so `sacct` works) for the
# launcher tests and for trying the workflow's slurm profile on one machine.
#
#   scripts/slurm_cluster.sh start  [SCRATCH_DIR]   # prints: export SLURM_CONF=...
#   scripts/slurm_cluster.sh status [SCRATCH_DIR]
#   scripts/slurm_cluster.sh stop   [SCRATCH_DIR]
#
# Needs root. No systemd here: every daemon is started directly, its PID kept in
# SCRATCH_DIR/pids/, and `stop` ends exactly those PIDs. Every `start` that finds
# no running cluster begins from a fresh state dir and a fresh accounting DB
# (a drain reason survives restarts, and job ids restart at 1, so old sacct rows
# would shadow new jobs). Two symlinks to /dev/null act as GPUs (gres File=).
set -euo pipefail

ACTION=${1:-}
SCRATCH=${2:-${OSV_SLURM_DIR:-/tmp/osv-slurm}}
HOST=$(hostname -s)
# The node offers this machine's memory less 2 GB for the daemons and the test process: the
# paper-smoke DAG's stage-2 job (two SVD UNets in fp32 on the CPU) asks for most of it.
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
CLUSTER=osv
DB_PORT=${OSV_SLURM_DB_PORT:-33061}
DB_PASS=osv-slurm-db
CONF=$SCRATCH/etc/slurm.conf
PIDS=$SCRATCH/pids
LOGS=$SCRATCH/log
export SLURM_CONF=$CONF

log() { echo "[slurm_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() { die "usage: $0 {start|stop|status} [SCRATCH_DIR]"; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (starts munged, slurmd and mariadb)"; }

alive() {  # alive NAME: the recorded PID of NAME is a live process
  local f=$PIDS/$1.pid
  [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

install_packages() {
  local pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Only refresh the package lists when apt cannot find a candidate.
  if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$SCRATCH/apt.log" 2>&1; then
    apt-get update >>"$SCRATCH/apt.log" 2>&1
    apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$SCRATCH/apt.log" 2>&1 \
      || die "apt-get install failed, see $SCRATCH/apt.log"
  fi
}

# Start a command detached from our session, output to a log, PID recorded.
spawn() {  # spawn NAME CMD...
  local name=$1; shift
  setsid "$@" </dev/null >"$LOGS/$name.out" 2>&1 &
  echo $! >"$PIDS/$name.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out after ${secs}s waiting for $what (logs in $LOGS)"
    sleep 0.2
  done
}

write_configs() {
  mkdir -p "$SCRATCH/etc" "$SCRATCH/state/ctld" "$SCRATCH/state/d" "$SCRATCH/dev"
  # Two distinct names: gres.conf refuses two lines with the same file.
  ln -sf /dev/null "$SCRATCH/dev/gpu0"
  ln -sf /dev/null "$SCRATCH/dev/gpu1"
  cat >"$SCRATCH/etc/gres.conf" <<EOF
Name=gpu File=$SCRATCH/dev/gpu[0-1]
EOF
  cat >"$CONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120).
AuthInfo=cred_expire=20
StateSaveLocation=$SCRATCH/state/ctld
SlurmdSpoolDir=$SCRATCH/state/d
SlurmctldPidFile=$PIDS/slurmctld.daemon.pid
SlurmdPidFile=$PIDS/slurmd.daemon.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:2 State=UNKNOWN
PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat >"$SCRATCH/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$PIDS/slurmdbd.daemon.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$SCRATCH/etc/slurmdbd.conf"  # slurmdbd refuses a world-readable file
}

start_mariadb() {
  local data=$SCRATCH/mysql
  mkdir -p "$data" "$SCRATCH/mysql-run"
  chown -R mysql:mysql "$data" "$SCRATCH/mysql-run"  # mysqld runs as mysql: its socket dir too
  mariadb-install-db --user=mysql --datadir="$data" --skip-test-db \
    --auth-root-authentication-method=socket >"$LOGS/mariadb-install.out" 2>&1 \
    || die "mariadb-install-db failed, see $LOGS/mariadb-install.out"
  spawn mariadb mariadbd --no-defaults --user=mysql --datadir="$data" \
    --socket="$SCRATCH/mysql-run/mysqld.sock" --pid-file="$SCRATCH/mysql-run/mariadb.pid" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --log-error="$LOGS/mariadb.log"
  wait_for 60 "mariadb" mariadb --no-defaults --socket="$SCRATCH/mysql-run/mysqld.sock" -uroot -e "SELECT 1"
  mariadb --no-defaults --socket="$SCRATCH/mysql-run/mysqld.sock" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_munge() {
  # One munged per machine (socket in /run/munge); reuse a working one.
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge /etc/munge/munge.key
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid
  # -F: foreground, so the recorded PID is munged itself.
  spawn munged setpriv --reuid=munge --regid=munge --init-groups munged -F
  wait_for 20 "munged" bash -c "munge -n | unmunge"
}

node_idle() { sinfo -h -n "$HOST" -o %t 2>/dev/null | grep -qx idle; }

print_env() {
  echo "export SLURM_CONF=$CONF"
}

start() {
  need_root
  mkdir -p "$SCRATCH"
  if alive slurmctld && alive slurmd && alive slurmdbd && node_idle_or_busy; then
    log "already running in $SCRATCH"
    print_env
    return 0
  fi
  local t0=$SECONDS
  [ -d "$PIDS" ] && stop_daemons
  install_packages
  # Fresh state and accounting DB every cold start (see the header).
  rm -rf "$SCRATCH/state" "$SCRATCH/mysql" "$SCRATCH/mysql-run" "$SCRATCH/etc" "$LOGS" "$PIDS"
  mkdir -p "$PIDS" "$LOGS"
  write_configs
  start_munge
  start_mariadb
  spawn slurmdbd slurmdbd -D  # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 60 "slurmdbd" sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  spawn slurmctld slurmctld -D -i -f "$CONF"
  wait_for 60 "slurmctld" scontrol ping
  spawn slurmd slurmd -D -f "$CONF"
  wait_for 90 "node $HOST idle" node_idle
  wait_for 30 "sacct" sacct -n -X -S now
  log "started in $((SECONDS - t0))s (scratch $SCRATCH)"
  print_env
}

node_idle_or_busy() { sinfo -h -n "$HOST" -o %t 2>/dev/null | grep -Eqx "idle|mix|alloc"; }

# Cancel what is still queued or running while slurmd can still end it cleanly.
drain_jobs() {
  alive slurmctld || return 0
  local ids
  ids=$(squeue -h -o %i 2>/dev/null || true)
  [ -n "$ids" ] || return 0
  log "cancelling jobs: $(echo $ids)"
  scancel $ids 2>/dev/null || true
  for _ in $(seq 1 100); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.3
  done
}

# Step daemons outlive slurmd; ours are the ones started with our SLURM_CONF.
kill_stray_stepds() {
  local d
  for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] || continue
    tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -x "SLURM_CONF=$CONF" >/dev/null && { kill -KILL "${d#/proc/}" 2>/dev/null || true; }
  done
  return 0
}

stop_daemons() {
  local name pid
  drain_jobs
  for name in slurmd slurmctld slurmdbd mariadb munged; do
    [ -s "$PIDS/$name.pid" ] || continue
    pid=$(cat "$PIDS/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$name.pid"
  done
  kill_stray_stepds
}

stop() {
  need_root
  [ -d "$PIDS" ] || { log "nothing to stop in $SCRATCH"; return 0; }
  stop_daemons
  log "stopped (scratch $SCRATCH)"
}

status() {
  local name rc=0
  for name in munged mariadb slurmdbd slurmctld slurmd; do
    if alive "$name"; then echo "$name: running (pid $(cat "$PIDS/$name.pid"))"
    else echo "$name: not running"; rc=1; fi
  done
  [ $rc = 0 ] && sinfo -N -o "%N %t %G %c %m" || true
  [ $rc = 0 ] && print_env
  return $rc
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
