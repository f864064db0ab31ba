"""The ten profiles added from independent public sources (issue 10 item 5): real register words
decode to the values and statuses the sources describe, every register and control names its
source, the controls write what the sources write (function code included), and each profile's
simulated device is polled over Modbus TCP by the engine."""

from __future__ import annotations

import re
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

import gateway.sim.server as sim_server
from gateway.config import DeviceConfig
from gateway.modbus.bus import TcpBus
from gateway.modbus.codec import decode, encode
from gateway.modbus.driver import DeviceDriver
from gateway.modbus.types import DataType, RegisterSpec, Table
from gateway.model import ChargerStatus, DeviceKind, IecState
from gateway.profiles import KNOWN_FROM, Profile, load_profiles
from gateway.sim.devices import SimCharger, SimMeter
from gateway.sim.registers import RegisterImage
from gateway.sim.server import SimServer

NEW_SLUGS = {
    "victron-evcs",
    "amperfied-connect",
    "cfos-power-brain",
    "mennekes-amtron-compact",
    "siemens-pac2200",
    "janitza-umg96rm",
    "carlo-gavazzi-em340",
    "eastron-sdm230",
    "abb-b21",
    "eastron-sdm72d-m",
}
PROFILES = load_profiles()
NEW = sorted(NEW_SLUGS)
NEW_CHARGERS = sorted(s for s in NEW if PROFILES[s].kind is DeviceKind.CHARGER)
NEW_METERS = sorted(s for s in NEW if PROFILES[s].kind is DeviceKind.METER)

# Projects and documents counted as independent sources (a profile needs two of them).
SOURCE_FAMILIES = {
    "evcc": "evcc",
    "OpenEMS": "openems",
    "mbmd": "mbmd",
    "dbus-modbus-client": "venus",
    "openWB": "openwb",
    "cFos documentation": "cfos-doc",
    "DF3MS/janiza": "df3ms",
    "merlokk/SmartHome": "merlokk",
    "nymea": "nymea",
    "Modbus RTU Specification": "mennekes-spec",
}


def f32(x: float) -> list[int]:
    raw = struct.pack(">f", x)
    return [int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big")]


def f64(x: float) -> list[int]:
    raw = struct.pack(">d", x)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 8, 2)]


NAN32 = [0x7FC0, 0x0000]

# (slug, register, words as read from the device, decoded value in the register's unit)
DECODE: list[tuple[str, str, list[int], object]] = [
    # Victron EVCS: u16 W, u32 (high word first) 0.01 kWh, u16 0.01 kWh session, 0.1 A
    ("victron-evcs", "power_w", [7400], 7400),
    ("victron-evcs", "status", [2], 2),
    ("victron-evcs", "energy_wh", [0x0001, 0x86A0], 1_000_000),
    ("victron-evcs", "session_energy_wh", [1234], 12_340),
    ("victron-evcs", "charge_current_a", [160], 16.0),
    ("victron-evcs", "charge_time_s", [0x0000, 0x0E10], 3600),
    ("victron-evcs", "product_id", [0xC024], 0xC024),
    # Amperfied connect: Heidelberg layout, 0.1 A, signed 0.1 degC, u32 Wh, RFID as 12 hex bytes
    ("amperfied-connect", "charge_state", [7], 7),
    ("amperfied-connect", "current_l1_a", [160], 16.0),
    ("amperfied-connect", "temperature_c", [0xFFF6], -1.0),
    ("amperfied-connect", "voltage_l2_v", [231], 231),
    ("amperfied-connect", "power_w", [11000], 11000),
    ("amperfied-connect", "energy_wh", [0x0001, 0x0000], 65536),
    # cFos: state in the low byte, u64 Wh, u32 W, u32 0.1 A, ASCII tag
    ("cfos-power-brain", "charge_state", [0x0102], 2),
    ("cfos-power-brain", "energy_wh", [0, 0, 0x0001, 0x86A0], 100_000),
    ("cfos-power-brain", "power_w", [0x0000, 0x1CE8], 7400),
    ("cfos-power-brain", "current_l1_a", [0x0000, 0x00A0], 16.0),
    ("cfos-power-brain", "rfid", [0x3034, 0x4132, 0x4233] + [0] * 12, "04A2B3"),
    # evcc strips leading NULs from this tag: a right-aligned UID reads the same
    ("cfos-power-brain", "rfid", [0] * 12 + [0x3034, 0x4132, 0x4233], "04A2B3"),
    # Mennekes AMTRON Compact: float32 high word first (evcc), kWh
    ("mennekes-amtron-compact", "evse_state", [5], 5),
    ("mennekes-amtron-compact", "power_w", f32(7400.0), 7400.0),
    ("mennekes-amtron-compact", "energy_wh", f32(1234.5), 1_234_500.0),
    ("mennekes-amtron-compact", "session_energy_wh", f32(12.5), 12_500.0),
    ("mennekes-amtron-compact", "voltage_l1_v", [0x4366, 0x0000], 230.0),
    ("mennekes-amtron-compact", "charge_time_s", [0x0000, 0x0E10], 3600),
    ("mennekes-amtron-compact", "power_w", NAN32, None),
    # Siemens PAC2200: float32 measurements, float64 Wh counters
    ("siemens-pac2200", "voltage_l1_v", f32(230.0), 230.0),
    ("siemens-pac2200", "power_w", f32(-1500.0), -1500.0),
    ("siemens-pac2200", "energy_wh", f64(12_345_678.5), 12_345_678.5),
    ("siemens-pac2200", "energy_export_wh", f64(0.0), 0.0),
    ("siemens-pac2200", "frequency_hz", f32(50.0), 50.0),
    ("siemens-pac2200", "power_w", NAN32, None),
    # Janitza UMG 96RM: float32, energy in Wh
    ("janitza-umg96rm", "power_w", f32(4000.0), 4000.0),
    ("janitza-umg96rm", "energy_wh", f32(123_456.0), 123_456.0),
    ("janitza-umg96rm", "frequency_hz", f32(49.98), pytest.approx(49.98, abs=1e-4)),
    ("janitza-umg96rm", "current_l3_a", f32(16.0), 16.0),
    # Carlo Gavazzi EM340: int32 low word first, 0.1 V, mA, 0.1 W, 0.1 kWh
    ("carlo-gavazzi-em340", "voltage_l1_v", [0x0901, 0x0000], 230.5),
    ("carlo-gavazzi-em340", "current_l1_a", [0x3E80, 0x0000], 16.0),
    ("carlo-gavazzi-em340", "power_w", [0xFA24, 0xFFFF], -150.0),
    ("carlo-gavazzi-em340", "energy_wh", [0xE240, 0x0001], 12_345_600.0),
    ("carlo-gavazzi-em340", "frequency_hz", [500], 50.0),
    ("carlo-gavazzi-em340", "power_factor", [0xFC18], -1.0),
    # Eastron SDM230: float32 kWh
    ("eastron-sdm230", "energy_wh", f32(1234.5), 1_234_500.0),
    ("eastron-sdm230", "power_w", f32(3680.0), 3680.0),
    ("eastron-sdm230", "voltage_l1_v", [0x4366, 0x0000], 230.0),
    ("eastron-sdm230", "energy_total_wh", f32(2000.0), 2_000_000.0),
    # ABB B21: u64 0.01 kWh, i32 0.01 W, all-FF / 7FFF.. sentinels
    ("abb-b21", "energy_wh", [0x0000, 0x0000, 0x0001, 0x86A0], 1_000_000.0),
    ("abb-b21", "energy_export_wh", [0xFFFF] * 4, None),
    ("abb-b21", "power_w", [0xFFFF, 0xCFC7], -123.45),
    ("abb-b21", "power_w", [0x7FFF, 0xFFFF], None),
    ("abb-b21", "power_factor", [0x7FFF], None),
    ("abb-b21", "voltage_l1_v", [0x0000, 0x08FD], 230.1),
    # Eastron SDM72D-M: float32 kWh
    ("eastron-sdm72d-m", "energy_wh", f32(1234.5), 1_234_500.0),
    ("eastron-sdm72d-m", "power_w", f32(5000.0), 5000.0),
]

# (slug, {status register: words}, IEC state, status) as the sources name the codes
STATUS: list[tuple[str, dict[str, list[int]], IecState, ChargerStatus]] = [
    ("victron-evcs", {"status": [0]}, IecState.A, ChargerStatus.AVAILABLE),
    ("victron-evcs", {"status": [1]}, IecState.B, ChargerStatus.PREPARING),
    ("victron-evcs", {"status": [2]}, IecState.C, ChargerStatus.CHARGING),
    ("victron-evcs", {"status": [3]}, IecState.B, ChargerStatus.SUSPENDED_EV),  # charged
    ("victron-evcs", {"status": [4]}, IecState.B, ChargerStatus.SUSPENDED_EVSE),  # wait sun
    ("victron-evcs", {"status": [5]}, IecState.B, ChargerStatus.PREPARING),  # wait RFID
    ("victron-evcs", {"status": [6]}, IecState.B, ChargerStatus.SUSPENDED_EVSE),  # wait start
    ("victron-evcs", {"status": [8]}, IecState.F, ChargerStatus.FAULTED),  # ground error
    ("victron-evcs", {"status": [14]}, IecState.F, ChargerStatus.FAULTED),  # over-temperature
    ("victron-evcs", {"status": [21]}, IecState.B, ChargerStatus.PREPARING),
    ("victron-evcs", {"status": [23]}, IecState.B, ChargerStatus.SUSPENDED_EVSE),
    ("victron-evcs", {"status": [99]}, IecState.E, ChargerStatus.FAULTED),
    ("amperfied-connect", {"charge_state": [2]}, IecState.A, ChargerStatus.AVAILABLE),
    ("amperfied-connect", {"charge_state": [3]}, IecState.A, ChargerStatus.AVAILABLE),
    ("amperfied-connect", {"charge_state": [4]}, IecState.B, ChargerStatus.PREPARING),
    ("amperfied-connect", {"charge_state": [5]}, IecState.B, ChargerStatus.SUSPENDED_EV),
    ("amperfied-connect", {"charge_state": [6]}, IecState.C, ChargerStatus.SUSPENDED_EVSE),
    ("amperfied-connect", {"charge_state": [7]}, IecState.C, ChargerStatus.CHARGING),
    ("amperfied-connect", {"charge_state": [8]}, IecState.C, ChargerStatus.CHARGING),
    ("amperfied-connect", {"charge_state": [9]}, IecState.E, ChargerStatus.FAULTED),
    ("amperfied-connect", {"charge_state": [10]}, IecState.F, ChargerStatus.UNAVAILABLE),
    ("amperfied-connect", {"charge_state": [11]}, IecState.F, ChargerStatus.FAULTED),
    ("cfos-power-brain", {"charge_state": [0x0000]}, IecState.A, ChargerStatus.AVAILABLE),
    ("cfos-power-brain", {"charge_state": [0x0001]}, IecState.B, ChargerStatus.PREPARING),
    ("cfos-power-brain", {"charge_state": [0x0002]}, IecState.C, ChargerStatus.CHARGING),
    ("cfos-power-brain", {"charge_state": [0xFF02]}, IecState.C, ChargerStatus.CHARGING),
    ("cfos-power-brain", {"charge_state": [0x0005]}, IecState.F, ChargerStatus.FAULTED),
    ("cfos-power-brain", {"charge_state": [0x0003]}, IecState.E, ChargerStatus.FAULTED),
    ("mennekes-amtron-compact", {"evse_state": [0]}, IecState.F, ChargerStatus.UNAVAILABLE),
    ("mennekes-amtron-compact", {"evse_state": [1]}, IecState.A, ChargerStatus.AVAILABLE),
    ("mennekes-amtron-compact", {"evse_state": [2]}, IecState.B, ChargerStatus.PREPARING),
    ("mennekes-amtron-compact", {"evse_state": [3]}, IecState.B, ChargerStatus.SUSPENDED_EVSE),
    ("mennekes-amtron-compact", {"evse_state": [4]}, IecState.B, ChargerStatus.SUSPENDED_EV),
    ("mennekes-amtron-compact", {"evse_state": [5]}, IecState.C, ChargerStatus.CHARGING),
    ("mennekes-amtron-compact", {"evse_state": [6]}, IecState.F, ChargerStatus.FAULTED),
    ("mennekes-amtron-compact", {"evse_state": [7]}, IecState.F, ChargerStatus.UNAVAILABLE),
]


# ---- the profiles themselves -----------------------------------------------------------------


def test_the_new_profiles_ship_and_bring_the_count_to_24() -> None:
    assert set(PROFILES) >= NEW_SLUGS
    assert len(PROFILES) >= 24
    assert len(NEW_CHARGERS) == 4 and len(NEW_METERS) == 6


def _controls(p: Profile) -> Iterator[tuple[str, RegisterSpec]]:
    for reg in p.registers:
        yield f"register {reg.name}", reg
    if p.enable is not None:
        yield "enable", p.enable.register
    if p.current_limit is not None:
        yield "current_limit", p.current_limit.control.register
    if p.heartbeat is not None and not p.heartbeat.rewrites_current_limit:
        yield "heartbeat", p.heartbeat.control.register
    if p.phases is not None:
        yield "phases", p.phases.register
    if p.identify is not None:
        yield "identify", p.identify.register


@pytest.mark.parametrize("slug", NEW)
def test_every_register_and_control_names_its_source(slug: str) -> None:
    profile = PROFILES[slug]
    for what, spec in _controls(profile):
        assert spec.source.strip(), f"{slug} {what}: no source"
        assert spec.known in KNOWN_FROM, f"{slug} {what}: known={spec.known!r}"
        # Nothing here was checked on a device by us or by a source that says so.
        assert spec.known != "hardware", f"{slug} {what}"
    families = {
        family for s in profile.sources for key, family in SOURCE_FAMILIES.items() if key in s
    }
    assert len(families) >= 2, f"{slug}: sources from {families or 'nowhere'}"
    assert profile.uncertain, f"{slug}: say what is uncertain"


def test_pause_methods_and_controls_follow_the_sources() -> None:
    got: dict[str, tuple[object, ...]] = {}
    for slug in NEW_CHARGERS:
        p = PROFILES[slug]
        assert p.current_limit is not None
        cl = p.current_limit
        enable = (p.enable.register.address, p.enable.function) if p.enable else None
        hb = (p.heartbeat.control.register.address, p.heartbeat.value) if p.heartbeat else None
        got[slug] = (
            enable,
            cl.control.register.address,
            cl.unit,
            cl.control.function,
            cl.disable,
            hb,
            p.tag is not None,
        )
    assert got == {
        # Victron pauses with StartStop 5010; 5016 is whole amperes.
        "victron-evcs": ((5010, 6), 5016, "A", 6, None, None, False),
        # Amperfied has no enable register: current 0 on HR 261 locks it (evcc, OpenEMS).
        "amperfied-connect": (None, 261, "0.1A", 16, 0, None, False),
        "cfos-power-brain": ((8094, 6), 8093, "0.1A", 6, 0, None, True),
        # Mennekes: 0x0302 = 0 means "no limit", so the pause is the release 0x0D05.
        "mennekes-amtron-compact": ((0x0D05, 6), 0x0302, "A", 16, None, (0x0D00, 0x55AA), False),
    }
    mennekes = PROFILES["mennekes-amtron-compact"]
    assert mennekes.current_limit is not None
    assert mennekes.current_limit.control.register.type is DataType.F32
    assert mennekes.connection.baudrate == 57600 and mennekes.connection.stopbits == 2
    assert PROFILES["cfos-power-brain"].connection.default_port == 4701
    assert PROFILES["eastron-sdm72d-m"].connection.max_registers_per_read == 10
    assert PROFILES["victron-evcs"].session_energy_resets == "plug"
    assert PROFILES["victron-evcs"].connection.max_registers_per_read == 50
    pauses = {s: PROFILES[s].pause_method for s in NEW_CHARGERS}
    assert pauses == {
        "victron-evcs": "enable",
        "amperfied-connect": "current_limit",
        "cfos-power-brain": "enable",
        "mennekes-amtron-compact": "enable",
    }


@pytest.mark.parametrize(
    ("slug", "name", "words", "expected"),
    DECODE,
    ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(DECODE)],
)
def test_real_words_decode(slug: str, name: str, words: list[int], expected: object) -> None:
    spec = PROFILES[slug].register(name)
    assert len(words) == spec.count
    got = decode(spec, words)
    if isinstance(expected, float):
        assert got == pytest.approx(expected)
    else:
        assert got == expected
    if expected is not None and not isinstance(expected, str):
        assert decode(spec, encode(spec, got)) == pytest.approx(got)


@pytest.mark.parametrize(
    ("slug", "raw", "iec", "status"),
    STATUS,
    ids=[f"{c[0]}-{'-'.join(str(w) for ws in c[1].values() for w in ws)}" for c in STATUS],
)
def test_status_codes_classify(
    slug: str, raw: dict[str, list[int]], iec: IecState, status: ChargerStatus
) -> None:
    profile = PROFILES[slug]
    assert profile.state is not None
    values = {name: decode(profile.register(name), words) for name, words in raw.items()}
    assert profile.state.classify(values) == (iec, status)


def test_abb_b21_identifies_by_its_model_register() -> None:
    ident = PROFILES["abb-b21"].identify
    assert ident is not None and ident.pattern is not None
    text = decode(ident.register, [0x4232, 0x3120])  # "B21 " as dbus-modbus-client reads it
    assert text == "B21"
    assert decode(ident.register, [0x4232, 0x3320]) == "B23"  # a B23 is not taken for a B21
    assert re.match(ident.pattern, "B21") and not re.match(ident.pattern, "B23")


# ---- over the wire ---------------------------------------------------------------------------


@asynccontextmanager
async def served(profile: Profile, image: RegisterImage) -> AsyncIterator[DeviceDriver]:
    unit = profile.connection.default_unit
    async with SimServer.tcp("127.0.0.1", 0, {unit: image}) as srv:
        bus = TcpBus("127.0.0.1", srv.port)
        cfg = DeviceConfig(
            id="dev", driver=profile.slug, host="127.0.0.1", port=srv.port, unit=unit, timeout_s=1.0
        )
        try:
            yield DeviceDriver(cfg, profile, bus)
        finally:
            await bus.close()


def _frame(slug: str) -> tuple[dict[str, list[int]], dict[str, object]]:
    """One device image per profile: the first real-word case of each register."""
    words: dict[str, list[int]] = {}
    expected: dict[str, object] = {}
    for s, name, w, value in DECODE:
        if s == slug and name not in words and value is not None:
            words[name] = w
            expected[name] = value
    return words, expected


@pytest.mark.parametrize("slug", NEW)
async def test_real_words_polled_over_the_wire(slug: str) -> None:
    """The engine reads a device image made of real words over Modbus TCP (its own request
    plan, gaps and word order) and gets the values and the status the tables above say."""
    profile = PROFILES[slug]
    words, expected = _frame(slug)
    assert words, f"no decode cases for {slug}"
    cases = [c for c in STATUS if c[0] == slug]
    image = RegisterImage()
    for name, w in words.items():
        spec = profile.register(name)
        image.set(spec.table, spec.address, w)
    for _, raw, iec, status in cases or [(slug, {}, None, None)]:
        for name, w in raw.items():
            spec = profile.register(name)
            image.set(spec.table, spec.address, w)
        async with served(profile, image) as driver:
            sample = await driver.poll()
        assert sample.online, sample.error
        for name, value in expected.items():
            if name in raw:
                continue
            got = sample.values[name]
            assert got == (pytest.approx(value) if isinstance(value, float) else value), name
        if profile.kind is DeviceKind.CHARGER:
            assert (sample.iec, sample.status) == (iec, status), raw
        else:
            assert sample.status is None


@pytest.fixture
def function_codes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(function code, address) of every write request the simulator served."""
    seen: list[tuple[int, int]] = []
    real = sim_server.handle_pdu

    def recording(image: RegisterImage, pdu: bytes) -> bytes:
        if pdu and pdu[0] in (5, 6, 15, 16):
            seen.append((pdu[0], int.from_bytes(pdu[1:3], "big")))
        return real(image, pdu)

    monkeypatch.setattr(sim_server, "handle_pdu", recording)
    return seen


# What each charger must put on the wire: (limit 10 A words, pause writes, resume writes)
WRITES: dict[
    str,
    tuple[
        tuple[int, int, list[int]],
        list[tuple[int, int, list[int]]],
        list[tuple[int, int, list[int]]],
    ],
] = {
    "victron-evcs": ((6, 5016, [10]), [(6, 5010, [0])], [(6, 5010, [1])]),
    "amperfied-connect": ((16, 261, [100]), [(16, 261, [0])], [(16, 261, [100])]),
    "cfos-power-brain": ((6, 8093, [100]), [(6, 8094, [0])], [(6, 8094, [1])]),
    "mennekes-amtron-compact": ((16, 0x0302, f32(10.0)), [(6, 0x0D05, [0])], [(6, 0x0D05, [1])]),
}


@pytest.mark.parametrize("slug", NEW_CHARGERS)
async def test_controls_write_what_the_sources_write(
    slug: str, function_codes: list[tuple[int, int]]
) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=2, enforce_heartbeat=False)
    sim.plug_in(tag="04A2B3C4", power_w=11000.0)
    sim.start_charging()
    sim.step(10.0)
    (limit_fc, limit_addr, limit_words), pause, resume = WRITES[slug]
    async with served(profile, image) as driver:
        await driver.set_current_limit(10.0)
        assert function_codes[-1] == (limit_fc, limit_addr)
        assert image.get(Table.HOLDING, limit_addr, len(limit_words)) == limit_words
        assert sim.limit_a == pytest.approx(10.0)

        await driver.set_enabled(False)
        for fc, addr, w in pause:
            assert (fc, addr) in function_codes
            assert image.get(Table.HOLDING, addr, len(w)) == w
        sim.step(1.0)
        assert sim.power_w == 0
        sample = await driver.poll()
        assert sample.status is not None and sample.status.plugged
        assert not sample.status.delivering

        await driver.set_enabled(True)
        for fc, addr, w in resume:
            assert (fc, addr) in function_codes
            assert image.get(Table.HOLDING, addr, len(w)) == w
        sim.step(1.0)
        assert (await driver.poll()).status is ChargerStatus.CHARGING
        assert sim.power_w == pytest.approx(10 * 230 * 3)

        if profile.heartbeat is not None:
            function_codes.clear()
            await driver.heartbeat()
            hb = profile.heartbeat.control.register
            assert function_codes == [(6, hb.address)]
            assert image.get(Table.HOLDING, hb.address) == [0x55AA]


@pytest.mark.parametrize("slug", NEW)
async def test_simulated_device_polled_over_the_wire(slug: str) -> None:
    """Each new profile's simulator serves a whole session (chargers) or a load (meters); the
    engine's polls over Modbus TCP follow it."""
    profile = PROFILES[slug]
    image = RegisterImage()
    if profile.kind is DeviceKind.METER:
        meter = SimMeter(profile, image, seed=5, base_load_w=3000.0, initial_energy_wh=250_000)
        meter.step(1200.0)  # 20 minutes at 3 kW
        async with served(profile, image) as driver:
            sample = await driver.poll()
        assert sample.online, sample.error
        assert sample.power_w == pytest.approx(3000.0, rel=1e-3)
        assert sample.energy_wh == pytest.approx(
            251_000.0, abs=max(profile.register("energy_wh").scale, 1.0)
        )
        return
    sim = SimCharger(profile, image, seed=5, initial_energy_wh=250_000, enforce_heartbeat=False)
    async with served(profile, image) as driver:
        first = await driver.poll()
        assert first.online and first.status is ChargerStatus.AVAILABLE
        sim.plug_in(tag="04A2B3C4", power_w=7400.0)
        plugged = await driver.poll()
        assert plugged.status is not None and plugged.status.plugged
        if profile.tag is not None:
            assert plugged.tag == "04A2B3C4"
        sim.start_charging()
        sim.step(1800.0)  # half an hour at 7.4 kW
        charging = await driver.poll()
        assert charging.status is ChargerStatus.CHARGING
        assert charging.power_w == pytest.approx(7400.0, rel=0.01)
        resolution = max(profile.register("energy_wh").scale, 1.0)
        assert charging.energy_wh == pytest.approx(253_700.0, abs=resolution)
        if profile.has("session_energy_wh"):
            got = charging.values["session_energy_wh"]
            assert got == pytest.approx(
                3700.0, abs=max(profile.register("session_energy_wh").scale, 1.0)
            )
        sim.unplug()
        assert (await driver.poll()).status is ChargerStatus.AVAILABLE
