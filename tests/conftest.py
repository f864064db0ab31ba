"""Fixtures shared by every test file.

The broker fixtures start a real mosquitto per test on a free port (see tests/mqtt_broker.py);
the profiles are the shipped ones, loaded once. The hooks below sort the tests into tiers
(tests/support/tiers.py): a test using a broker fixture is ``e2e``; a test that is not ``e2e``
cannot start a process.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Generator, Iterator

import pytest
import structlog
from mqtt_broker import fault_proxy, mosquitto, test_pki

from gateway.logs import configure_logging
from gateway.profiles import Profile, load_profiles
from tests.support.tiers import E2E_FIXTURES, SpawnGuard

__all__ = ["fault_proxy", "mosquitto", "shipped_profiles", "test_pki"]


_spawn_guard = SpawnGuard()


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(_spawn_guard)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    _spawn_guard.watch(item.nodeid)
    try:
        return (yield)
    finally:
        _spawn_guard.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    result = yield
    if _spawn_guard.refused:  # the test caught the guard's error and went on
        pytest.fail(f"{item.nodeid} is not marked e2e but tried to start: {_spawn_guard.refused}")
    return result


@pytest.fixture(scope="session")
def shipped_profiles() -> dict[str, Profile]:
    return load_profiles()


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Every test logs through the gateway's own pipeline to its own captured stderr (never to
    stdout, which CLI tests read), and a test that runs the CLI cannot leave its configuration
    to the next one."""
    handlers = list(logging.getLogger().handlers)
    configure_logging("info", json=False)
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = handlers
