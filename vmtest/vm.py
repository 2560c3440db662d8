"""Boot the cached image in qemu (TCG), run the in-VM tests, bring their results back.

The checkout goes in on a second virtio disk (the cloud kernel has no 9p) made with
``mke2fs -d`` from the files git knows (tracked and untracked, not ignored) and a wheelhouse
built on the host, because the guest has no network. The guest writes its junit XML and log
back to that disk; the host reads them with ``debugfs`` once qemu has exited (no loop mount).
qemu is always killed at the end, and everything has a hard timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmtest.image import REPO, Image, build

VM_TIMEOUT_S = int(os.environ.get("REMEDY_VMTEST_TIMEOUT", "1500"))
DATA_SIZE = "3G"
WHEEL_TIMEOUT_S = 600
# KVM hangs with a stock kernel on this machine (issue 13): TCG, threaded across both vCPUs.
QEMU_ACCEL = "tcg,thread=multi"
RESULT_FILES = ("junit.xml", "guest.log", "pytest.rc", "setup-failed")


@dataclass(frozen=True)
class Run:
    """What came back from one VM run."""

    results: Path
    serial: Path
    returncode: int | None
    seconds: float

    def file(self, name: str) -> Path | None:
        path = self.results / name
        return path if path.is_file() else None


def _checkout_files(repo: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    return [f for f in listed.decode().split("\0") if f and (repo / f).is_file()]


def _wheelhouse(repo: Path, dest: Path, log: Path) -> None:
    """Every wheel setup.sh's ``pip install -e .[test]`` needs, and its build backend."""
    pip = repo / ".venv" / "bin" / "pip"
    tool = [str(pip)] if pip.exists() else [sys.executable, "-m", "pip"]
    with open(log, "ab") as out:
        subprocess.run(
            [
                *tool,
                "wheel",
                "-q",
                "-w",
                str(dest),
                ".[test]",
                "hatchling",
                "editables",
                "pip",
                "setuptools",
                "wheel",
            ],
            cwd=repo,
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=WHEEL_TIMEOUT_S,
        )
    for own in dest.glob("remedy-*.whl"):  # setup.sh installs the checkout itself, editable
        own.unlink()


def make_data_disk(work: Path, repo: Path = REPO) -> Path:
    """The second disk: src/ (the checkout), wheelhouse/, results/ (empty)."""
    stage = work / "data"
    src = stage / "src"
    for rel in _checkout_files(repo):
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)
    (stage / "results").mkdir(parents=True)
    wheels = stage / "wheelhouse"
    wheels.mkdir()
    _wheelhouse(repo, wheels, work / "host.log")
    disk = work / "data.img"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-L", "vmdata", "-d", str(stage), str(disk), DATA_SIZE],
        check=True,
        timeout=300,
    )
    shutil.rmtree(stage)
    return disk


def qemu_argv(image: Image, data: Path, serial: Path) -> list[str]:
    """2 vCPUs, 2 GiB, the image's own kernel and initrd, virtio disks, no network."""
    return [
        "qemu-system-x86_64",
        "-accel",
        QEMU_ACCEL,
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "2048",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-nic",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        "root=/dev/vda rw console=ttyS0 panic=-1 remedy.vmtest",
        # snapshot=on: the cached image is never written; the guest's changes go to a temp file.
        "-drive",
        f"file={image.rootfs},format=raw,if=virtio,snapshot=on",
        "-drive",
        f"file={data},format=raw,if=virtio",
        "-serial",
        f"file:{serial}",
    ]


def _boot(argv: list[str], timeout_s: float, log: Path) -> int | None:
    """Run qemu in its own process group; kill the group on timeout or any exit path."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"vmtest: VM still running after {timeout_s:.0f} s: killed", flush=True)
            return None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def _pull(disk: Path, dest: Path) -> None:
    """Copy results/* out of the ext4 image with debugfs (no mount)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        subprocess.run(
            ["debugfs", "-R", f"dump /results/{name} {dest / name}", str(disk)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        out = dest / name
        if out.exists() and out.stat().st_size == 0 and name != "setup-failed":
            out.unlink()  # debugfs leaves an empty file for a missing one


def run(out_dir: Path, timeout_s: float = VM_TIMEOUT_S) -> Run:
    """Build (or reuse) the image, boot it once, return where the results are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    image = build(out_dir / "image-build.log")
    print(f"vmtest: image {image.root} ready after {time.monotonic() - started:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="remedy-vmtest-"))
    try:
        data = make_data_disk(work)
        serial = out_dir / "serial.log"
        serial.unlink(missing_ok=True)
        booted = time.monotonic()
        rc = _boot(qemu_argv(image, data, serial), timeout_s, out_dir / "qemu.log")
        print(f"vmtest: VM ran {time.monotonic() - booted:.0f} s (qemu rc={rc})", flush=True)
        _pull(data, out_dir / "results")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Run(out_dir / "results", out_dir / "serial.log", rc, time.monotonic() - started)


def main() -> int:
    """``python -m vmtest.vm [OUT]``: one VM run; prints the guest's log."""
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / ".vmtest"
    result = run(out)
    log = result.file("guest.log")
    print(log.read_text() if log else f"no guest log; see {result.serial}")
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
