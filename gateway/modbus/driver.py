"""One device: ``DeviceDriver`` turns a profile (data) into polls and control writes on a bus.

Device faults are data: a poll that fails yields ``DeviceSample(online=False, error=reason)``
and is logged once per change of state, never raised. ``Chargers`` exposes the drivers to
session logic as ``gateway.ports.ChargerControl``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from gateway.errors import DeviceError
from gateway.modbus.bus import ModbusBus
from gateway.modbus.codec import encode_raw
from gateway.modbus.plan import BlockDecoder, ReadBlock, plan_reads
from gateway.model import DeviceSample, SystemClock, Value
from gateway.profiles import ControlSpec, Profile, TagSpec
from gateway.tags import normalise_tag, reverse_hex_bytes

if TYPE_CHECKING:
    from gateway.config import DeviceConfig

__all__ = ["Chargers", "DeviceDriver"]

log = structlog.get_logger(__name__)


class _ReadPlan:
    """A profile's read plan, shared by every driver of that profile: its blocks, one decoder
    each, and every register's name in profile order (a poll's values start as a copy of
    ``template`` and the blocks decode into it, so the order is the profile's without sorting).

    Shared rather than built per driver because a site polls many devices of one profile: on
    the poll saturation bench (50 chargers of one profile) per-driver decoders cost ~20 us a
    poll more than shared ones, the same code and data spread over 50 copies in the caches.
    """

    __slots__ = ("blocks", "profile", "steps", "template")

    def __init__(self, profile: Profile) -> None:
        conn = profile.connection
        self.profile = profile
        self.blocks = tuple(
            plan_reads(
                profile.registers,
                conn.max_registers_per_read,
                conn.effective_max_gap,
                conn.single_value_reads,
            )
        )
        self.steps = tuple((b, BlockDecoder(b)) for b in self.blocks)
        self.template: dict[str, Value] = dict.fromkeys(spec.name for spec in profile.registers)


# One plan per profile slug; a reloaded profile that differs gets a plan of its own.
_PLANS: dict[str, _ReadPlan] = {}


def _read_plan(profile: Profile) -> _ReadPlan:
    plan = _PLANS.get(profile.slug)
    if plan is None or (plan.profile is not profile and plan.profile != profile):
        plan = _PLANS[profile.slug] = _ReadPlan(profile)
    return plan


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
        self.gap_s = profile.connection.inter_request_delay_s
        plan = _read_plan(profile)
        self.blocks: list[ReadBlock] = list(plan.blocks)
        self._plan = [(i, b, d, d.new_memo()) for i, (b, d) in enumerate(plan.steps)]
        # Each poll that succeeds has read every block at least once (a slow block is read at
        # the first poll and again after the device was offline), so no name is left at the
        # template's None.
        self._template = plan.template
        self._slow_due: dict[int, float] = {}  # block index -> monotonic time it is due again
        self._cache: dict[str, Value] = {}  # last values of slow blocks
        self._tag_seen: tuple[str, str | None] | None = None  # (raw text, tag) of the last poll
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

    # -- polling ----------------------------------------------------------------------------
    async def poll(self) -> DeviceSample:
        """Read and decode the device once. Never raises for device faults."""
        ts = self.clock.time()
        try:
            if self.profile.on_connect:
                await self._after_connect()
            values = await self._read_values()
        except DeviceError as err:
            self._went_offline(err)
            return DeviceSample(self.device_id, ts, online=False, error=err.reason)
        self._went_online()
        iec = status = None
        if self.profile.state is not None:
            iec, status = self.profile.state.classify(values)  # reads only: no copy
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
                self._log.warning(
                    "on_connect_write_refused", address=address, value=w.value, detail=err.detail
                )
                continue
            self._log.info("on_connect_write", address=address, value=w.value)
        self._connects_done = self.bus.stats.connects if connects == -1 else connects

    async def _read_values(self) -> dict[str, Value]:
        now = self.clock.monotonic()
        values = self._template.copy()
        cache = self._cache
        if cache:
            values.update(cache)  # slow values between their reads (re-read ones overwritten)
        read, unit, timeout_s, gap_s = (
            self.bus.read,
            self.config.unit,
            self.config.timeout_s,
            self.gap_s,
        )
        slow_due = self._slow_due
        for index, block, decoder, memo in self._plan:
            every_s = block.every_s
            if every_s is not None and now < slow_due.get(index, -math.inf):
                continue
            words = await read(
                unit, block.table, block.address, block.count, timeout_s, gap_s=gap_s
            )
            # A register that fails is None (a profile bug); the rest of the values still count.
            for spec, exc in decoder.decode_into(words, values, memo):
                self._log.warning("register_decode_failed", register=spec.name, error=str(exc))
            if every_s is not None:
                slow_due[index] = now + every_s
                for spec in block.registers:
                    cache[spec.name] = values[spec.name]
        return values

    def _tag(self, values: Mapping[str, Value]) -> str | None:
        spec = self.profile.tag
        if spec is None:
            return None
        raw = values.get(spec.register)
        if raw is None:
            return None
        raw = str(raw)
        seen = self._tag_seen
        if seen is not None and seen[0] == raw:
            return seen[1]  # the same text as the last poll: the same tag (most polls)
        tag = self._tag_of(spec, raw)
        self._tag_seen = (raw, tag)
        return tag

    def _tag_of(self, spec: TagSpec, raw: str) -> str | None:
        text = normalise_tag(raw)
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
