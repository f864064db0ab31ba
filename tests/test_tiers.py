"""The test tiers (tests/support/tiers.py): a test that is not marked e2e cannot start a
process, whichever way it asks; a test using a broker fixture is e2e without saying so."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tests.support.tiers import GUARD, UnmarkedSpawnError


def test_the_tiers_are_strict_markers(pytestconfig: pytest.Config) -> None:
    markers = {line.split(":", 1)[0] for line in pytestconfig.getini("markers")}
    assert {"e2e", "slow"} <= markers
    assert "--strict-markers" in pytestconfig.getini("addopts")


def test_an_unmarked_test_cannot_start_a_process(pytestconfig: pytest.Config) -> None:
    guard = pytestconfig.stash[GUARD]
    with pytest.raises(UnmarkedSpawnError, match=r"test_tiers.py::\S+ starts .*mosquitto -h"):
        subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, check=False)
    with pytest.raises(UnmarkedSpawnError, match="-m gateway run --help"):
        subprocess.Popen([sys.executable, "-m", "gateway", "run", "--help"])
    with pytest.raises(UnmarkedSpawnError, match=r"\(os\.system: true\)"):
        os.system("true")
    with pytest.raises(UnmarkedSpawnError, match=r"\(os\.posix_spawn: true\)"):
        os.posix_spawn("/bin/true", ["true"], os.environ)
    # were the guard off, the child would leave at once and pytest.raises would fail
    with pytest.raises(UnmarkedSpawnError, match=r"\(os\.fork\)"):
        if os.fork() == 0:
            os._exit(0)
    with pytest.raises(UnmarkedSpawnError, match=r"\(os\.forkpty\)"):
        pid, _ = os.forkpty()
        if pid == 0:
            os._exit(0)
    assert len(guard.refused) == 6
    guard.refused.clear()  # all refused on purpose: this test passes


async def test_an_unmarked_test_cannot_start_a_process_from_asyncio(
    pytestconfig: pytest.Config,
) -> None:
    guard = pytestconfig.stash[GUARD]
    with pytest.raises(UnmarkedSpawnError, match="-m gateway simulate --help"):
        await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "simulate", "--help")
    with pytest.raises(UnmarkedSpawnError, match="chromium --version"):
        await asyncio.create_subprocess_shell("chromium --version")
    assert len(guard.refused) == 2
    guard.refused.clear()


INNER = """
import subprocess

import pytest


@pytest.fixture
def mosquitto():
    return "a broker"


def test_pure():
    assert 1 + 1 == 2


def test_spawns_unmarked():
    subprocess.run(["true"], check=True)


def test_swallows_the_refusal():
    try:
        subprocess.run(["true"], check=True)
    except Exception:
        pass


@pytest.mark.e2e
def test_spawns_marked():
    subprocess.run(["true"], check=True)


def test_uses_the_broker(mosquitto):
    subprocess.run(["true"], check=True)
"""


@pytest.mark.e2e  # the inner e2e tests start `true`
def test_the_plugin_fails_unmarked_spawns_and_marks_broker_tests(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p tests.support.tiers -p no:asyncio\n"
        "markers =\n    e2e: whole paths\n    slow: long runs\n"
    )
    pytester.makepyfile(test_inner=INNER)

    everything = pytester.runpytest_inprocess()
    everything.assert_outcomes(passed=3, failed=2)
    everything.stdout.fnmatch_lines(
        [
            "E   *UnmarkedSpawnError: test_inner.py::test_spawns_unmarked starts a process "
            "(subprocess.Popen: true) but is not marked e2e*",
            "E   *Failed: test_inner.py::test_swallows_the_refusal is not marked e2e but tried "
            "to start: subprocess.Popen: true",
        ]
    )

    inner_loop = pytester.runpytest_inprocess("-m", "not e2e and not slow")
    inner_loop.assert_outcomes(passed=1, failed=2, deselected=2)
