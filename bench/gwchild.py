"""The measured side of the scale and memory scenarios, in its own process so that its CPU time
and RSS are its own (the simulators run in bench.serve, the runner elsewhere).

``python -m bench.gwchild --mode gateway|raw --ports 1,2,3 --interval-s 1 --duration-s 60
[--db PATH --prefill N]`` prints one JSON line of figures.

gateway: ``DeviceDriver`` x N under the real ``DevicePoller`` (fixed schedule, missed slots
counted), samples batched into ``Store.add_readings`` once a second as the app does.
raw: one bare pymodbus client per device reading the same blocks on the same fixed schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import tracemalloc
from array import array
from typing import Any

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from bench.common import HOST, cpu_seconds, raise_fd_limit, rss_mb
from bench.poll import make_drivers, raw_blocks
from gateway.modbus.poller import DevicePoller
from gateway.modbus.types import Table
from gateway.model import DeviceSample
from gateway.store import Store

WARMUP_S = 2.0


class Histogram:
    """Jitter counts in fixed buckets (50 us up to 5 s): a long run must not grow the probe's
    memory (a list of samples grew ~0.55 MB a minute at 300 polls/s, most of the 'growth' the
    first 10-minute run reported)."""

    RES_S = 50e-6
    BUCKETS = 100_000

    def __init__(self) -> None:
        self.counts = array("Q", bytes(8 * self.BUCKETS))
        self.n = 0
        self.max_s = float("nan")

    def add(self, value_s: float) -> None:
        value_s = abs(value_s)
        i = min(int(value_s / self.RES_S), self.BUCKETS - 1)
        self.counts[i] += 1
        self.n += 1
        if not value_s <= self.max_s:
            self.max_s = value_s

    def percentile(self, q: float) -> float:
        """The upper edge of the bucket holding the q-quantile (at most 50 us high)."""
        if self.n == 0:
            return float("nan")
        rank = q * (self.n - 1) + 1
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min((i + 1) * self.RES_S, self.max_s)
        return self.max_s


class Probe:
    """Poll start times against the fixed schedule, and RSS over time (bounded memory)."""

    def __init__(self, rss_every_s: float = 0.5) -> None:
        self.jitter = Histogram()
        # gateway mode: lateness against the first poll's actual start plus k intervals (what
        # this probe measured before 2026-12-02; a late first poll skews every later one)
        self.from_first = Histogram()
        self.rss: list[tuple[float, float]] = []
        self.rss_every_s = rss_every_s
        self.measuring = False

    def started(self, first: float, k: int, interval_s: float, now: float) -> None:
        if self.measuring:
            self.jitter.add(now - (first + k * interval_s))

    def late(self, lateness_s: float, first: float, k: int, interval_s: float, now: float) -> None:
        """A gateway poll started ``lateness_s`` after its slot in DevicePoller's schedule."""
        if self.measuring:
            self.jitter.add(lateness_s)
            self.from_first.add(now - (first + k * interval_s))

    async def sample_rss(self) -> None:
        t0 = time.monotonic()
        while True:
            self.rss.append((time.monotonic() - t0, rss_mb()[0]))
            await asyncio.sleep(self.rss_every_s)


async def gateway_mode(args: argparse.Namespace, probe: Probe) -> dict[str, Any]:
    drivers = make_drivers(args.ports, interval_s=args.interval_s)
    loop = asyncio.get_running_loop()
    pending: list[tuple[str, float, dict[str, Any]]] = []
    async with Store.open(args.db, site_id="bench", reserve_bytes=0, max_size_mb=8192) as store:
        for i in range(0, args.prefill, 5000):
            n = min(5000, args.prefill - i)
            await store.add_readings([(f"cp{j % 50}", 1.79e9 + i + j, _VALUES) for j in range(n)])

        def sink(sample: DeviceSample) -> None:
            if sample.online:
                pending.append((sample.device_id, sample.ts, dict(sample.values)))

        # --stagger K: K pollers started K-th of an interval apart, spreading the devices'
        # phases (DevicePoller itself spreads them over 2 ms a device, at most the interval).
        groups = max(1, args.stagger)
        pollers = [DevicePoller(drivers[g::groups], sink) for g in range(groups)]
        for g, poller in enumerate(pollers):
            for d in drivers[g::groups]:
                original = d.poll
                stats = poller.stats[d.device_id]
                state = {"first": None, "k": 0}

                async def timed(
                    original: Any = original, state: dict[str, Any] = state, stats: Any = stats
                ) -> Any:
                    # DevicePoller set the lateness against its slot just before this call
                    now = loop.time()
                    if state["first"] is None:
                        state["first"] = now
                    probe.late(
                        stats.last_lateness_s, state["first"], state["k"], args.interval_s, now
                    )
                    state["k"] += 1
                    return await original()

                d.poll = timed  # type: ignore[method-assign]

        async def writer() -> None:
            while True:
                await asyncio.sleep(1.0)
                batch = pending[:]
                del pending[:]
                await store.add_readings(batch)

        async def start(poller: DevicePoller, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            await poller.run()

        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(start(p, g * args.interval_s / groups))
                for g, p in enumerate(pollers)
            ]
            tasks.append(tg.create_task(writer()))
            tasks.append(tg.create_task(probe.sample_rss()))
            figures = await measured(args, probe)
            for task in tasks:
                task.cancel()
        for d in drivers:
            await d.bus.close()
    every = [s for p in pollers for s in p.stats.values()]
    figures["missed"] = sum(s.missed_slots for s in every)
    figures["offline"] = sum(s.offline for s in every)
    figures["polls"] = sum(s.polls for s in every)
    return figures


async def raw_mode(args: argparse.Namespace, probe: Probe) -> dict[str, Any]:
    blocks = raw_blocks()
    loop = asyncio.get_running_loop()
    clients = [AsyncModbusTcpClient(HOST, port=p, timeout=5, retries=0) for p in args.ports]
    missed = [0]
    errors = [0]

    async def poll_loop(client: AsyncModbusTcpClient) -> None:
        methods = {
            Table.HOLDING: client.read_holding_registers,
            Table.INPUT: client.read_input_registers,
        }
        first = loop.time()
        k = 0
        while True:
            probe.started(first, k, args.interval_s, loop.time())
            try:
                for table, address, count in blocks:
                    await methods[table](address, count=count, device_id=1)
            except ModbusException:
                errors[0] += 1
            k += 1
            now = loop.time()
            while first + k * args.interval_s < now:
                k += 1
                missed[0] += 1
            await asyncio.sleep(first + k * args.interval_s - now)

    for c in clients:
        await c.connect()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(poll_loop(c)) for c in clients]
        tasks.append(tg.create_task(probe.sample_rss()))
        figures = await measured(args, probe)
        for task in tasks:
            task.cancel()
    for c in clients:
        c.close()
    figures["missed"] = missed[0]
    figures["offline"] = errors[0]
    return figures


async def measured(args: argparse.Namespace, probe: Probe) -> dict[str, Any]:
    await asyncio.sleep(WARMUP_S)
    probe.measuring = True
    cpu0, t0 = cpu_seconds(), time.monotonic()
    if args.tracemalloc:
        # Where the growth comes from: snapshots at a quarter of the run and at its end.
        tracemalloc.start(8)
        await asyncio.sleep(args.duration_s / 4)
        first = tracemalloc.take_snapshot()
        await asyncio.sleep(args.duration_s * 3 / 4)
        growth = tracemalloc.take_snapshot().compare_to(first, "traceback")
        for stat in growth[:12]:
            print(
                f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks", file=sys.stderr
            )
            for line in stat.traceback.format()[-8:]:
                print("    " + line, file=sys.stderr)
        tracemalloc.stop()
    else:
        await asyncio.sleep(args.duration_s)
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - t0
    probe.measuring = False
    jitter = probe.jitter
    return {
        "cpu_share": cpu / wall,
        "wall_s": wall,
        "jitter_p50_ms": jitter.percentile(0.5) * 1000,
        "jitter_p99_ms": jitter.percentile(0.99) * 1000,
        "jitter_max_ms": jitter.max_s * 1000,
        "jitter_from_first_p99_ms": probe.from_first.percentile(0.99) * 1000,
    }


_VALUES: dict[str, Any] = {}


async def main_async(args: argparse.Namespace) -> None:
    from bench.ingest import sample_values

    _VALUES.update(sample_values())
    # at most ~1200 RSS samples however long the run
    probe = Probe(rss_every_s=max(0.5, args.duration_s / 1200))
    figures = await (gateway_mode(args, probe) if args.mode == "gateway" else raw_mode(args, probe))
    figures["rss_samples"] = probe.rss
    figures["rss_peak_mb"] = rss_mb()[1]
    print(json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gwchild")
    parser.add_argument("--mode", choices=("gateway", "raw"), required=True)
    parser.add_argument("--ports", type=lambda s: [int(p) for p in s.split(",")], required=True)
    parser.add_argument("--interval-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--db", default="")
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--stagger", type=int, default=1)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="print the biggest allocation growth (stderr)"
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    raise_fd_limit()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
