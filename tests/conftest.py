"""Fixtures shared by every test file.

The broker fixtures start a real mosquitto per test on a free port (tests/support/mqtt_broker.py);
the profiles are the shipped ones, loaded once. tests/support/tiers.py sorts the tests into
tiers: a test using a broker fixture is ``e2e``; a test that is not ``e2e`` cannot start a
process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from gateway.logs import configure_logging
from gateway.profiles import Profile, load_profiles

pytest_plugins = ["pytester", "tests.support.mqtt_broker", "tests.support.tiers"]


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
