#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the submitit_slurm launcher
# (docs/slurm.md). Debian's packages (apt-get install slurm-wlm munge), bound
# to 127.0.0.1, everything it writes under one state directory:
#
#   scripts/local-slurm.sh up       start munged, slurmctld and slurmd; print what to export
#   scripts/local-slurm.sh status   sinfo (and squeue) of that cluster
#   scripts/local-slurm.sh down     cancel its jobs, stop exactly the daemons `up` started
#
# SLURM_STATE_DIR (default: <project>/.slurm) holds the munge key, socket and
# seed, slurm.conf, the controller's state, slurmd's spool, the pid and log
# files, and the job-completion log (jobcomp.log: SLURM's own record of every
# finished job, since `sacct` needs slurmdbd). Nothing is written to /etc,
# /run or /var: munged runs with its own --key-file, --socket, --pid-file,
# --log-file and --seed-file there. Ports are free ones picked at `up`.
# slurmd runs jobs as their submitting user, which needs root: run it as root
# (as CI does).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${SLURM_STATE_DIR:-$ROOT/.slurm}
PARTITION=local
NODE=$(hostname -s)
APT_LINE="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge"
WAIT_S=${SLURM_UP_TIMEOUT_S:-60}

die() { echo "local-slurm: $*" >&2; exit 1; }

# Absolute form of $STATE (which may not exist yet).
abs_state() {
  case $STATE in /*) ;; *) STATE=$PWD/$STATE ;; esac
}

# The pid in pid file $1 if that process is alive and runs program $2.
live_pid() {
  local file=$1 prog=$2 pid
  [ -s "$file" ] || return 1
  pid=$(tr -dc '0-9' < "$file")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm")" = "$prog" ] || return 1  # a reused pid is not ours
  echo "$pid"
}

# Two distinct free TCP ports on 127.0.0.1 (for slurmctld and slurmd).
free_ports() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))'
  else
    local p ports=()
    while [ ${#ports[@]} -lt 2 ]; do
      p=$((20000 + RANDOM % 30000))
      [ "${ports[0]:-}" != "$p" ] || continue
      (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || ports+=("$p")
    done
    echo "${ports[@]}"
  fi
}

check_packages() {
  local missing=()
  for prog in munged mungekey slurmctld slurmd sinfo sbatch squeue scancel; do
    command -v "$prog" >/dev/null 2>&1 || [ -x "/usr/sbin/$prog" ] || missing+=("$prog")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "local-slurm: not installed: ${missing[*]}. Install Debian's packages: $APT_LINE" >&2
    exit 3
  fi
}

# Whether the daemons can bind to 127.0.0.1 alone. With CommunicationParameters=
# NoInAddrAny,NoCtldInAddrAny SLURM binds each daemon and srun to the address
# its host name resolves to, and slurmstepd answers srun at the source address
# of srun's request, which on loopback is 127.0.0.1. So: only where the name
# resolves to 127.0.0.1 (as here). Elsewhere (127.0.1.1, a LAN address, no
# entry at all) they listen on every interface; every message is still
# authenticated by munge, and they are reached on 127.0.0.1.
binds_loopback() {
  [ "$(getent ahostsv4 "$NODE" 2>/dev/null | awk '{ print $1; exit }' || true)" = 127.0.0.1 ]
}

write_conf() {
  local ctld_port=$1 slurmd_port=$2 cpus mem_mb bind
  if binds_loopback; then
    bind="# Daemons and srun bind to 127.0.0.1 ($NODE resolves to it), not to every interface.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
  else
    bind="# $NODE does not resolve to 127.0.0.1: daemons listen on every interface (see binds_loopback)."
    echo "local-slurm: note: $NODE does not resolve to 127.0.0.1, so slurmctld and slurmd listen on" \
         "all interfaces (munge still authenticates every message)" >&2
  fi
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  cat > "$STATE/slurm.conf" <<EOF
# Written by scripts/local-slurm.sh up: a one-node cluster on 127.0.0.1.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
$bind
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
SelectType=select/cons_tres
# CPUs are the consumable resource, not memory: jobs without --mem share the node.
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# scancel and time limits: SIGTERM, then SIGKILL after KillWait seconds.
KillWait=10
MinJobAge=300
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
  local m=$STATE/munge
  if [ ! -s "$m/munge.key" ]; then
    mungekey --create --keyfile="$m/munge.key" >/dev/null
  fi
  chmod 0400 "$m/munge.key"
  munged --key-file="$m/munge.key" --socket="$m/munge.socket" --pid-file="$STATE/run/munged.pid" \
         --log-file="$STATE/log/munged.log" --seed-file="$m/munged.seed" \
         --origin=127.0.0.1 --force \
    || die "munged did not start; see $STATE/log/munged.log"
}

# $STATE/bin/sacct: what `sacct` answers with slurmdbd, read from SLURM's own
# records instead: squeue for jobs not yet purged, then the job-completion log
# (which wins) for finished ones. Array tasks are shown as <array job>_<task>,
# which `sacct --completion` does not do. submitit's launcher polls
# `sacct -o JobID,State,NodeList --parsable2 -j ID...` to learn that a job it
# has no result for (cancelled, timed out, killed) has ended.
write_sacct() {
  mkdir -p "$STATE/bin"
  cat > "$STATE/bin/sacct" <<EOF
#!/usr/bin/env bash
# Written by scripts/local-slurm.sh up: sacct from squeue and $STATE/jobcomp.log.
# Options: -o/--format FIELD,... (JobID JobName State NodeList Partition ExitCode
# Start End User; others print empty), -j/--jobs ID,..., -n/--noheader; output
# is always --parsable2 style (fields separated by |).
export SLURM_CONF=$STATE/slurm.conf
JOBCOMP=$STATE/jobcomp.log
EOF
  cat >> "$STATE/bin/sacct" <<'EOF'
set -euo pipefail
format=JobID,JobName,Partition,State,ExitCode,NodeList jobs= header=1
while [ $# -gt 0 ]; do
  case $1 in
    -o|--format) format=$2; shift ;;
    -o*) format=${1#-o} ;;
    --format=*) format=${1#--format=} ;;
    -j|--jobs) jobs=$jobs,$2; shift ;;
    -j*) jobs=$jobs,${1#-j} ;;
    --jobs=*) jobs=$jobs,${1#--jobs=} ;;
    -n|--noheader) header= ;;
    *) ;;  # --parsable2, -X, -a ...: the output is parsable2 anyway
  esac
  shift
done
{
  squeue -h -r -a -t all -o 'JobId=%i Name=%j JobState=%T NodeList=%N Partition=%P UserId=%u' 2>/dev/null \
    | sed -E 's/^JobId=([0-9]+)_([0-9]+) /JobId=\1_\2 ArrayJobId=\1 ArrayTaskId=\2 /' || true
  cat "$JOBCOMP" 2>/dev/null || true
} | awk -v format="$format" -v jobs="$jobs" -v header="$header" '
  function field(key,   m) {
    if (match($0, "(^| )" key "=[^ ]*")) { m = substr($0, RSTART, RLENGTH); sub(/^ /, "", m); return substr(m, length(key) + 2) }
    return ""
  }
  BEGIN {
    n = split(format, cols, ","); split(jobs, wanted, ",")
    nwant = 0; for (i in wanted) if (wanted[i] != "") { want[wanted[i]] = 1; nwant++ }
    map["jobid"] = "JobId"; map["jobname"] = "Name"; map["state"] = "JobState"; map["nodelist"] = "NodeList"
    map["partition"] = "Partition"; map["exitcode"] = "ExitCode"; map["start"] = "StartTime"
    map["end"] = "EndTime"; map["user"] = "UserId"
    if (header) { line = ""; for (i = 1; i <= n; i++) line = line (i > 1 ? "|" : "") cols[i]; print line }
  }
  {
    id = field("JobId"); array = field("ArrayJobId"); task = field("ArrayTaskId")
    if (array != "" && index(id, "_") == 0) id = array "_" task
    if (nwant && !(id in want) && !(array in want) && !(field("JobId") in want)) next
    if (!(id in seen)) order[++count] = id
    seen[id] = 1
    line = ""
    for (i = 1; i <= n; i++) {
      key = map[tolower(cols[i])]; value = (tolower(cols[i]) == "jobid") ? id : (key == "" ? "" : field(key))
      line = line (i > 1 ? "|" : "") value
    }
    row[id] = line  # the job-completion log comes last and wins
  }
  END { for (i = 1; i <= count; i++) print row[order[i]] }
'
EOF
  chmod 0755 "$STATE/bin/sacct"
}

wait_idle() {
  local deadline=$((SECONDS + WAIT_S)) state
  while :; do
    state=$(SLURM_CONF=$STATE/slurm.conf sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    case $state in idle*|mix*|alloc*) return 0 ;; esac
    if [ $SECONDS -ge $deadline ]; then
      echo "local-slurm: node $NODE is '${state:-not answering}' after ${WAIT_S}s; logs:" >&2
      tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

print_env() {
  echo "SLURM cluster 'local' is up: partition '$PARTITION', node $NODE on 127.0.0.1. Export:"
  echo "export SLURM_CONF=$STATE/slurm.conf"
  echo "export PATH=$STATE/bin:\$PATH   # sacct from SLURM's job-completion log (no slurmdbd here)"
}

cmd_up() {
  check_packages
  [ "$(id -u)" = 0 ] || echo "local-slurm: warning: not root; slurmd needs root to run jobs" >&2
  abs_state
  case $STATE in *[[:space:]]*) die "SLURM_STATE_DIR '$STATE' has a space: slurm.conf cannot name it" ;; esac
  mkdir -p "$STATE"/{munge,ctld,spool,run,log}
  chmod 0755 "$STATE/munge"  # the socket's directory must be searchable by every client; the key is 0400
  STATE=$(cd "$STATE" && pwd -P)
  # A Unix socket's path has at most 107 bytes.
  [ ${#STATE} -le 85 ] || die "SLURM_STATE_DIR '$STATE' is too long for munge's socket (85 characters at most)"
  local running=0 stale=0 d
  for d in munged slurmctld slurmd; do
    if live_pid "$STATE/run/$d.pid" "$d" >/dev/null; then running=$((running + 1)); else stale=$((stale + 1)); fi
  done
  if [ $stale -eq 0 ]; then
    print_env
    return 0
  fi
  [ $running -eq 0 ] || die "some daemons of $STATE are running, some not: run '$0 down' first"
  local ports
  read -r -a ports <<< "$(free_ports)"
  write_conf "${ports[0]}" "${ports[1]}"
  write_sacct
  start_munged
  # slurmctld recovers its saved state (job ids go on from there); without one,
  # ids restart at 1 and an old job-completion log would name other jobs.
  if [ ! -e "$STATE/ctld/job_state" ] && [ -s "$STATE/jobcomp.log" ]; then
    mv "$STATE/jobcomp.log" "$STATE/jobcomp.log.old"
  fi
  slurmctld -f "$STATE/slurm.conf" || { cmd_down >/dev/null 2>&1; die "slurmctld did not start; see $STATE/log/slurmctld.log"; }
  slurmd -f "$STATE/slurm.conf" || { cmd_down >/dev/null 2>&1; die "slurmd did not start; see $STATE/log/slurmd.log"; }
  wait_idle || { cmd_down >/dev/null 2>&1; exit 1; }
  print_env
}

cmd_down() {
  abs_state
  [ -d "$STATE" ] || { echo "local-slurm: $STATE does not exist: nothing to stop"; return 0; }
  STATE=$(cd "$STATE" && pwd -P)
  local pid deadline
  # Jobs first, so that no slurmstepd of this cluster outlives its slurmd.
  if live_pid "$STATE/run/slurmctld.pid" slurmctld >/dev/null && [ -s "$STATE/slurm.conf" ]; then
    SLURM_CONF=$STATE/slurm.conf timeout 10 scancel --partition="$PARTITION" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ] && [ -n "$(SLURM_CONF=$STATE/slurm.conf timeout 10 \
          squeue -h -p "$PARTITION" -t PD,R,CG,S,CF -o %i 2>/dev/null || true)" ]; do
      sleep 0.5
    done
  fi
  for d in slurmd slurmctld munged; do
    if pid=$(live_pid "$STATE/run/$d.pid" "$d"); then
      kill -TERM "$pid"
      deadline=$((SECONDS + 20))
      while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "local-slurm: $d ($pid) ignored SIGTERM for 20s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
      echo "stopped $d ($pid)"
    fi
    rm -f "$STATE/run/$d.pid"
  done
}

cmd_status() {
  abs_state
  [ -s "$STATE/slurm.conf" ] || die "no cluster in $STATE: run '$0 up'"
  STATE=$(cd "$STATE" && pwd -P)
  local d pid
  for d in munged slurmctld slurmd; do
    if pid=$(live_pid "$STATE/run/$d.pid" "$d"); then echo "$d: running ($pid)"; else echo "$d: not running"; fi
  done
  echo "SLURM_CONF=$STATE/slurm.conf"
  SLURM_CONF=$STATE/slurm.conf sinfo
  SLURM_CONF=$STATE/slurm.conf squeue
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status   (state in \$SLURM_STATE_DIR, default $ROOT/.slurm)" >&2; exit 2 ;;
esac
