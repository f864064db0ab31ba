"""Serial devices behind a Modbus TCP gateway (protocol converter: MBAP in, RTU out), on the real
wire: the simulated converter (``SimServer.tcp_gateway``) forwards to its units one request at a
time over a simulated serial line; the gateway reaches them with ``host``/``port``/``unit``."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from gateway.config import check_config, load_config
from gateway.errors import DeviceError
from gateway.modbus.bus import BusPool, TcpBus
from gateway.modbus.driver import DeviceDriver
from gateway.modbus.types import Table
from gateway.profiles import Profile
from gateway.sim.devices import SimMeter
from gateway.sim.registers import RegisterImage
from gateway.sim.server import FaultKind, LineTransaction, SimServer
from gateway.sim.site import SimSite
from gateway.store import Store
from tests.support.mqtt_broker import free_port
from tests.support.sessions import modbus_sessions

SPEED = 60.0
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example-gateway-site.yaml"

SITE = """\
site: {{id: converter-site}}
storage: {{path: ./buffer.db}}
devices:
  - {{id: cp1, driver: heidelberg-ec, host: 127.0.0.1, port: {port}, unit: 1, meter: m1,
     poll_interval: 1s}}
  - {{id: m1, driver: eastron-sdm630, host: 127.0.0.1, port: {port}, unit: 2,
     poll_interval: 1s}}
endpoints:
  - {{host: 127.0.0.1, port: {port}, baudrate: 19200, inter_request_delay: {delay}}}
"""


def _gaps(transactions: list[LineTransaction]) -> list[tuple[int, float]]:
    """(unit, pause the client left before this request) for every request but the first."""
    return [
        (cur.unit, cur.received_s - prev.answered_s)
        for prev, cur in itertools.pairwise(transactions)
    ]


@pytest.mark.slow
async def test_charger_and_billing_meter_behind_one_converter_bill_exactly(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(SITE.format(port=free_port(), delay="20ms"))
    code, summary = check_config(site_file)
    assert code == 0, summary
    config = load_config(site_file)
    # Two devices, one address: one bus, one TCP connection, the endpoint's pause.
    events: list[tuple[str, dict[str, Any]]] = []
    finished = asyncio.Event()

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        events.append((kind, payload))
        if kind == "session_finished":
            finished.set()

    async with (
        SimSite(
            config, shipped_profiles, speed=SPEED, traffic=False, seed=5, enforce_heartbeat=False
        ) as site,
        Store.open(config.storage.path, site_id="converter-site", reserve_bytes=0) as store,
        BusPool.from_config(config) as pool,
    ):
        [served] = {s.endpoint for s in site.served}
        assert served.startswith("tcp-gateway://127.0.0.1:")
        converter = site.server("m1")
        assert converter is site.server("cp1") and converter.line.baudrate == 19200
        bus = pool.bus_for("cp1")
        assert bus is pool.bus_for("m1") and isinstance(bus, TcpBus)
        assert bus.frame_gap_s == pytest.approx(0.02)
        manager, poller = await modbus_sessions(
            config, shipped_profiles, pool, store, on_event, charger_ids=["cp1"], time_scale=SPEED
        )
        async with asyncio.TaskGroup() as tg:
            polling = tg.create_task(poller.run())
            await asyncio.sleep(1.0)
            cp1 = site.charger("cp1")
            # The EV stops by itself once full: the meter's last reading is the whole session.
            cp1.plug_in(power_w=11_000, energy_need_wh=400)
            await asyncio.sleep(0.5)
            result = await manager.remote_start("cp1", "alice", "APP-7")
            assert result["charger_id"] == "cp1"
            cp1.start_charging()
            await asyncio.sleep(4.0)  # 240 s simulated: the 400 Wh take ~131 s
            truth = cp1.unplug()
            async with asyncio.timeout(10):
                await finished.wait()
            polling.cancel()
        await manager.wait_idle()
        records = await store.finished_sessions()
    assert truth is not None and truth["energy_wh"] >= 400
    [record] = records
    assert record["user"]["id"] == "alice" and record["charger_id"] == "cp1"
    assert "meter_reset" not in record["flags"] and "comms_gap" not in record["flags"]
    # Billed from the SDM630 behind the converter (float32 kWh on the wire): to the Wh.
    assert abs(record["energy_wh"] - truth["energy_wh"]) <= 1, (record, truth)
    assert record["meter_stop_wh"] - record["meter_start_wh"] == record["energy_wh"]
    # Nothing was ever pipelined at the converter, and every pause was kept.
    log = list(converter.transactions)
    assert len(log) > 20 and converter.max_pending == 1
    assert {t.unit for t in log} == {1, 2}
    for unit, gap_s in _gaps(log):
        assert gap_s >= (0.1 if unit == 1 else 0.02) - 1e-3, (unit, gap_s)


def _meter_unit(profile: Profile, seed: int) -> RegisterImage:
    image = RegisterImage()
    SimMeter(profile, image, seed=seed)
    return image


@pytest.mark.slow
async def test_shared_endpoint_serialises_requests_and_keeps_the_delays(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    """Four meters behind one converter, polled concurrently as the gateway does: never two
    requests at the converter at once, the endpoint's 30 ms between requests, the Heidelberg
    profile's 100 ms before its own. The same polling over two connections does overlap: the
    measurement can fail."""
    port = free_port()
    sdm = shipped_profiles["eastron-sdm630"]
    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        "site: {id: s1}\nstorage: {path: ./b.db}\ndevices:\n"
        + "".join(
            f"  - {{id: m{u}, driver: eastron-sdm630, host: 127.0.0.1, port: {port}, unit: {u}}}\n"
            for u in (1, 2, 3)
        )
        + f"  - {{id: cp4, driver: heidelberg-ec, host: 127.0.0.1, port: {port}, unit: 4}}\n"
        f"endpoints:\n  - {{host: 127.0.0.1, port: {port}, inter_request_delay: 30ms}}\n"
    )
    config = load_config(site_file)
    units = {u: _meter_unit(sdm, u) for u in (1, 2, 3)}
    units[4] = RegisterImage()
    units[4].set(Table.INPUT, 5, [2])  # Heidelberg: state A1, no car
    async with SimServer.tcp_gateway("127.0.0.1", port, units, baudrate=9600) as converter:
        async with BusPool.from_config(config) as pool:
            drivers = [
                DeviceDriver(d, shipped_profiles[d.driver], pool.bus_for(d)) for d in config.devices
            ]
            assert len({id(d.bus) for d in drivers}) == 1

            async def poll(driver: DeviceDriver, n: int) -> None:
                for _ in range(n):
                    sample = await driver.poll()
                    assert sample.online, (driver.device_id, sample.error)

            async with asyncio.TaskGroup() as tg:
                for driver in drivers:
                    tg.create_task(poll(driver, 3))
            # Wire time at 9600 8N1: 76 registers are 8 bytes out and 157 back, ~172 ms.
            await drivers[0].bus.read(1, Table.INPUT, 0, 76, 2.0)
            big = converter.transactions[-1]
            assert big.answered_s - big.line_start_s >= (8 + 157) * 10 / 9600
        log = list(converter.transactions)
        assert converter.max_pending == 1 and len(log) >= 12
        assert {t.unit for t in log} == {1, 2, 3, 4}
        for unit, gap_s in _gaps(log):
            assert gap_s >= (0.1 if unit == 4 else 0.03) - 1e-3, (unit, gap_s)

        # Control: two connections to the same converter, polled at once, do pile up there.
        converter.max_pending = 0
        a, b = TcpBus("127.0.0.1", port), TcpBus("127.0.0.1", port)
        try:
            reads = [bus.read(u, Table.INPUT, 0, 76, 2.0) for bus in (a, b) for u in (1, 2)]
            await asyncio.gather(*reads)
        finally:
            await a.close()
            await b.close()
        assert converter.max_pending == 2


async def test_a_silent_unit_behind_the_converter_costs_its_timeout_not_the_others(
    shipped_profiles: dict[str, Profile],
) -> None:
    """A unit that does not answer on the serial line (absent, or its answer garbled) comes back
    from the converter as exception 0x0B after the converter's own timeout; the link stays."""
    sdm = shipped_profiles["eastron-sdm630"]
    units = {2: _meter_unit(sdm, 2), 3: _meter_unit(sdm, 3)}
    async with SimServer.tcp_gateway(
        "127.0.0.1", 0, units, baudrate=9600, response_timeout_s=0.2
    ) as converter:
        converter.set_fault(3, FaultKind.GARBAGE)
        bus = TcpBus("127.0.0.1", converter.port)
        try:
            loop = asyncio.get_running_loop()
            for unit in (5, 3):
                t0 = loop.time()
                with pytest.raises(DeviceError) as info:
                    await bus.read(unit, Table.INPUT, 0, 2, 1.0)
                took_s = loop.time() - t0
                assert (info.value.reason, info.value.exception_code) == (
                    "exception_response",
                    0x0B,
                ), unit
                assert 0.2 <= took_s < 1.0, unit
            assert len(await bus.read(2, Table.INPUT, 0, 2, 1.0)) == 2
            assert bus.stats.connects == 1  # the converter's exceptions keep the link
        finally:
            await bus.close()


@pytest.mark.slow
async def test_scan_through_a_converter_names_its_serial_units_and_the_snippet_checks(
    tmp_path: Path, shipped_profiles: dict[str, Profile], capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.modbus.commands import run_scan

    em24 = shipped_profiles["carlo-gavazzi-em24"]
    units = {1: _meter_unit(shipped_profiles["eastron-sdm630"], 1), 7: _meter_unit(em24, 7)}
    async with SimServer.tcp_gateway(
        "127.0.0.1", 0, units, baudrate=9600, response_timeout_s=0.2
    ) as converter:
        code = await run_scan(tcp=f"127.0.0.1:{converter.port}", units="1-8")
        out = capsys.readouterr().out
        assert code == 0, out
        assert converter.max_pending == 1
        async with SimServer.tcp_gateway("127.0.0.1", 0, {}, response_timeout_s=0.05) as empty:
            assert await run_scan(tcp=f"127.0.0.1:{empty.port}", units="1-2") == 1
        hint = capsys.readouterr().out
    assert "no known device found" in hint
    assert "2400 8N1, 9600 8E1, 9600 8N1" in hint  # SDM120 and SDM630 disputed defaults too
    snippet = out[out.index("devices:") :]
    # SDM120 and SDM630 share their identification: one device, the other named beside it
    assert f"driver: eastron-sdm120, host: 127.0.0.1, port: {converter.port}, unit: 1}}" in snippet
    sdm_line = next(line for line in snippet.splitlines() if "unit: 1}" in line)
    assert "# or: " in sdm_line and "eastron-sdm630" in sdm_line.split("# or: ")[1]
    assert "driver: carlo-gavazzi-em24, host: 127.0.0.1" in snippet
    site = tmp_path / "site.yaml"
    site.write_text("site: {id: s1}\nstorage: {path: ./b.db}\n" + snippet)
    code, text = check_config(site)
    assert code == 0, text


async def test_a_unit_the_converter_reports_unreachable_is_probed_once(
    shipped_profiles: dict[str, Profile],
) -> None:
    """Exception 0x0B (gateway target failed to respond) means nobody answers at that unit id:
    the scan moves on instead of trying every other profile there, each after the converter's
    own timeout."""
    from gateway.modbus.scan import scan

    units = {1: _meter_unit(shipped_profiles["eastron-sdm630"], 1)}
    async with SimServer.tcp_gateway(
        "127.0.0.1", 0, units, baudrate=9600, response_timeout_s=0.2
    ) as converter:
        result = await scan(shipped_profiles, tcp=f"127.0.0.1:{converter.port}", units=[1, 2, 3])
    identities = [p.identify for p in shipped_profiles.values() if p.identify is not None]
    station = sum(1 for ident in identities if ident.unit is not None)
    per_unit = len(identities) - station
    assert [m.unit for m in result.matches] and {m.unit for m in result.matches} == {1}
    # unit 1: every profile (station-level identities once); units 2 and 3: one probe each
    assert result.probed == per_unit + station + 2, result.probed


async def test_the_example_site_is_served_behind_a_simulated_converter(
    shipped_profiles: dict[str, Profile],
) -> None:
    """``evgw simulate -c config/example-gateway-site.yaml`` serves the converter; ``evgw read``
    reaches both serial devices through it."""
    from gateway.modbus.commands import read_device_once

    config = load_config(EXAMPLE)
    async with SimSite(config, shipped_profiles, traffic=False, seed=1) as site:
        endpoints = {s.device_id: s.endpoint for s in site.served}
        assert endpoints["cp1"] == endpoints["m1"] == "tcp-gateway://127.0.0.1:15030"
        assert endpoints["cp2"] == "tcp://127.0.0.1:15031"
        assert site.server("m1").line.baudrate == 19200  # the endpoint's line, not a profile's
        for device_id in ("cp1", "m1"):
            sample = await read_device_once(config, device_id, shipped_profiles)
            assert sample.online, (device_id, sample.error)
        assert sample.values["energy_wh"] == pytest.approx(site.meter("m1").energy_wh, abs=1)
