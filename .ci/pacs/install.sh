#!/usr/bin/env bash
# Install the PACS test's packages (Debian 12): Orthanc 1.10, its DICOMweb plugin 1.7,
# dicom3tools (dciodvfy) and dcmtk (dcmcjpeg, dcmcjpls, dcmcrle: the compressed-series tests). Idempotent: does nothing when they are present. Needs root (CI runs as
# root). The packages' init scripts are kept from starting a system Orthanc: the test starts its
# own on free ports. Usage: .ci/pacs/install.sh
set -euo pipefail
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

packages=(orthanc orthanc-dicomweb dicom3tools dcmtk)
plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

if command -v Orthanc >/dev/null 2>&1 && command -v dciodvfy >/dev/null 2>&1 \
        && command -v dcmcjpeg >/dev/null 2>&1 && [[ -e $plugin ]]; then
    echo "pacs/install: already installed ($(Orthanc --version | head -n 1))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "pacs/install: installing ${packages[*]} needs root (apt-get)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "pacs/install: no apt-get here; install ${packages[*]} with this system's package" \
        "manager" >&2
    exit 1
fi

echo "pacs/install: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
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
echo "pacs/install: done ($(Orthanc --version | head -n 1))"
