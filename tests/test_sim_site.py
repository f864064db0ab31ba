"""A whole simulated site: TCP devices grouped per address, an RTU bus on a real socat pty at the
configured path, scenarios (with line-numbered errors), random traffic and the truth log."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from gateway.config import (
    AuthConfig,
    BusConfig,
    DeviceConfig,
    GatewayConfig,
    GridConfig,
    SiteConfig,
    StorageConfig,
)
from gateway.errors import ConfigError
from gateway.modbus.codec import decode
from gateway.modbus.types import Table
from gateway.model import ChargerStatus, Token, TokenType
from gateway.profiles import Profile, load_profiles
from gateway.sim.scenario import parse_scenario
from gateway.sim.server import Fault, FaultKind
from gateway.sim.site import SimSite, TrafficProfile

PROFILES = load_profiles()
TOKENS = (
    Token("04A2B3C4D5E6F7", TokenType.RFID, "alice"),
    Token("FOB-0042", TokenType.KEYFOB, "bob"),
    Token("app-7f3c9a", TokenType.APP, "frank"),
)


def _config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(
        site=SiteConfig(id="sim-test"),
        storage=StorageConfig(path=str(tmp_path / "buffer.db")),
        buses=(BusConfig(id="rs485", type="rtu", port=str(tmp_path / "ttyEVGW"), baudrate=19200),),
        devices=(
            DeviceConfig(
                id="cp1", driver="keba-p30", host="127.0.0.1", port=0, unit=255, meter="m-cp1"
            ),
            DeviceConfig(id="cp2", driver="abb-terra-ac", host="127.0.0.1", port=0, unit=1),
            DeviceConfig(id="cp4", driver="heidelberg-ec", bus="rs485", unit=1),
            DeviceConfig(id="m-site", driver="eastron-sdm630", bus="rs485", unit=2),
            DeviceConfig(id="m-cp1", driver="eastron-sdm630", bus="rs485", unit=3),
            DeviceConfig(id="far", driver="keba-p30", host="192.0.2.10", port=502, unit=255),
        ),
        auth=AuthConfig(tokens=TOKENS),
        grid=GridConfig(max_current_a=63, meter="m-site"),
    )


async def _read(
    client: AsyncModbusSerialClient | AsyncModbusTcpClient, profile: Profile, unit: int, name: str
) -> object:
    reg = profile.register(name)
    read = {
        Table.HOLDING: client.read_holding_registers,
        Table.INPUT: client.read_input_registers,
    }[reg.table]
    rr = await read(reg.address, count=reg.count, device_id=unit)
    assert not rr.isError(), rr
    return decode(reg, rr.registers)


SCENARIO = """\
- {at: 10s, device: cp1, action: plug_in, tag: 04a2b3c4d5e6f7, power_w: 11000}
- {at: 20s, device: cp1, action: start}
- {at: 10s, device: cp4, action: plug_in, power_w: 7400}
- {at: 15s, device: cp4, action: tag, tag: app-7f3c9a}
- {at: 20s, device: cp4, action: start}
- {at: 30m, device: cp4, action: suspend}
- {at: 40m, device: cp1, action: unplug}
- {at: 41m, device: m-site, action: fault, fault: exception, code: 6}
"""


@pytest.mark.e2e
async def test_site_serves_tcp_and_rtu_and_plays_scenario(tmp_path: Path) -> None:
    config = _config(tmp_path)
    devices = [d.id for d in config.devices]
    chargers = ["cp1", "cp2", "cp4", "far"]
    scenario = parse_scenario(SCENARIO, "s.yaml", device_ids=devices, charger_ids=chargers)
    truth = tmp_path / "truth.jsonl"
    async with SimSite(
        config,
        PROFILES,
        speed=3000.0,
        scenario=scenario,
        truth_path=truth,
        seed=7,
        enforce_heartbeat=False,
    ) as site:
        served = {s.device_id: s for s in site.served}
        assert set(served) == {"cp1", "cp2", "cp4", "m-site", "m-cp1"}
        assert site.skipped == [("far", "host 192.0.2.10 is not a loopback address")]
        # Same host:port (0 here) -> units of one server.
        assert served["cp1"].endpoint == served["cp2"].endpoint
        assert served["cp4"].endpoint == f"rtu:{tmp_path / 'ttyEVGW'}"
        async with asyncio.timeout(10):
            await site.scenario_done.wait()
        cp1, cp4 = site.charger("cp1"), site.charger("cp4")
        assert cp1.ev is None and cp1.sessions and cp1.sessions[0]["tag_seen"] == "04A2B3C4"
        assert cp4.status is ChargerStatus.SUSPENDED_EV

        # RTU: the gateway side is the configured path, all three units answer.
        rtu = AsyncModbusSerialClient(
            str(tmp_path / "ttyEVGW"),
            framer=FramerType.RTU,
            baudrate=19200,
            timeout=0.5,
            retries=0,
        )
        assert await rtu.connect()
        try:
            heidelberg, sdm = PROFILES["heidelberg-ec"], PROFILES["eastron-sdm630"]
            assert heidelberg.state is not None
            state = {
                name: await _read(rtu, heidelberg, 1, name)
                for name in {c.register for r in heidelberg.state.rules for c in r.when}
            }
            assert heidelberg.state.classify(state)[1] is ChargerStatus.SUSPENDED_EV
            # The billing meter measures cp1 alone: its energy moved exactly as cp1's counter.
            meter_wh = await _read(rtu, sdm, 3, "energy_wh")
            start = site.meter("m-cp1").energy_wh - cp1.sessions[0]["energy_wh"]
            assert isinstance(meter_wh, float)
            assert meter_wh - start == pytest.approx(cp1.sessions[0]["energy_wh"], abs=1.0)
            # The scenario's fault: the grid meter answers exception 6.
            rr = await rtu.read_input_registers(0, count=2, device_id=2)
            assert rr.isError() and rr.exception_code == 6
            site.clear_fault("m-site")
            assert await _read(rtu, sdm, 2, "voltage_l1_v") == pytest.approx(230)
        finally:
            rtu.close()

        # TCP fault injection by device id, and frozen values.
        host, port = served["cp2"].endpoint.removeprefix("tcp://").split(":")
        tcp = AsyncModbusTcpClient(host, port=int(port), timeout=0.3, retries=0)
        assert await tcp.connect()
        try:
            abb = PROFILES["abb-terra-ac"]
            site.set_fault("cp2", Fault(FaultKind.NO_ANSWER))
            with pytest.raises(ModbusException):
                await _read(tcp, abb, 1, "power_w")
            site.set_fault("cp2", "frozen")
            assert site.charger("cp2").frozen
            site.clear_fault("cp2")
            assert not site.charger("cp2").frozen
        finally:
            tcp.close()
    assert not (tmp_path / "ttyEVGW").is_symlink()  # the link goes with the site
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    done = [r for r in records if not r.get("open")]
    still_open = [r for r in records if r.get("open")]
    assert [r["device"] for r in done] == ["cp1"]
    assert done[0]["tag"] == "04a2b3c4d5e6f7" and done[0]["tag_seen"] == "04A2B3C4"
    # Charged from 20 s to 40 min at 11 kW, give or take one tick of simulated time.
    assert done[0]["energy_wh"] == pytest.approx(11000 * (2400 - 20) / 3600, rel=0.05)
    assert done[0]["counter_end_wh"] - done[0]["counter_start_wh"] == pytest.approx(
        done[0]["energy_wh"], abs=0.2
    )
    assert [(r["device"], r["tag"], r["tag_seen"]) for r in still_open] == [
        ("cp4", "app-7f3c9a", None)
    ]


@pytest.mark.e2e
async def test_random_traffic_uses_configured_tokens(tmp_path: Path) -> None:
    config = _config(tmp_path)
    truth = tmp_path / "truth.jsonl"
    fast = TrafficProfile(
        mean_idle_s=60.0,
        energy_need_wh=(200.0, 800.0),
        suspend_probability=0.5,
        suspend_s=(10.0, 30.0),
        linger_s=(0.0, 60.0),
        unknown_tag_probability=0.3,
    )
    async with SimSite(
        config,
        PROFILES,
        speed=2000.0,
        truth_path=truth,
        seed=11,
        traffic_profile=fast,
        enforce_heartbeat=False,
    ) as site:
        assert site.traffic
        for _ in range(200):
            if sum(len(c.sessions) for c in site.chargers.values()) >= 6:
                break
            await asyncio.sleep(0.05)
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    done = [r for r in records if not r.get("open")]
    assert len(done) >= 6
    known = {t.id for t in TOKENS}
    for r in done:
        assert r["device"] in {"cp1", "cp2", "cp4"}
        assert r["unplugged_at"] >= r["plugged_at"]
        assert r["tag"] in known or (r["tag"].startswith("04") and len(r["tag"]) == 14)
        if r["device"] in ("cp2", "cp4"):  # no tag register: app starts
            assert r["tag"] == "app-7f3c9a" and r["tag_seen"] is None
    assert any(r["energy_wh"] > 0 for r in done)
    # a connector stays free for a while between two visits: a gateway polling a sped-up site
    # must see it free, or two drivers' visits would read as one session
    by_device: dict[str, list[dict[str, float]]] = {}
    for r in sorted(done, key=lambda r: r["plugged_at"]):
        by_device.setdefault(r["device"], []).append(r)
    gaps = [
        b["plugged_at"] - a["unplugged_at"]
        for visits in by_device.values()
        for a, b in itertools.pairwise(visits)
    ]
    # (truth times are wall-clock: at speed 2000 a simulated second is half a millisecond)
    assert gaps and min(gaps) * 2000.0 >= fast.min_idle_s * 0.95, gaps


def test_scenario_errors_carry_lines() -> None:
    text = """\
- {at: 5s, device: cp1, action: plug_in}
- {at: soon, device: cp1, action: start}
- {at: 1m, device: nope, action: unplug}
- {at: 2m, device: m-site, action: plug_in}
- {at: 3m, device: m-site, action: fault, fault: melted}
- {at: 4m, device: cp1, action: tag}
- {at: 5m, device: cp1, action: start, colour: red}
"""
    with pytest.raises(ConfigError) as err:
        parse_scenario(text, "s.yaml", device_ids=["cp1", "m-site"], charger_ids=["cp1"])
    lines = [(p.line, p.path) for p in err.value.problems]
    assert lines == [
        (2, "[1].at"),
        (3, "[2].device"),
        (4, "[3].action"),
        (5, "[4].fault"),
        (6, "[5]"),
        (7, "[6].colour"),
    ]
    assert "s.yaml:2:" in str(err.value)


def test_scenario_mapping_form_sorted_steps() -> None:
    scenario = parse_scenario(
        "traffic: true\nsteps:\n"
        "  - {at: 2m, device: cp1, action: unplug}\n"
        "  - {at: 1h, device: cp1, action: fault, fault: drop}\n"
        "  - {at: 30, device: cp1, action: plug_in, tag: 1234, energy_need_wh: 5000}\n",
    )
    assert scenario.traffic
    assert [(s.at_s, s.action) for s in scenario.steps] == [
        (30.0, "plug_in"),
        (120.0, "unplug"),
        (3600.0, "fault"),
    ]
    assert scenario.steps[0].tag == "1234" and scenario.steps[0].line == 5
    assert scenario.steps[2].fault == Fault(FaultKind.DROP)


async def test_scenario_override_answers_garbage_for_n_polls(tmp_path: Path) -> None:
    # What a glitching meter looks like on the wire: an SDM630 answering 1e30 kWh for two reads.
    config = GatewayConfig(
        site=SiteConfig(id="sim-test"),
        storage=StorageConfig(path=str(tmp_path / "buffer.db")),
        devices=(DeviceConfig(id="m1", driver="eastron-sdm630", host="127.0.0.1", port=0, unit=2),),
    )
    scenario = parse_scenario(
        "- {at: 1s, device: m1, action: override, register: energy_wh, value: 1e33, polls: 2}\n",
        "s.yaml",
        device_ids=["m1"],
        charger_ids=[],
    )
    assert scenario.steps[0].value == 1e33 and scenario.steps[0].polls == 2
    async with SimSite(
        config, PROFILES, speed=100.0, scenario=scenario, seed=3, enforce_heartbeat=False
    ) as site:
        async with asyncio.timeout(10):
            await site.scenario_done.wait()
        server = site.server("m1")
        client = AsyncModbusTcpClient(server.host, port=server.port, timeout=0.5, retries=0)
        assert await client.connect()
        try:
            sdm = PROFILES["eastron-sdm630"]
            seen = [await _read(client, sdm, 2, "energy_wh") for _ in range(3)]
        finally:
            client.close()
        truth = site.meter("m1").energy_wh
    assert seen[:2] == [pytest.approx(1e33, rel=1e-6)] * 2
    assert seen[2] == pytest.approx(truth, abs=1.0)


def test_scenario_override_needs_register_and_value() -> None:
    text = """\
- {at: 1s, device: m1, action: override, value: 5}
- {at: 2s, device: m1, action: override, register: energy_wh, value: lots}
- {at: 3s, device: m1, action: override, register: energy_wh, value: 1, polls: 0}
- {at: 4s, device: m1, action: unplug, polls: 3}
"""
    with pytest.raises(ConfigError) as err:
        parse_scenario(text, "s.yaml", device_ids=["m1"], charger_ids=["m1"])
    assert [(p.line, p.path) for p in err.value.problems] == [
        (1, "[0]"),
        (2, "[1].value"),
        (3, "[2].polls"),
        (4, "[3].polls"),
    ]
