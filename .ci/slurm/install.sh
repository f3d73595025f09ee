#!/usr/bin/env bash
# Install a one-node SLURM test cluster's packages (Debian/Ubuntu): munge, slurmctld, slurmd and
# the client commands (sbatch, squeue, sinfo, ...). Idempotent: does nothing when they are present.
# Needs root (CI runs as root). Usage: .ci/slurm/install.sh
set -euo pipefail
# The daemons live in sbin, which a non-login root shell may lack on its PATH.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

packages=(munge slurmctld slurmd slurm-client)
commands=(munged mungekey slurmctld slurmd sbatch squeue sinfo scontrol)

missing=()
for cmd in "${commands[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "slurm/install: already installed ($(slurmctld -V))"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm/install: missing ${missing[*]}; installing needs root (apt-get)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm/install: missing ${missing[*]} and no apt-get here; install ${packages[*]}" \
        "with this system's package manager" >&2
    exit 1
fi

echo "slurm/install: installing ${packages[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 keeps the packages' init scripts from starting daemons during the install:
# start.sh starts exactly the daemons it needs, with its own config.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

# shellcheck source=../apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/../apt.sh"
ci_apt_update
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "slurm/install: done ($(slurmctld -V))"
