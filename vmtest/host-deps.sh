#!/usr/bin/env bash
# What `make vmtest` needs on the host (Debian): qemu (TCG), mmdebstrap, e2fsprogs (mke2fs -d,
# debugfs). Idempotent: a second run only checks.
set -euo pipefail
PACKAGES=(qemu-system-x86 mmdebstrap e2fsprogs)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "vmtest: host packages present: ${PACKAGES[*]}"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "vmtest: not root: cannot install ${missing[*]} (mmdebstrap needs root too)" >&2
    exit 1
fi
echo "vmtest: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
