"""Fixtures shared by every test file.

The broker fixtures start a real mosquitto per test on a free port (see tests/mqtt_broker.py);
the profiles are the shipped ones, loaded once.
"""

from __future__ import annotations

import pytest
from mqtt_broker import fault_proxy, mosquitto, test_pki

from gateway.profiles import Profile, load_profiles

__all__ = ["fault_proxy", "mosquitto", "shipped_profiles", "test_pki"]


@pytest.fixture(scope="session")
def shipped_profiles() -> dict[str, Profile]:
    return load_profiles()
