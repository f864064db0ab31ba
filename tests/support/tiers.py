"""The test tiers (README, Development): the inner loop ``pytest -m "not e2e and not slow"`` runs
in-process and in under a minute; ``e2e`` tests run whole paths (a real broker, the gateway or
the simulator as a subprocess, a browser); ``slow`` tests are long runs.

tests/conftest.py marks every test that uses a broker fixture as ``e2e`` at collection, and runs
every test that is not marked ``e2e`` under ``SpawnGuard``: starting any process there fails the
test, so a test that starts a broker, a gateway, socat or a browser itself cannot stay in the
inner loop unmarked. The guard is an audit hook (PEP 578), so it sees every way Python starts a
process (``subprocess``, ``asyncio.create_subprocess_*``, ``os.fork``, ``os.posix_spawn``,
``os.system``) and refuses before anything is started.
"""

from __future__ import annotations

from typing import Any

__all__ = ["E2E_FIXTURES", "SPAWN_EVENTS", "SpawnGuard", "UnmarkedSpawnError"]

# A test using one of these fixtures talks to a real mosquitto (fault_proxy stands in front of it).
E2E_FIXTURES = frozenset({"mosquitto", "fault_proxy"})

# The audit events raised before a process is started (docs.python.org: audit events table).
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

    Installed once per pytest run (audit hooks cannot be removed); ``watch(nodeid)`` and
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
            "@pytest.mark.e2e (or the module with pytestmark) so the inner loop stays in-process"
        )


def _describe(event: str, args: tuple[Any, ...]) -> str:
    if event in ("subprocess.Popen", "os.posix_spawn", "os.spawn", "os.exec") and len(args) >= 2:
        argv = args[1]
        words = [str(a) for a in argv] if isinstance(argv, list | tuple) else [str(argv)]
        return f"{event}: {' '.join(words)[:120]}"
    if event == "os.system" and args:
        return f"{event}: {str(args[0])[:120]}"
    return event
