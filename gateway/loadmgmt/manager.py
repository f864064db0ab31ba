"""The manager: runs the balancer and writes its limits to the chargers.

It is the ``ChargerControl`` the session manager talks to, so a charger the session manager
disabled is never switched back on by a limit write; a grid operator's limit (relay signal or
cloud command) reaches the balancer through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from gateway.errors import CommandError, DeviceError
from gateway.gridlimit import CloudLimit, EffectiveLimit, GridLimits, LimitValue
from gateway.loadmgmt.balancer import ChargerSpec, Decision, LoadBalancer, Mode
from gateway.model import Clock, DeviceSample, SystemClock
from gateway.ports import ChargerControl

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["LoadManager"]

log = structlog.get_logger(__name__)


class LoadManager:
    """Applies the balancer's decisions; a ``ChargerControl`` for the session manager.

    ``on_sample`` is called by the app for every sample; ``run`` evaluates every ``interval_s``
    and at once when the grid meter shows the limit exceeded or a charger's status changes.
    Writes that lower limits go first. A failed write is logged once per change and retried at
    the next evaluation; it never stops the loop.
    """

    def __init__(
        self,
        config: GatewayConfig | None,
        balancer: LoadBalancer,
        chargers: ChargerControl,
        clock: Clock | None = None,
        *,
        interval_s: float = 2.0,
        limits: GridLimits | None = None,
        on_limit: Callable[[EffectiveLimit], None] | None = None,
    ) -> None:
        self.config = config
        self.limits = limits
        self.on_limit = on_limit  # told every change of the limit in force (to publish it)
        self.grid_limit: EffectiveLimit | None = None  # in force since the last evaluation
        self.balancer = balancer
        self.chargers = chargers
        self.clock = clock or SystemClock()
        self.interval_s = interval_s
        self.last: Decision | None = None
        self.writes = 0
        self.write_failures = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._mode: str | None = None
        self._failing: dict[str, str] = {}  # device -> reason of the last failed write

    # -- inputs from the app -----------------------------------------------------------------
    def on_sample(self, sample: DeviceSample) -> None:
        spec = self.balancer.specs.get(sample.device_id)
        before = self.balancer.status(sample.device_id)
        self.balancer.update(sample)
        if sample.device_id == self.balancer.settings.grid_meter:
            if self.balancer.over_limit() or self._mode is None:
                self._wake.set()
        elif spec is not None and sample.status != before:
            self._wake.set()

    def on_signal(self, active: bool | None) -> None:
        """The grid operator's relay was read (None: the I/O module did not answer)."""
        if self.limits is None or active == self.limits.signal:
            return
        self.limits.set_signal(active)
        self._wake.set()

    # -- the grid operator's limit command ---------------------------------------------------
    async def set_cloud_limit(
        self,
        request_id: str,
        scope: str,
        value: LimitValue | None,
        expires_at: float | None,
        reason: str | None,
    ) -> EffectiveLimit:
        """Apply (``value``) or lift (None) a cloud limit at once; raises CommandError to refuse."""
        if self.limits is None:
            raise CommandError("unsupported", "this site has no load management (grid limit)")
        if scope != "site":
            spec = self.balancer.specs.get(scope)
            if spec is None:
                known = ", ".join(sorted(self.balancer.specs)) or "none"
                raise CommandError("unknown_charger", f"no charger {scope!r} (chargers: {known})")
            if not spec.controllable:
                raise CommandError(
                    "not_controllable", f"charger {scope!r} has no current limit the gateway writes"
                )
        now = self.clock.time()
        if expires_at is not None and expires_at <= now:
            raise CommandError("invalid", "expires_at is in the past")
        async with self._lock:
            if value is None:
                self.limits.clear_cloud(scope)
            else:
                self.limits.set_cloud(
                    CloudLimit(scope, value, expires_at, reason, request_id, set_at=now)
                )
            await self._evaluate()
        assert self.grid_limit is not None
        return self.grid_limit

    def _apply_grid_limit(self, now: float) -> None:
        limits = self.limits
        if limits is None:
            return
        for gone in limits.expire(now):
            log.info(
                "grid_limit_expired",
                scope=gone.scope,
                request_id=gone.request_id,
                reason=gone.reason,
                **gone.value.as_dict(),
            )
        effective = limits.effective(now)
        previous = self.grid_limit
        if previous is not None and previous.key() == effective.key():
            return
        self.grid_limit = effective
        self.balancer.set_grid_limit(effective.site_a, effective.chargers)
        event = "grid_limit_changed"
        fields = {
            "max_current_a": round(effective.site_a, 2),
            "source": effective.source,
            "reason": effective.reason,
            "expires_at": effective.expires_at,
            "chargers": dict(effective.chargers),
            "signal": effective.signal,
            "previous_a": None if previous is None else round(previous.site_a, 2),
            "previous_source": None if previous is None else previous.source,
        }
        log.info(event, **fields)
        if self.on_limit is not None:
            self.on_limit(effective)

    # -- ChargerControl for the session manager ----------------------------------------------
    def can_control(self, device_id: str) -> bool:
        return self.chargers.can_control(device_id)

    def _balanced(self, device_id: str) -> ChargerSpec | None:
        """The charger's spec when load management writes its limit; None: commands for it go
        straight to the charger."""
        spec = self.balancer.specs.get(device_id)
        return spec if spec is not None and spec.controllable else None

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        spec = self._balanced(device_id)
        if spec is None:
            await self.chargers.set_enabled(device_id, enabled)
            return
        async with self._lock:
            self.balancer.set_authorized(device_id, enabled)
            if not enabled:
                await self.chargers.set_enabled(device_id, False)
                if not spec.enable_register:  # the engine paused it with the limit register
                    self.balancer.confirm(device_id, 0.0, self.clock.time())
                self._wake.set()  # its share goes to the others
                return
            decision = await self._evaluate()
            if spec.enable_register:
                await self.chargers.set_enabled(device_id, True)
            elif device_id in self._failing:
                raise DeviceError(device_id, self._failing[device_id], "current limit write failed")
            # Without an enable register the limit write above is the enable; with no room the
            # charger stays paused and is resumed by a later decision.
            log.info(
                "load_charger_enabled",
                device_id=device_id,
                target_a=decision.targets.get(device_id),
                limit_a=self.balancer.applied(device_id),
            )

    async def set_current_limit(self, device_id: str, current_a: float) -> None:
        """A limit asked for by another part: kept as an upper bound for this charger."""
        if self._balanced(device_id) is None:
            await self.chargers.set_current_limit(device_id, current_a)
            return
        async with self._lock:
            self.balancer.set_cap(device_id, current_a if current_a > 0 else None)
            await self._evaluate()

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled."""
        await self._await_first_meter_sample()
        while True:
            # Cleared before evaluating, never after: a wake-up that arrives while the limit
            # writes are out (slow on RS-485) makes the next round start at once.
            self._wake.clear()
            async with self._lock:
                await self._evaluate()
            await self._sleep()

    async def _await_first_meter_sample(self) -> None:
        """At start-up the grid meter has simply not been polled yet: judging the site before
        its first sample would put every charger in failsafe (and pause some) for nothing.
        Wait for it, but no longer than the meter's stale limit."""
        settings = self.balancer.settings
        if settings.grid_meter is None:
            return
        deadline = self.clock.monotonic() + settings.meter_stale_s
        while self.balancer.grid_sample is None and self.clock.monotonic() < deadline:
            self._wake.clear()
            await self._sleep()

    async def _sleep(self) -> None:
        """One interval, or less when something wakes the manager (a new sample, a cap)."""
        try:
            async with asyncio.timeout(self.interval_s):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def evaluate(self) -> Decision:
        """Decide and write once (what ``run`` does every interval)."""
        async with self._lock:
            return await self._evaluate()

    async def _evaluate(self) -> Decision:
        now = self.clock.time()
        self._apply_grid_limit(now)
        decision = self.balancer.decide(now)
        self.last = decision
        if decision.mode != self._mode:
            event = "load_mode_changed"
            fields = {"mode": decision.mode, "previous": self._mode}
            if decision.mode == Mode.FAILSAFE:
                log.warning(event, meter=self.balancer.settings.grid_meter, **fields)
            else:
                log.info(event, **fields)
            self._mode = decision.mode
        if decision.changed:
            log.info(
                "load_limits_changed",
                limits=dict(sorted(decision.changed.items())),
                mode=decision.mode,
                available_a=[round(a, 2) for a in decision.available_a],
                grid_a=[round(a, 2) for a in decision.grid_a] if decision.grid_a else None,
                paused=list(decision.paused),
            )
        # Lower first: the sum stays under the limit while the writes go out.
        order = sorted(
            decision.writes.items(),
            key=lambda kv: kv[1] - (self.balancer.applied(kv[0]) or 0.0),
        )
        for device_id, amps in order:
            await self._write(device_id, amps)
        return decision

    async def _write(self, device_id: str, amps: float) -> None:
        try:
            await self.chargers.set_current_limit(device_id, amps)
        except (DeviceError, ValueError) as exc:
            self.write_failures += 1
            reason = exc.reason if isinstance(exc, DeviceError) else "bad_value"
            if self._failing.get(device_id) != reason:
                log.warning(
                    "load_limit_write_failed", device_id=device_id, limit_a=amps, error=str(exc)
                )
            self._failing[device_id] = reason
            self.balancer.forget(device_id)
            return
        if self._failing.pop(device_id, None) is not None:
            log.info("load_limit_write_recovered", device_id=device_id, limit_a=amps)
        self.writes += 1
        self.balancer.confirm(device_id, amps, self.clock.time())
