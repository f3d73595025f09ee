#!/usr/bin/env bash
# Start a throw-away one-node SLURM cluster on this machine, for tests and demos.
#
# Usage: .ci/slurm/start.sh [STATE_DIR]        (default STATE_DIR: .ci/slurm/run, gitignored)
#
# Everything lives under STATE_DIR: slurm.conf, a munge key, spool and state folders, logs, and
# the pid files of the daemons started here (STATE_DIR/pids: munged as user munge, slurmctld and
# slurmd as root). Nothing under /etc is read or written. Outside STATE_DIR only two runtime
# paths are used: munged's standard socket /run/munge/munge.socket.2 (a munged already serving it
# is used, not started) and the link /run/slurm/conf that slurmd makes to its copy of slurm.conf.
# The cluster runs "configless" (slurmd fetches slurm.conf from slurmctld) because the srun that
# snakemake's SLURM jobstep executor runs inside each job drops SLURM_CONF from its environment,
# and then finds the configuration through that link.
# Clients on this machine reach the cluster with:   source STATE_DIR/env.sh   (sets SLURM_CONF)
# Stop it with:  .ci/slurm/stop.sh STATE_DIR   (kills exactly the pids in STATE_DIR/pids).
#
# Needs root and the packages from .ci/slurm/install.sh. Environment:
#   CAPSMED_SLURM_CTLD_PORT (6817), CAPSMED_SLURMD_PORT (6818): ports of the two daemons.
#   CAPSMED_SLURM_START_TIMEOUT (60): seconds to wait for the node to become idle.
# On success the last line on stdout is the absolute STATE_DIR; messages go to stderr.
set -euo pipefail
# The daemons live in sbin, which a non-login root shell may lack on its PATH.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state_arg=${1:-$here/run}
ctld_port=${CAPSMED_SLURM_CTLD_PORT:-6817}
slurmd_port=${CAPSMED_SLURMD_PORT:-6818}
timeout_s=${CAPSMED_SLURM_START_TIMEOUT:-60}

log() { echo "slurm/start: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (slurmd and slurmctld run as root here)"
for cmd in munged mungekey munge unmunge slurmctld slurmd sinfo scontrol runuser; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' not found; run .ci/slurm/install.sh first"
done
id munge >/dev/null 2>&1 || die "user 'munge' is missing (it comes with the munge package)"

mkdir -p "$state_arg"
state=$(cd "$state_arg" && pwd)
pids=$state/pids
for name in munged slurmctld slurmd; do
    pidfile=$pids/$name.pid
    if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "$name from $state is still running (pid $(cat "$pidfile")); run .ci/slurm/stop.sh $state"
    fi
done

# One test cluster per machine: they would share /run/slurm/conf.
conf_link=/run/slurm/conf
if [[ -e $conf_link || -L $conf_link ]]; then
    target=$(readlink "$conf_link" || true)
    other=${target%/slurmd/conf-cache}
    if [[ $other != "$state" ]]; then
        if [[ $target == */slurmd/conf-cache && -s $other/pids/slurmd.pid ]] \
            && kill -0 "$(cat "$other/pids/slurmd.pid")" 2>/dev/null; then
            die "another test cluster runs from $other; stop it: .ci/slurm/stop.sh $other"
        elif [[ $target != */slurmd/conf-cache && -e $target ]]; then
            die "$conf_link belongs to another Slurm on this machine ($target); not starting"
        fi
    fi
fi
if [[ -e /etc/slurm/slurm.conf ]]; then
    log "warning: /etc/slurm/slurm.conf exists; srun inside snakemake's jobs will read it" \
        "instead of this cluster's configuration"
fi

# A failed start stops whatever it had started already.
started=0
on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && $started -eq 1 ]]; then
        log "start failed; stopping the daemons it started"
        "$here/stop.sh" "$state" >&2 || true
    fi
    exit "$rc"
}
trap on_exit EXIT

host=$(hostname -s)
# munged runs as user munge: it must be able to reach its folder.
chmod 755 "$state"
runuser -u munge -- test -x "$state" \
    || die "user munge cannot enter $state (a parent folder is private); use a STATE_DIR elsewhere"
mkdir -p "$pids" "$state/log" "$state/ctld" "$state/slurmd" "$state/munge"
rm -f "$state/log/"*.log
chown munge:munge "$state/munge"
chmod 755 "$state/munge"
touch "$state/log/munged.log"
chown munge:munge "$state/log/munged.log"

# --- munge: own key and pid file, the standard socket ---------------------------------------------
# The standard socket, because slurmd, started configless, authenticates its first request
# (for slurm.conf) before it can read an AuthInfo=socket=... line. A munged that answers there
# already (a system one) is used as it is and not stopped by stop.sh.
munge_socket=/run/munge/munge.socket.2
if munge -n -S "$munge_socket" 2>/dev/null | unmunge -S "$munge_socket" >/dev/null 2>&1; then
    log "using the munged already serving $munge_socket (not started here, will not be stopped)"
    rm -f "$pids/munged.pid"
else
    if [[ ! -s $state/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile="$state/munge/munge.key"
    fi
    # The runtime folder that systemd would make.
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    started=1
    log "starting munged (user munge, socket $munge_socket, log $state/log/munged.log)"
    rm -f "$state/munge/munged.pid"
    runuser -u munge -- munged \
        --socket="$munge_socket" \
        --key-file="$state/munge/munge.key" \
        --pid-file="$state/munge/munged.pid" \
        --log-file="$state/log/munged.log" \
        --seed-file="$state/munge/munged.seed" \
        || die "munged failed to start; see $state/log/munged.log"
    for _ in $(seq 50); do
        [[ -s $state/munge/munged.pid ]] && break
        sleep 0.1
    done
    [[ -s $state/munge/munged.pid ]] || die "munged wrote no pid file; see $state/log/munged.log"
    # The pid file that stop.sh reads (munged's own lives in its munge-owned folder).
    cp "$state/munge/munged.pid" "$pids/munged.pid"
    munge -n -S "$munge_socket" | unmunge -S "$munge_socket" >/dev/null \
        || die "munge credential round trip failed; see $state/log/munged.log"
fi

# --- slurm.conf ---------------------------------------------------------------------------------
# Node line as slurmd detects the hardware (CPUs, sockets, cores, memory), minus the uptime.
node_line=$(slurmd -C | head -n 1)
[[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
node_name=${node_line%% *}
node_name=${node_name#NodeName=}
[[ $node_name == "$host" ]] || log "note: slurmd -C names the node $node_name, hostname -s is $host"
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
real_mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
def_mem=$((real_mem / cpus / 2))
: >"$state/plugstack.conf"
cat >"$state/slurm.conf" <<CONF
# One-node test cluster written by .ci/slurm/start.sh; do not edit (rewritten at each start).
ClusterName=capsmed
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmctldParameters=enable_configless
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$pids/slurmctld.pid
SlurmdPidFile=$pids/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$state/plugstack.conf
# No cgroups, no accounting database: plain process tracking, no sacct.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Every finished job gets one line here (id, name, state, exit code): the test's proof.
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.log
MpiDefault=none
SchedulerType=sched/backfill
# Cores and memory are consumable, so jobs share the node; a job without --mem gets
# DefMemPerCPU per CPU instead of the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
ReturnToService=2
# Finished jobs stay visible to squeue for an hour: the executor's status checks need them, and
# so do the tests that look the run's jobs up afterwards.
MinJobAge=3600
KillWait=5
SlurmdTimeout=60
InactiveLimit=0
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$node_name Default=YES MaxTime=INFINITE State=UP
CONF
sed -i 's/ UpTime=[^ ]*//' "$state/slurm.conf"
printf 'export SLURM_CONF=%q\n' "$state/slurm.conf" >"$state/env.sh"
export SLURM_CONF=$state/slurm.conf

# --- slurmctld, slurmd ----------------------------------------------------------------------------
log "starting slurmctld (port $ctld_port, log $state/log/slurmctld.log)"
rm -f "$pids/slurmctld.pid" "$pids/slurmd.pid"
started=1
slurmctld -c || die "slurmctld failed to start; see $state/log/slurmctld.log"
for _ in $(seq 100); do
    scontrol ping >/dev/null 2>&1 && break
    sleep 0.2
done
scontrol ping >/dev/null 2>&1 \
    || die "slurmctld does not answer; tail of its log:$(printf '\n')$(tail -n 20 "$state/log/slurmctld.log")"

log "starting slurmd (node $node_name, port $slurmd_port, log $state/log/slurmd.log)"
# Configless: fetches slurm.conf from slurmctld, so SLURM_CONF must not be set for it.
env -u SLURM_CONF slurmd --conf-server "127.0.0.1:$ctld_port" -N "$node_name" \
    || die "slurmd failed to start; see $state/log/slurmd.log"

state_now=""
for _ in $(seq "$((timeout_s * 2))"); do
    state_now=$(sinfo -h -n "$node_name" -o %T 2>/dev/null || true)
    [[ $state_now == idle ]] && break
    sleep 0.5
done
if [[ $state_now != idle ]]; then
    log "node $node_name is '${state_now:-unknown}' after ${timeout_s}s:"
    scontrol show node "$node_name" >&2 || true
    tail -n 20 "$state/log/slurmd.log" >&2 || true
    die "node did not become idle"
fi
for name in slurmctld slurmd; do
    [[ -s $pids/$name.pid ]] || die "no pid file $pids/$name.pid"
done
log "cluster up: node $node_name idle, $cpus CPUs, ${real_mem} MB;" \
    "pids munged $(cat "$pids/munged.pid" 2>/dev/null || echo -), slurmctld $(cat "$pids/slurmctld.pid")," \
    "slurmd $(cat "$pids/slurmd.pid")"
log "use it with: source $state/env.sh"
echo "$state"
