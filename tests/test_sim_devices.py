"""Simulated chargers and meters: behaviour in simulated time, and every shipped profile served
over Modbus TCP and read back with a raw pymodbus client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.modbus.codec import decode, encode
from gateway.modbus.types import Table
from gateway.model import ChargerStatus, DeviceKind, Value
from gateway.profiles import Profile, load_profiles
from gateway.sim.devices import SimCharger, SimMeter, TruthLog, fit_tag
from gateway.sim.registers import RegisterImage
from gateway.sim.server import SimServer

PROFILES = load_profiles()
CHARGERS = sorted(s for s, p in PROFILES.items() if p.kind is DeviceKind.CHARGER)
METERS = sorted(s for s, p in PROFILES.items() if p.kind is DeviceKind.METER)


def _values(profile: Profile, image: RegisterImage) -> dict[str, Value]:
    return {r.name: decode(r, image.get(r.table, r.address, r.count)) for r in profile.registers}


def _status(charger: SimCharger) -> ChargerStatus:
    assert charger.profile.state is not None
    return charger.profile.state.classify(_values(charger.profile, charger.image))[1]


def _write(image: RegisterImage, table: Table, address: int, words: list[int]) -> None:
    """What the server does with a client write."""
    image.client_write(table, address, words)


def test_shipped_profiles_exist() -> None:
    assert len(CHARGERS) >= 5 and len(METERS) >= 2


@pytest.mark.parametrize("slug", CHARGERS)
def test_charger_lifecycle_classifies(slug: str) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    charger = SimCharger(profile, image, device_id="cp", seed=1, enforce_heartbeat=False)
    shown = profile.simulate_states
    assert _status(charger) is ChargerStatus.AVAILABLE
    charger.plug_in(power_w=7400)
    assert _status(charger) is ChargerStatus.PREPARING
    charger.start_charging()
    charger.step(60)
    assert charger.status is ChargerStatus.CHARGING
    assert _status(charger) is ChargerStatus.CHARGING
    values = _values(profile, image)
    if profile.has("power_w"):
        assert values["power_w"] == pytest.approx(7400, abs=100)
    if profile.has("energy_wh"):
        assert charger.energy_wh > 0
    if profile.has("current_l1_a"):
        assert values["current_l1_a"] == pytest.approx(7400 / 230 / 3, abs=0.6)  # 1 A steps
    charger.suspend()
    charger.step(1)
    assert charger.status is ChargerStatus.SUSPENDED_EV
    if ChargerStatus.SUSPENDED_EV in shown:
        assert _status(charger) is ChargerStatus.SUSPENDED_EV
    charger.unplug()
    assert _status(charger) is ChargerStatus.AVAILABLE


def test_energy_rises_with_power_and_session_counter_resets() -> None:
    profile = PROFILES["keba-p30"]
    image = RegisterImage()
    charger = SimCharger(
        profile, image, seed=3, initial_energy_wh=1_000_000, enforce_heartbeat=False
    )
    charger.plug_in(tag="04A1B2C3", power_w=11000)
    charger.start_charging()
    for _ in range(60):
        charger.step(60)  # one simulated hour
    values = _values(profile, image)
    assert values["energy_wh"] == pytest.approx(1_011_000, abs=0.2)
    assert values["session_energy_wh"] == pytest.approx(11_000, abs=0.2)
    first = charger.unplug()
    assert first is not None and first["energy_wh"] == pytest.approx(11_000)
    charger.plug_in(power_w=3700, energy_need_wh=500)
    # KEBA's session counter is documented not to reset at plug-in ("never"): the sim keeps it.
    assert profile.session_energy_resets == "never"
    assert _values(profile, image)["session_energy_wh"] == pytest.approx(11_000, abs=0.2)
    charger.start_charging()
    for _ in range(60):
        charger.step(60)
    assert charger.ev is not None and charger.ev.charged_wh == pytest.approx(500)  # EV full
    assert charger.status is ChargerStatus.SUSPENDED_EV
    assert _values(profile, image)["energy_wh"] == pytest.approx(1_011_500, abs=0.2)


@pytest.mark.parametrize(
    "slug",
    [
        s
        for s in CHARGERS
        if PROFILES[s].has("session_energy_wh") and PROFILES[s].session_energy_resets == "plug"
    ],
)
def test_session_counter_resets_at_plug_in(slug: str) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    charger = SimCharger(profile, image, enforce_heartbeat=False)
    charger.plug_in(power_w=7400)
    charger.start_charging()
    charger.step(3600)
    assert _values(profile, image)["session_energy_wh"] == pytest.approx(7400, rel=0.01)
    charger.unplug()
    charger.plug_in()
    assert _values(profile, image)["session_energy_wh"] == 0


def test_keba_hex_tag_shows_first_four_bytes() -> None:
    profile = PROFILES["keba-p30"]
    assert profile.tag is not None
    image = RegisterImage()
    charger = SimCharger(profile, image, enforce_heartbeat=False)
    assert _values(profile, image)[profile.tag.register] in profile.tag.empty
    charger.plug_in(tag="04a2b3c4d5e6f7")
    assert _values(profile, image)[profile.tag.register] == "04A2B3C4"
    record = charger.unplug()
    assert record is not None and record["tag"] == "04a2b3c4d5e6f7"
    assert record["tag_seen"] == "04A2B3C4"
    assert _values(profile, image)[profile.tag.register] in profile.tag.empty


def test_fit_tag_per_encoding() -> None:
    keba = PROFILES["keba-p30"]
    assert keba.tag is not None
    spec = keba.register(keba.tag.register)
    assert fit_tag(spec, "04A2B3C4D5E6F7") == "04A2B3C4"
    assert fit_tag(spec, "ABC") == "0ABC"  # odd hex: a leading zero nibble
    for slug in CHARGERS:
        profile = PROFILES[slug]
        if profile.tag is None:
            continue
        tag_spec = profile.register(profile.tag.register)
        shown = fit_tag(tag_spec, "04B7C1D2E3F480")
        assert decode(tag_spec, encode(tag_spec, shown)) == shown.strip()


def test_limit_and_enable_writes_change_power() -> None:
    profile = PROFILES["keba-p30"]
    assert profile.current_limit is not None and profile.enable is not None
    limit = profile.current_limit.control.register
    image = RegisterImage()
    charger = SimCharger(profile, image, enforce_heartbeat=False)
    charger.plug_in(power_w=22000)
    charger.start_charging()
    charger.step(1)
    assert charger.power_w == pytest.approx(22000)
    _write(image, limit.table, limit.address, encode(limit, 10_000))  # 10 A in mA
    charger.step(1)
    assert charger.power_w == pytest.approx(10 * 230 * 3)
    _write(image, limit.table, limit.address, encode(limit, 0))
    charger.step(1)
    assert charger.power_w == 0 and _status(charger) is ChargerStatus.SUSPENDED_EVSE
    _write(image, limit.table, limit.address, encode(limit, 16_000))
    charger.step(1)
    assert charger.power_w == pytest.approx(16 * 230 * 3)
    enable = profile.enable.register
    assert profile.enable.off is not None
    _write(image, enable.table, enable.address, encode(enable, profile.enable.off))
    charger.step(1)
    assert charger.power_w == 0 and charger.status is ChargerStatus.SUSPENDED_EVSE


def test_enable_after_disable_starts_a_waiting_ev() -> None:
    profile = PROFILES["keba-p30"]
    assert profile.enable is not None and profile.enable.on is not None
    assert profile.enable.off is not None
    enable = profile.enable.register
    image = RegisterImage()
    charger = SimCharger(profile, image, enforce_heartbeat=False)
    _write(image, enable.table, enable.address, encode(enable, profile.enable.off))
    charger.plug_in(tag="04A1B2C3")
    charger.step(1)
    assert charger.status is ChargerStatus.PREPARING
    _write(image, enable.table, enable.address, encode(enable, profile.enable.on))  # authorised
    charger.step(1)
    assert charger.status is ChargerStatus.CHARGING


@pytest.mark.parametrize("slug", [s for s in CHARGERS if PROFILES[s].heartbeat is not None])
def test_missed_heartbeat_falls_back_to_failsafe(slug: str) -> None:
    profile = PROFILES[slug]
    hb = profile.heartbeat
    assert hb is not None
    image = RegisterImage()
    # speed 10: the watchdog runs on real seconds, so it needs 10x the simulated time.
    charger = SimCharger(profile, image, speed=10.0)
    charger.plug_in(power_w=22000)
    charger.start_charging()
    charger.step(1)
    normal_w = charger.power_w
    assert normal_w > 0
    charger.step(hb.timeout_s * 10 * 0.9)
    assert not charger.failsafe
    charger.step(hb.timeout_s * 10 * 0.2)
    assert charger.failsafe
    failsafe_a = hb.failsafe_current_a if hb.failsafe_current_a >= charger.min_a else 0.0
    assert charger.effective_limit_a == pytest.approx(min(failsafe_a, charger.limit_a))
    if failsafe_a == 0:
        assert charger.power_w == 0 and charger.status is ChargerStatus.SUSPENDED_EVSE
    # The gateway's heartbeat write restores normal operation.
    spec = hb.control.register
    if hb.rewrites_current_limit:
        assert profile.current_limit is not None
        value = profile.current_limit.to_raw(charger.limit_a)
    else:
        value = hb.value
    _write(image, spec.table, spec.address, encode(spec, value))
    charger.step(1)
    assert not charger.failsafe and charger.power_w == pytest.approx(normal_w)


def test_frozen_stops_registers_but_not_energy() -> None:
    profile = PROFILES["keba-p30"]
    image = RegisterImage()
    charger = SimCharger(profile, image, enforce_heartbeat=False)
    charger.plug_in(power_w=11000)
    charger.start_charging()
    charger.step(60)
    before = _values(profile, image)
    charger.frozen = True
    charger.step(600)
    assert _values(profile, image) == before
    charger.frozen = False
    charger.step(0)
    assert _values(profile, image)["energy_wh"] > before["energy_wh"]  # type: ignore[operator]


def test_meter_measures_wired_chargers(tmp_path: Path) -> None:
    truth = TruthLog(tmp_path / "truth.jsonl")
    chargers = [
        SimCharger(
            PROFILES["keba-p30"],
            RegisterImage(),
            device_id=f"cp{i}",
            truth=truth,
            enforce_heartbeat=False,
        )
        for i in (1, 2)
    ]
    meter_profile = PROFILES["eastron-sdm630"]
    image = RegisterImage()
    meter = SimMeter(
        meter_profile, image, chargers=chargers, base_load_w=1000, initial_energy_wh=5_000_000
    )
    chargers[0].plug_in(tag="04A1B2C3", power_w=11000)
    chargers[1].plug_in(tag="04FFFFFF", power_w=3680, phases=1)
    for c in chargers:
        c.start_charging()
    for _ in range(30):
        for c in chargers:
            c.step(60)
        meter.step(60)
    values = _values(meter_profile, image)
    assert values["power_w"] == pytest.approx(11000 + 3680 + 1000, rel=1e-4)
    assert values["energy_wh"] == pytest.approx(5_000_000 + (11000 + 3680 + 1000) / 2, abs=1)
    assert values["current_l1_a"] == pytest.approx((11000 / 3 + 3680 + 1000 / 3) / 230, rel=1e-3)
    for c in chargers:
        c.unplug()
    lines = [json.loads(x) for x in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert [(x["device"], x["tag_seen"]) for x in lines] == [
        ("cp1", "04A1B2C3"),
        ("cp2", "04FFFFFF"),
    ]
    assert lines[0]["energy_wh"] == pytest.approx(5500)
    assert lines[0]["counter_end_wh"] - lines[0]["counter_start_wh"] == pytest.approx(5500, abs=0.2)


def test_charger_without_tag_register_keeps_tag_in_truth_only() -> None:
    profile = PROFILES["abb-terra-ac"]
    assert profile.tag is None
    charger = SimCharger(profile, RegisterImage(), enforce_heartbeat=False)
    charger.plug_in(tag="app-7f3c9a")
    charger.start_charging()
    charger.step(3600)
    record = charger.unplug()
    assert record is not None
    assert record["tag"] == "app-7f3c9a" and record["tag_seen"] is None
    assert record["session_counter_wh"] == pytest.approx(record["energy_wh"], abs=1)


async def test_every_shipped_profile_over_the_wire() -> None:
    """Serve every profile as one unit of a TCP server; read each register with pymodbus."""
    units: dict[int, RegisterImage] = {}
    devices: dict[int, SimCharger | SimMeter] = {}
    for unit, slug in enumerate(sorted(PROFILES), start=1):
        profile = PROFILES[slug]
        image = RegisterImage()
        units[unit] = image
        if profile.kind is DeviceKind.CHARGER:
            charger = SimCharger(profile, image, device_id=slug, seed=unit, enforce_heartbeat=False)
            charger.plug_in(tag="04A2B3C4D5E6F7", power_w=7400)
            charger.start_charging()
            charger.step(600)
            devices[unit] = charger
        else:
            meter = SimMeter(profile, image, device_id=slug, base_load_w=2300, seed=unit)
            meter.step(600)
            devices[unit] = meter
    async with SimServer.tcp("127.0.0.1", 0, units) as server:
        client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=1, retries=0)
        assert await client.connect()
        try:
            for unit, device in devices.items():
                profile = device.profile
                wire: dict[str, Value] = {}
                for reg in profile.registers:
                    read = {
                        Table.HOLDING: client.read_holding_registers,
                        Table.INPUT: client.read_input_registers,
                        Table.COIL: client.read_coils,
                        Table.DISCRETE: client.read_discrete_inputs,
                    }[reg.table]
                    rr = await read(reg.address, count=reg.count, device_id=unit)
                    assert not rr.isError(), (profile.slug, reg.name, rr)
                    words = rr.bits[: reg.count] if reg.table.is_bits else rr.registers
                    wire[reg.name] = decode(reg, [int(w) for w in words])
                assert wire == _values(profile, units[unit]), profile.slug
                expect_w = 7400.0 if profile.kind is DeviceKind.CHARGER else 2300.0
                if profile.has("power_w"):
                    assert wire["power_w"] == pytest.approx(expect_w, rel=0.01), profile.slug
                if profile.kind is DeviceKind.CHARGER:
                    assert profile.state is not None
                    assert profile.state.classify(wire)[1] is ChargerStatus.CHARGING, profile.slug
                    if profile.tag is not None:
                        shown = wire[profile.tag.register]
                        assert isinstance(shown, str) and shown.startswith("04"), profile.slug
        finally:
            client.close()
