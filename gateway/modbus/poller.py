"""The scheduling loop: ``DevicePoller`` polls every driver on its own fixed schedule (phases
spread over a window, missed slots skipped and counted) and runs each heartbeat in its own task,
all in one TaskGroup. Offline state is the driver's: a failed poll is an offline sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from gateway.errors import DeviceError
from gateway.modbus.driver import DeviceDriver
from gateway.model import DeviceSample

__all__ = ["DevicePoller", "PollStats", "Sink"]

log = structlog.get_logger(__name__)

Sink = Callable[[DeviceSample], Awaitable[None] | None]


@dataclass(slots=True)
class PollStats:
    polls: int = 0
    offline: int = 0
    missed_slots: int = 0  # schedule slots skipped because a poll overran
    heartbeats: int = 0
    heartbeat_missed_slots: int = 0
    last_duration_s: float = 0.0
    last_lateness_s: float = 0.0  # how long after its slot the last poll started


class DevicePoller:
    """Polls each driver at its ``poll_interval_s`` on a fixed schedule and hands every sample
    to ``sink`` (a plain function or a coroutine function).

    Devices start spread out so a large site does not wake all in the same millisecond: device
    ``i`` of ``n`` (in the order given) first polls ``i / n`` of a window after the start, and
    keeps that phase. The window is ``spread_per_device_s`` per device, at most the device's
    interval: just enough to take turns for the CPU, while devices whose samples are combined
    (a grid meter and the chargers behind it) are still read close together.
    The schedule does not drift: the next deadline is the previous one plus the interval; when
    a poll overruns, the missed slots are skipped and counted, not caught up. Heartbeats run in
    their own task per device so a slow poll never delays them. A sink that raises stops the
    poller (it is a bug in the caller, not a device fault).
    """

    def __init__(
        self, drivers: Iterable[DeviceDriver], sink: Sink, *, spread_per_device_s: float = 0.002
    ) -> None:
        self.drivers = list(drivers)
        self.spread_per_device_s = spread_per_device_s
        self.sink = sink
        self.stats: dict[str, PollStats] = {d.device_id: PollStats() for d in self.drivers}
        # Told of every poll with its duration (metrics); must not block or raise.
        self.on_poll: Callable[[DeviceSample, float], None] | None = None

    async def run(self) -> None:
        n = len(self.drivers)
        async with asyncio.TaskGroup() as tg:
            for index, driver in enumerate(self.drivers):
                tg.create_task(self._poll_loop(driver, index / n), name=f"poll:{driver.device_id}")
                if driver.profile.heartbeat is not None:
                    tg.create_task(
                        self._heartbeat_loop(driver), name=f"heartbeat:{driver.device_id}"
                    )

    async def _deliver(self, sample: DeviceSample) -> None:
        result = self.sink(sample)
        if inspect.isawaitable(result):
            await result

    async def _poll_loop(self, driver: DeviceDriver, phase: float = 0.0) -> None:
        """``phase`` (0 <= phase < 1) places the first poll that far into the spread window."""
        loop = asyncio.get_running_loop()
        stats = self.stats[driver.device_id]
        interval = max(driver.config.poll_interval_s, 0.001)
        deadline = loop.time() + phase * min(interval, len(self.drivers) * self.spread_per_device_s)
        if phase > 0.0:
            await asyncio.sleep(deadline - loop.time())
        while True:
            started = loop.time()
            stats.last_lateness_s = started - deadline
            sample = await driver.poll()
            stats.polls += 1
            stats.last_duration_s = loop.time() - started
            if not sample.online:
                stats.offline += 1
            if self.on_poll is not None:
                self.on_poll(sample, stats.last_duration_s)
            await self._deliver(sample)
            deadline = self._next_deadline(deadline, interval, loop.time(), stats, driver)
            await asyncio.sleep(deadline - loop.time())

    @staticmethod
    def _next_deadline(
        deadline: float, interval: float, now: float, stats: PollStats, driver: DeviceDriver
    ) -> float:
        deadline += interval
        if now > deadline:
            missed = int((now - deadline) // interval) + 1
            deadline += missed * interval
            stats.missed_slots += missed
            log.debug("poll_overrun", device=driver.device_id, missed_slots=missed)
        return deadline

    async def _heartbeat_loop(self, driver: DeviceDriver) -> None:
        hb = driver.profile.heartbeat
        assert hb is not None
        loop = asyncio.get_running_loop()
        stats = self.stats[driver.device_id]
        deadline = loop.time()
        while True:
            with contextlib.suppress(DeviceError):  # logged by the driver, once per change
                await driver.heartbeat()
                stats.heartbeats += 1
            missed = PollStats()
            deadline = self._next_deadline(deadline, hb.period_s, loop.time(), missed, driver)
            stats.heartbeat_missed_slots += missed.missed_slots
            await asyncio.sleep(deadline - loop.time())
