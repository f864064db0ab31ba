"""Load management on the real Modbus wire: a simulated site (three chargers, an Eastron SDM630
grid meter measuring them plus a base load) polled by the engine, limited by the LoadManager."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import GatewayConfig, load_config
from gateway.loadmgmt import LoadBalancer, LoadManager, Mode
from gateway.modbus.bus import BusPool
from gateway.modbus.driver import Chargers, DeviceDriver
from gateway.modbus.poller import DevicePoller
from gateway.profiles import Profile
from gateway.sim.devices import VOLTAGE_V
from gateway.sim.site import SimSite
from tests.support.mqtt_broker import free_port
from tests.support.uplink import running, wait_until

MAX_A = 32.0

SITE_YAML = """
site: {{id: lm-site}}
storage: {{path: ./buffer.db}}
buses:
  - {{id: gw, type: rtu-over-tcp, host: 127.0.0.1, tcp_port: {p_bus}}}
devices:
  - {{id: cp1, driver: webasto-next, host: 127.0.0.1, port: {p1}, {opts}}}
  - {{id: cp2, driver: vestel-evc04, host: 127.0.0.1, port: {p2}, {opts}}}
  - {{id: cp3, driver: keba-p30, host: 127.0.0.1, port: {p3}, {opts}}}
  - {{id: grid, driver: eastron-sdm630, bus: gw, unit: 2, {opts}}}
grid: {{max_current_a: {max_a}, meter: grid}}
"""


def site_config(tmp_path: Path) -> GatewayConfig:
    path = tmp_path / "site.yaml"
    path.write_text(
        SITE_YAML.format(
            p_bus=free_port(),
            p1=free_port(),
            p2=free_port(),
            p3=free_port(),
            max_a=MAX_A,
            opts="poll_interval: 200ms, timeout: 300ms",
        )
    )
    return load_config(path)


def grid_phase_a(site: SimSite) -> list[float]:
    """What the simulated grid meter measures on each phase (its own arithmetic)."""
    meter = site.meter("grid")
    per_phase = [meter.base_load_w / 3] * 3
    for charger in meter.chargers:
        phases = charger.ev.phases if charger.ev is not None else 3
        for i in range(phases):
            per_phase[i] += charger.power_w / phases
    return [w / VOLTAGE_V for w in per_phase]


@contextlib.asynccontextmanager
async def gateway_side(
    config: GatewayConfig, profiles: dict[str, Profile]
) -> AsyncIterator[LoadManager]:
    async with BusPool.from_config(config) as pool:
        drivers = {
            dev.id: DeviceDriver(dev, profiles[dev.driver], pool.bus_for(dev))
            for dev in config.devices
        }
        chargers = Chargers(drivers)
        balancer = LoadBalancer.from_config(
            config, profiles, chargers.can_control, raise_every_s=1.0, meter_stale_s=2.0
        )
        load = LoadManager(config, balancer, chargers, interval_s=0.2)
        poller = DevicePoller(drivers.values(), load.on_sample)
        async with running(poller.run(), "poller"), running(load.run(), "load"):
            yield load


class Watch:
    """Samples the simulated grid current every 50 ms while armed."""

    def __init__(self, site: SimSite) -> None:
        self.site = site
        self.peak_a = 0.0
        self.armed = False

    async def run(self) -> None:
        while True:
            if self.armed:
                self.peak_a = max(self.peak_a, *grid_phase_a(self.site))
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_three_evs_are_held_under_the_grid_limit(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    config = site_config(tmp_path)
    async with SimSite(config, shipped_profiles, speed=1.0, traffic=False, seed=7) as site:
        evs = [site.charger(c) for c in ("cp1", "cp2", "cp3")]
        for ev in evs:
            ev.plug_in(power_w=22_000, phases=3)
            ev.start_charging()
        await asyncio.sleep(0.2)
        base_a = site.meter("grid").base_load_w / 3 / VOLTAGE_V
        before = grid_phase_a(site)
        assert min(before) > 3 * MAX_A  # every EV draws its 32 A: the fuse would blow

        watch = Watch(site)
        async with gateway_side(config, shipped_profiles) as load, running(watch.run(), "watch"):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await wait_until(lambda: max(grid_phase_a(site)) <= MAX_A, 5, "grid under limit")
            settle_s = loop.time() - t0
            watch.armed = True
            await asyncio.sleep(1.5)  # it stays there
            shares = [ev.limit_a for ev in evs]
            assert all(6 <= a <= 11 for a in shares), shares
            assert max(shares) - min(shares) <= 1  # fair, up to each register's steps
            assert load.last is not None and load.last.mode == Mode.METERED
            assert load.last.base_a is not None
            assert abs(load.last.base_a[0] - base_a) < 0.5  # base load measured, not assumed
            # Using the room: within 1 A margin + 3 A of rounding to whole amps of the limit.
            assert max(grid_phase_a(site)) >= MAX_A - 1 - 3

            # One EV leaves: the other two get its share (after the raise interval).
            evs[2].unplug()
            await wait_until(
                lambda: all(ev.limit_a >= shares[0] + 3 for ev in evs[:2]), 5, "bigger shares"
            )
            await asyncio.sleep(1.0)
            assert evs[2].limit_a == 6  # the idle charger is parked at its minimum
            assert all(12 <= ev.limit_a <= 16 for ev in evs[:2]), [e.limit_a for e in evs]

            # The session manager stops cp2: the load manager never switches it back on.
            await load.set_enabled("cp2", False)
            await asyncio.sleep(2.0)
            assert evs[1].limit_a == 0 and evs[1].power_w == 0
            assert 25 <= evs[0].limit_a <= 31  # cp1 took the room
            await load.set_enabled("cp2", True)
            await wait_until(lambda: evs[1].power_w > 0, 3, "cp2 resumed")
            await asyncio.sleep(1.0)
            assert watch.peak_a <= MAX_A

            # The grid meter falls silent: nobody knows the base load, every EV gets 6 A.
            site.set_fault("grid", "no_answer")
            await wait_until(lambda: all(ev.limit_a == 6 for ev in evs[:2]), 6, "failsafe minimum")
            assert load.last is not None and load.last.mode == Mode.FAILSAFE
            site.clear_fault("grid")
            await wait_until(lambda: evs[0].limit_a > 6, 6, "metered again")
            await asyncio.sleep(1.0)
        print(f"settled in {settle_s:.2f} s; peak after settling {watch.peak_a:.2f} A")
        assert settle_s < 3.0
        assert watch.peak_a <= MAX_A


@pytest.mark.slow
async def test_a_silent_charger_counts_as_base_load(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    config = site_config(tmp_path)
    async with SimSite(config, shipped_profiles, speed=1.0, traffic=False, seed=3) as site:
        evs = [site.charger(c) for c in ("cp1", "cp2", "cp3")]
        for ev, power_w in zip(evs, (22_000, 22_000, 7_400), strict=True):
            ev.plug_in(power_w=power_w, phases=3)
            ev.start_charging()
        site.set_fault("cp3", "no_answer")  # cp3 is deaf: its polls and writes time out
        async with gateway_side(config, shipped_profiles) as load:
            # What cp3 draws shows up in the grid meter as base load: the two chargers the
            # gateway reaches shrink until the whole site fits.
            await wait_until(lambda: max(grid_phase_a(site)) <= MAX_A, 6, "grid under limit")
            await asyncio.sleep(1.0)
            assert max(grid_phase_a(site)) <= MAX_A
            assert all(6 <= ev.limit_a <= 10 for ev in evs[:2]), [ev.limit_a for ev in evs]
            assert evs[2].limit_a == 32  # nothing reached it
            assert load.balancer.applied("cp3") is None
            assert load.last is not None and load.last.base_a is not None
            assert load.last.base_a[0] > 10  # cp3's 10.7 A plus the building
