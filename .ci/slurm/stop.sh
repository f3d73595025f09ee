#!/usr/bin/env bash
# Stop the one-node SLURM cluster that .ci/slurm/start.sh started in STATE_DIR.
#
# Usage: .ci/slurm/stop.sh STATE_DIR
#
# Cancels the jobs still queued on that cluster, then stops exactly the processes named by the
# pid files in STATE_DIR/pids (slurmd, slurmctld, munged, in that order): SIGTERM, up to
# CAPSMED_SLURM_STOP_TIMEOUT (30) seconds to exit, then SIGKILL. A pid whose process is gone, or
# now belongs to another program, is skipped. Never kills by name. Logs and state stay in
# STATE_DIR for inspection; the /run/slurm/conf link that slurmd made is removed when it points
# into STATE_DIR.
set -euo pipefail
# The daemons live in sbin, which a non-login root shell may lack on its PATH.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

log() { echo "slurm/stop: $*" >&2; }

[[ $# -eq 1 ]] || { log "usage: $0 STATE_DIR"; exit 2; }
[[ -d $1 ]] || { log "ERROR: no such state folder: $1"; exit 1; }
state=$(cd "$1" && pwd)
pids=$state/pids
timeout_s=${CAPSMED_SLURM_STOP_TIMEOUT:-30}

# The program a pid file must point at (guards against a recycled pid).
expected_comm() {
    case $1 in
        slurmd) echo slurmd ;;
        slurmctld) echo slurmctld ;;
        munged) echo munged ;;
    esac
}

alive() { [[ -d /proc/$1 ]] && [[ $(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# Cancel this cluster's jobs first so that slurmd can end their job steps.
if [[ -s $state/slurm.conf && -s $pids/slurmctld.pid ]] && alive "$(cat "$pids/slurmctld.pid")"; then
    export SLURM_CONF=$state/slurm.conf
    jobs=$(timeout 10 squeue -h -t pending,running,completing -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086 # one job id per word
        timeout 10 scancel $jobs || true
        for _ in $(seq 20); do
            [[ -z $(timeout 10 squeue -h -t pending,running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi

status=0
for name in slurmd slurmctld munged; do
    pidfile=$pids/$name.pid
    if [[ ! -s $pidfile ]]; then
        log "$name: no pid file ($pidfile), nothing to stop"
        continue
    fi
    pid=$(tr -d '[:space:]' <"$pidfile")
    if ! [[ $pid =~ ^[0-9]+$ ]]; then
        log "ERROR: $name: pid file $pidfile holds '$pid', not a pid"
        status=1
        continue
    fi
    if ! alive "$pid"; then
        log "$name: pid $pid is not running"
        rm -f "$pidfile"
        continue
    fi
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [[ $comm != "$(expected_comm "$name")" ]]; then
        log "$name: pid $pid is now '$comm', not $name; leaving it alone"
        rm -f "$pidfile"
        continue
    fi
    log "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq "$((timeout_s * 10))"); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name: pid $pid still running after ${timeout_s}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    if alive "$pid"; then
        log "ERROR: $name: pid $pid survived SIGKILL"
        status=1
    else
        rm -f "$pidfile"
    fi
done

link=/run/slurm/conf
if [[ -L $link && $(readlink "$link") == "$state"/* ]]; then
    rm -f "$link"
fi
[[ $status -eq 0 ]] && log "stopped ($state)"
exit "$status"
