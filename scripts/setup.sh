#!/usr/bin/env bash
# Install everything remedy needs on a Debian host. Idempotent: a second run only checks.
# Never installs PyPI's "bcc" (an unrelated project): bcc comes from Debian's python3-bpfcc.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${REMEDY_VENV:-.venv}
KERNEL=$(uname -r)
APT_PACKAGES=(bpfcc-tools python3-bpfcc python3-venv python3-pip stress-ng bpftrace graphviz gcc libc6-dev
    prometheus prometheus-alertmanager)  # promtool, alertmanager: the observability tests

say() { printf 'setup: %s\n' "$*"; }
loud() { printf '\n!!! setup WARNING: %s\n\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        loud "not root: cannot install packages, headers or mount tracefs; kernel tests will not load"
        return 1
    fi
}

install_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages present: ${APT_PACKAGES[*]}"
        return
    fi
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# bcc compiles programs against /lib/modules/$K/build. Prefer exact headers; otherwise link the
# distro default and say so every run, because struct layouts may then differ from the kernel's.
install_headers() {
    local mod=/lib/modules/$KERNEL
    if [ -e "$mod/build/include" ] && [ ! -L "$mod/build" ]; then
        say "kernel headers present for $KERNEL"
        return
    fi
    if apt-cache show "linux-headers-$KERNEL" >/dev/null 2>&1; then
        dpkg-query -W "linux-headers-$KERNEL" >/dev/null 2>&1 \
            || apt-get install -y -qq "linux-headers-$KERNEL" >/dev/null
        say "kernel headers installed for $KERNEL"
        return
    fi
    local arch
    arch=$(dpkg --print-architecture)
    dpkg-query -W -f='${Status}' "linux-headers-$arch" 2>/dev/null | grep -q "install ok installed" \
        || apt-get install -y -qq "linux-headers-$arch" >/dev/null
    local build common
    build=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
    if [ -z "$build" ] || [ -z "$common" ]; then
        loud "no kernel headers found under /usr/src; BPF programs cannot compile"
        return 1
    fi
    mkdir -p "$mod"
    ln -sfn "$build" "$mod/build"
    ln -sfn "$common" "$mod/source"
    loud "no headers match kernel $KERNEL; using $(basename "$build") via $mod/{build,source}.
    Tracepoint programs compile, but any struct that differs between the two versions is suspect."
}

mount_tracefs() {
    if [ -e /sys/kernel/tracing/events/sched ]; then
        say "tracefs mounted"
        return
    fi
    mount -t tracefs tracefs /sys/kernel/tracing
    say "mounted tracefs at /sys/kernel/tracing"
}

make_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        # The system Python, not pyenv's: only it sees Debian's bcc module.
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
        say "created venv $VENV"
    fi
    local stamp="$VENV/.remedy-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
        "$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
        "$VENV/bin/python" -c "import remedy.cli, re2, transitions, psutil, cgroupspy" ||
        { loud "remedy or one of its dependencies did not install"; return 1; }
        touch "$stamp"
        say "installed remedy and test extras into $VENV"
    else
        say "venv up to date"
    fi
}

check_bcc() {
    local where
    if ! where=$("$VENV/bin/python" -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null); then
        loud "python cannot import bcc (Debian python3-bpfcc); kernel sensors will not load"
        return 1
    fi
    case "$where" in
        /usr/lib/python3/dist-packages/*) say "bcc from Debian: $where" ;;
        *) loud "bcc imported from $where, not Debian's python3-bpfcc"; return 1 ;;
    esac
}

if need_root; then
    install_packages
    install_headers
    mount_tracefs
fi
make_venv
check_bcc
say "ready"
