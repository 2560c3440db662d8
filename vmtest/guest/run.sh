#!/bin/bash
# Runs in the guest as root (remedy-vmtest.service): install remedy with the same
# scripts/setup.sh a user runs, then the in-VM tests; results go back on the data disk.
# The guest has no network: apt packages are in the image, Python packages in a wheelhouse.
set -uo pipefail
D=${1:-/mnt/vmtest}
R=$D/results
mkdir -p "$R"
exec > >(tee -a "$R/guest.log") 2>&1
cd "$D/src" || exit 1
echo "vmtest-guest: $(uname -r) cgroup=$(stat -fc %T /sys/fs/cgroup) up=$(cut -d' ' -f1 /proc/uptime)s"
# No .pyc compile at install: under TCG that is most of pip's time; imports compile lazily.
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$D/wheelhouse PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_COMPILE=1
export REMEDY_REQUIRE_BPF=1 REMEDY_VMTEST_GUEST=1 REMEDY_AGENT_READY_S=600
start=$(date +%s)
if ! bash scripts/setup.sh; then
    echo "vmtest-guest: setup.sh failed" | tee "$R/setup-failed"
fi
echo "vmtest-guest: setup took $(( $(date +%s) - start )) s"
mapfile -t targets < <(grep -v '^#' vmtest/guest/targets.txt | grep .)
start=$(date +%s)
.venv/bin/python -m pytest -p no:cacheprovider -ra -v --timeout=600 --junitxml="$R/junit.xml" "${targets[@]}"
echo $? > "$R/pytest.rc"
echo "vmtest-guest: pytest rc=$(cat "$R/pytest.rc") in $(( $(date +%s) - start )) s"
sync
