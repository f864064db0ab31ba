"""Every shipped profile through the engine over the wire: the profile's own simulator (gateway.sim)
serves it on loopback Modbus TCP, the generic driver polls, classifies and controls it, and scan
recognises it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.config import DeviceConfig
from gateway.modbus.bus import TcpBus
from gateway.modbus.driver import DeviceDriver
from gateway.modbus.scan import scan
from gateway.model import ChargerStatus, DeviceKind
from gateway.profiles import Profile, load_profiles
from gateway.sim.devices import SimCharger, SimMeter, fit_tag
from gateway.sim.registers import RegisterImage
from gateway.sim.server import SimServer

PROFILES = load_profiles()
CHARGERS = sorted(s for s, p in PROFILES.items() if p.kind is DeviceKind.CHARGER)
METERS = sorted(s for s, p in PROFILES.items() if p.kind is DeviceKind.METER)
TAG = "04A2B3C4D5E6F7"


def test_there_are_profiles_of_both_kinds() -> None:
    assert len(CHARGERS) >= 5 and len(METERS) >= 2


@asynccontextmanager
async def served(profile: Profile, image: RegisterImage) -> AsyncIterator[DeviceDriver]:
    unit = profile.connection.default_unit
    units = {unit: image}
    if profile.identify is not None and profile.identify.unit is not None:
        units[profile.identify.unit] = image  # station-level identity (Alfen unit 200)
    async with SimServer.tcp("127.0.0.1", 0, units) as srv:
        bus = TcpBus("127.0.0.1", srv.port)
        cfg = DeviceConfig(
            id="dev", driver=profile.slug, host="127.0.0.1", port=srv.port, unit=unit, timeout_s=1.0
        )
        try:
            yield DeviceDriver(cfg, profile, bus)
        finally:
            await bus.close()


def assert_paused_by_evse(profile: Profile, status: ChargerStatus | None) -> None:
    """Chargers with a code for it show suspended_evse; the others just "plugged, not charging"."""
    if ChargerStatus.SUSPENDED_EVSE in profile.simulate_states:
        assert status is ChargerStatus.SUSPENDED_EVSE
    else:
        assert status is not None and status.plugged and not status.delivering


def resolution_wh(profile: Profile) -> float:
    spec = profile.register("energy_wh")
    return max(abs(spec.scale), 1.0)


@pytest.mark.parametrize(
    "slug",
    # Heidelberg's 100 ms between requests makes its run take two seconds
    [pytest.param(s, marks=pytest.mark.slow) if s == "heidelberg-ec" else s for s in CHARGERS],
)
async def test_charger_profile_end_to_end(slug: str) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    async with served(profile, image) as driver:
        sample = await driver.poll()
        assert sample.online, sample.error
        assert set(sample.values) == {r.name for r in profile.registers}
        assert sample.status is sim.status is ChargerStatus.AVAILABLE
        assert sample.tag is None

        sim.plug_in(tag=TAG, power_w=7400.0)
        sample = await driver.poll()
        assert sample.status is sim.status
        assert sample.status.plugged
        if profile.tag is not None:
            assert sample.tag == fit_tag(profile.register(profile.tag.register), TAG).upper()

        sim.start_charging()
        sim.step(60.0)
        sample = await driver.poll()
        assert sample.status is sim.status is ChargerStatus.CHARGING
        if profile.has("power_w"):
            assert sample.power_w == pytest.approx(sim.power_w, rel=0.02, abs=10.0)
        if profile.has_lifetime_energy:
            assert sample.energy_wh == pytest.approx(sim.energy_wh, abs=resolution_wh(profile))

        if profile.current_limit is not None:
            await driver.set_current_limit(10.0)
            assert sim.limit_a == pytest.approx(10.0, abs=0.1)
            await driver.set_enabled(False)
            sim.step(1.0)
            sample = await driver.poll()
            assert sim.status is ChargerStatus.SUSPENDED_EVSE
            assert_paused_by_evse(profile, sample.status)
            await driver.set_enabled(True)
            sim.step(1.0)
            assert sim.limit_a == pytest.approx(10.0, abs=0.1)
            assert (await driver.poll()).status is ChargerStatus.CHARGING
        elif profile.enable is not None:
            await driver.set_enabled(False)
            sim.step(1.0)
            assert_paused_by_evse(profile, (await driver.poll()).status)

        if profile.heartbeat is not None:
            sim.step(5.0)
            assert sim.heartbeat_age_s > 0
            await driver.heartbeat()
            assert sim.heartbeat_age_s == 0.0
            assert sim.limit_a == pytest.approx(
                10.0 if profile.current_limit else sim.limit_a, abs=0.1
            )

        sim.unplug()
        sample = await driver.poll()
        assert sample.status is sim.status is ChargerStatus.AVAILABLE


@pytest.mark.parametrize("slug", METERS)
async def test_meter_profile_end_to_end(slug: str) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    sim = SimMeter(profile, image, seed=1, base_load_w=4000.0)
    sim.step(3600.0)
    async with served(profile, image) as driver:
        sample = await driver.poll()
    assert sample.online, sample.error
    assert sample.status is None and sample.tag is None
    assert sample.power_w == pytest.approx(4000.0, rel=0.01)
    assert sample.energy_wh == pytest.approx(sim.energy_wh, abs=max(resolution_wh(profile), 100.0))


@pytest.mark.parametrize("slug", sorted(s for s, p in PROFILES.items() if p.identify is not None))
async def test_scan_recognises_each_profile(slug: str) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    if profile.kind is DeviceKind.CHARGER:
        SimCharger(profile, image, seed=1)
    else:
        SimMeter(profile, image, seed=1, base_load_w=100.0)
    unit = profile.connection.default_unit
    units = {unit: image}
    if profile.identify is not None and profile.identify.unit is not None:
        units[profile.identify.unit] = image
    async with SimServer.tcp("127.0.0.1", 0, units) as srv:
        result = await scan(
            PROFILES,
            tcp=f"127.0.0.1:{srv.port}",
            units=[unit],
            timeout_s=0.5,
        )
    assert (unit, slug) in {(m.unit, m.slug) for m in result.matches}, result.matches
