"""Record the example traces of tests/traces/ on this host, then write their golden replays.

    sudo .venv/bin/python tests/traces/record_examples.py            # record + goldens (root)
    .venv/bin/python tests/traces/record_examples.py --goldens       # goldens only (no root)

Recording runs the real recorder (``remedy record``, kernel funnel) with the policies of
tests/traces/policies/, copied to a private temporary directory, while bounded workloads
(tests/workloads/storm.py) run inside a pids-limited CgroupSandbox named
``remedy-trace-example``: the only cgroup those policies match. The recorder never acts.

Traces:
  storm.jsonl  a flat-out fork storm (3000 forks, at most 5 s) next to a slow innocent forker
               (10 forks per second): the storm crosses both thresholds, the innocent neither.
  burst.jsonl  a paced burst at 120 forks per second for 2 s: over the shipped threshold
               (100 per 1 s), under the variant's (200 per 1 s), so --against diverges.

Goldens, for each trace: <name>.golden.txt (replay with policies/), <name>.variant.golden.txt
(with policies-variant/) and <name>.against.golden.txt (policies/ --against policies-variant/).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STORM = REPO / "tests" / "workloads" / "storm.py"
POLICIES = HERE / "policies"
VARIANT = HERE / "policies-variant"
SANDBOX = "remedy-trace-example"  # the cgroup the shipped policies match
TRACES = ("storm", "burst")


def _workloads(name: str) -> list[list[str]]:
    py = [sys.executable, str(STORM)]
    if name == "storm":
        return [
            [*py, "fork", "--count", "60", "--seconds", "6", "--rate", "10"],
            [*py, "fork", "--count", "3000", "--seconds", "5"],
        ]
    return [[*py, "fork", "--count", "240", "--seconds", "2", "--rate", "120"]]


def record(name: str, config: Path) -> Path:
    """Record one trace: start the recorder, run the workloads to completion, stop it."""
    sys.path.insert(0, str(REPO))
    from testkit.sandbox import CgroupSandbox  # noqa: PLC0415

    out = HERE / f"{name}.jsonl"
    log = (config / f"{name}.log").open("w+")
    argv = [sys.executable, "-m", "remedy", "record", "--sensor", "kernel", "--duration", "60"]
    argv += ["--policies", str(config / "policies"), "--playbooks", str(config / "playbooks")]
    recorder = subprocess.Popen(
        [*argv, "--out", str(out)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in Path(log.name).read_text():
            if recorder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"recorder not ready:\n{Path(log.name).read_text()}")
            time.sleep(0.05)
        with CgroupSandbox(SANDBOX) as box:
            procs = [box.spawn(argv) for argv in _workloads(name)]
            for proc in procs:
                proc.wait(30)
            time.sleep(0.5)  # let the last records drain
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(30)
    print(Path(log.name).read_text(), end="")
    return out


def goldens(names: Sequence[str] = TRACES) -> None:
    """Replay each trace and write what it prints, byte for byte, next to it."""
    sys.path.insert(0, str(REPO))
    from remedy.tools import replay  # noqa: PLC0415

    for name in names:
        trace = HERE / f"{name}.jsonl"
        runs = {
            "golden": ([POLICIES], []),
            "variant.golden": ([VARIANT], []),
            "against.golden": ([POLICIES], [VARIANT]),
        }
        for suffix, (policies, against) in runs.items():
            out = io.StringIO()
            replay.main(trace, policies, against=against, out=out)
            (HERE / f"{name}.{suffix}.txt").write_text(out.getvalue())
            print(f"wrote {name}.{suffix}.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--goldens", action="store_true", help="only rewrite the goldens")
    parser.add_argument("names", nargs="*", default=list(TRACES), help=f"of {TRACES}")
    args = parser.parse_args()
    if set(args.names) - set(TRACES):
        parser.error(f"unknown trace(s); known: {', '.join(TRACES)}")
    if not args.goldens:
        if os.geteuid() != 0:
            parser.error("recording needs root (BPF and cgroups); --goldens does not")
        with tempfile.TemporaryDirectory(prefix="remedy-record-") as tmp:
            config = Path(tmp)
            (config / "policies").mkdir()
            (config / "playbooks").mkdir()  # the playbook shares the policy's file
            for f in POLICIES.glob("*.yaml"):
                shutil.copy(f, config / "policies" / f.name)
            for name in args.names:
                print(f"recording {name} ...", flush=True)
                record(name, config)
    goldens(args.names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
