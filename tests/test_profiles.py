"""Device profiles: every shipped profile loads, validates and classifies its own simulated states;
the codec decodes real register words as the profiles say; broken profiles are reported with file,
line, column and key path."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.errors import ProfileError
from gateway.modbus.codec import decode, encode
from gateway.modbus.types import DataType
from gateway.model import ChargerStatus, DeviceKind, IecState
from gateway.profiles import (
    SCHEMA_FILE,
    Profile,
    describe_profile,
    load_profile,
    load_profiles,
    profile_json_schema,
    shipped_drivers_dir,
)
from gateway.profiles.load import schema_text

EXPECTED_SLUGS = {
    "eastron-sdm630", "eastron-sdm120", "carlo-gavazzi-em24", "abb-b23", "abb-terra-ac",
    "alfen-eve", "vestel-evc04", "webasto-next", "schneider-evlink-pro", "phoenix-ev-eth",
    "phoenix-charx", "heidelberg-ec", "keba-p30", "bender-cc613",
}
PROFILES = load_profiles()
CHARGERS = sorted(s for s, p in PROFILES.items() if p.kind is DeviceKind.CHARGER)
SHIPPED_FILES = sorted(shipped_drivers_dir().glob("*.yaml"))


def f32(x: float) -> list[int]:
    raw = struct.pack(">f", x)
    return [int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big")]


def f64(x: float) -> list[int]:
    raw = struct.pack(">d", x)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 8, 2)]


# ---- shipped profiles ------------------------------------------------------------------------


def test_all_expected_profiles_ship() -> None:
    assert set(PROFILES) >= EXPECTED_SLUGS
    assert {p.stem for p in SHIPPED_FILES} == set(PROFILES)


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.stem)
def test_shipped_profile_loads_and_describes(path: Path) -> None:
    profile = load_profile(path)
    assert profile.slug == path.stem
    assert profile.sources, "every profile names its sources"
    text = describe_profile(profile)
    assert profile.manufacturer in text and profile.model in text
    for reg in profile.registers:
        assert reg.name in text
    if profile.kind is DeviceKind.METER:
        assert profile.has("energy_wh") and profile.has("power_w")
        assert profile.state is None and profile.tag is None and not profile.simulate_states


@pytest.mark.parametrize("slug", CHARGERS)
def test_charger_simulates_the_basic_statuses(slug: str) -> None:
    states = PROFILES[slug].simulate_states
    basic = {ChargerStatus.AVAILABLE, ChargerStatus.PREPARING, ChargerStatus.CHARGING,
             ChargerStatus.FAULTED}
    assert basic <= set(states), f"{slug} misses {basic - set(states)}"


SIM_CASES = [
    (slug, status) for slug in CHARGERS for status in PROFILES[slug].simulate_states
]


@pytest.mark.parametrize(("slug", "status"), SIM_CASES, ids=[f"{s}-{t}" for s, t in SIM_CASES])
def test_simulated_state_encodes_and_classifies_back(slug: str, status: ChargerStatus) -> None:
    profile = PROFILES[slug]
    assert profile.state is not None
    values: dict[str, object] = {}
    for name, value in profile.simulate_states[status].items():
        spec = profile.register(name)
        words = encode(spec, value)
        assert len(words) == spec.count and all(0 <= w <= 0xFFFF for w in words)
        values[name] = decode(spec, words)
    assert profile.state.classify(values)[1] is status


@pytest.mark.parametrize("slug", CHARGERS)
def test_simulated_states_are_distinct(slug: str) -> None:
    states = PROFILES[slug].simulate_states
    seen = [tuple(sorted(v.items())) for v in states.values()]
    assert len(set(seen)) == len(seen)


def test_unknown_codes_fall_to_the_default() -> None:
    state = PROFILES["keba-p30"].state
    assert state is not None
    assert state.classify({"cp_state": 99, "cable_state": 0}) == (IecState.E, ChargerStatus.FAULTED)
    assert state.classify({}) == (IecState.E, ChargerStatus.FAULTED)


def test_abb_state_code_5_falls_back_to_the_socket_state() -> None:
    state = PROFILES["abb-terra-ac"].state
    assert state is not None
    base = {"error_bits": 0, "charge_state": 5}
    assert state.classify({**base, "socket_state": 0x111})[0] is IecState.B
    assert state.classify({**base, "socket_state": 0x101})[0] is IecState.B
    assert state.classify({**base, "socket_state": 0x011}) == (IecState.A, ChargerStatus.AVAILABLE)


def test_capabilities_match_the_register_map() -> None:
    units = {s: p.current_limit.unit for s, p in PROFILES.items() if p.current_limit}
    # Subsets: profiles added later (other models) must not break these facts.
    assert units.items() >= {
        "abb-terra-ac": "mA", "keba-p30": "mA", "keba-p40": "mA", "heidelberg-ec": "0.1A",
        "alfen-eve": "A", "vestel-evc04": "A", "webasto-next": "A", "schneider-evlink-pro": "A",
        "phoenix-ev-eth": "A", "phoenix-ev-eth-wallbe": "0.1A", "phoenix-charx": "A",
        "bender-cc613": "A",
    }.items()
    abb = PROFILES["abb-terra-ac"]
    assert abb.current_limit is not None
    assert (abb.current_limit.control.register.address, abb.current_limit.control.function,
            abb.current_limit.control.register.type) == (0x4100, 16, DataType.U32)
    assert not abb.has_lifetime_energy and abb.has("session_energy_wh") and abb.tag is None
    alfen = PROFILES["alfen-eve"]
    assert alfen.heartbeat is not None and alfen.heartbeat.rewrites_current_limit
    assert alfen.current_limit is not None
    assert alfen.heartbeat.control == alfen.current_limit.control
    assert alfen.current_limit.control.register.type is DataType.F32
    assert alfen.current_limit.control.function == 16
    heartbeats = {s: p.heartbeat.control.register.address for s, p in PROFILES.items()
                  if p.heartbeat}
    assert heartbeats.items() >= {
        "alfen-eve": 1210, "vestel-evc04": 6000, "webasto-next": 6000,
        "schneider-evlink-pro": 4000, "keba-p30": 5018, "keba-p40": 5018, "abb-terra-ac": 0x4106,
        "heidelberg-ec": 257,
    }.items()
    tags = {s: (p.register(p.tag.register).address, p.register(p.tag.register).type,
                p.register(p.tag.register).count) for s, p in PROFILES.items() if p.tag}
    assert tags.items() >= {
        "webasto-next": (1600, DataType.ASCII, 10), "phoenix-ev-eth": (606, DataType.ASCII, 16),
        "phoenix-ev-eth-wallbe": (606, DataType.ASCII, 16), "keba-p40": (1500, DataType.HEX, 2),
        "phoenix-charx": (1275, DataType.ASCII, 10), "bender-cc613": (720, DataType.ASCII, 10),
        "vestel-evc04": (1516, DataType.ASCII1, 15), "keba-p30": (1500, DataType.HEX, 2),
    }.items()
    keba = PROFILES["keba-p30"]
    assert keba.tag is not None and "00000000" in keba.tag.empty
    assert keba.connection.single_value_reads and keba.session_energy_resets == "never"
    hd = PROFILES["heidelberg-ec"].connection
    assert (hd.transports[0], hd.baudrate, hd.parity, hd.stopbits, hd.inter_request_delay_s) == (
        "rtu", 19200, "E", 1, pytest.approx(0.1))


# ---- decoding real register words ------------------------------------------------------------

DECODE_CASES: list[tuple[str, str, list[int], object]] = [
    # float32 ABCD, kWh -> Wh
    ("eastron-sdm630", "power_w", f32(1000.0), 1000.0),
    ("eastron-sdm630", "energy_wh", f32(1234.5), 1234500.0),
    ("eastron-sdm630", "voltage_l1_v", [0x4366, 0x0000], 230.0),
    ("eastron-sdm630", "power_w", [0x7FC0, 0x0000], None),  # NaN: not available
    ("eastron-sdm120", "frequency_hz", f32(50.0), 50.0),
    # int32 CDAB (low word first), /10 /1000, 0.1 kWh -> Wh
    ("carlo-gavazzi-em24", "voltage_l1_v", [0x0901, 0x0000], 230.5),
    ("carlo-gavazzi-em24", "power_w", [0xFA24, 0xFFFF], -150.0),
    ("carlo-gavazzi-em24", "current_l1_a", [0x3E80, 0x0000], 16.0),
    ("carlo-gavazzi-em24", "energy_wh", [0xE240, 0x0001], 12345600.0),
    ("carlo-gavazzi-em24", "frequency_hz", [500], 50.0),
    # ABB B23: u32/i32/u64 ABCD with all-FF / 7FFF.. sentinels
    ("abb-b23", "voltage_l1_v", [0x0000, 0x08FD], 230.1),
    ("abb-b23", "voltage_l1_v", [0xFFFF, 0xFFFF], None),
    ("abb-b23", "power_w", [0xFFFF, 0xCFC7], -123.45),
    ("abb-b23", "power_w", [0x7FFF, 0xFFFF], None),
    ("abb-b23", "energy_wh", [0x0000, 0x0000, 0x0001, 0x86A0], 1000000.0),
    ("abb-b23", "energy_wh", [0xFFFF] * 4, None),
    ("abb-b23", "frequency_hz", [5000], 50.0),
    ("abb-b23", "frequency_hz", [0xFFFF], None),
    # ABB Terra AC: state is the high byte of 0x400D, masked with 0x7f
    ("abb-terra-ac", "charge_state", [0x0000, 0x0400], 4),
    ("abb-terra-ac", "charge_state", [0x1234, 0x84FF], 4),
    ("abb-terra-ac", "charge_state", [0x0000, 0x0005], 0),
    ("abb-terra-ac", "current_l1_a", [0x0000, 0x3E80], 16.0),
    ("abb-terra-ac", "voltage_l1_v", [0x0000, 0x08FC], 230.0),
    ("abb-terra-ac", "session_energy_wh", [0x0001, 0x0000], 65536),
    # Schneider: float32 CDAB in kW (trace from evcc PR #9436: fe c6 41 2e = 10.937 kW)
    ("schneider-evlink-pro", "power_w", [0xFEC6, 0x412E], pytest.approx(10937.0, abs=0.5)),
    ("schneider-evlink-pro", "energy_wh", [0x5678, 0x1234, 0x0000, 0x0000], 0x12345678),
    # Alfen: float64 Wh, ASCII Mode 3 state
    ("alfen-eve", "energy_wh", f64(12345678.5), 12345678.5),
    ("alfen-eve", "mode3_state", [0x4332, 0, 0, 0, 0], "C2"),
    ("alfen-eve", "mode3_state", [0x4100, 0, 0, 0, 0], "A"),
    ("alfen-eve", "availability", [0xFFFF], None),
    # Vestel: one character per register, 0.1 kWh, mA
    ("vestel-evc04", "rfid", [ord(c) for c in "04A2B3C4"] + [0] * 7, "04A2B3C4"),
    ("vestel-evc04", "rfid", [0] * 15, ""),
    ("vestel-evc04", "energy_wh", [0x0000, 0x3039], 1234500.0),
    ("vestel-evc04", "current_l1_a", [16000], 16.0),
    # Webasto NEXT / Phoenix / CHARX / Bender: two characters per register
    ("webasto-next", "rfid", [0x4142, 0x4344, 0x3132, 0x3334] + [0] * 6, "ABCD1234"),
    ("phoenix-ev-eth", "rfid", [0x3034, 0x4132] + [0] * 14, "04A2"),
    ("phoenix-ev-eth", "cp_status", [0x0043], "C"),  # letter in the low byte
    ("phoenix-ev-eth", "energy_wh", [0x5678, 0x1234], 0x12345678),
    ("phoenix-charx", "cp_status", [0x4300], ord("C")),  # letter in the high byte
    ("phoenix-charx", "cp_status", [0x4331], ord("C")),  # whatever the low byte holds
    ("phoenix-charx", "power_w", [0x0070, 0xEA40], 7400.0),  # mW
    ("phoenix-charx", "voltage_l1_v", [0x0003, 0x8270], 230.0),  # mV
    ("bender-cc613", "rfid", [0x4142, 0x2020] + [0] * 8, "AB"),
    # KEBA: raw hex UID, 0.1 Wh, mW
    ("keba-p30", "rfid", [0x04A2, 0xB3C4], "04A2B3C4"),
    ("keba-p30", "rfid", [0x0000, 0x0000], "00000000"),
    ("keba-p30", "energy_wh", [0x0001, 0xE240], 12345.6),
    ("keba-p30", "session_energy_wh", [0x0000, 0x0064], 10.0),
    ("keba-p30", "power_w", [0x00A7, 0xD8C0], 11000.0),
    ("keba-p30", "cable_state", [0x0000, 0x0007], 7),
    # Heidelberg: 0.1 A, signed 0.1 degC
    ("heidelberg-ec", "current_l1_a", [160], 16.0),
    ("heidelberg-ec", "temperature_c", [0xFFF6], -1.0),
    ("heidelberg-ec", "energy_wh", [0x0001, 0x0000], 65536),
]


@pytest.mark.parametrize(
    ("slug", "name", "words", "expected"), DECODE_CASES,
    ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(DECODE_CASES)],
)
def test_decode_real_words(slug: str, name: str, words: list[int], expected: object) -> None:
    spec = PROFILES[slug].register(name)
    got = decode(spec, words)
    if isinstance(expected, float):
        assert got == pytest.approx(expected)
    else:
        assert got == expected
    if expected is not None and not isinstance(expected, str):
        # encode is decode's inverse on these values
        assert decode(spec, encode(spec, got)) == pytest.approx(got)


def test_keba_empty_tag_is_recognised() -> None:
    keba = PROFILES["keba-p30"]
    assert keba.tag is not None
    assert decode(keba.register("rfid"), [0, 0]) in keba.tag.empty


def test_nan_float_is_not_available() -> None:
    spec = PROFILES["alfen-eve"].register("power_w")
    assert decode(spec, encode(spec, None)) is None
    assert math.isnan(struct.unpack(">f", bytes.fromhex("7fc00000"))[0])


# ---- broken profiles -------------------------------------------------------------------------

METER = """\
slug: demo
kind: meter
manufacturer: Demo
model: M1
registers:
  - {name: power_w, table: input, address: 0, type: f32}
"""

CHARGER = """\
slug: demo
kind: charger
manufacturer: Demo
model: C1
registers:
  - {name: cp_state, table: holding, address: 100, type: u16}
  - {name: rfid, table: holding, address: 200, type: ascii, count: 4}
state:
  rules:
    - when: {cp_state: 3}
      iec: C
      status: charging
    - when: {cp_state: 1}
      iec: A
      status: available
"""

BROKEN: list[tuple[str, str, str, list[str]]] = [
    ("unknown top-level key", "demo", METER + "colour: red\n",
     ["demo.yaml:7:1: colour: unknown key 'colour'"]),
    ("misspelt key with hint", "demo",
     METER.replace("address: 0", "adress: 0"),
     ["demo.yaml:6:5: registers[0].address: missing required key 'address'",
      "demo.yaml:6:35: registers[0].adress: unknown key 'adress' (did you mean 'address'?)"]),
    ("wrong type", "demo", METER.replace("address: 0", "address: twelve"),
     ["demo.yaml:6:44: registers[0].address: expected an integer, got 'twelve'"]),
    ("missing required", "demo", METER.replace("model: M1\n", ""),
     ["demo.yaml:1:1: model: missing required key 'model'"]),
    ("bad enum", "demo", METER.replace("table: input", "table: inputs"),
     ["demo.yaml:6:28: registers[0].table: must be one of holding, input, coil, discrete; "
      "got 'inputs' (did you mean 'input'?)"]),
    ("slug mismatch", "other", METER,
     ["other.yaml:1:7: slug: slug 'demo' does not match the file name 'other'.yaml"]),
    ("count on a numeric type", "demo", METER.replace("type: f32", "type: f32, count: 2"),
     ["demo.yaml:6:58: registers[0].count: only for ascii, ascii1 and hex "
      "(f32 always occupies 2 registers)"]),
    ("count missing on text", "demo",
     METER + "  - {name: serial, table: input, address: 10, type: ascii}\n",
     ["demo.yaml:7:5: registers[1].count: required for type ascii"]),
    ("address past the end", "demo",
     METER + "  - {name: serial, table: input, address: 65534, type: ascii, count: 4}\n",
     ["demo.yaml:7:43: registers[1].address: address 65534 + count 4 exceeds 65536"]),
    ("bad reference in a state rule", "demo", CHARGER.replace("{cp_state: 1}", "{cp_stat: 1}"),
     ["demo.yaml:13:23: state.rules[1].when.cp_stat: no register named 'cp_stat' in registers"]),
    ("tag on a numeric register", "demo", CHARGER + "tag: {register: cp_state}\n",
     ["demo.yaml:16:17: tag.register: register 'cp_state' is u16; "
      "a tag needs ascii, ascii1 or hex"]),
    ("tag on a missing register", "demo", CHARGER + "tag: {register: uid}\n",
     ["demo.yaml:16:17: tag.register: no register named 'uid' in registers"]),
    ("string compared with a number register", "demo",
     CHARGER.replace("{cp_state: 1}", "{cp_state: B}"),
     ["demo.yaml:13:24: state.rules[1].when.cp_state: register 'cp_state' is a number: "
      "compare with integers"]),
    ("charger without state", "demo", CHARGER.split("state:\n")[0],
     ["demo.yaml:1:1: state: missing required key (every charger needs state rules)"]),
    ("meter with state rules", "demo",
     METER + "state:\n  rules:\n    - {when: {power_w: 1}, iec: A, status: available}\n",
     ["demo.yaml:7:1: state: not for kind meter"]),
    ("bad duration", "demo", METER.replace("type: f32}", "type: f32, every: 10 parsecs}"),
     ["demo.yaml:6:65: registers[0].every: invalid duration '10 parsecs': use a number of "
      "seconds or a number with a unit (ms, s, m, h, d), e.g. 500ms or 2m"]),
    ("too many registers per read", "demo",
     METER + "connection: {max_registers_per_read: 200}\n",
     ["demo.yaml:7:38: connection.max_registers_per_read: must be between 1 and 125, got 200"]),
    ("byte neither high nor low", "demo",
     METER + "  - {name: code, table: input, address: 9, type: u16, byte: middle}\n",
     ["demo.yaml:7:61: registers[1].byte: must be one of high, low; got 'middle'"]),
    ("sentinel not an integer", "demo",
     METER.replace("type: f32}", "type: f32, sentinels: [none]}"),
     ["demo.yaml:6:70: registers[0].sentinels[0]: expected an integer, got 'none'"]),
    ("simulated state that classifies elsewhere", "demo",
     CHARGER + "simulate:\n  states:\n    charging: {cp_state: 1}\n",
     ["demo.yaml:18:15: simulate.states.charging: these values classify as available (IEC A), "
      "not charging"]),
    ("simulated state with an unknown status word", "demo",
     CHARGER + "simulate:\n  states:\n    idle: {cp_state: 1}\n",
     ["demo.yaml:18:5: simulate.states.idle: key must be one of available, preparing, "
      "charging, suspended_ev, suspended_evse, finishing, faulted, unavailable; got 'idle'"]),
    ("simulated state naming a missing register", "demo",
     CHARGER + "simulate:\n  states:\n    charging: {cp_state: 3, cp_mode: 2}\n",
     ["demo.yaml:18:38: simulate.states.charging.cp_mode: no register named 'cp_mode' in "
      "registers"]),
    ("simulated state writing a control", "demo",
     CHARGER + "current_limit: {table: holding, address: 100, type: u16, unit: A}\n"
     "simulate:\n  states:\n    charging: {cp_state: 3}\n",
     ["demo.yaml:19:26: simulate.states.charging.cp_state: register 'cp_state' is written by "
      "the gateway (a control); a simulated state must not set it"]),
    ("two-register control with function 6", "demo",
     CHARGER + "current_limit: {table: holding, address: 300, type: u32, unit: mA, function: 6}\n",
     ["demo.yaml:16:78: current_limit.function: a 2-register value must be written in one "
      "request (function 16)"]),
    ("heartbeat period not shorter than the timeout", "demo",
     CHARGER + "heartbeat: {table: holding, address: 6000, type: u16, value: 1, period: 30s, "
     "timeout: 30s}\n",
     ["demo.yaml:16:73: heartbeat.period: period 30s must be shorter than the timeout 30s"]),
    ("YAML syntax error", "demo", METER + "  - {name: x, table: [\n",
     ["demo.yaml:8:1: <root>: YAML syntax error: "
      "expected the node content, but found '<stream end>'"]),
]


# Rules inside one section (the models' validators) and between sections (the builder).
LIMIT = "current_limit: {table: holding, address: 300, type: u16, unit: A}\n"
BROKEN += [
    ("heartbeat without a register", "demo", CHARGER + "heartbeat: {period: 10s, timeout: 30s}\n",
     [f"demo.yaml:16:12: heartbeat.{k}: missing required key (or use rewrite: current_limit)"
      for k in ("address", "table", "type", "value")]),
    ("heartbeat rewrite with a value", "demo",
     CHARGER + LIMIT + "heartbeat: {rewrite: current_limit, value: 1, period: 10s, timeout: 30s}\n",
     ["demo.yaml:17:37: heartbeat.value: not with rewrite: current_limit"]),
    ("heartbeat rewrite without a limit", "demo",
     CHARGER + "heartbeat: {rewrite: current_limit, period: 10s, timeout: 30s}\n",
     ["demo.yaml:16:22: heartbeat.rewrite: needs a current_limit section"]),
    ("limit minimum above maximum", "demo",
     CHARGER + LIMIT.replace("unit: A}", "unit: A, min_a: 20, max_a: 10}"),
     ["demo.yaml:16:74: current_limit.min_a: min_a 20 is above max_a 10"]),
    ("float limit in mA", "demo", CHARGER + LIMIT.replace("u16, unit: A", "f32, unit: mA"),
     ["demo.yaml:16:64: current_limit.unit: type f32 carries amps: unit must be A"]),
    ("limit maximum does not fit", "demo",
     CHARGER + LIMIT.replace("unit: A}", "unit: mA, max_a: 80}"),
     ["demo.yaml:16:75: current_limit.max_a: 80 A in mA does not fit u16"]),
    ("on-connect value does not fit", "demo",
     CHARGER + "on_connect:\n  - {table: holding, address: 258, type: u16, value: 70000}\n",
     ["demo.yaml:17:54: on_connect[0].value: 70000 does not fit u16"]),
    ("identify pattern not a regex", "demo",
     METER + "identify: {table: input, address: 9, type: ascii, count: 2, pattern: '('}\n",
     ["demo.yaml:7:70: identify.pattern: not a regular expression: missing ), unterminated "
      "subpattern at position 0"]),
    ("byte of a float", "demo", METER.replace("type: f32}", "type: f32, byte: high}"),
     ["demo.yaml:6:58: registers[0].byte: only for integer types, not f32"]),
    ("canonical quantity in another unit", "demo",
     METER.replace("type: f32}", "type: f32, unit: kW}"),
     ["demo.yaml:6:64: registers[0].unit: power_w is in W after scaling, not 'kW'"]),
    ("condition without a test", "demo", CHARGER.replace("{cp_state: 1}", "{cp_state: {}}"),
     ["demo.yaml:13:24: state.rules[1].when.cp_state: needs at least one of equals, min, max, "
      "bits_all, bits_any"]),
    ("condition on a boolean", "demo", CHARGER.replace("{cp_state: 1}", "{cp_state: true}"),
     ["demo.yaml:13:24: state.rules[1].when.cp_state: expected a value, a list of values or a "
      "mapping of tests, got true"]),
    ("text register compared with a number", "demo",
     CHARGER.replace("{cp_state: 1}", "{rfid: 1}"),
     ["demo.yaml:13:20: state.rules[1].when.rfid: register 'rfid' is text (ascii): compare "
      "with strings"]),
    ("duplicate register name", "demo",
     METER + "  - {name: power_w, table: input, address: 4, type: f32}\n",
     ["demo.yaml:7:12: registers[1].name: duplicate register name 'power_w'"]),
    ("duplicate sentinel", "demo", METER.replace("type: f32}", "type: f32, sentinels: [1, 1]}"),
     ["demo.yaml:6:73: registers[0].sentinels[1]: duplicate 1"]),
    ("scale 0", "demo", METER.replace("type: f32}", "type: f32, scale: 0}"),
     ["demo.yaml:6:65: registers[0].scale: must not be 0"]),
    ("poll period 0", "demo", METER.replace("type: f32}", "type: f32, every: 0}"),
     ["demo.yaml:6:65: registers[0].every: must be more than 0s, got 0s"]),
    ("negative mask", "demo",
     METER + "  - {name: code, table: input, address: 9, type: u16, mask: -1}\n",
     ["demo.yaml:7:61: registers[1].mask: must be at least 0, got -1"]),
    ("pause by a missing enable control", "demo", CHARGER + "pause: enable\n",
     ["demo.yaml:16:8: pause: pause: enable needs an enable section"]),
    ("simulated states on a meter", "demo",
     METER + "simulate:\n  states:\n    charging: {power_w: 1}\n",
     ["demo.yaml:8:3: simulate.states: not for kind meter"]),
    ("coil written with function 6", "demo",
     CHARGER + "enable: {table: coil, address: 1, type: bool, function: 6}\n",
     ["demo.yaml:16:57: enable.function: coil is written with function 5 or 15"]),
    ("duplicate transport", "demo", METER + "connection: {transports: [tcp, tcp]}\n",
     ["demo.yaml:7:32: connection.transports[1]: duplicate 'tcp'"]),
    ("problems of shape and between sections at once", "demo",
     CHARGER.replace("{cp_state: 1}", "{cp_stat: 1}") + "colour: red\n",
     ["demo.yaml:13:23: state.rules[1].when.cp_stat: no register named 'cp_stat' in registers",
      "demo.yaml:16:1: colour: unknown key 'colour'"]),
    ("a broken register has no follow-on problems", "demo",
     CHARGER.replace("type: u16}", "type: u17}") + "tag: {register: rfid}\n",
     ["demo.yaml:6:58: registers[0].type: must be one of u16, i16, u32, i32, u64, i64, f32, "
      "f64, ascii, ascii1, hex, bool; got 'u17'"]),
    ("simulated text for a number register", "demo",
     CHARGER + "simulate:\n  states:\n    charging: {cp_state: '3'}\n",
     ["demo.yaml:18:26: simulate.states.charging.cp_state: register 'cp_state' is u16: give a "
      "number"]),
]


@pytest.mark.parametrize(("case", "stem", "text", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_profile_reports_every_problem(
    tmp_path: Path, case: str, stem: str, text: str, expected: list[str]
) -> None:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    prefix = f"{tmp_path}/"
    got = [str(p).removeprefix(prefix) for p in info.value.problems]
    assert got == expected


def test_the_valid_snippets_load(tmp_path: Path) -> None:
    for text in (METER, CHARGER):
        path = tmp_path / "demo.yaml"
        path.write_text(text)
        profile = load_profile(path)
        assert profile.slug == "demo"


def test_durations(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    for text, seconds in (("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0),
                          ("1.5s", 1.5), ("3", 3.0), ("1h30m", 5400.0), ("1d", 86400.0)):
        path.write_text(METER.replace("f32}", f"f32, every: {text}}}"))
        assert load_profile(path).register("power_w").every_s == pytest.approx(seconds)


# ---- site profiles ---------------------------------------------------------------------------


def test_site_profile_overrides_and_adds(tmp_path: Path) -> None:
    site = tmp_path / "site-drivers"
    site.mkdir()
    keba = (shipped_drivers_dir() / "keba-p30.yaml").read_text()
    (site / "keba-p30.yaml").write_text(keba.replace("model: KeContact", "model: Site KeContact"))
    (site / "demo.yaml").write_text(METER)
    profiles = load_profiles(str(site))
    assert profiles["keba-p30"].model.startswith("Site KeContact")
    assert profiles["keba-p30"].path == str(site / "keba-p30.yaml")
    assert profiles["demo"].kind is DeviceKind.METER
    assert set(profiles) == set(PROFILES) | {"demo"}
    assert load_profiles()["keba-p30"].model.startswith("KeContact")


def test_bad_site_profile_names_the_file(tmp_path: Path) -> None:
    site = tmp_path / "site-drivers"
    site.mkdir()
    (site / "broken.yaml").write_text(METER)  # slug demo in broken.yaml
    shutil.copy(shipped_drivers_dir() / "abb-b23.yaml", site / "abb-b23.yaml")
    with pytest.raises(ProfileError) as info:
        load_profiles(site)
    assert [str(p) for p in info.value.problems] == [
        f"{site}/broken.yaml:1:7: slug: slug 'demo' does not match the file name 'broken'.yaml"
    ]


def test_missing_site_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not a directory"):
        load_profiles(tmp_path / "nope")


def test_edited_profile_is_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(METER)
    assert load_profile(path).model == "M1"
    path.write_text(METER.replace("model: M1", "model: M2 (longer)"))
    assert load_profile(path).model == "M2 (longer)"


# ---- JSON Schema -----------------------------------------------------------------------------


def test_json_schema_is_valid_and_accepts_every_shipped_profile() -> None:
    schema = profile_json_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    for path in SHIPPED_FILES:
        data = yaml.safe_load(path.read_text())
        errors = [e.message for e in validator.iter_errors(data)]
        assert errors == [], path.name


def test_checked_in_json_schema_is_the_generated_one() -> None:
    # Regenerate with: python -c "from gateway.profiles.load import SCHEMA_FILE, schema_text;
    # SCHEMA_FILE.write_text(schema_text())"
    assert SCHEMA_FILE.read_text() == schema_text()
    assert json.loads(SCHEMA_FILE.read_text()) == profile_json_schema()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(colour="red"),
        lambda d: d["registers"][0].update(adress=3),
        lambda d: d["registers"][0].update(type="f33"),
        lambda d: d["connection"].update(max_registers_per_read=126),
        lambda d: d.pop("model"),
        lambda d: d["state"]["rules"][0].update(status="idle"),
        lambda d: d["heartbeat"].update(period="ten seconds"),
    ],
)
def test_json_schema_rejects_what_the_loader_rejects(mutate: object) -> None:
    data = yaml.safe_load((shipped_drivers_dir() / "keba-p30.yaml").read_text())
    assert callable(mutate)
    mutate(data)
    validator = jsonschema.Draft202012Validator(profile_json_schema())
    assert list(validator.iter_errors(data))


def test_describe_names_the_capabilities() -> None:
    text = describe_profile(PROFILES["keba-p30"])
    for part in ("KEBA", "tcp", "unit 255", "raw bytes as hex", "unit mA", "5018",
                 "one value per request", "keba-p40", "pause: enable"):
        assert part in text
    abb = describe_profile(PROFILES["abb-terra-ac"])
    assert "no lifetime energy counter" in abb and "tag: none" in abb
    assert "byte high mask 0x7f" in abb
    alfen = describe_profile(PROFILES["alfen-eve"])
    assert "rewrite the current limit every 25s" in alfen and "f32" in alfen
    heidelberg = describe_profile(PROFILES["heidelberg-ec"])
    assert "19200 8E1" in heidelberg and "100 ms between requests" in heidelberg
    assert isinstance(PROFILES["eastron-sdm630"], Profile)
