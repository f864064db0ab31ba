"""RTU end to end: the engine on one end of a socat pty pair, the simulator on the other; and RTU
frames through a TCP serial server."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.config import DeviceConfig, load_config
from gateway.errors import DeviceError
from gateway.modbus.bus import ModbusBus, RtuOverTcpBus, SerialBus
from gateway.modbus.codec import encode
from gateway.modbus.commands import read_device_once
from gateway.modbus.driver import DeviceDriver
from gateway.modbus.scan import scan
from gateway.modbus.types import DataType, RegisterSpec, Table, WordOrder
from gateway.model import DeviceKind
from gateway.profiles import ConnectionSpec, ControlSpec, CurrentLimitSpec, Profile
from gateway.sim.pty import pty_pair
from gateway.sim.registers import RegisterImage
from gateway.sim.server import Fault, FaultKind, SimServer

pytestmark = [
    pytest.mark.e2e,  # socat makes the pseudo-terminal pairs
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed"),
]

BAUD = 19200
# The pty pair refuses parity and character-size changes (tcsetattr EINVAL) here, and a pty
# has no real line settings anyway: the tests run 8N1.
PARITY = "N"


def heidelberg_like(delay_s: float = 0.0) -> Profile:
    """The shape of Heidelberg Energy Control: input registers, 0.1 A setpoint, RTU 8E1."""
    regs = (
        RegisterSpec("state", Table.INPUT, 5, DataType.U16, 1),
        RegisterSpec("current_l1_a", Table.INPUT, 6, DataType.U16, 1, scale=0.1),
        RegisterSpec("temperature_c", Table.INPUT, 9, DataType.I16, 1, scale=0.1),
        RegisterSpec("power_w", Table.INPUT, 14, DataType.U16, 1),
        RegisterSpec("energy_wh", Table.INPUT, 17, DataType.U32, 2),
        RegisterSpec("energy_export_wh", Table.INPUT, 30, DataType.U32, 2, WordOrder.CDAB),
    )
    limit = ControlSpec(RegisterSpec("max_current", Table.HOLDING, 261, DataType.U16, 1), 6)
    return Profile(
        slug="rtu-charger",
        kind=DeviceKind.CHARGER,
        manufacturer="Test",
        model="RTU",
        connection=ConnectionSpec(
            transports=("rtu",), baudrate=BAUD, parity=PARITY, inter_request_delay_s=delay_s
        ),
        registers=regs,
        current_limit=CurrentLimitSpec(limit, "0.1A", 6.0, 16.0, 0),
    )


VALUES = {
    "state": 7,
    "current_l1_a": 15.9,
    "temperature_c": -3.5,
    "power_w": 3650,
    "energy_wh": 98765,
    "energy_export_wh": 70000,
}


def image(profile: Profile, power_w: int) -> RegisterImage:
    img = RegisterImage()
    for name, value in {**VALUES, "power_w": power_w}.items():
        spec = profile.register(name)
        img.set(spec.table, spec.address, encode(spec, value))
    return img


def dev(dev_id: str, unit: int, timeout_s: float = 0.15) -> DeviceConfig:
    return DeviceConfig(id=dev_id, driver="rtu-charger", bus="line", unit=unit, timeout_s=timeout_s)


@asynccontextmanager
async def rtu_line(units: dict[int, RegisterImage]) -> AsyncIterator[tuple[SimServer, SerialBus]]:
    async with (
        pty_pair() as (gateway_end, sim_end),
        SimServer.rtu(sim_end, units, baudrate=BAUD, parity=PARITY) as srv,
    ):
        bus = SerialBus(gateway_end, BAUD, PARITY, 1, 8)
        try:
            yield srv, bus
        finally:
            await bus.close()


async def test_rtu_line_decodes_two_units() -> None:
    prof = heidelberg_like()
    units = {1: image(prof, 1000), 2: image(prof, 2000)}
    async with rtu_line(units) as (_, bus):
        a = await DeviceDriver(dev("a", 1), prof, bus).poll()
        b = await DeviceDriver(dev("b", 2), prof, bus).poll()
    assert a.online and b.online, (a.error, b.error)
    assert a.values == {**VALUES, "power_w": 1000, "current_l1_a": pytest.approx(15.9)}
    assert b.values["power_w"] == 2000
    assert b.values["temperature_c"] == pytest.approx(-3.5)
    # 5..17+2 in one read (holes <= 8), 30..31 in another
    assert units[1].reads == 2 and units[2].reads == 2


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (FaultKind.NO_ANSWER, "timeout"),
        (FaultKind.GARBAGE, "bad_frame"),
        (FaultKind.EXCEPTION, "exception_response"),
        (FaultKind.DROP, "timeout"),  # nothing to hang up on a serial line: silence
    ],
)
async def test_fault_on_one_unit_does_not_disturb_the_others(kind: FaultKind, reason: str) -> None:
    prof = heidelberg_like()
    units = {1: image(prof, 1000), 2: image(prof, 2000), 3: image(prof, 3000)}
    async with rtu_line(units) as (srv, bus):
        drivers = [DeviceDriver(dev(f"d{u}", u), prof, bus) for u in (1, 2, 3)]
        srv.set_fault(2, kind)
        for _ in range(3):
            samples = [await d.poll() for d in drivers]
            assert [s.online for s in samples] == [True, False, True]
            assert samples[1].error == reason
            assert samples[0].values["power_w"] == 1000 and samples[2].values["power_w"] == 3000
        srv.clear_fault(2)
        recovered = await drivers[1].poll()
        assert recovered.online and recovered.values["power_w"] == 2000


async def test_current_limit_write_over_rtu_reaches_only_its_unit() -> None:
    prof = heidelberg_like()
    units = {1: image(prof, 1000), 2: image(prof, 2000)}
    async with rtu_line(units) as (_, bus):
        await DeviceDriver(dev("b", 2), prof, bus).set_current_limit(13.2)
    assert units[2].get(Table.HOLDING, 261) == [132]  # 0.1 A steps
    assert units[1].writes == 0


async def test_inter_request_delay_and_frame_gap_are_kept() -> None:
    prof = heidelberg_like(delay_s=0.05)
    units = {1: image(prof, 1000)}
    async with rtu_line(units) as (_, bus):
        driver = DeviceDriver(dev("a", 1), prof, bus)
        await driver.poll()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(3):
            assert (await driver.poll()).online
        elapsed = loop.time() - t0
    # 3 polls x 2 requests, each after >= 50 ms of bus silence
    assert elapsed >= 6 * 0.05
    assert bus.frame_gap_s == pytest.approx(3.5 * 11 / BAUD)


async def test_a_unit_nobody_has_times_out_and_the_line_still_works() -> None:
    prof = heidelberg_like()
    units = {1: image(prof, 1000)}
    async with rtu_line(units) as (_, bus):
        with pytest.raises(DeviceError) as info:
            await bus.read(9, Table.INPUT, 5, 1, 0.1)
        assert info.value.reason == "timeout"
        assert await bus.read(1, Table.INPUT, 5, 1, 0.5) == [7]


async def test_rtu_over_tcp_serial_server() -> None:
    prof = heidelberg_like()
    units = {1: image(prof, 1000), 2: image(prof, 2000)}
    async with SimServer.rtu_over_tcp("127.0.0.1", 0, units) as srv:
        bus: ModbusBus = RtuOverTcpBus("127.0.0.1", srv.port)
        try:
            a = await DeviceDriver(dev("a", 1), prof, bus).poll()
            srv.set_fault(2, FaultKind.GARBAGE)
            b = await DeviceDriver(dev("b", 2), prof, bus).poll()
            a2 = await DeviceDriver(dev("a", 1), prof, bus).poll()
        finally:
            await bus.close()
    assert a.online and a.values["energy_wh"] == 98765
    assert (b.online, b.error) == (False, "bad_frame")
    assert a2.online and a2.values["power_w"] == 1000


@pytest.mark.parametrize(
    ("timeout_s", "delay_s", "online"),
    [(0.2, 0.5, False), (0.2, 0.05, True), (1.0, 0.5, True)],
)
async def test_a_bus_waits_for_an_answer_as_long_as_its_timeout(
    timeout_s: float, delay_s: float, online: bool
) -> None:
    """The timeout a request is given is the one the bus waits (not a fixed one): a device
    slower than it is offline with ``timeout``, a faster one online."""
    prof = heidelberg_like()
    async with SimServer.rtu_over_tcp("127.0.0.1", 0, {1: image(prof, 1000)}) as srv:
        srv.set_fault(1, Fault(delay_s=delay_s))
        bus = RtuOverTcpBus("127.0.0.1", srv.port)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            sample = await DeviceDriver(dev("a", 1, timeout_s), prof, bus).poll()
            took_s = loop.time() - started
        finally:
            await bus.close()
    assert sample.online is online
    if online:
        assert sample.values["power_w"] == 1000
    else:
        assert sample.error == "timeout"
        assert timeout_s <= took_s < delay_s


@pytest.mark.parametrize(
    ("bus_timeout", "device_timeout", "online"),
    [
        ("200ms", None, False),
        ("1s", None, True),
        ("200ms", "1s", True),
        ("1s", "200ms", False),
    ],
)
async def test_buses_timeout_is_the_answer_timeout_of_its_devices(
    tmp_path: Path, bus_timeout: str, device_timeout: str | None, online: bool
) -> None:
    """``buses[].timeout`` from a config file reaches the bus; a device's own timeout wins.
    The meter answers after 0.5 s."""
    from gateway.profiles import load_profiles
    from gateway.sim.devices import SimMeter

    profiles = load_profiles()
    img = RegisterImage()
    SimMeter(profiles["eastron-sdm630"], img, seed=1)
    own = f", timeout: {device_timeout}" if device_timeout else ""
    async with SimServer.rtu_over_tcp("127.0.0.1", 0, {2: img}) as srv:
        srv.set_fault(2, Fault(delay_s=0.5))
        site = tmp_path / "site.yaml"
        site.write_text(
            "site: {id: s1}\nstorage: {path: ./b.db}\n"
            "buses:\n  - {id: line, type: rtu-over-tcp, host: 127.0.0.1, "
            f"tcp_port: {srv.port}, timeout: {bus_timeout}}}\n"
            f"devices:\n  - {{id: m1, driver: eastron-sdm630, bus: line, unit: 2{own}}}\n"
        )
        sample = await read_device_once(load_config(site), "m1", profiles)
    assert (sample.online, sample.error) == (online, None if online else "timeout")


async def test_scan_a_serial_line_skips_silent_units_after_one_probe() -> None:
    from gateway.profiles import load_profiles
    from gateway.sim.devices import SimMeter

    profiles = load_profiles()
    sdm, em24 = RegisterImage(), RegisterImage()
    SimMeter(profiles["eastron-sdm630"], sdm, seed=1)
    SimMeter(profiles["carlo-gavazzi-em24"], em24, seed=1)
    async with (
        pty_pair() as (gateway_end, sim_end),
        SimServer.rtu(sim_end, {2: sdm, 7: em24}, baudrate=9600) as _,
    ):
        result = await scan(
            profiles, serial=gateway_end, bauds=[9600], units=range(1, 9), timeout_s=0.1
        )
    found = {(m.unit, m.slug) for m in result.matches}
    assert (2, "eastron-sdm630") in found and (7, "carlo-gavazzi-em24") in found
    assert {u for u, _ in found} == {2, 7}
    rtu_with_identify = [
        p for p in profiles.values() if p.identify and "rtu" in p.connection.transports
    ]
    # each of the six silent units costs one probe per serial setting tried, not one per profile
    settings = {(p.connection.parity, p.connection.stopbits) for p in rtu_with_identify}
    assert result.probed <= 6 * len(settings) + 2 * len(rtu_with_identify)
    snippet = result.config_snippet()
    assert f"type: rtu, port: {gateway_end}, baudrate: 9600, parity: N, stopbits: 1" in snippet
    assert "driver: carlo-gavazzi-em24, bus: rs485-1, unit: 7" in snippet


async def test_even_parity_line_settings_on_a_pty_are_ignored_not_fatal() -> None:
    # `evgw simulate` stands in for RS-485 with a pty; a site config for an 8E1 device
    # (Heidelberg) must still poll it. Linux refuses parity on a pty (EINVAL).
    from gateway.modbus.bus import is_pseudo_terminal

    profile = heidelberg_like()
    async with (
        pty_pair() as (gateway_end, sim_end),
        SimServer.rtu(sim_end, {1: image(profile, 3650)}, baudrate=BAUD),
    ):
        assert is_pseudo_terminal(gateway_end)
        bus = SerialBus(gateway_end, BAUD, "E", 1, 8)
        try:
            words = await bus.read(1, Table.INPUT, 14, 1, timeout_s=1.0)
        finally:
            await bus.close()
    assert words == [3650]
    assert not is_pseudo_terminal("/dev/ttyUSB0")


async def test_scan_tries_the_disputed_baud_rate_when_the_default_finds_nothing() -> None:
    """An SDM120 left at 9600 baud (its profile says 2400, evcc's sample 9600): the scan finds
    nothing at 2400, then tries 9600. The simulated meter answers only at its own speed, read
    from the gateway's end of the pty (a pty carries bytes at any speed; a wire does not)."""
    from gateway.profiles import load_profiles
    from gateway.sim.devices import SimMeter

    shipped = load_profiles()
    profiles = {s: shipped[s] for s in ("eastron-sdm120", "carlo-gavazzi-em24")}  # 2400, 9600
    assert shipped["eastron-sdm120"].connection.serial_alternatives == ((9600, "N", 1),)
    for meter_baud, expect_alternative in ((9600, True), (2400, False)):
        sdm = RegisterImage()
        SimMeter(shipped["eastron-sdm120"], sdm, seed=1)
        async with (
            pty_pair() as (gateway_end, sim_end),
            SimServer.rtu(sim_end, {3: sdm}, baudrate=meter_baud, line_peer=gateway_end) as srv,
        ):
            result = await scan(profiles, serial=gateway_end, units=range(1, 5), timeout_s=0.1)
        assert [(m.unit, m.slug, m.baudrate, m.alternative) for m in result.matches] == [
            (3, "eastron-sdm120", meter_baud, expect_alternative)
        ], meter_baud
        snippet = result.config_snippet()
        assert f"baudrate: {meter_baud}, parity: N" in snippet
        assert "driver: eastron-sdm120, bus: rs485-1, unit: 3" in snippet
        if expect_alternative:
            # the four SDM120 probes at 2400 went unanswered: the wire check holds
            assert srv.wrong_speed_frames >= 4
        else:
            assert srv.wrong_speed_frames >= 4  # the EM24 probes at 9600
            assert result.probed == 4 + 4  # no second pass: 2400 found it


async def test_scan_finds_nothing_at_a_speed_no_profile_names() -> None:
    from gateway.profiles import load_profiles
    from gateway.sim.devices import SimMeter

    shipped = load_profiles()
    sdm = RegisterImage()
    SimMeter(shipped["eastron-sdm120"], sdm, seed=1)
    async with (
        pty_pair() as (gateway_end, sim_end),
        SimServer.rtu(sim_end, {3: sdm}, baudrate=4800, line_peer=gateway_end),
    ):
        result = await scan(
            {"eastron-sdm120": shipped["eastron-sdm120"]},
            serial=gateway_end,
            units=range(1, 5),
            timeout_s=0.1,
        )
    assert result.matches == [] and result.probed == 8  # 4 units at 2400, then at 9600
