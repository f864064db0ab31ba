"""The test tiers (README, Development), as a pytest plugin that tests/conftest.py loads.

- ``e2e``: whole paths: a real broker (mosquitto, or the demo's embedded one), the gateway or the
  simulator as a subprocess, socat, a browser, any other process.
- ``slow``: long runs: an in-process test that needs a second or more on an idle core, an e2e
  test that needs ten seconds or more.
- the inner loop, ``pytest -m "not e2e and not slow"``: in-process, under a minute.

Marking cannot rot: a test that uses a broker fixture (``E2E_FIXTURES``) is marked ``e2e`` at
collection, and every test that is not marked ``e2e`` runs under ``SpawnGuard``, which refuses to
start a process and fails the test. So a test that starts a broker, a gateway, socat or a
browser itself fails until it is marked. The guard is an audit hook (PEP 578): it sees every way
Python starts a process (``subprocess``, ``asyncio.create_subprocess_*``, ``os.fork``,
``os.posix_spawn``, ``os.system``, ``os.exec*``) and refuses before anything is started. The one
way past it is multiprocessing's "spawn" and "forkserver" start methods, which raise no audit
event; nothing in the project uses multiprocessing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["E2E_FIXTURES", "GUARD", "SPAWN_EVENTS", "SpawnGuard", "UnmarkedSpawnError"]

# A test using one of these fixtures talks to a real mosquitto (fault_proxy stands in front of it).
E2E_FIXTURES = frozenset({"mosquitto", "fault_proxy"})

# The audit events raised before a process is started (the "Audit events table" of the Python
# documentation).
SPAWN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.exec",
        "os.fork",
        "os.forkpty",
    }
)


class UnmarkedSpawnError(Exception):
    """A test that is not marked ``e2e`` tried to start a process."""


class SpawnGuard:
    """An audit hook that refuses to start a process while it watches a test.

    Audit hooks cannot be removed, so there is one per pytest run; ``watch(nodeid)`` and
    ``stop()`` bracket each test that is not marked ``e2e``. ``refused`` keeps what was refused
    for the test being watched, so a test that swallows the error still fails afterwards.
    """

    __slots__ = ("_nodeid", "refused")

    def __init__(self) -> None:
        self._nodeid: str | None = None
        self.refused: list[str] = []

    def watch(self, nodeid: str) -> None:
        self._nodeid = nodeid
        self.refused = []

    def stop(self) -> None:
        self._nodeid = None
        self.refused = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        nodeid = self._nodeid
        if nodeid is None or event not in SPAWN_EVENTS:
            return
        what = _describe(event, args)
        self.refused.append(what)
        raise UnmarkedSpawnError(
            f"{nodeid} starts a process ({what}) but is not marked e2e: mark it "
            "@pytest.mark.e2e (or its module with pytestmark) so the inner loop stays in-process"
        )


def _describe(event: str, args: tuple[Any, ...]) -> str:
    """The command line, as far as the event tells it."""
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec") and len(args) >= 2:
        command = args[1]  # argv (Popen: a string too, with shell=True)
    elif event == "os.spawn" and len(args) >= 3:
        command = args[2]
    elif event == "os.system" and args:
        command = args[0]
    else:
        return event
    words = command if isinstance(command, list | tuple) else [command]
    text = " ".join(os.fsdecode(w) if isinstance(w, bytes) else str(w) for w in words)
    return f"{event}: {text[:120]}"


GUARD = pytest.StashKey[SpawnGuard]()


def pytest_configure(config: pytest.Config) -> None:
    guard = SpawnGuard()
    config.stash[GUARD] = guard
    sys.addaudithook(guard)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    guard = item.config.stash[GUARD]
    guard.watch(item.nodeid)
    try:
        return (yield)
    finally:
        guard.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    result = yield
    refused = item.config.stash[GUARD].refused
    if refused:  # the test caught the guard's error and went on
        pytest.fail(f"{item.nodeid} is not marked e2e but tried to start: {'; '.join(refused)}")
    return result
