"""The generic, profile-driven device engine.

``DeviceDriver`` turns a profile (data) into polls and control writes on a bus;
``DevicePoller`` runs every driver on its own fixed schedule in one TaskGroup; ``Chargers``
exposes the drivers to session logic as ``gateway.ports.ChargerControl``. ``read_device_once``
and ``scan`` serve the command line (``evgw read``, ``evgw scan``).

Device faults are data: a poll that fails yields ``DeviceSample(online=False, error=reason)``
and is logged once per change of state, never raised.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from gateway.errors import DeviceError, GatewayError
from gateway.modbus.bus import BusPool, ModbusBus, SerialBus, TcpBus
from gateway.modbus.codec import CodecError, decode, encode_raw
from gateway.modbus.plan import BlockDecoder, ReadBlock, plan_reads
from gateway.model import DeviceSample, SystemClock, Value
from gateway.profiles import ControlSpec, Profile
from gateway.tags import normalise_tag, reverse_hex_bytes

if TYPE_CHECKING:
    from gateway.config import DeviceConfig, GatewayConfig

__all__ = [
    "Chargers",
    "DeviceDriver",
    "DevicePoller",
    "EngineUsageError",
    "PollStats",
    "ScanMatch",
    "ScanResult",
    "drivers_from_config",
    "parse_units",
    "read_device_once",
    "run_read",
    "run_scan",
    "scan",
]

log = structlog.get_logger(__name__)

Sink = Callable[[DeviceSample], Awaitable[None] | None]


class DeviceDriver:
    """One device: its profile's read plan and control registers on a shared bus."""

    def __init__(
        self, config: DeviceConfig, profile: Profile, bus: ModbusBus, clock: Any = None
    ) -> None:
        self.config = config
        self.profile = profile
        self.bus = bus
        self.clock = clock or SystemClock()
        self.device_id = config.id
        conn = profile.connection
        self.gap_s = conn.inter_request_delay_s
        self.blocks: list[ReadBlock] = plan_reads(
            profile.registers,
            conn.max_registers_per_read,
            conn.effective_max_gap,
            conn.single_value_reads,
        )
        self._decoders = [BlockDecoder(b) for b in self.blocks]
        self._slow_due: dict[int, float] = {}  # block index -> monotonic time it is due again
        self._cache: dict[str, Value] = {}  # last values of slow blocks
        self._online: bool | None = None
        self._last_error: str | None = None
        self._limit_a: float | None = None  # last current limit asked for (restored on enable)
        self._hb_ok: bool | None = None
        self._limit_raw: int | float | None = None  # last raw value written to the limit
        # Pause state where the pause is the enable control: paused by a limit of 0 (load
        # management) and disabled by set_enabled(False) (sessions) are tracked apart, so a
        # new limit never re-enables a charger that was switched off.
        self._limit_paused = False
        self._disabled = False
        # Bus connects already followed by the profile's on-connect writes (None: never).
        self._connects_done: int | None = None
        self._log = log.bind(device=config.id, driver=profile.slug)

    def __repr__(self) -> str:
        return f"DeviceDriver({self.device_id!r}, {self.profile.slug!r}, {self.bus!r})"

    @property
    def online(self) -> bool | None:
        """None until the first poll."""
        return self._online

    @property
    def can_control(self) -> bool:
        return self.profile.enable is not None or self.profile.current_limit is not None

    @property
    def requests_per_poll(self) -> int:
        """Requests of a poll where every slow block is due too."""
        return len(self.blocks)

    # -- polling ----------------------------------------------------------------------------
    async def poll(self) -> DeviceSample:
        """Read and decode the device once. Never raises for device faults."""
        ts = self.clock.time()
        try:
            await self._after_connect()
            values = await self._read_values()
        except DeviceError as err:
            self._went_offline(err)
            return DeviceSample(self.device_id, ts, online=False, error=err.reason)
        self._went_online()
        iec = status = None
        if self.profile.state is not None:
            iec, status = self.profile.state.classify(dict(values))
        return DeviceSample(self.device_id, ts, True, values, iec, status, self._tag(values))

    async def _after_connect(self) -> None:
        """The profile's on-connect writes, once after each (re)connect of the bus and after
        the device was offline (it may have lost power, and with it these settings). Raises
        DeviceError when a write fails; they are tried again at the next poll."""
        writes = self.profile.on_connect
        if not writes:
            return
        connects = self.bus.stats.connects
        if self._connects_done is not None and self._connects_done == connects and self._online:
            return
        if not self.bus.connected:
            # Open the link first so the connect counter below is the one these writes used.
            connects = -1
        for w in writes:
            address = w.control.register.address
            try:
                await self._write(w.control, w.value)
            except DeviceError as err:
                if err.reason != "exception_response":
                    raise  # not reachable: the poll is offline and this is tried again
                # It answered but refused (a firmware without the register): poll it anyway.
                self._log.warning("on_connect_write_refused", address=address, value=w.value,
                                  detail=err.detail)
                continue
            self._log.info("on_connect_write", address=address, value=w.value)
        self._connects_done = self.bus.stats.connects if connects == -1 else connects

    async def _read_values(self) -> dict[str, Value]:
        now = self.clock.monotonic()
        values: dict[str, Value] = {}
        fresh: dict[str, Value] = {}
        for index, block in enumerate(self.blocks):
            if block.every_s is not None and now < self._slow_due.get(index, -math.inf):
                continue
            words = await self.bus.read(
                self.config.unit,
                block.table,
                block.address,
                block.count,
                self.config.timeout_s,
                gap_s=self.gap_s,
            )
            # A register that fails is None (a profile bug); the rest of the values still count.
            for spec, exc in self._decoders[index].decode_into(words, fresh):
                self._log.warning("register_decode_failed", register=spec.name, error=str(exc))
            if block.every_s is not None:
                self._slow_due[index] = now + block.every_s
                for spec in block.registers:
                    self._cache[spec.name] = fresh[spec.name]
        # Keep the profile's register order; slow values come from the cache between reads.
        for spec in self.profile.registers:
            if spec.name in fresh:
                values[spec.name] = fresh[spec.name]
            elif spec.name in self._cache:
                values[spec.name] = self._cache[spec.name]
        return values

    def _tag(self, values: Mapping[str, Value]) -> str | None:
        spec = self.profile.tag
        if spec is None:
            return None
        raw = values.get(spec.register)
        if raw is None:
            return None
        text = normalise_tag(str(raw))
        if text is None or text in spec.empty:
            return None
        if spec.reverse_bytes:
            text = reverse_hex_bytes(text)
        if text in spec.not_a_user:
            self._log.debug("tag_not_a_user", tag=text)
            return None
        return text

    def _went_offline(self, err: DeviceError) -> None:
        if self._online is not False:
            self._log.warning("device_offline", reason=err.reason, detail=err.detail)
        elif err.reason != self._last_error:
            self._log.info("device_offline_reason_changed", reason=err.reason, detail=err.detail)
        else:
            self._log.debug("device_still_offline", reason=err.reason, detail=err.detail)
        self._online = False
        self._last_error = err.reason
        # Re-read slow registers as soon as the device answers again.
        self._slow_due.clear()

    def _went_online(self) -> None:
        if self._online is False:
            self._log.info("device_online", after=self._last_error)
        elif self._online is None:
            self._log.debug("device_online")
        self._online = True
        self._last_error = None

    # -- control ----------------------------------------------------------------------------
    async def _write(self, control: ControlSpec, raw: int | float) -> None:
        if self.profile.current_limit is not None and control is self.profile.current_limit.control:
            self._limit_raw = raw  # what a heartbeat that rewrites the limit writes again
        spec = control.register
        words = encode_raw(spec, raw)
        function = control.function
        await self.bus.write(
            self.config.unit,
            spec.table,
            spec.address,
            words,
            function,
            self.config.timeout_s,
            gap_s=self.gap_s,
        )

    async def _write_enable(self, enabled: bool) -> None:
        enable = self.profile.enable
        assert enable is not None
        value = enable.on if enabled else enable.off
        if value is None:
            value = 1 if enabled else 0
        await self._write(enable, value)

    @property
    def pauses_by_enable(self) -> bool:
        return self.profile.pause_method == "enable" and self.profile.enable is not None

    async def set_enabled(self, enabled: bool) -> None:
        """Allow or stop charging by the profile's pause method: the enable register or coil,
        else the current limit (the profile's ``disable`` raw value to stop, the last limit
        asked for, or the maximum, to resume). Raises DeviceError when the write fails or the
        device has no such control."""
        prof = self.profile
        if self.pauses_by_enable:
            # Resuming while load management holds it at 0 would charge at a stale limit.
            await self._write_enable(enabled and not self._limit_paused)
            self._disabled = not enabled
        elif prof.current_limit is not None and prof.pause_method == "current_limit":
            cl = prof.current_limit
            if enabled:
                await self._write_limit(
                    self._limit_a if self._limit_a is not None else self.max_current_a
                )
            else:
                if cl.disable is None:
                    raise DeviceError(
                        self.device_id, "not_supported", "current limit has no disable value"
                    )
                await self._write(cl.control, cl.disable)
        else:
            raise DeviceError(self.device_id, "not_supported", f"{prof.slug} has no enable control")
        self._log.info("charger_enabled" if enabled else "charger_disabled")

    @property
    def max_current_a(self) -> float:
        cl = self.profile.current_limit
        top = cl.max_a if cl is not None else 32.0
        if self.config.max_current_a is not None:
            top = min(top, self.config.max_current_a)
        return top

    async def set_current_limit(self, current_a: float) -> None:
        """Set the charging current limit in amperes. 0 pauses (the profile's ``disable``);
        above the device or site maximum it is capped (and logged); between 0 and the minimum
        it is an error."""
        cl = self.profile.current_limit
        if cl is None:
            raise DeviceError(
                self.device_id, "not_supported", f"{self.profile.slug} has no current limit"
            )
        if current_a <= 0:
            if self.pauses_by_enable:
                # A real pause exists: never write a current below the device's minimum.
                await self._write_enable(False)
                self._limit_paused = True
            else:
                if cl.disable is None:
                    raise DeviceError(
                        self.device_id, "not_supported", "current limit has no disable value"
                    )
                await self._write(cl.control, cl.disable)
            self._log.info("current_limit_set", current_a=0.0)
            return
        if current_a < cl.min_a:
            raise ValueError(f"{self.device_id}: {current_a} A is below the minimum {cl.min_a} A")
        self._limit_a = current_a
        await self._write_limit(current_a)
        if self._limit_paused:
            self._limit_paused = False
            if not self._disabled:
                await self._write_enable(True)

    async def _write_limit(self, current_a: float) -> None:
        cl = self.profile.current_limit
        assert cl is not None
        top = self.max_current_a
        if current_a > top:
            self._log.info("current_limit_capped", asked_a=current_a, max_a=top)
            current_a = top
        await self._write(cl.control, cl.to_raw(current_a))
        self._log.info("current_limit_set", current_a=current_a)

    async def heartbeat(self) -> None:
        """Write the profile's heartbeat value once. Raises DeviceError on failure."""
        hb = self.profile.heartbeat
        if hb is None:
            return
        control, value = hb.control, hb.value
        cl = self.profile.current_limit
        if hb.rewrites_current_limit and cl is not None:
            # Alfen: the limit itself times out; write the last one again (the maximum if the
            # gateway never set one: what the charger would allow without the gateway).
            control = cl.control
            value = (
                self._limit_raw if self._limit_raw is not None else cl.to_raw(self.max_current_a)
            )
        try:
            await self._write(control, value)
        except DeviceError as err:
            if self._hb_ok is not False:
                self._log.warning("heartbeat_failed", reason=err.reason, detail=err.detail)
            self._hb_ok = False
            raise
        if self._hb_ok is False:
            self._log.info("heartbeat_recovered")
        self._hb_ok = True


def drivers_from_config(
    config: GatewayConfig, profiles: Mapping[str, Profile], pool: BusPool, clock: Any = None
) -> dict[str, DeviceDriver]:
    return {
        dev.id: DeviceDriver(dev, profiles[dev.driver], pool.bus_for(dev), clock)
        for dev in config.modbus_devices
    }


# -- the poll loop --------------------------------------------------------------------------
@dataclass(slots=True)
class PollStats:
    polls: int = 0
    offline: int = 0
    missed_slots: int = 0  # schedule slots skipped because a poll overran
    heartbeats: int = 0
    heartbeat_failures: int = 0
    heartbeat_missed_slots: int = 0
    last_duration_s: float = 0.0


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
            try:
                await driver.heartbeat()
                stats.heartbeats += 1
            except DeviceError:
                stats.heartbeat_failures += 1  # logged by the driver, once per change
            missed = PollStats()
            deadline = self._next_deadline(deadline, hb.period_s, loop.time(), missed, driver)
            stats.heartbeat_missed_slots += missed.missed_slots
            await asyncio.sleep(deadline - loop.time())


class Chargers:
    """``gateway.ports.ChargerControl`` over the drivers (chargers with a control register)."""

    def __init__(self, drivers: Mapping[str, DeviceDriver] | Iterable[DeviceDriver]) -> None:
        items = drivers.values() if isinstance(drivers, Mapping) else drivers
        self._drivers = {d.device_id: d for d in items}

    def _driver(self, device_id: str) -> DeviceDriver:
        try:
            return self._drivers[device_id]
        except KeyError:
            raise DeviceError(device_id, "unknown_device", "no such device") from None

    def can_control(self, device_id: str) -> bool:
        driver = self._drivers.get(device_id)
        return driver is not None and driver.can_control

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        await self._driver(device_id).set_enabled(enabled)

    async def set_current_limit(self, device_id: str, current_a: float) -> None:
        await self._driver(device_id).set_current_limit(current_a)


# -- one-shot helpers for the command line -----------------------------------------------------
async def read_device_once(
    config: GatewayConfig, device_id: str, profiles: Mapping[str, Profile]
) -> DeviceSample:
    """Poll one configured device once (``evgw read``). Raises KeyError for an unknown device or
    driver; device faults come back as an offline sample."""
    dev = config.device(device_id)
    profile = profiles[dev.driver]
    async with BusPool.from_config(config) as pool:
        return await DeviceDriver(dev, profile, pool.bus_for(dev)).poll()


async def run_read(config: GatewayConfig, device_id: str, *, as_json: bool = False) -> int:
    """``evgw read``: print one decoded poll; exit 1 when the device does not answer."""
    from gateway.profiles import load_profiles

    profiles = load_profiles(config.drivers_path)
    try:
        dev = config.device(device_id)
    except KeyError:
        raise _usage(f"no device {device_id!r} in the config") from None
    if dev.driver == "ocpp":
        raise _usage(
            f"device {device_id} is an OCPP charge point: it reports by itself to `evgw run` "
            "(its statuses and meter values are in the log and on the status topic)"
        )
    if dev.driver not in profiles:
        raise _usage(f"device {device_id}: no profile named {dev.driver!r}")
    sample = await read_device_once(config, device_id, profiles)
    if as_json:
        print(
            json.dumps(
                {
                    "device_id": sample.device_id,
                    "ts": sample.ts,
                    "online": sample.online,
                    "error": sample.error,
                    "iec": sample.iec.value if sample.iec else None,
                    "status": sample.status.value if sample.status else None,
                    "tag": sample.tag,
                    "values": dict(sample.values),
                },
                indent=2,
            )
        )
    else:
        state = "online" if sample.online else f"OFFLINE: {sample.error}"
        print(f"{sample.device_id} ({dev.driver}): {state}")
        if sample.status is not None:
            print(
                f"  status  {sample.status.value} (IEC {sample.iec.value if sample.iec else '?'})"
            )
        if sample.tag is not None:
            print(f"  tag     {sample.tag}")
        specs = {r.name: r for r in profiles[dev.driver].registers}
        for name, value in sample.values.items():
            unit = specs[name].unit if name in specs else ""
            print(f"  {name:<24} {value!s:>14} {unit}")
    return 0 if sample.online else 1


class EngineUsageError(GatewayError):
    """A bad argument to ``evgw read`` / ``evgw scan`` (exit 2, one line)."""

    exit_code = 2


def _usage(message: str) -> Exception:
    return EngineUsageError(message)


# -- scan -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ScanMatch:
    unit: int  # unit id to put in the config
    slug: str
    value: Value  # what the identify register said
    baudrate: int | None = None
    parity: str | None = None
    stopbits: int | None = None
    alternative: bool = False  # found at a disputed factory setting, not the profile's default


@dataclass(slots=True)
class ScanResult:
    endpoint: str
    tcp: tuple[str, int] | None = None
    serial: str | None = None
    matches: list[ScanMatch] = field(default_factory=list)
    probed: int = 0  # requests sent
    errors: list[str] = field(default_factory=list)  # line settings that could not be opened

    def config_snippet(self) -> str:
        """YAML to paste into a site config (CONTRACT section 3 keys)."""
        lines: list[str] = []
        if self.serial is not None:
            settings = sorted({(m.baudrate, m.parity, m.stopbits) for m in self.matches}, key=str)
            bus_ids: dict[tuple[Any, Any, Any], str] = {}
            if settings:
                lines.append("buses:")
            for i, (baud, parity, stopbits) in enumerate(settings, 1):
                bus_id = "rs485-1" if len(settings) == 1 else f"rs485-{i}"
                bus_ids[(baud, parity, stopbits)] = bus_id
                lines.append(
                    f"  - {{id: {bus_id}, type: rtu, port: {self.serial}, baudrate: {baud}, "
                    f"parity: {parity}, stopbits: {stopbits}}}"
                )
            if self.matches:
                lines.append("devices:")
            for m, others in self._one_per_unit():
                bus_id = bus_ids[(m.baudrate, m.parity, m.stopbits)]
                lines.append(
                    f"  - {{id: {m.slug}-{m.unit}, driver: {m.slug}, bus: {bus_id}, "
                    f"unit: {m.unit}}}" + _alternatives(others)
                )
        elif self.tcp is not None and self.matches:
            host, port = self.tcp
            lines.append("devices:")
            for m, others in self._one_per_unit():
                lines.append(
                    f"  - {{id: {m.slug}-{m.unit}, driver: {m.slug}, host: {host}, "
                    f"port: {port}, unit: {m.unit}}}" + _alternatives(others)
                )
        return "\n".join(lines) + ("\n" if lines else "")

    def _one_per_unit(self) -> list[tuple[ScanMatch, list[str]]]:
        """One device per unit id: a unit that several profiles recognise (SDM120 and SDM630
        share their identification register) is one device; the others are named as
        alternatives, since two devices on one unit would not pass check-config."""
        groups: dict[tuple[int, Any, Any, Any], list[ScanMatch]] = {}
        for m in self.matches:
            groups.setdefault((m.unit, m.baudrate, m.parity, m.stopbits), []).append(m)
        return [(ms[0], [m.slug for m in ms[1:]]) for ms in groups.values()]


def _alternatives(slugs: list[str]) -> str:
    return f"  # or: {', '.join(slugs)} (same identification)" if slugs else ""


def parse_units(text: str | None) -> list[int] | None:
    """ "1-10", "1,2,255", "1-3,200" -> sorted unit ids; None for None."""
    if text is None or not text.strip():
        return None
    units: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if lo > hi:
                raise ValueError(f"bad unit range {part!r}")
            units.update(range(lo, hi + 1))
        elif part:
            units.add(int(part))
    bad = [u for u in units if not 0 <= u <= 255]
    if bad:
        raise ValueError(f"unit ids out of 0..255: {bad}")
    return sorted(units)


def _identified(profile: Profile, value: Value) -> bool:
    ident = profile.identify
    assert ident is not None
    if value is None:
        return False
    if ident.pattern is not None and not re.search(ident.pattern, str(value)):
        return False
    if ident.min is not None or ident.max is not None:
        if isinstance(value, str):
            return False
        if ident.min is not None and value < ident.min:
            return False
        if ident.max is not None and value > ident.max:
            return False
    return not (isinstance(value, str) and value == "")


async def _probe(
    bus: ModbusBus,
    profiles: Sequence[Profile],
    units: Sequence[int],
    timeout_s: float,
    result: ScanResult,
) -> list[tuple[int, Profile, Value]]:
    """Try each profile's identify register on each unit. A unit that times out is absent for
    this bus setting: the remaining profiles are not tried on it."""
    found: list[tuple[int, Profile, Value]] = []
    station_done: set[tuple[str, int]] = set()
    for unit in units:
        for profile in profiles:
            ident = profile.identify
            assert ident is not None
            probe_unit = ident.unit if ident.unit is not None else unit
            if ident.unit is not None:
                # A station-level identity: probe it once, report the profile's default unit.
                if (profile.slug, probe_unit) in station_done or unit != units[0]:
                    continue
                station_done.add((profile.slug, probe_unit))
            reg = ident.register
            result.probed += 1
            try:
                words = await bus.read(
                    probe_unit,
                    reg.table,
                    reg.address,
                    reg.count,
                    timeout_s,
                    gap_s=profile.connection.inter_request_delay_s,
                )
            except DeviceError as err:
                if err.reason in ("timeout", "connect_failed") and ident.unit is None:
                    if err.reason == "connect_failed":
                        raise
                    break  # nobody at this unit id
                continue
            try:
                value = decode(reg, words)
            except CodecError:
                continue
            if _identified(profile, value):
                report_unit = profile.connection.default_unit if ident.unit is not None else unit
                found.append((report_unit, profile, value))
    return found


async def scan(
    profiles: Mapping[str, Profile],
    *,
    tcp: str | None = None,
    serial: str | None = None,
    bauds: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
    timeout_s: float | None = None,
) -> ScanResult:
    """Probe unit ids on a TCP endpoint (``HOST[:PORT]``) or a serial line and name the
    profiles whose ``identify`` register matches.

    Without ``units``: on TCP the units the profiles name (default and identify units) and 1;
    on serial 1-247. Without ``bauds``, a serial line is tried at each serial setting
    (baud rate, parity, stop bits) that an RTU profile names, then a model not found at its
    defaults at its ``serial_alternatives``. Default timeout: 0.3 s a request on a serial line,
    1 s over TCP (a Modbus TCP gateway answers for a silent unit only after its own timeout; a
    late answer would land on the next probe).
    """
    candidates = [p for _, p in sorted(profiles.items()) if p.identify is not None]
    if (tcp is None) == (serial is None):
        raise ValueError("scan needs exactly one of tcp or serial")
    if tcp is not None:
        host, _, port_text = tcp.rpartition(":") if ":" in tcp else (tcp, "", "")
        port = int(port_text) if port_text else 502
        # Every profile: RTU-only devices often sit behind a Modbus TCP gateway.
        unit_list = (
            list(units) if units else sorted({1} | {p.connection.default_unit for p in candidates})
        )
        result = ScanResult(f"tcp://{host}:{port}", tcp=(host, port))
        tcp_timeout_s = 1.0 if timeout_s is None else timeout_s
        bus: ModbusBus = TcpBus(host, port, connect_timeout_s=max(tcp_timeout_s, 1.0))
        try:
            probed = await _probe(bus, candidates, unit_list, tcp_timeout_s, result)
            for unit, profile, value in probed:
                result.matches.append(ScanMatch(unit, profile.slug, value))
        finally:
            await bus.close()
        return result
    assert serial is not None
    rtu = [p for p in candidates if "rtu" in p.connection.transports]
    unit_list = list(units) if units else list(range(1, 248))
    result = ScanResult(f"serial://{serial}", serial=serial)
    settings: dict[tuple[int, str, int], list[Profile]] = {}
    for p in rtu:
        c = p.connection
        for baud in bauds or [c.baudrate]:
            settings.setdefault((baud, c.parity, c.stopbits), []).append(p)
    tried = len(settings)
    timeout_s = 0.3 if timeout_s is None else timeout_s
    await _scan_settings(serial, settings, unit_list, timeout_s, result)
    # Where sources disagree on a model's factory settings (SDM120 2400 or 9600 baud, SDM630
    # 8N1 or 8E1), a model the defaults did not find is tried at the others.
    found = {m.slug for m in result.matches}
    retry: dict[tuple[int, str, int], list[Profile]] = {}
    for p in rtu:
        if p.slug in found:
            continue
        c = p.connection
        done = {(b, c.parity, c.stopbits) for b in bauds or [c.baudrate]}
        for baud, parity, stopbits in c.serial_alternatives:
            for b in bauds or [baud]:
                if (b, parity, stopbits) not in done:
                    retry.setdefault((b, parity, stopbits), []).append(p)
    if retry:
        tried += len(retry)
        await _scan_settings(serial, retry, unit_list, timeout_s, result, alternative=True)
    if not result.matches and result.errors and len(result.errors) == tried:
        raise DeviceError(result.endpoint, "connect_failed", "; ".join(result.errors))
    return result


async def _scan_settings(
    serial: str,
    settings: Mapping[tuple[int, str, int], Sequence[Profile]],
    units: Sequence[int],
    timeout_s: float,
    result: ScanResult,
    *,
    alternative: bool = False,
) -> None:
    for (baud, parity, stopbits), group in sorted(settings.items()):
        bus = SerialBus(serial, baud, parity, stopbits)
        try:
            for unit, profile, value in await _probe(bus, group, units, timeout_s, result):
                result.matches.append(
                    ScanMatch(unit, profile.slug, value, baud, parity, stopbits, alternative)
                )
        except DeviceError as err:
            # One setting the port refuses must not end the scan of the others.
            result.errors.append(f"{baud} {parity}{stopbits}: {err.reason} ({err.detail})")
        finally:
            await bus.close()


def _converter_hint(profiles: Mapping[str, Profile]) -> str:
    """After an empty TCP scan: a Modbus TCP gateway's serial side is set in the converter, not
    by us; name the settings the serial profiles ship with (disputed ones included)."""
    settings: set[tuple[int, str, int]] = set()
    for p in profiles.values():
        c = p.connection
        if "rtu" in c.transports and p.identify is not None:
            settings.add((c.baudrate, c.parity, c.stopbits))
            settings.update(c.serial_alternatives)
    listed = ", ".join(f"{b} 8{par}{stop}" for b, par, stop in sorted(settings))
    return (
        "  serial devices behind a Modbus TCP gateway answer only when the converter's serial "
        f"side matches theirs; factory settings of the serial profiles: {listed}"
    )


async def run_scan(
    *,
    tcp: str | None = None,
    serial: str | None = None,
    bauds: Sequence[int] | None = None,
    units: str | None = None,
    timeout_s: float | None = None,
    drivers_path: str | None = None,
) -> int:
    """``evgw scan``: print matches and a config snippet; exit 1 when nothing answered."""
    from gateway.profiles import load_profiles

    profiles = load_profiles(drivers_path)
    try:
        unit_list = parse_units(units)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    try:
        result = await scan(
            profiles, tcp=tcp, serial=serial, bauds=bauds, units=unit_list, timeout_s=timeout_s
        )
    except DeviceError as err:
        print(f"scan: cannot reach {err.device_id}: {err.reason} ({err.detail})")
        return 1
    for error in result.errors:
        print(f"scan {result.endpoint}: skipped {error}")
    if not result.matches:
        print(f"scan {result.endpoint}: no known device found ({result.probed} probes)")
        if result.tcp is not None:
            print(_converter_hint(profiles))
        return 1
    print(f"scan {result.endpoint}: {len(result.matches)} device(s)")
    for m in result.matches:
        serial_note = f" @ {m.baudrate} {m.parity}{m.stopbits}" if m.baudrate else ""
        if m.alternative:
            serial_note += " (not the profile's default: keep these line settings)"
        print(f"  unit {m.unit:>3}  {m.slug:<24} {m.value!s}{serial_note}")
    print()
    print(result.config_snippet(), end="")
    return 0
