"""Issue 10: the device facts found in independent driver code, each held by a test.

Three kinds of test: (1) a table of raw register words -> decoded value and status per profile
(pure, no I/O); (2) the simulator models carrying each quirk (gateway.sim.quirks), served over
loopback Modbus TCP and polled by the real engine; each of these also runs the profile as it was
before the correction (rebuilt with ``dataclasses.replace``) and shows it fails; (3) the same
card on every tag-reading profile resolving to the same user, and provenance on every register.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.auth import Authorizer
from gateway.config import AuthConfig, DeviceConfig
from gateway.modbus.bus import TcpBus
from gateway.modbus.codec import decode
from gateway.modbus.driver import DeviceDriver
from gateway.modbus.types import DataType, RegisterSpec, Table
from gateway.model import AuthStatus, ChargerStatus, IecState, Token, TokenType
from gateway.profiles import KNOWN_FROM, ControlSpec, Profile, load_profiles
from gateway.sim.devices import SimCharger, SimMeter
from gateway.sim.registers import RegisterImage, SimWriteRejected
from gateway.sim.server import SimServer
from gateway.tags import normalise_tag
from tests.test_auth import FakeClock, MemoryAuthStore

PROFILES = load_profiles()
ORIGINAL_14 = (
    "abb-b23", "abb-terra-ac", "alfen-eve", "bender-cc613", "carlo-gavazzi-em24",
    "eastron-sdm120", "eastron-sdm630", "heidelberg-ec", "keba-p30", "phoenix-charx",
    "phoenix-ev-eth", "schneider-evlink-pro", "vestel-evc04", "webasto-next",
)


def ascii_words(text: str, count: int, *, right: bool = False) -> list[int]:
    data = text.encode("latin-1")
    data = data.rjust(count * 2, b"\0") if right else data.ljust(count * 2, b"\0")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


# ---- (1) raw registers -> values ---------------------------------------------------------------

RAW_CASES: list[tuple[str, str, list[int], object]] = [
    # EM24: energy is TOT at 0x3E (0.1 kWh, int32 low word first)
    ("carlo-gavazzi-em24", "energy_wh", [0x3039, 0x0000], 1234500.0),
    ("carlo-gavazzi-em24", "energy_partial_wh", [0x000A, 0x0000], 1000.0),
    # Bender: 0xFFFFFFFF means "no value"
    ("bender-cc613", "energy_wh", [0xFFFF, 0xFFFF], None),
    ("bender-cc613", "power_w", [0xFFFF, 0xFFFF], None),
    ("bender-cc613", "power_w", [0x0000, 0x1CE8], 7400),
    # Tags right-aligned behind leading NULs
    ("bender-cc613", "rfid", ascii_words("04A2B3C4", 10, right=True), "04A2B3C4"),
    ("phoenix-ev-eth", "rfid", ascii_words("04A2B3C4D5E6F7", 16, right=True), "04A2B3C4D5E6F7"),
    ("phoenix-charx", "rfid", ascii_words("04A2B3C4D5E6F7", 10, right=True), "04A2B3C4D5E6F7"),
    ("webasto-next", "rfid", ascii_words("ABCD1234", 10, right=True), "ABCD1234"),
    ("webasto-next", "rfid", ascii_words("ABCD1234", 10), "ABCD1234"),
    # Webasto NEXT: 1006 and 1502 are u16; ABB 0x4020 u16
    ("webasto-next", "error_code", [0x0007], 7),
    ("webasto-next", "last_session_energy_wh", [0x1234], 0x1234),
    ("abb-terra-ac", "comm_timeout_s", [30], 30),
    # CHARX 1299: the letter is the high byte whatever the low byte holds
    ("phoenix-charx", "cp_status", [0x4331], ord("C")),
    ("phoenix-charx", "cp_status", [0x4100], ord("A")),
    # Phoenix on Wallbe firmware: energy u64 low word first, setpoint in 0.1 A
    ("phoenix-ev-eth-wallbe", "energy_wh", [0x5678, 0x1234, 0x0001, 0x0000], 0x1_1234_5678),
    ("phoenix-ev-eth-wallbe", "current_setpoint_a", [160], 16.0),
    # KEBA P30 / P40: the same map; u32 high word first (evcc keba-modbus.go)
    ("keba-p30", "cp_state", [0, 3], 3),
    ("keba-p40", "cp_state", [0, 3], 3),
    ("keba-p40", "energy_wh", [0x0001, 0x86A0], 10_000.0),  # 100,000 x 0.1 Wh
    ("keba-p40", "session_energy_wh", [0x0000, 0x2710], 1_000.0),
    ("keba-p40", "power_w", [0x00A8, 0x7BF0], 11_041.776),  # mW on the wire
    ("keba-p40", "rfid", [0x04A2, 0xB3C4], "04A2B3C4"),
    # Vestel EVC04: 1006 (fault code) and 1502 (session energy) are u32, unlike Webasto NEXT
    ("vestel-evc04", "fault_code", [0x0001, 0x0002], 0x1_0002),
    ("vestel-evc04", "session_energy_wh", [0x0001, 0x0000], 65_536),
    # Heidelberg: lifetime energy IR 17-18, u32 high word first, Wh
    ("heidelberg-ec", "energy_wh", [0x0001, 0x0002], 0x1_0002),
]

# KEBA product codes (holding 1016, u32): 6 digits from 3 = P30, 7 digits from 4 = P40 (evcc
# keba-modbus.go kebaRegProduct). Each code is decoded with the profile's identify register and
# must fall in its own profile's range only: this is how `evgw scan` tells the variants apart.
PRODUCT_CODES = [
    ([0x0004, 0xBEE3], 311_011, "keba-p30"),  # KC-P30 product code from the simulator
    ([0x003E, 0xB71E], 4_110_110, "keba-p40"),
]


@pytest.mark.parametrize(("words", "code", "slug"), PRODUCT_CODES)
def test_keba_product_code_tells_p30_from_p40(words: list[int], code: int, slug: str) -> None:
    matches = []
    for variant in ("keba-p30", "keba-p40"):
        ident = PROFILES[variant].identify
        assert ident is not None and ident.min is not None and ident.max is not None
        value = decode(ident.register, words)
        assert value == code
        if ident.min <= value <= ident.max:
            matches.append(variant)
    assert matches == [slug]


@pytest.mark.parametrize(("slug", "name", "words", "expected"), RAW_CASES)
def test_raw_registers_decode(slug: str, name: str, words: list[int], expected: object) -> None:
    assert decode(PROFILES[slug].register(name), words) == expected


STATE_CASES: list[tuple[str, dict[str, object], IecState, ChargerStatus]] = [
    # Vestel IR 1000 is the OCPP status (evcc #24874)
    ("vestel-evc04", {"cp_state": 0}, IecState.A, ChargerStatus.AVAILABLE),
    ("vestel-evc04", {"cp_state": 1}, IecState.B, ChargerStatus.PREPARING),
    ("vestel-evc04", {"cp_state": 2}, IecState.C, ChargerStatus.CHARGING),
    ("vestel-evc04", {"cp_state": 3}, IecState.B, ChargerStatus.SUSPENDED_EVSE),
    ("vestel-evc04", {"cp_state": 4}, IecState.B, ChargerStatus.SUSPENDED_EV),
    ("vestel-evc04", {"cp_state": 5}, IecState.B, ChargerStatus.FINISHING),
    ("vestel-evc04", {"cp_state": 6}, IecState.A, ChargerStatus.UNAVAILABLE),
    ("vestel-evc04", {"cp_state": 7}, IecState.A, ChargerStatus.UNAVAILABLE),
    ("vestel-evc04", {"cp_state": 8}, IecState.F, ChargerStatus.FAULTED),
    # Alfen E = no power: not a fault
    ("alfen-eve", {"availability": 1, "mode3_state": "E"}, IecState.A, ChargerStatus.AVAILABLE),
    ("alfen-eve", {"availability": 1, "mode3_state": "F"}, IecState.F, ChargerStatus.FAULTED),
    # Heidelberg 10 = locked / not ready: not a fault
    ("heidelberg-ec", {"charge_state": 10}, IecState.F, ChargerStatus.UNAVAILABLE),
    ("heidelberg-ec", {"charge_state": 11}, IecState.F, ChargerStatus.FAULTED),
    ("heidelberg-ec", {"charge_state": 9}, IecState.E, ChargerStatus.FAULTED),
    # CHARX: the decoded high byte
    ("phoenix-charx", {"cp_status": ord("C")}, IecState.C, ChargerStatus.CHARGING),
    ("phoenix-charx", {"cp_status": ord("A")}, IecState.A, ChargerStatus.AVAILABLE),
    ("phoenix-charx", {"cp_status": ord("F")}, IecState.F, ChargerStatus.FAULTED),
]


@pytest.mark.parametrize(("slug", "values", "iec", "status"), STATE_CASES)
def test_status_table(
    slug: str, values: dict[str, object], iec: IecState, status: ChargerStatus
) -> None:
    state = PROFILES[slug].state
    assert state is not None
    assert state.classify(values) == (iec, status)


def test_charx_status_word_with_a_low_byte_classifies_by_the_letter() -> None:
    p = PROFILES["phoenix-charx"]
    assert p.state is not None
    value = decode(p.register("cp_status"), [0x4331])
    assert p.state.classify({"cp_status": value})[1] is ChargerStatus.CHARGING


def test_controls_and_pause_methods() -> None:
    pause = {s: PROFILES[s].pause_method for s in (*ORIGINAL_14, "keba-p40")
             if PROFILES[s].state is not None}
    assert pause == {
        "abb-terra-ac": "current_limit", "alfen-eve": "current_limit",
        "bender-cc613": "current_limit", "heidelberg-ec": "current_limit",
        "keba-p30": "enable", "keba-p40": "current_limit", "phoenix-charx": "current_limit",
        "phoenix-ev-eth": "enable", "schneider-evlink-pro": "current_limit",
        "vestel-evc04": "current_limit", "webasto-next": "current_limit",
    }
    for slug in pause:
        assert PROFILES[slug].pause is not None, f"{slug} does not name its pause method"
    for slug, address in (("bender-cc613", 1000), ("phoenix-charx", 1301)):
        cl = PROFILES[slug].current_limit
        assert cl is not None and cl.control.register.address == address
        assert cl.control.function == 16
    assert PROFILES["phoenix-charx"].enable is None  # 1300 is read-only under OCPP
    assert PROFILES["keba-p40"].enable is None and PROFILES["keba-p30"].enable is not None
    assert PROFILES["vestel-evc04"].connection.effective_max_gap == 0
    assert PROFILES["webasto-next"].connection.effective_max_gap == 0
    assert not PROFILES["webasto-next"].has("session_energy_wh")
    (w,) = PROFILES["heidelberg-ec"].on_connect
    assert (w.control.register.address, w.value, w.control.function) == (258, 4, 16)
    vestel_tag = PROFILES["vestel-evc04"].tag
    assert vestel_tag is not None and "VESTELFREEMODE" in vestel_tag.not_a_user


def test_every_register_and_control_carries_provenance() -> None:
    for slug, p in PROFILES.items():
        specs: list[RegisterSpec] = list(p.registers)
        controls: list[ControlSpec | None] = [
            p.enable, p.current_limit.control if p.current_limit else None, p.phases,
            None if p.heartbeat is None or p.heartbeat.rewrites_current_limit
            else p.heartbeat.control,
        ]
        specs += [c.register for c in controls if c is not None]
        specs += [w.control.register for w in p.on_connect]
        if p.identify is not None:
            specs.append(p.identify.register)
        for spec in specs:
            assert spec.source.strip(), f"{slug}: {spec.name} has no source"
            assert spec.known in KNOWN_FROM, f"{slug}: {spec.name} known={spec.known!r}"


def test_drivers_command_flags_what_was_never_verified(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["drivers", "heidelberg-ec"]) == 0
    out = capsys.readouterr().out
    assert "[unverified]" in out and "evcc charger/heidelberg-ec.go" in out
    assert "on connect: write 4 to holding 258" in out and "pause: current_limit" in out


# ---- (2) simulators that carry the quirks ------------------------------------------------------

@asynccontextmanager
async def served(
    profile: Profile, image: RegisterImage, *, driver_profile: Profile | None = None
) -> AsyncIterator[DeviceDriver]:
    """The simulator behaves as ``profile``'s device; the gateway runs ``driver_profile``."""
    unit = profile.connection.default_unit
    async with SimServer.tcp("127.0.0.1", 0, {unit: image}) as srv:
        bus = TcpBus("127.0.0.1", srv.port)
        cfg = DeviceConfig(
            id="dev", driver=profile.slug, host="127.0.0.1", port=srv.port, unit=unit, timeout_s=0.5
        )
        try:
            yield DeviceDriver(cfg, driver_profile or profile, bus)
        finally:
            await bus.close()


def old(profile: Profile, **changes: object) -> Profile:
    return dataclasses.replace(profile, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("slug", ["vestel-evc04", "webasto-next"])
async def test_gapped_reads_are_refused_and_the_profile_never_sends_one(slug: str) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in(tag="04A2B3C4D5E6F7")
    sim.start_charging()
    sim.step(60.0)
    async with served(profile, image) as driver:
        sample = await driver.poll()
        assert sample.online, sample.error
        assert sample.status is ChargerStatus.CHARGING
        assert sample.power_w == pytest.approx(sim.power_w, rel=0.02)
    # The profile as it was: default gap of 8 registers -> exception 2 from the device.
    before = old(profile, connection=dataclasses.replace(profile.connection, rejects_gaps=False))
    async with served(profile, image, driver_profile=before) as driver:
        sample = await driver.poll()
    assert not sample.online and sample.error == "exception_response"


async def test_webasto_next_error_code_u32_read_fails_on_the_gap() -> None:
    profile = PROFILES["webasto-next"]
    image = RegisterImage()
    SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    u32 = RegisterSpec("error_code", Table.HOLDING, 1006, DataType.U32, 2, source="x",
                       known="code")
    regs = tuple(u32 if r.name == "error_code" else r for r in profile.registers)
    async with served(profile, image, driver_profile=old(profile, registers=regs)) as driver:
        sample = await driver.poll()
    assert not sample.online and sample.error == "exception_response"


TAG_PROFILES = sorted(s for s, p in PROFILES.items() if p.tag is not None)


@pytest.mark.parametrize("slug", TAG_PROFILES)
async def test_nul_padded_tags_read_as_the_card(slug: str) -> None:
    profile = PROFILES[slug]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in(tag="04A2B3C4D5E6F7")
    async with served(profile, image) as driver:
        sample = await driver.poll()
    assert sample.tag is not None
    assert "04A2B3C4D5E6F7".startswith(sample.tag) and len(sample.tag) >= 8


async def test_vestel_free_mode_tag_is_not_a_user() -> None:
    profile = PROFILES["vestel-evc04"]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in(tag="VESTELFREEMODE")
    async with served(profile, image) as driver:
        assert (await driver.poll()).tag is None
    assert profile.tag is not None
    before = old(profile, tag=dataclasses.replace(profile.tag, not_a_user=frozenset()))
    async with served(profile, image, driver_profile=before) as driver:
        assert (await driver.poll()).tag == "VESTELFREEMODE"


async def test_bender_all_ones_is_no_value_not_four_billion() -> None:
    profile = PROFILES["bender-cc613"]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.unavailable = {"power_w", "energy_wh"}
    sim.step(1.0)
    async with served(profile, image) as driver:
        sample = await driver.poll()
    assert sample.online and sample.power_w is None and sample.energy_wh is None
    plain = tuple(dataclasses.replace(r, sentinels=frozenset()) for r in profile.registers)
    async with served(profile, image, driver_profile=old(profile, registers=plain)) as driver:
        assert (await driver.poll()).power_w == 0xFFFFFFFF


@pytest.mark.slow
async def test_heidelberg_woken_at_start_and_after_every_reconnect() -> None:
    profile = PROFILES["heidelberg-ec"]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    async with served(profile, image) as driver:
        assert (await driver.poll()).online
        assert image.get(Table.HOLDING, 258) == [4]
        sim.step(600.0)  # no car for 10 minutes: standby stays off
        assert not sim.standby and (await driver.poll()).online
        # A power cut: the box forgets HR 258; the gateway writes it again when it answers.
        sim.power_off()
        assert not (await driver.poll()).online
        sim.power_on()
        assert image.get(Table.HOLDING, 258) == [0]
        assert (await driver.poll()).online
        assert image.get(Table.HOLDING, 258) == [4]
        sim.step(600.0)
        assert (await driver.poll()).online
    # Without the on-connect write (the profile as it was) the box falls silent in standby.
    image2 = RegisterImage()
    sim2 = SimCharger(profile, image2, seed=1, enforce_heartbeat=False)
    async with served(profile, image2, driver_profile=old(profile, on_connect=())) as driver:
        assert (await driver.poll()).online
        sim2.step(600.0)
        sample = await driver.poll()
    assert sim2.standby and not sample.online and sample.error == "timeout"


async def test_charx_pauses_through_1301_and_ignores_1300() -> None:
    profile = PROFILES["phoenix-charx"]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in()
    sim.start_charging()
    async with served(profile, image) as driver:
        assert (await driver.poll()).status is ChargerStatus.CHARGING
        await driver.set_enabled(False)
        sim.step(1.0)
        assert sim.status is ChargerStatus.SUSPENDED_EVSE
        await driver.set_enabled(True)
        sim.step(1.0)
        assert sim.status is ChargerStatus.CHARGING
    # The profile as it was: enable register 1300, which the charger ignores under OCPP.
    enable = ControlSpec(
        RegisterSpec("enabled", Table.HOLDING, 1300, DataType.U16, 1), 6, on=1, off=0
    )
    async with served(profile, image, driver_profile=old(profile, enable=enable,
                                                          pause="enable")) as driver:
        await driver.set_enabled(False)
        sim.step(1.0)
    assert sim.status is ChargerStatus.CHARGING  # it did not stop


async def test_em24_bills_from_tot_while_par_is_reset() -> None:
    profile = PROFILES["carlo-gavazzi-em24"]
    image = RegisterImage()
    sim = SimMeter(profile, image, seed=1, base_load_w=11000.0, initial_energy_wh=500_000.0)
    sim.step(3600.0)
    before_old = old(profile, registers=tuple(
        dataclasses.replace(r, address=0x42) if r.name == "energy_wh" else r
        for r in profile.registers if r.name != "energy_partial_wh"
    ))
    async with served(profile, image) as driver, served(
        profile, image, driver_profile=before_old
    ) as old_driver:
        first = (await driver.poll()).energy_wh
        old_first = (await old_driver.poll()).energy_wh
        sim.step(3600.0)
        sim.reset_partial()  # someone resets PAR at the meter mid-session
        sim.step(3600.0)
        last = (await driver.poll()).energy_wh
        old_last = (await old_driver.poll()).energy_wh
    assert first is not None and last is not None
    assert last - first == pytest.approx(22000.0, abs=100.0)  # 2 h at 11 kW, billed exactly
    assert old_first is not None and old_last is not None
    assert old_last < old_first  # PAR went backwards: the old profile would bill nonsense


async def test_pause_never_writes_a_current_below_the_minimum_where_a_real_pause_exists() -> None:
    profile = PROFILES["keba-p30"]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in()
    sim.start_charging()
    async with served(profile, image) as driver:
        await driver.set_current_limit(10.0)
        assert image.get(Table.HOLDING, 5004) == [10000]
        await driver.set_current_limit(0.0)  # load management pauses it
        assert image.get(Table.HOLDING, 5004) == [10000]  # no 0 mA written
        assert image.get(Table.HOLDING, 5014) == [0]
        sim.step(1.0)
        assert sim.status is ChargerStatus.SUSPENDED_EVSE
        await driver.set_enabled(False)  # the session ends meanwhile
        await driver.set_current_limit(8.0)  # a new limit must not re-enable it
        assert image.get(Table.HOLDING, 5014) == [0]
        await driver.set_enabled(True)
        assert image.get(Table.HOLDING, 5014) == [1]
        assert image.get(Table.HOLDING, 5004) == [8000]
        sim.step(1.0)
        assert sim.status is ChargerStatus.CHARGING


async def test_keba_p40_pauses_through_5004() -> None:
    profile = PROFILES["keba-p40"]
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in()
    sim.start_charging()
    async with served(profile, image) as driver:
        await driver.set_enabled(False)
        assert image.get(Table.HOLDING, 5004) == [0]
        assert image.get(Table.HOLDING, 5014) == [0] and image.writes == 1
        sim.step(1.0)
        assert sim.status is ChargerStatus.SUSPENDED_EVSE


async def test_keba_p40_ignores_the_p30_pause_through_5014() -> None:
    """The old behaviour (keba-p30's enable register 5014 used on a P40) does not pause it."""
    profile = PROFILES["keba-p40"]
    p30 = PROFILES["keba-p30"]
    assert p30.enable is not None and p30.enable.register.address == 5014
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in()
    sim.start_charging()
    sim.step(1.0)
    assert sim.status is ChargerStatus.CHARGING
    as_p30 = old(profile, enable=p30.enable, pause="enable")
    async with served(profile, image, driver_profile=as_p30) as driver:
        await driver.set_enabled(False)
        assert image.writes == 1  # the write to 5014 went out
        assert image.get(Table.HOLDING, 5004) != [0]  # the limit was not touched
        sim.step(1.0)
        assert sim.status is ChargerStatus.CHARGING  # still charging: 5014 means nothing here


@pytest.mark.slow
async def test_heidelberg_write_failure_is_retried_at_the_next_poll() -> None:
    profile = PROFILES["heidelberg-ec"]
    image = RegisterImage()
    SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    image.silent = True
    async with served(profile, image) as driver:
        sample = await driver.poll()
        assert not sample.online
        image.silent = False
        assert (await driver.poll()).online
    assert image.get(Table.HOLDING, 258) == [4]


# ---- (3) one card, one token, every charger ----------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("04a2b3c4d5e6f7", "04A2B3C4D5E6F7"),
        ("\x00\x00\x0004A2B3C4", "04A2B3C4"),
        ("04A2B3C4\x00\x00\x00", "04A2B3C4"),
        ("  04a2b3c4  ", "04A2B3C4"),
        ("04:a2:b3:c4", "04A2B3C4"),
        ("04-A2-B3-C4", "04A2B3C4"),
        ("04 a2 b3 c4", "04A2B3C4"),
        ("0x04a2b3c4", "04A2B3C4"),
        ("ABC-123", "ABC-123"),  # an OCPP idTag with a dash stays as it is
        ("\x00\x00", None),
        ("", None),
        (None, None),
    ],
)
def test_tag_normal_form(raw: str | None, normal: str | None) -> None:
    assert normalise_tag(raw) == normal


async def test_the_same_card_on_every_tag_reading_charger_is_the_same_user() -> None:
    card = "04A2B3C4D5E6F7"
    # Typed into the local list by a person, lower case with separators.
    token = Token(id="04:a2:b3:c4:d5:e6:f7", type=TokenType.RFID, user="alice")
    # each charger id is its profile's slug; truncating profiles say so, as the app passes it
    truncated = {
        slug: tag.truncated_to
        for slug in TAG_PROFILES
        if (tag := PROFILES[slug].tag) is not None and tag.truncated_to is not None
    }
    assert set(truncated) == {"keba-p30", "keba-p40"} & set(TAG_PROFILES)
    auth = Authorizer(
        AuthConfig(tokens=(token,)), MemoryAuthStore(), None, FakeClock(), truncated_to=truncated
    )
    await auth.load()
    seen: dict[str, str | None] = {}
    for slug in TAG_PROFILES:
        profile = PROFILES[slug]
        image = RegisterImage()
        sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
        sim.plug_in(tag=card)
        async with served(profile, image) as driver:
            tag = (await driver.poll()).tag
        assert tag is not None, slug
        decision = await auth.authorize(tag, "rfid", slug)
        seen[slug] = decision.user if decision.status is AuthStatus.ACCEPTED else None
    assert seen == dict.fromkeys(TAG_PROFILES, "alice")
    assert {"bender-cc613", "keba-p30", "phoenix-charx", "phoenix-ev-eth", "vestel-evc04",
            "webasto-next"} <= set(seen)


async def test_a_profile_can_declare_a_uid_shown_least_significant_byte_first() -> None:
    profile = PROFILES["bender-cc613"]
    assert profile.tag is not None and not profile.tag.reverse_bytes
    reversed_tag = dataclasses.replace(profile.tag, reverse_bytes=True)
    image = RegisterImage()
    sim = SimCharger(profile, image, seed=1, enforce_heartbeat=False)
    sim.plug_in(tag="F7E6D5C4B3A204")  # the card 04A2B3C4D5E6F7, LSB first
    async with served(profile, image, driver_profile=old(profile, tag=reversed_tag)) as driver:
        assert (await driver.poll()).tag == "04A2B3C4D5E6F7"


async def test_an_on_connect_write_the_device_refuses_does_not_take_it_offline() -> None:
    profile = PROFILES["heidelberg-ec"]
    image = RegisterImage()
    SimCharger(profile, image, seed=1, enforce_heartbeat=False)

    def refuse(table: Table, address: int, words: list[int]) -> None:
        raise SimWriteRejected(2)

    image.on_write = refuse
    async with served(profile, image) as driver:
        sample = await driver.poll()
        assert sample.online and sample.status is ChargerStatus.AVAILABLE
        assert image.get(Table.HOLDING, 258) == [0]
        assert (await driver.poll()).online
