"""make vmtest's host side, offline: guest junit outcomes become host verdicts (a skip or a
missing result fails under REMEDY_REQUIRE_BPF=1), and node ids map to junit's names."""

from __future__ import annotations

from pathlib import Path

from vmtest.image import packages, recipe_hash, setup_packages
from vmtest.test_vm import Outcome, junit_key, parse_junit, verdict

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.kernel.test_scope" name="test_a" time="1.0"/>
<testcase classname="vmtest.guest.test_v2_controllers" name="test_b[x]" time="1.0">
  <skipped type="pytest.skip" message="no cpu controller">why</skipped></testcase>
<testcase classname="vmtest.guest.test_v2_controllers" name="test_c" time="1.0">
  <failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="vmtest.guest.test_v2_controllers" name="test_c" time="0.1">
  <error message="teardown">trace</error></testcase>
<testcase classname="vmtest.guest.test_v2_controllers" name="test_d" time="1.0"/>
<testcase classname="vmtest.guest.test_v2_controllers" name="test_d" time="0.1">
  <error message="teardown failed">trace</error></testcase>
</testsuite></testsuites>
"""


def test_node_ids_map_to_junit_names() -> None:
    assert junit_key("tests/kernel/test_scope.py::test_a") == ("tests.kernel.test_scope", "test_a")
    assert junit_key("vmtest/guest/t.py::TestX::test_y[1-a]") == (
        "vmtest.guest.t.TestX",
        "test_y[1-a]",
    )


def test_outcomes_keep_the_worse_of_a_call_and_its_teardown(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    got = parse_junit(path)
    assert got[("tests.kernel.test_scope", "test_a")].status == "passed"
    assert got[("vmtest.guest.test_v2_controllers", "test_b[x]")].status == "skipped"
    assert got[("vmtest.guest.test_v2_controllers", "test_c")].status == "failure"
    assert got[("vmtest.guest.test_v2_controllers", "test_d")].status == "error"


def test_a_guest_skip_or_a_missing_result_fails_under_require_bpf() -> None:
    skipped = Outcome("skipped", "no cpu controller")
    assert verdict(skipped, "t", require=True)[0] == "fail"
    assert verdict(skipped, "t", require=False) == ("skip", "no cpu controller")
    assert verdict(None, "t", require=False)[0] == "fail"
    assert verdict(Outcome("error", "teardown"), "t", require=False)[0] == "fail"
    assert verdict(Outcome("passed", ""), "t", require=True) == ("pass", "")


def test_the_image_has_every_package_setup_sh_installs() -> None:
    """The guest has no network: setup.sh must find its packages already installed."""
    needed = setup_packages()
    assert "python3-bpfcc" in needed and "stress-ng" in needed
    assert set(needed) <= set(packages())
    assert {"linux-image-cloud-amd64", "linux-headers-cloud-amd64", "systemd-sysv"} <= set(
        packages()
    )
    assert len(recipe_hash()) == 16
