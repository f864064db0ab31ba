"""The profile-driven engine against simulated devices over real Modbus TCP on loopback."""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config import BusConfig, DeviceConfig, GatewayConfig, SiteConfig, StorageConfig
from gateway.errors import DeviceError
from gateway.modbus.bus import Backoff, BusPool, TcpBus, rtu_frame_gap_s
from gateway.modbus.codec import encode
from gateway.modbus.commands import read_device_once
from gateway.modbus.driver import Chargers, DeviceDriver
from gateway.modbus.poller import DevicePoller
from gateway.modbus.scan import parse_units, scan
from gateway.modbus.types import DataType, RegisterSpec, Table
from gateway.model import ChargerStatus, DeviceKind, DeviceSample, IecState
from gateway.profiles import (
    Condition,
    ConnectionSpec,
    ControlSpec,
    CurrentLimitSpec,
    HeartbeatSpec,
    IdentifySpec,
    Profile,
    StateRule,
    StateSpec,
    TagSpec,
)
from gateway.sim.registers import RegisterImage
from gateway.sim.server import Fault, FaultKind, SimServer

H, IN, COIL = Table.HOLDING, Table.INPUT, Table.COIL


# -- hand-built profiles (the shapes of real ones: Vestel-like charger, SDM-like meter) --------
def r(
    name: str, table: Table, address: int, dtype: DataType, count: int | None = None, **kw: object
) -> RegisterSpec:
    n = count if count is not None else (dtype.fixed_count or 1)
    return RegisterSpec(name, table, address, dtype, n, **kw)  # type: ignore[arg-type]


def charger_profile(**conn: object) -> Profile:
    regs = (
        r("cp_state", IN, 1000, DataType.U16),
        r("cable_state", IN, 1004, DataType.U16),
        r("power_w", IN, 1020, DataType.U32),
        r("energy_wh", IN, 1036, DataType.U32, scale=100.0),
        r("rfid", IN, 1516, DataType.ASCII1, 15),
        r("serial", IN, 100, DataType.ASCII1, 25, every_s=3600.0),
    )
    rules = (
        StateRule((Condition("cp_state", equals=(2,)),), IecState.C, ChargerStatus.CHARGING),
        StateRule((Condition("cable_state", min=2),), IecState.B, ChargerStatus.PREPARING),
        StateRule((Condition("cable_state", equals=(0, 1)),), IecState.A, ChargerStatus.AVAILABLE),
    )
    limit = ControlSpec(r("set_current", H, 5004, DataType.U16), 6)
    hb = ControlSpec(r("alive", H, 6000, DataType.U16), 6)
    return Profile(
        slug="test-charger",
        kind=DeviceKind.CHARGER,
        manufacturer="Test",
        model="Charger",
        connection=ConnectionSpec(**conn),  # type: ignore[arg-type]
        registers=regs,
        state=StateSpec(rules),
        tag=TagSpec("rfid", frozenset({"", "00000000"})),
        current_limit=CurrentLimitSpec(limit, "A", 6.0, 32.0, 0),
        heartbeat=HeartbeatSpec(hb, 1, 0.1, 1.0),
        identify=IdentifySpec(r("serial", IN, 100, DataType.ASCII1, 25), pattern="^VST"),
    )


def meter_profile() -> Profile:
    regs = tuple(
        r(name, IN, addr, DataType.F32)
        for name, addr in [
            ("voltage_l1_v", 0x00),
            ("voltage_l2_v", 0x02),
            ("voltage_l3_v", 0x04),
            ("current_l1_a", 0x06),
            ("power_w", 0x34),
            ("energy_wh", 0x48),
        ]
    )
    regs = (*regs[:-1], replace(regs[-1], scale=1000.0))
    return Profile(
        slug="test-meter",
        kind=DeviceKind.METER,
        manufacturer="Test",
        model="Meter",
        registers=regs,
        identify=IdentifySpec(r("frequency_hz", IN, 0x46, DataType.F32), min=45.0, max=65.0),
    )


def fill(image: RegisterImage, profile: Profile, values: dict[str, object]) -> None:
    for name, value in values.items():
        spec = profile.register(name)
        image.set(spec.table, spec.address, encode(spec, value))  # type: ignore[arg-type]


CHARGER_VALUES = {
    "cp_state": 2,
    "cable_state": 3,
    "power_w": 11040,
    "energy_wh": 1234500.0,
    "rfid": "04a2b3c4",
    "serial": "VST-0001",
}


def device(dev_id: str, unit: int, port: int, **kw: object) -> DeviceConfig:
    # a generous timeout: a loaded CI machine can take longer than 50 ms to accept a connection;
    # the tests about timeouts ask for a short one themselves
    base: dict[str, object] = {"poll_interval_s": 0.1, "timeout_s": 0.5}
    base.update(kw)
    return DeviceConfig(
        id=dev_id, driver="test-charger", host="127.0.0.1", port=port, unit=unit, **base
    )  # type: ignore[arg-type]


@asynccontextmanager
async def charger_server(
    units: list[int],
) -> AsyncIterator[tuple[SimServer, dict[int, RegisterImage]]]:
    prof = charger_profile()
    images = {u: RegisterImage() for u in units}
    for u, img in images.items():
        fill(img, prof, {**CHARGER_VALUES, "power_w": 1000 * u})
    async with SimServer.tcp("127.0.0.1", 0, images) as srv:
        yield srv, images


# -- decoding and planning over the wire --------------------------------------------------------
async def test_driver_decodes_a_charger_and_coalesces_reads() -> None:
    prof = charger_profile()
    async with charger_server([1]) as (srv, images):
        bus = TcpBus("127.0.0.1", srv.port)
        driver = DeviceDriver(device("cp1", 1, srv.port), prof, bus)
        sample = await driver.poll()
        assert sample.online and sample.error is None
        assert sample.values == {
            "cp_state": 2,
            "cable_state": 3,
            "power_w": 1000,
            "energy_wh": 1234500.0,
            "rfid": "04a2b3c4",
            "serial": "VST-0001",
        }
        assert (sample.iec, sample.status) == (IecState.C, ChargerStatus.CHARGING)
        assert sample.tag == "04A2B3C4"  # normalised upper case
        # 1000..1005 in one read; 1020 and 1036 apart (holes > 8); 1516 alone; serial slow.
        assert [(b.address, b.count, b.every_s) for b in driver.blocks] == [
            (1000, 5, None),
            (1020, 2, None),
            (1036, 2, None),
            (1516, 15, None),
            (100, 25, 3600.0),
        ]
        assert images[1].reads == 5
        second = await driver.poll()
        assert images[1].reads == 9  # the slow block is not due again
        assert second.values["serial"] == "VST-0001"  # served from the cache
        await bus.close()


async def test_single_value_reads_and_gap_setting_change_the_request_count() -> None:
    async with charger_server([1]) as (srv, images):
        bus = TcpBus("127.0.0.1", srv.port)
        wide = DeviceDriver(device("a", 1, srv.port), charger_profile(max_gap=40), bus)
        await wide.poll()
        assert images[1].reads == 3  # 1000..1037 in one read, 1516, serial
        single = DeviceDriver(
            device("b", 1, srv.port), charger_profile(single_value_reads=True), bus
        )
        before = images[1].reads
        assert (await single.poll()).online
        assert images[1].reads - before == 6
        await bus.close()


async def test_meter_floats_and_missing_tag() -> None:
    prof = meter_profile()
    img = RegisterImage()
    fill(
        img,
        prof,
        {"voltage_l1_v": 230.5, "current_l1_a": 16.0, "power_w": 3680.0, "energy_wh": 12500.0},
    )
    async with SimServer.tcp("127.0.0.1", 0, {2: img}) as srv:
        bus = TcpBus("127.0.0.1", srv.port)
        dev = DeviceConfig(id="m1", driver="test-meter", host="127.0.0.1", port=srv.port, unit=2)
        sample = await DeviceDriver(dev, prof, bus).poll()
        await bus.close()
    assert sample.online and sample.iec is None and sample.status is None and sample.tag is None
    assert sample.values["voltage_l1_v"] == pytest.approx(230.5)
    assert sample.energy_wh == pytest.approx(12500.0)
    assert sample.power_w == pytest.approx(3680.0)
    assert img.reads == 3  # 0x00..0x07, 0x34..0x35, 0x48..0x49 (holes above max_gap)


@pytest.mark.parametrize("rfid", ["", "00000000", "   "])
async def test_empty_tag_values_mean_no_tag(rfid: str) -> None:
    prof = charger_profile()
    async with charger_server([1]) as (srv, images):
        fill(images[1], prof, {"rfid": rfid})
        bus = TcpBus("127.0.0.1", srv.port)
        sample = await DeviceDriver(device("cp1", 1, srv.port), prof, bus).poll()
        await bus.close()
    assert sample.online and sample.tag is None


async def test_drivers_of_one_profile_share_its_plan_and_keep_their_own_tags() -> None:
    prof = charger_profile()
    async with charger_server([1, 2]) as (srv, images):
        fill(images[1], prof, {"rfid": "CAFE01"})
        fill(images[2], prof, {"rfid": "BEEF02"})
        bus = TcpBus("127.0.0.1", srv.port)
        one = DeviceDriver(device("cp1", 1, srv.port), prof, bus)
        two = DeviceDriver(device("cp2", 2, srv.port), prof, bus)
        tags = []
        for rfid in ("CAFE01", "D00D03"):
            fill(images[1], prof, {"rfid": rfid})
            tags.append(((await one.poll()).tag, (await two.poll()).tag))
        await bus.close()
    shared = zip(one._plan, two._plan, strict=True)
    assert all(a[2] is b[2] and a[3] is not b[3] for a, b in shared)  # decoders shared, memos not
    assert tags == [("CAFE01", "BEEF02"), ("D00D03", "BEEF02")]


# -- failures are data, logged once per change -------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (FaultKind.NO_ANSWER, "timeout"),
        (FaultKind.EXCEPTION, "exception_response"),
        (FaultKind.GARBAGE, "bad_frame"),
        (FaultKind.DROP, "connection_lost"),
    ],
)
async def test_faults_become_offline_samples_logged_once(kind: FaultKind, reason: str) -> None:
    prof = charger_profile()
    async with charger_server([1]) as (srv, _):
        bus = TcpBus("127.0.0.1", srv.port)
        driver = DeviceDriver(device("cp1", 1, srv.port, timeout_s=0.2), prof, bus)
        assert (await driver.poll()).online
        srv.set_fault(1, kind)
        with capture_logs() as logs:
            first = await driver.poll()
            second = await driver.poll()
            srv.clear_fault(1)
            third = await driver.poll()
        await bus.close()
    assert (first.online, first.error, first.values) == (False, reason, {})
    assert not second.online
    assert third.online and third.values["power_w"] == 1000
    mine = [(e["event"], e["log_level"]) for e in logs if e.get("device") == "cp1"]
    assert mine[0] == ("device_offline", "warning")
    assert [e for e, _ in mine].count("device_offline") == 1
    assert ("device_online", "info") in mine
    offline_event = next(e for e in logs if e["event"] == "device_offline")
    assert offline_event["reason"] == reason


async def test_exception_response_carries_the_code() -> None:
    async with charger_server([1]) as (srv, _):
        srv.set_fault(1, Fault(FaultKind.EXCEPTION, code=2))
        bus = TcpBus("127.0.0.1", srv.port)
        with pytest.raises(DeviceError) as info:
            await bus.read(1, H, 0, 1, 0.5)
        await bus.close()
    assert info.value.reason == "exception_response" and info.value.exception_code == 2


async def test_each_request_times_out_at_its_own_deadline() -> None:
    # The bus keeps one watchdog timer, re-armed when it fires early, not one timer a request:
    # a short timeout after a long one still fires on time, a request after a quick one still
    # gets all of its own timeout, and a slow answer inside its timeout is never cut short.
    async with charger_server([1]) as (srv, _):
        bus = TcpBus("127.0.0.1", srv.port)
        loop = asyncio.get_running_loop()
        assert await bus.read(1, IN, 1000, 1, 5.0) == [2]  # leaves a watchdog due in 5 s
        srv.set_fault(1, FaultKind.NO_ANSWER)
        t0 = loop.time()
        with pytest.raises(DeviceError) as short:
            await bus.read(1, IN, 1000, 1, 0.1)
        assert short.value.reason == "timeout"
        assert 0.09 <= loop.time() - t0 < 1.0
        srv.clear_fault(1)
        assert await bus.read(1, IN, 1000, 1, 0.2) == [2]  # a watchdog due in 0.2 s
        srv.set_fault(1, Fault(FaultKind.NONE, delay_s=0.35))
        assert await bus.read(1, IN, 1000, 1, 1.0) == [2]  # answered after 0.35 s: in time
        srv.clear_fault(1)
        assert await bus.read(1, IN, 1000, 1, 0.2) == [2]
        srv.set_fault(1, FaultKind.NO_ANSWER)
        t0 = loop.time()
        with pytest.raises(DeviceError) as long:
            await bus.read(1, IN, 1000, 1, 0.4)
        assert long.value.reason == "timeout"
        assert 0.39 <= loop.time() - t0 < 1.5
        await bus.close()


async def test_unreachable_endpoint_backs_off_without_blocking_another_bus() -> None:
    async with charger_server([1]) as (srv, _):
        # A port nobody listens on: take a free port from a server we then close.
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead_port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        dead = TcpBus("127.0.0.1", dead_port, backoff=Backoff(0.5, 30.0, 0.2))
        live = TcpBus("127.0.0.1", srv.port)
        with pytest.raises(DeviceError) as first:
            await dead.read(1, H, 0, 1, 0.2)
        assert first.value.reason == "connect_failed"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeviceError) as second:
            await dead.read(1, H, 0, 1, 0.2)
        assert second.value.reason == "connect_failed" and "retry in" in second.value.detail
        assert loop.time() - t0 < 0.05  # fails fast while backing off
        assert await live.read(1, IN, 1000, 1, 0.2) == [2]
        await dead.close()
        await live.close()


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    b = Backoff(0.5, 30.0, 0.2)
    delays = [b.next_delay() for _ in range(10)]
    nominal = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for got, want in zip(delays, nominal, strict=True):
        assert want * 0.8 <= got <= want * 1.2
    b.reset()
    assert 0.4 <= b.next_delay() <= 0.6


def test_rtu_frame_gap() -> None:
    assert rtu_frame_gap_s(9600) == pytest.approx(3.5 * 11 / 9600)  # ~4.01 ms
    assert rtu_frame_gap_s(2400) == pytest.approx(0.016042, rel=1e-3)
    assert rtu_frame_gap_s(19200) == pytest.approx(0.002005, rel=1e-3)
    assert rtu_frame_gap_s(115200) == 0.00175


# -- the poller: isolation, schedule, heartbeats -----------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, DeviceSample]]] = {}

    def __call__(self, sample: DeviceSample) -> None:
        t = asyncio.get_running_loop().time()
        self.samples.setdefault(sample.device_id, []).append((t, sample))

    def online(self, dev: str, since: float = 0.0) -> list[bool]:
        return [s.online for t, s in self.samples.get(dev, []) if t >= since]


async def run_for(poller: DevicePoller, seconds: float) -> None:
    task = asyncio.create_task(poller.run(), name="poller")
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", [FaultKind.NO_ANSWER, FaultKind.EXCEPTION, FaultKind.GARBAGE, FaultKind.DROP]
)
async def test_fault_on_one_device_leaves_the_others_on_time(kind: FaultKind) -> None:
    prof = charger_profile()
    async with AsyncExitStack() as stack:
        srv_a, _ = await stack.enter_async_context(charger_server([1, 2, 3]))
        srv_b, _ = await stack.enter_async_context(charger_server([1]))
        bus_a = TcpBus("127.0.0.1", srv_a.port)
        bus_b = TcpBus("127.0.0.1", srv_b.port)
        stack.push_async_callback(bus_a.close)
        stack.push_async_callback(bus_b.close)
        # no heartbeat here: this test is about polls
        prof = replace(prof, heartbeat=None)
        drivers = [
            DeviceDriver(device("a1", 1, srv_a.port, timeout_s=0.05), prof, bus_a),
            DeviceDriver(device("a2", 2, srv_a.port, timeout_s=0.05), prof, bus_a),
            DeviceDriver(device("a3", 3, srv_a.port, timeout_s=0.05), prof, bus_a),
            DeviceDriver(device("b1", 1, srv_b.port, timeout_s=0.05), prof, bus_b),
        ]
        rec = Recorder()
        poller = DevicePoller(drivers, rec)
        srv_a.set_fault(2, kind)
        task = asyncio.create_task(poller.run(), name="poller")
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(1.0)
        cleared = loop.time()
        srv_a.clear_fault(2)
        await asyncio.sleep(0.6)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for dev in ("a1", "a3", "b1"):
        states = rec.online(dev)
        assert all(states), (dev, states)
        times = [t for t, _ in rec.samples[dev]]
        assert len(times) >= 14, (dev, len(times))  # 1.6 s at 0.1 s
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) < 0.2, (dev, max(gaps))  # never a missed slot's worth late
        assert poller.stats[dev].missed_slots == 0
    faulty = rec.samples["a2"]
    assert not any(s.online for t, s in faulty if t < cleared)
    assert all(s.error for t, s in faulty if t < cleared)
    assert any(s.online for t, s in faulty if t > cleared + 0.2)
    assert faulty[-1][1].online
    assert start < cleared


async def test_fixed_schedule_skips_and_counts_missed_slots() -> None:
    prof = replace(charger_profile(), heartbeat=None)
    async with charger_server([1]) as (srv, _):
        bus = TcpBus("127.0.0.1", srv.port)
        times: list[float] = []

        async def slow_sink(sample: DeviceSample) -> None:
            times.append(sample.ts)  # taken when the poll starts, on the schedule
            if len(times) == 2:
                await asyncio.sleep(0.35)  # overrun: the slots at +0.2, +0.3, +0.4 are lost

        driver = DeviceDriver(device("cp1", 1, srv.port, poll_interval_s=0.1), prof, bus)
        poller = DevicePoller([driver], slow_sink)
        await run_for(poller, 0.88)
        await bus.close()
    assert poller.stats["cp1"].missed_slots == 3
    t0 = times[0]
    slots = [round((t - t0) / 0.1, 1) for t in times]
    # polls land on the original grid (no drift): 0, 1, then 5, 6, 7, 8
    assert slots[:2] == [0.0, 1.0]
    assert [round(s) for s in slots[2:]] == [5, 6, 7, 8]
    assert all(abs(s - round(s)) < 0.3 for s in slots)


async def test_poll_stats_tell_how_late_each_poll_started_against_its_slot() -> None:
    prof = replace(charger_profile(), heartbeat=None)
    async with charger_server([1]) as (srv, _):
        bus = TcpBus("127.0.0.1", srv.port)
        driver = DeviceDriver(device("cp1", 1, srv.port, poll_interval_s=0.1), prof, bus)
        lateness: list[float] = []
        poller = DevicePoller([driver], lambda s: lateness.append(stats.last_lateness_s))
        stats = poller.stats["cp1"]

        # the loop is stuck from +0.15 to +0.23 s: the slot at +0.2 s starts ~30 ms late
        asyncio.get_running_loop().call_later(0.15, time.sleep, 0.08)
        await run_for(poller, 0.45)
        await bus.close()
    assert len(lateness) >= 4
    assert max(lateness[:2]) < 0.02
    assert 0.02 < lateness[2] < 0.08
    assert all(x >= 0 for x in lateness)


async def test_devices_start_spread_over_their_interval_and_keep_their_phase() -> None:
    prof = replace(charger_profile(), heartbeat=None)
    async with charger_server([1, 2, 3, 4]) as (srv, _):
        bus = TcpBus("127.0.0.1", srv.port)
        drivers = [
            DeviceDriver(device(f"cp{u}", u, srv.port, poll_interval_s=0.2), prof, bus)
            for u in (1, 2, 3, 4)
        ]
        rec = Recorder()
        # 4 devices x 0.05 s: the window is the whole 0.2 s interval
        poller = DevicePoller(drivers, rec, spread_per_device_s=0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await run_for(poller, 0.95)
        await bus.close()
    for i, dev in enumerate(("cp1", "cp2", "cp3", "cp4")):
        times = [t - start for t, _ in rec.samples[dev]]
        # device i of 4 first polls i/4 of an interval in, then stays on its own grid
        assert times[0] == pytest.approx(i * 0.05, abs=0.03), (dev, times)
        slots = [(t - i * 0.05) / 0.2 for t in times]
        assert all(abs(s - round(s)) < 0.15 for s in slots), (dev, slots)
        assert [round(s) for s in slots] == list(range(len(slots))), (dev, slots)
        assert poller.stats[dev].missed_slots == 0


async def test_heartbeats_arrive_on_schedule_at_the_right_unit() -> None:
    prof = charger_profile()  # heartbeat: HR 6000 := 1 every 0.1 s
    async with charger_server([1, 2]) as (srv, images):
        writes: list[float] = []
        loop = asyncio.get_running_loop()

        def on_write(table: Table, address: int, words: list[int]) -> None:
            assert (table, address, words) == (H, 6000, [1])
            writes.append(loop.time())

        images[2].on_write = on_write
        bus = TcpBus("127.0.0.1", srv.port)
        # polls every 0.5 s: heartbeats must not wait for them
        driver = DeviceDriver(device("cp2", 2, srv.port, poll_interval_s=0.5), prof, bus)
        poller = DevicePoller([driver], lambda s: None)
        await run_for(poller, 0.56)
        await bus.close()
    assert images[1].writes == 0
    assert 5 <= len(writes) <= 7
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    assert all(0.07 < g < 0.13 for g in gaps), gaps
    assert poller.stats["cp2"].heartbeats == len(writes)
    assert poller.stats["cp2"].heartbeat_missed_slots == 0


# -- control writes ----------------------------------------------------------------------------
def with_limit(unit: str, dtype: DataType, function: int, disable: float | None = 0) -> Profile:
    prof = charger_profile()
    spec = r("set_current", H, 0x4100, dtype)
    return replace(
        prof, current_limit=CurrentLimitSpec(ControlSpec(spec, function), unit, 6.0, 32.0, disable)
    )


@pytest.mark.parametrize(
    ("profile", "amps", "words"),
    [
        (with_limit("A", DataType.U16, 6), 16, [16]),
        (with_limit("0.1A", DataType.U16, 6), 13.5, [135]),
        (with_limit("mA", DataType.U32, 16), 16, [0, 16000]),
        (
            with_limit("A", DataType.F32, 16),
            10.5,
            list(struct.unpack(">HH", struct.pack(">f", 10.5))),
        ),
        (with_limit("A", DataType.U16, 6), 40, [32]),  # capped at the device maximum
    ],
)
async def test_current_limit_lands_in_the_right_register_and_unit(
    profile: Profile, amps: float, words: list[int]
) -> None:
    async with charger_server([1, 2]) as (srv, images):
        bus = TcpBus("127.0.0.1", srv.port)
        driver = DeviceDriver(device("cp2", 2, srv.port, timeout_s=0.5), profile, bus)
        await driver.set_current_limit(amps)
        await bus.close()
    assert images[2].get(H, 0x4100, len(words)) == words
    assert images[1].writes == 0 and images[2].writes == 1


async def test_enable_via_current_limit_restores_the_last_limit_and_site_cap() -> None:
    prof = charger_profile()
    async with charger_server([1]) as (srv, images):
        bus = TcpBus("127.0.0.1", srv.port)
        driver = DeviceDriver(
            device("cp1", 1, srv.port, timeout_s=0.5, max_current_a=20.0), prof, bus
        )
        chargers = Chargers({"cp1": driver})
        assert chargers.can_control("cp1") and not chargers.can_control("nope")
        await chargers.set_enabled("cp1", True)  # nothing asked yet: the site cap
        assert images[1].get(H, 5004) == [20]
        await chargers.set_current_limit("cp1", 25)  # above the site cap
        assert images[1].get(H, 5004) == [20]
        await chargers.set_current_limit("cp1", 10)
        await chargers.set_enabled("cp1", False)
        assert images[1].get(H, 5004) == [0]  # the profile's disable value
        await chargers.set_enabled("cp1", True)
        assert images[1].get(H, 5004) == [10]
        await chargers.set_current_limit("cp1", 0)
        assert images[1].get(H, 5004) == [0]
        with pytest.raises(ValueError, match="below the minimum"):
            await chargers.set_current_limit("cp1", 3)
        with pytest.raises(DeviceError) as unknown:
            await chargers.set_enabled("ghost", True)
        assert unknown.value.reason == "unknown_device"
        srv.set_fault(1, FaultKind.EXCEPTION)
        with pytest.raises(DeviceError) as failed:
            await chargers.set_current_limit("cp1", 16)
        assert failed.value.reason == "exception_response"
        await bus.close()


async def test_enable_coil_is_written_with_fc5() -> None:
    enable = ControlSpec(r("enable", COIL, 400, DataType.BOOL), 5, on=1, off=0)
    prof = replace(charger_profile(), enable=enable)
    async with charger_server([7]) as (srv, images):
        bus = TcpBus("127.0.0.1", srv.port)
        driver = DeviceDriver(device("cp7", 7, srv.port, timeout_s=0.5), prof, bus)
        await driver.set_enabled(True)
        assert images[7].get(COIL, 400) == [1]
        await driver.set_enabled(False)
        assert images[7].get(COIL, 400) == [0]
        assert images[7].get(H, 5004) == [0]  # the current limit was not touched
        await bus.close()


async def test_no_control_is_refused() -> None:
    prof = meter_profile()
    bus = TcpBus("127.0.0.1", 1)
    driver = DeviceDriver(DeviceConfig(id="m1", driver="test-meter", host="127.0.0.1"), prof, bus)
    assert not driver.can_control
    with pytest.raises(DeviceError, match="not_supported"):
        await driver.set_enabled(True)
    with pytest.raises(DeviceError, match="not_supported"):
        await driver.set_current_limit(16)


# -- pool, one-shot read, scan -----------------------------------------------------------------
def site(devices: tuple[DeviceConfig, ...], buses: tuple[BusConfig, ...] = ()) -> GatewayConfig:
    return GatewayConfig(
        site=SiteConfig(id="t"),
        storage=StorageConfig(path="/nonexistent/x.db"),
        buses=buses,
        devices=devices,
    )


async def test_bus_pool_shares_one_bus_per_endpoint_and_bus_id() -> None:
    cfg = site(
        (
            DeviceConfig(id="a", driver="x", host="10.0.0.1", port=502, unit=1),
            DeviceConfig(id="b", driver="x", host="10.0.0.1", port=502, unit=2),
            DeviceConfig(id="c", driver="x", host="10.0.0.1", port=503, unit=1),
            DeviceConfig(id="d", driver="x", bus="line", unit=1),
            DeviceConfig(id="e", driver="x", bus="line", unit=2),
            DeviceConfig(id="f", driver="x", bus="gw", unit=3),
        ),
        (
            BusConfig(id="line", type="rtu", port="/dev/ttyUSB9", baudrate=19200, parity="E"),
            BusConfig(id="gw", type="rtu-over-tcp", host="10.0.0.9", tcp_port=4001),
        ),
    )
    async with BusPool.from_config(cfg) as pool:
        assert pool.bus_for("a") is pool.bus_for("b") is pool.bus_for(cfg.device("a"))
        assert pool.bus_for("a") is not pool.bus_for("c")
        assert pool.bus_for("d") is pool.bus_for("e")
        assert [b.endpoint for b in pool.buses] == [
            "serial:///dev/ttyUSB9",
            "rtu+tcp://10.0.0.9:4001",
            "tcp://10.0.0.1:502",
            "tcp://10.0.0.1:503",
        ]
        assert pool.bus_for("d").frame_gap_s == pytest.approx(rtu_frame_gap_s(19200))
    with pytest.raises(DeviceError, match="bus closed"):
        await pool.bus_for("a").read(1, H, 0, 1, 0.1)


async def test_read_device_once() -> None:
    async with charger_server([4]) as (srv, _):
        cfg = site((device("cp4", 4, srv.port, timeout_s=0.5),))
        sample = await read_device_once(cfg, "cp4", {"test-charger": charger_profile()})
        srv.set_fault(4, FaultKind.NO_ANSWER)
        offline = await read_device_once(cfg, "cp4", {"test-charger": charger_profile()})
    assert (
        sample.online
        and sample.values["power_w"] == 4000
        and sample.status is ChargerStatus.CHARGING
    )
    assert (offline.online, offline.error) == (False, "timeout")


async def test_scan_tcp_names_the_profiles_and_writes_a_snippet() -> None:
    charger, meter = charger_profile(), meter_profile()
    c_img, m_img = RegisterImage(), RegisterImage()
    fill(c_img, charger, {"serial": "VST-42"})
    fill(m_img, meter, {})
    spec = meter.identify.register  # type: ignore[union-attr]
    m_img.set(spec.table, spec.address, encode(spec, 50.0))
    async with SimServer.tcp("127.0.0.1", 0, {1: m_img, 255: c_img}) as srv:
        result = await scan(
            {"test-charger": charger, "test-meter": meter},
            tcp=f"127.0.0.1:{srv.port}",
            units=[1, 5, 255],
        )
    found = sorted((m.unit, m.slug, m.value) for m in result.matches)
    assert found == [(1, "test-meter", 50.0), (255, "test-charger", "VST-42")]
    snippet = result.config_snippet()
    assert f"driver: test-charger, host: 127.0.0.1, port: {srv.port}, unit: 255" in snippet
    assert snippet.startswith("devices:\n")


def test_scan_snippet_has_one_device_per_unit_and_passes_check_config(tmp_path: Path) -> None:
    # SDM120 and SDM630 answer the same identification register: one device, one alternative.
    from gateway.config import load_config
    from gateway.modbus.scan import ScanMatch, ScanResult

    result = ScanResult(
        "serial:///dev/ttyUSB0",
        serial="/dev/ttyUSB0",
        matches=[
            ScanMatch(2, "eastron-sdm120", 50.0, 9600, "N", 1),
            ScanMatch(2, "eastron-sdm630", 50.0, 9600, "N", 1),
            ScanMatch(3, "eastron-sdm630", 50.0, 9600, "N", 1),
        ],
    )
    snippet = result.config_snippet()
    assert snippet.count("unit: 2}") == 1 and "# or: eastron-sdm630" in snippet
    site = tmp_path / "site.yaml"
    site.write_text("site: {id: s1}\nstorage: {path: ./b.db}\n" + snippet)
    config = load_config(site)
    assert [d.unit for d in config.devices] == [2, 3]


def test_parse_units() -> None:
    assert parse_units("1-3,200, 255") == [1, 2, 3, 200, 255]
    assert parse_units(None) is None
    with pytest.raises(ValueError):
        parse_units("5-2")
    with pytest.raises(ValueError):
        parse_units("300")


# -- throughput --------------------------------------------------------------------------------
@pytest.mark.slow  # polls for one second by design
async def test_poll_loop_rate_against_a_loopback_sim(capsys: pytest.CaptureFixture[str]) -> None:
    """One device, polled back to back: requests/s of one poll loop (printed for the record)."""
    prof = replace(charger_profile(), heartbeat=None)
    async with charger_server([1]) as (srv, images):
        bus = TcpBus("127.0.0.1", srv.port)
        driver = DeviceDriver(device("cp1", 1, srv.port, timeout_s=1.0), prof, bus)
        await driver.poll()
        loop = asyncio.get_running_loop()
        before = images[1].reads
        t0 = loop.time()
        polls = 0
        while loop.time() - t0 < 1.0:
            assert (await driver.poll()).online
            polls += 1
        elapsed = loop.time() - t0
        await bus.close()
    requests = images[1].reads - before
    rate = requests / elapsed
    with capsys.disabled():
        per_poll = requests // polls
        print(f"\n[poll loop] {polls / elapsed:.0f} polls/s, {rate:.0f} req/s ({per_poll}/poll)")
    assert rate > 300
