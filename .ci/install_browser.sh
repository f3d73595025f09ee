#!/usr/bin/env bash
# Install headless Chromium for the report browser tests (pytest -m browser). Idempotent: does
# nothing when chromium and chromedriver are already on PATH. Debian/Ubuntu (apt-get); run as root
# or with sudo available.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_browser.sh: need root or sudo to run apt-get" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: apt-get not found; install chromium and chromium-driver by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# shellcheck source=apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
ci_apt_update $SUDO
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
echo "installed: $(chromium --version 2>/dev/null || echo chromium)"
