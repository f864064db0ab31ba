"""Scenario 1, poll saturation: N simulated chargers over Modbus TCP on loopback, polled as fast
as possible. Gateway path: ``DeviceDriver.poll`` (bus, decode, state, tag) with every sample's
values encoded as it arrives and batched into ``Store.add_wire_readings`` (500 a transaction,
as the app does). Baseline: a bare pymodbus ``AsyncModbusTcpClient`` per device reading the
same register blocks in a loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from bench.common import HOST, PROFILE, Result, SimProcess, Size, cpu_seconds, tempdir
from gateway.config import DeviceConfig
from gateway.modbus.bus import TcpBus
from gateway.modbus.driver import DeviceDriver
from gateway.modbus.types import Table
from gateway.profiles import load_profiles
from gateway.store import Store
from gateway.wire import encode_reading

TARGET_RATIO = 0.8
TARGET_CPU_RATIO = 1.25  # issue 14: CPU per poll <= 1.25 x raw
BATCH = 500


def make_drivers(ports: list[int], *, interval_s: float = 1.0) -> list[DeviceDriver]:
    profile = load_profiles()[PROFILE]
    return [
        DeviceDriver(
            DeviceConfig(
                id=f"cp{i}",
                driver=PROFILE,
                host=HOST,
                port=port,
                poll_interval_s=interval_s,
                timeout_s=2.0,
            ),
            profile,
            TcpBus(HOST, port),
        )
        for i, port in enumerate(ports)
    ]


async def gateway_polls(
    ports: list[int], duration_s: float, db_path: Any, *, store_samples: bool = True
) -> dict[str, float]:
    """``store_samples=False``: the samples are encoded and batched, and the batches dropped,
    not stored (to tell the share of the database apart; the raw loop stores nothing)."""
    drivers = make_drivers(ports)
    pending: list[tuple[str, float, bytes]] = []
    full = asyncio.Event()
    counts = [0]
    offline = [0]
    stored = [0]
    stop: list[bool] = []  # a flag, not cancellation: let every poll finish cleanly
    async with Store.open(db_path, site_id="bench", reserve_bytes=0) as store:

        async def writer() -> None:
            while True:
                await full.wait()
                full.clear()
                batch = pending[:]
                del pending[:]
                if store_samples:
                    await store.add_wire_readings(batch)
                    stored[0] += len(batch)

        async def loop(driver: DeviceDriver) -> None:
            while not stop:
                sample = await driver.poll()
                counts[0] += 1
                if sample.online:
                    # as gateway/app.py does: encoded now, stored in batches
                    wire = encode_reading(sample.ts, sample.values)
                    pending.append((sample.device_id, sample.ts, wire))
                    if len(pending) >= BATCH:
                        full.set()
                else:
                    offline[0] += 1
                    # a bus backing off fails without awaiting anything: let the loop breathe
                    await asyncio.sleep(0.01)

        for d in drivers:  # connect outside the timed part
            await d.poll()
        async with asyncio.TaskGroup() as tg:
            w = tg.create_task(writer())
            tasks = [tg.create_task(loop(d)) for d in drivers]
            await asyncio.sleep(0.3)  # warm-up
            start_n, start_t, start_cpu = counts[0], time.perf_counter(), cpu_seconds()
            await asyncio.sleep(duration_s)
            n, t = counts[0] - start_n, time.perf_counter() - start_t
            cpu = cpu_seconds() - start_cpu
            stop.append(True)
            await asyncio.gather(*tasks)
            w.cancel()
        for d in drivers:
            await d.bus.close()
    return {"polls": n, "seconds": t, "cpu_s": cpu, "offline": offline[0], "stored": stored[0]}


def raw_blocks() -> list[tuple[Table, int, int]]:
    drivers = make_drivers([502])
    return [(b.table, b.address, b.count) for b in drivers[0].blocks if b.every_s is None]


async def raw_polls(ports: list[int], duration_s: float) -> dict[str, float]:
    blocks = raw_blocks()
    clients = [AsyncModbusTcpClient(HOST, port=p, timeout=5, retries=0) for p in ports]
    for c in clients:
        await c.connect()
    counts = [0]
    errors = [0]
    # Stop by flag, not by cancelling: pymodbus turns a cancelled request into an I/O error.
    stop: list[bool] = []

    async def loop(client: AsyncModbusTcpClient) -> None:
        methods = {
            Table.HOLDING: client.read_holding_registers,
            Table.INPUT: client.read_input_registers,
            Table.COIL: client.read_coils,
            Table.DISCRETE: client.read_discrete_inputs,
        }
        while not stop:
            try:
                for table, address, count in blocks:
                    rr = await methods[table](address, count=count, device_id=1)
                    if rr.isError():
                        raise RuntimeError(f"raw read failed: {rr}")
            except ModbusException:
                errors[0] += 1  # counted like the gateway's offline polls
                await asyncio.sleep(0.01)
                continue
            counts[0] += 1

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(loop(c)) for c in clients]
            await asyncio.sleep(0.3)
            start_n, start_t, start_cpu = counts[0], time.perf_counter(), cpu_seconds()
            await asyncio.sleep(duration_s)
            n, t = counts[0] - start_n, time.perf_counter() - start_t
            cpu = cpu_seconds() - start_cpu
            stop.append(True)
            del tasks
    finally:
        for c in clients:
            c.close()
    return {"polls": n, "seconds": t, "cpu_s": cpu, "errors": errors[0]}


def _sum(parts: list[dict[str, float]]) -> dict[str, float]:
    """Slices added up: polls, seconds and CPU seconds; rates and costs from the totals."""
    polls = sum(p["polls"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    cpu = sum(p["cpu_s"] for p in parts)
    out = {k: sum(p.get(k, 0.0) for p in parts) for k in ("offline", "errors", "stored")}
    out.update(polls_per_s=polls / seconds, cpu_us_per_poll=cpu / max(polls, 1) * 1e6)
    return out


async def _take_turns(
    sim: SimProcess,
    raw_parts: list[dict[str, float]],
    gw_parts: list[dict[str, float]],
    unstored_parts: list[dict[str, float]],
    tmp: Path,
    slices: int,
    slice_s: float,
    unstored: bool,
) -> None:
    """Raw and gateway take turns in short slices, so a change in the machine's load during the
    run weighs on both alike (one long stretch each drifted)."""
    async with asyncio.timeout(slices * (3 * slice_s + 30) + 60):
        for k in range(slices):
            raw_parts.append(await raw_polls(sim.ports, slice_s))
            gw_parts.append(await gateway_polls(sim.ports, slice_s, tmp / f"poll{k}.db"))
            if unstored:
                unstored_parts.append(
                    await gateway_polls(
                        sim.ports, slice_s, tmp / f"unstored{k}.db", store_samples=False
                    )
                )


async def run(size: Size) -> Result:
    devices = size.pick(20, 50)
    slices, slice_s = size.pick(2, 4), size.pick(0.75, 2.0)
    result = Result("poll", f"1. Poll saturation ({devices} devices, Modbus TCP loopback)")
    raw_parts: list[dict[str, float]] = []
    gw_parts: list[dict[str, float]] = []
    unstored_parts: list[dict[str, float]] = []
    with tempdir() as tmp:
        async with SimProcess(devices) as sim:
            # full runs only take the unstored turns (--quick stays well under CI's 90 s)
            await _take_turns(
                sim, raw_parts, gw_parts, unstored_parts, tmp, slices, slice_s, not size.quick
            )
            sim.check_alive()
    raw, gw = _sum(raw_parts), _sum(gw_parts)
    unstored = _sum(unstored_parts) if unstored_parts else None
    result.add("gateway polls/s", gw["polls_per_s"], "1/s")
    result.add("raw pymodbus polls/s", raw["polls_per_s"], "1/s")
    result.add("requests per poll", float(len(raw_blocks())), "")
    result.add(
        "ratio gateway/raw", gw["polls_per_s"] / raw["polls_per_s"], "", at_least=TARGET_RATIO
    )
    result.add("gateway CPU per poll", gw["cpu_us_per_poll"], "us")
    result.add("raw CPU per poll", raw["cpu_us_per_poll"], "us")
    result.add(
        "CPU ratio gateway/raw",
        gw["cpu_us_per_poll"] / raw["cpu_us_per_poll"],
        "",
        at_most=TARGET_CPU_RATIO,
    )
    if unstored is not None:
        result.add("gateway CPU per poll, samples not stored", unstored["cpu_us_per_poll"], "us")
        result.add(
            "CPU ratio gateway/raw, samples not stored",
            unstored["cpu_us_per_poll"] / raw["cpu_us_per_poll"],
            "",
        )
    result.add("offline polls (gateway)", gw["offline"], "", at_most=0)
    result.add("failed polls (raw)", raw["errors"], "")
    result.notes.append(
        "Both sides poll the same simulator process (one Python event loop serving every "
        "device on the other core); its speed bounds both figures alike. The gateway's CPU "
        "includes encoding every sample into its wire form and storing it in batches of 500 "
        "(Store.add_wire_readings: the app's real work, so it stays in the target line); the "
        "raw loop stores nothing. 'samples not stored' is the same gateway loop run again with "
        "its encoded batches dropped instead of written, to show the database's share. "
        f"Raw, gateway (and, in full runs, unstored) take turns in {slices} slices of "
        f"{slice_s:g} s each; each figure is over the sum of its slices."
    )
    return result
