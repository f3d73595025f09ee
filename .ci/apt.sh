# shellcheck shell=bash
# The CI installers' one apt step (sourced by .ci/slurm/install.sh, .ci/install_browser.sh and
# .ci/pacs/install.sh, never run): `ci_apt_update [sudo]` refreshes the package lists once per CI
# run. `.ci/run` exports CAPSMED_APT_STAMP, the path of a file that does not exist yet: the first
# installer that needs packages runs `apt-get update` and creates it, the others find it and skip
# the update. Run standalone (`sudo .ci/slurm/install.sh`), without the variable, an installer
# updates the lists itself. Installers that find their packages present never get here.

ci_apt_update() {
    if [[ -n ${CAPSMED_APT_STAMP:-} && -e $CAPSMED_APT_STAMP ]]; then
        echo "apt: package lists already updated in this run"
        return 0
    fi
    "$@" apt-get update -qq
    if [[ -n ${CAPSMED_APT_STAMP:-} ]]; then
        : >"$CAPSMED_APT_STAMP"
    fi
}
