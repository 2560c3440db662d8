"""The VM image: a Debian bookworm root filesystem on pure cgroup v2 under systemd, cached.

Built with ``mmdebstrap`` (minbase plus what ``scripts/setup.sh`` installs, so setup in the guest,
which has no network, only checks) and ``mke2fs -d`` (no loop mount). The cache key is a hash of
the recipe: this file, the guest's boot files and setup.sh's package list; a changed recipe
builds a new image. A build happens in a temporary directory renamed into place only when
complete, so an interrupted build never leaves a cache entry that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("REMEDY_VMTEST_CACHE", "/var/cache/remedy-vmtest"))
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# The guest's own: boot (systemd, dbus for systemctl, udev, initramfs with virtio_blk), the
# cloud kernel with its *matching* headers (bcc needs no header fallback there), and procps
# and kmod for the tests. setup.sh's packages are added from the script itself.
BASE_PACKAGES = (
    "systemd-sysv",
    "dbus",
    "udev",
    "initramfs-tools",
    "kmod",
    "procps",
    "linux-image-cloud-amd64",
    "linux-headers-cloud-amd64",
    "python3",
    "python3-venv",
)
MASKED = (
    "serial-getty@ttyS0.service",
    "prometheus.service",
    "prometheus-alertmanager.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)
IMAGE_SIZE = "4G"
BUILD_TIMEOUT_S = 1200
RECIPE_FILES = (HERE / "image.py", HERE / "image" / "remedy-vmtest.service")


@dataclass(frozen=True)
class Image:
    """A complete cached image: the root filesystem and the kernel and initrd to boot it."""

    root: Path

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.img"


def setup_packages(setup_sh: Path = REPO / "scripts" / "setup.sh") -> list[str]:
    """APT_PACKAGES from setup.sh: the guest must already have them (it has no network)."""
    text = setup_sh.read_text()
    match = re.search(r"^APT_PACKAGES=\(([^)]*)\)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no APT_PACKAGES=(...) in {setup_sh}")
    words = re.sub(r"#[^\n]*", "", match.group(1)).split()
    return [w for w in words if w]


def packages() -> list[str]:
    """Everything the image installs, in a stable order."""
    return sorted({*BASE_PACKAGES, *setup_packages()})


def recipe_hash() -> str:
    """The cache key: the recipe files and the package list."""
    digest = hashlib.sha256()
    for path in RECIPE_FILES:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\n".join(packages()).encode())
    return digest.hexdigest()[:16]


def cached() -> Image | None:
    """The image for the current recipe, if a complete one is cached."""
    image = Image(CACHE / recipe_hash())
    done = [image.rootfs, image.kernel, image.initrd]
    return image if all(p.is_file() for p in done) else None


def _customize(root: Path) -> None:
    """What the guest needs beyond packages: an fstab, a name, the test runner unit."""
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc" / "hostname").write_text("remedy-vmtest\n")
    units = root / "etc" / "systemd" / "system"
    shutil.copy(HERE / "image" / "remedy-vmtest.service", units / "remedy-vmtest.service")
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "remedy-vmtest.service").symlink_to("/etc/systemd/system/remedy-vmtest.service")
    # Masked: no getty on the serial console (the runner writes there), and none of the
    # daemons setup.sh's packages enable (they only take the guest's two slow vCPUs).
    for unit in MASKED:
        masked = units / unit
        masked.unlink(missing_ok=True)
        masked.symlink_to("/dev/null")


def _newest(boot: Path, prefix: str) -> Path:
    found = sorted(boot.glob(f"{prefix}-*"))
    if not found:
        raise RuntimeError(f"the image has no {boot}/{prefix}-*")
    return found[-1]


def _prune(keep: str) -> None:
    """Older recipes' images, and builds killed before they could clean up (hours old)."""
    for entry in CACHE.iterdir():
        stale_tmp = entry.name.startswith(".") and time.time() - entry.stat().st_mtime > 7200
        if entry.is_dir() and entry.name != keep and (stale_tmp or not entry.name.startswith(".")):
            shutil.rmtree(entry, ignore_errors=True)


def build(log: Path | None = None) -> Image:
    """Build the image for the current recipe (or return the cached one)."""
    have = cached()
    if have is not None:
        return have
    key = recipe_hash()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=CACHE))
    try:
        started = time.monotonic()
        root = tmp / "root"
        out = open(log or tmp / "build.log", "ab")  # noqa: SIM115
        with out:
            subprocess.run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    f"--include={','.join(packages())}",
                    SUITE,
                    str(root),
                    *MIRRORS,
                ],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
            )
            _customize(root)
            shutil.copy(_newest(root / "boot", "vmlinuz"), tmp / "vmlinuz")
            shutil.copy(_newest(root / "boot", "initrd.img"), tmp / "initrd.img")
            subprocess.run(
                [
                    "mke2fs",
                    "-q",
                    "-t",
                    "ext4",
                    "-L",
                    "vmroot",
                    "-d",
                    str(root),
                    str(tmp / "rootfs.img"),
                    IMAGE_SIZE,
                ],
                check=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
            )
        shutil.rmtree(root)
        (tmp / "recipe.txt").write_text("\n".join(packages()) + "\n")
        final = CACHE / key
        if final.exists():  # a half-finished entry from an older layout: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _prune(key)
        print(f"vmtest: built image {final} in {time.monotonic() - started:.0f} s", flush=True)
        return Image(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    """``python -m vmtest.image``: build (or find) the image and print where it is."""
    image = build()
    print(image.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
