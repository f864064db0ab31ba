"""The async side of sessions: ``SessionManager`` feeds samples, authorization answers and commands
to the pure ``SessionTracker`` and performs the effects it returns through the ``gateway.ports``
Protocols (persist before publish; finish through the store, which seals and queues)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from gateway.config import GatewayConfig
from gateway.errors import CommandError
from gateway.model import (
    SESSION_STARTED_SCHEMA,
    AuthSource,
    AuthStatus,
    Clock,
    DeviceSample,
    Flag,
    MeterPoint,
    StopReason,
    SystemClock,
    rfc3339,
)
from gateway.ports import (
    ChargerControl,
    JsonObject,
    SessionAuthorizer,
    SessionEvents,
    SessionStore,
)
from gateway.sessions.connector import ChargerSpec, Grant, TransactionEnd, TransactionStart
from gateway.sessions.effects import (
    AddPoint,
    Effect,
    FinishSession,
    RequestAuth,
    SaveSession,
    SetEnabled,
    StartSession,
    StatusChanged,
)
from gateway.sessions.ledger import Counter, OpenSession, build_record, max_power_w
from gateway.sessions.tracker import SessionTracker

__all__ = ["Pricer", "SessionManager", "TariffsResolver", "default_periods"]

log = structlog.get_logger(__name__)

PricerResult = tuple[list[dict[str, Any]], dict[str, Any] | None]
Pricer = Callable[
    [dict[str, Any] | None, Sequence[MeterPoint], float, float],
    PricerResult | Awaitable[PricerResult],
]
# (charger id, user group) -> (tariff id, version, data[, what was meant if it fell back])
TariffsResolver = Callable[[str, str | None], tuple[Any, ...] | None]


def default_periods(
    points: Sequence[MeterPoint], started_at: float, ended_at: float
) -> list[dict[str, Any]]:
    """Charging periods without a tariff: one period, energy and times from the curve."""
    charging_s = idle_s = 0.0
    prev_ts = started_at
    for point in points:
        dt = max(0.0, point.ts - prev_ts)
        if point.charging:
            charging_s += dt
        else:
            idle_s += dt
        prev_ts = max(prev_ts, point.ts)
    energy = points[-1].energy_wh if points else 0
    return [
        {
            "start": rfc3339(started_at),
            "tariff_element": None,
            "energy_wh": energy,
            "charging_s": round(charging_s),
            "idle_s": round(idle_s + max(0.0, ended_at - prev_ts)),
        }
    ]


class SessionManager:
    """Feeds samples to a ``SessionTracker`` and performs its effects: persist before publish,
    finish through the store (which seals and queues), enable/disable chargers, authorize in
    background tasks so one slow cloud answer never blocks other chargers."""

    def __init__(
        self,
        config: GatewayConfig,
        store: SessionStore,
        authorizer: SessionAuthorizer | None,
        chargers: ChargerControl | None,
        pricer: Pricer | None = None,
        tariffs_resolver: TariffsResolver | None = None,
        clock: Clock | None = None,
        events: SessionEvents | None = None,
        *,
        charger_ids: Iterable[str] | None = None,
        grace_s: float = 120.0,
        plug_timeout_s: float = 120.0,
        time_scale: float = 1.0,
        plug_reset_counters: Iterable[str] = (),
        prefer_session_counters: Iterable[str] = (),
        transactional: Iterable[str] = (),
        counters: Mapping[str, Mapping[str, Counter]] | None = None,
        profile_max_a: Mapping[str, float] | None = None,
    ) -> None:
        """``time_scale``: simulated seconds per wall second when the devices are simulated
        faster than real time (``evgw demo``); it widens the plausibility bound on counter
        steps, which is measured against the gateway's wall clock. ``profile_max_a``: charger
        id -> its profile's ``current_limit.max_a`` (see :func:`max_power_w`)."""
        self._store = store
        self._authorizer = authorizer
        self._chargers = chargers
        self._pricer = pricer
        self._resolver = tariffs_resolver
        self._clock = clock or SystemClock()
        self._events = events
        devices = {d.id: d for d in config.devices}
        meters = {d.meter for d in config.devices if d.meter}
        if config.grid is not None and config.grid.meter:
            meters.add(config.grid.meter)
        guessed = charger_ids is None
        ids = (
            list(charger_ids)
            if charger_ids is not None
            else [d for d in devices if d not in meters]
        )
        counters = counters or {}
        profile_max_a = profile_max_a or {}
        resets = set(plug_reset_counters)  # chargers whose session counter restarts at plug-in
        prefer = set(prefer_session_counters) & resets
        reporting = set(transactional)
        specs = []
        for cid in ids:
            dev = devices[cid]
            meter = devices.get(dev.meter) if dev.meter else None
            own = dict(counters.get(cid, {}))
            if dev.meter and "energy_wh" in counters.get(dev.meter, {}):
                own[f"meter:{dev.meter}"] = counters[dev.meter]["energy_wh"]
            specs.append(
                ChargerSpec(
                    charger_id=cid,
                    connector=dev.connector,
                    meter_id=dev.meter,
                    poll_interval_s=dev.poll_interval_s,
                    meter_poll_interval_s=meter.poll_interval_s if meter else dev.poll_interval_s,
                    max_power_w=max_power_w(dev.max_current_a, profile_max_a.get(cid))
                    * max(1.0, time_scale),
                    controllable=chargers is not None and chargers.can_control(cid),
                    session_counter_resets_on_plug=cid in resets,
                    prefer_session_counter=cid in prefer,
                    confirmed=not guessed or cid in reporting,
                    transactional=cid in reporting,
                    counters=own,
                )
            )
        self.tracker = SessionTracker(
            specs, site_id=config.site.id, grace_s=grace_s, plug_timeout_s=plug_timeout_s
        )
        self._lock = asyncio.Lock()
        self._control_locks: dict[str, asyncio.Lock] = {}
        self._points: dict[str, list[MeterPoint]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        if authorizer is not None:
            authorizer.add_listener(self.revalidate)

    # ------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        """Own the authorization/control tasks until cancelled (optional: without it they run
        as loose tasks, cancelled by ``aclose``)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await asyncio.Event().wait()
        finally:
            self._tg = None

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
        self._tasks.clear()

    async def wait_idle(self) -> None:
        """Wait for outstanding authorization/control tasks (tests, orderly shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._tg is not None:
            task = self._tg.create_task(coro, name=name)
        else:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self) -> int:
        """Reload open sessions after a restart; each continues (same id, energy from the
        counters) or is closed as ``end_estimated`` on its charger's first sample."""
        rows = await self._store.load_open_sessions()
        by_charger: dict[str, list[JsonObject]] = {}
        for row in rows:
            nested = row.get("state")
            state = nested if isinstance(nested, dict) else row
            by_charger.setdefault(str(state["charger_id"]), []).append(state)
        count = 0
        effects: list[Effect] = []
        async with self._lock:
            for states in by_charger.values():
                states.sort(key=_started_at)
                for state in states[:-1]:  # never two open sessions on one connector
                    stale = OpenSession.from_state(state)
                    stale.flag(Flag.END_ESTIMATED)
                    stale.ended_at = max(stale.last_activity_ts, stale.started_at)
                    stale.stop_reason = StopReason.UNKNOWN.value
                    await self._load_points(stale.session_id)
                    effects.append(FinishSession(stale, build_record(stale, self.tracker.site_id)))
                session = self.tracker.restore(states[-1])
                await self._load_points(session.session_id)
                count += 1
                log.info(
                    "session_resumed", session_id=session.session_id, charger_id=session.charger_id
                )
            await self._perform(effects)
        return count

    async def _load_points(self, session_id: str) -> None:
        self._points[session_id] = list(await self._store.session_points(session_id))

    # ---------------------------------------------------------------- inputs
    async def on_sample(self, sample: DeviceSample) -> None:
        async with self._lock:
            await self._perform(self.tracker.on_sample(sample))

    async def remote_start(self, charger_id: str, user: str, token: str | None) -> dict[str, Any]:
        """App/remote start of ``user`` on ``charger_id``. Refused (CommandError, nothing
        changed) when the user's token is blocked/expired, the charger unknown, offline or busy.
        A user the gateway does not know is accepted: the cloud vouches for it."""
        now = self._clock.time()
        known = self._authorizer.lookup_user(user) if self._authorizer is not None else None
        grant = Grant.remote(user, token, known, now)
        async with self._lock:
            effects, session_id = self.tracker.remote_start(charger_id, grant, now)
            await self._perform(effects)
        return {
            "charger_id": charger_id,
            "session_id": session_id,
            "started": session_id is not None,
        }

    async def remote_stop(self, charger_id: str | None, session_id: str | None) -> dict[str, Any]:
        async with self._lock:
            if charger_id is None and session_id is not None:
                charger_id = self.tracker.find_session(session_id)
            if charger_id is None:
                raise CommandError("no_session", f"no open session {session_id!r}")
            session = self.tracker.session_of(charger_id)
            if session is None or (session_id is not None and session.session_id != session_id):
                raise CommandError(
                    "no_session", f"no open session {session_id or ''} on {charger_id}"
                )
            stopped = session.session_id
            await self._perform(
                self.tracker.stop(charger_id, StopReason.REMOTE, self._clock.time())
            )
        return {"charger_id": charger_id, "session_id": stopped, "stopped": True}

    async def revalidate(self) -> None:
        """After a token list change: end sessions whose token is now blocked or expired."""
        authorizer = self._authorizer
        if authorizer is None:
            return
        async with self._lock:
            for session in self.tracker.sessions():
                token = session.user.get("token")
                if token is None or session.user.get("auth") == AuthSource.REMOTE.value:
                    continue
                status = authorizer.check(str(token), session.charger_id)
                if status in (AuthStatus.BLOCKED, AuthStatus.EXPIRED):
                    log.info("session_deauthorized", session_id=session.session_id, token=token)
                    await self._perform(
                        self.tracker.stop(
                            session.charger_id, StopReason.DEAUTHORIZED, self._clock.time()
                        )
                    )

    async def begin_transaction(self, start: TransactionStart) -> str:
        """Open the session of a transaction the charger reported; returns its session id
        (persisted before this returns)."""
        async with self._lock:
            effects, session = self.tracker.begin_transaction(start)
            await self._perform(effects)
            return session.session_id

    async def transaction_meter(
        self, session_id: str, ts: float, energy_wh: float, power_w: float | None = None
    ) -> None:
        async with self._lock:
            await self._perform(self.tracker.transaction_meter(session_id, ts, energy_wh, power_w))

    async def end_transaction(self, end: TransactionEnd) -> bool:
        """Close a reported transaction's session (finished, priced, sealed and queued before
        this returns); False when no such session is open."""
        async with self._lock:
            if self.tracker.find_session(end.session_id) is None:
                return False
            await self._perform(self.tracker.end_transaction(end))
            return True

    def open_sessions(self) -> list[dict[str, Any]]:
        return [s.to_state() for s in self.tracker.sessions()]

    async def cost_so_far(self, session_id: str, now: float) -> dict[str, Any] | None:
        """What the open session would cost if it ended at ``now``: its points so far and one
        at ``now`` priced with the tariff frozen at its start (the same pricer as at the end).
        None without a tariff, for an unknown session, or when pricing fails."""
        session = next((s for s in self.tracker.sessions() if s.session_id == session_id), None)
        if session is None or self._pricer is None or session.tariff_data is None:
            return None
        points = list(self._points.get(session_id, ()))
        at = max(now, points[-1].ts if points else session.started_at)
        energy = round(session.energy())
        grew = energy > (points[-1].energy_wh if points else 0)
        points.append(MeterPoint(at, energy, session.interval_charging or grew))
        try:
            result = self._pricer(session.tariff_data, points, session.started_at, at)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # a display must never disturb the session
            log.warning("running_cost_failed", session_id=session_id, error=str(exc))
            return None
        return result[1]

    # --------------------------------------------------------------- effects
    async def _perform(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, StartSession):
                await self._started(effect.session)
            elif isinstance(effect, SaveSession):
                await self._save(effect.session)
            elif isinstance(effect, AddPoint):
                self._points.setdefault(effect.session_id, []).append(effect.point)
                await self._store.add_session_point(effect.session_id, effect.point)
            elif isinstance(effect, FinishSession):
                await self._finish(effect)
            elif isinstance(effect, RequestAuth):
                self._spawn(self._authorize(effect), f"authorize-{effect.charger_id}")
            elif isinstance(effect, SetEnabled):
                if self._chargers is not None and self._chargers.can_control(effect.charger_id):
                    self._spawn(self._set_enabled(effect), f"enable-{effect.charger_id}")
            elif isinstance(effect, StatusChanged) and self._events is not None:
                await self._events.charger_status(effect.charger_id, dict(effect.payload))

    async def _save(self, session: OpenSession) -> None:
        if session.ended_at is None:
            await self._store.save_open_session(
                session.session_id, session.charger_id, session.to_state()
            )

    async def _started(self, session: OpenSession) -> None:
        if self._resolver is not None:
            try:
                resolved = self._resolver(session.charger_id, session.group)
            except Exception as exc:  # a tariff problem must not lose the session
                log.error("tariff_resolve_failed", charger_id=session.charger_id, error=str(exc))
                session.flag(Flag.UNPRICED)
                resolved = None
            if resolved is not None:
                session.tariff_id, session.tariff_version, session.tariff_data = resolved[:3]
                if len(resolved) > 3 and resolved[3] is not None:
                    # Priced by another tariff than the one meant: never silently.
                    session.flag(Flag.TARIFF_FALLBACK)
        await self._save(session)  # on disk before anything is published
        if self._events is None:
            return
        await self._events.session_started(
            {
                "schema": SESSION_STARTED_SCHEMA,
                "session_id": session.session_id,
                "charger_id": session.charger_id,
                "user": session.user.get("id"),
                "started_at": rfc3339(session.started_at),
                "meter_start_wh": None
                if session.meter_start_wh is None
                else round(session.meter_start_wh),
            },
        )

    async def _finish(self, effect: FinishSession) -> None:
        session, facts = effect.session, effect.record
        points = self._points.pop(session.session_id, [])
        assert session.ended_at is not None
        periods: list[dict[str, Any]] | None = None
        cost: dict[str, Any] | None = None
        if self._pricer is not None:
            try:
                result = self._pricer(
                    session.tariff_data, points, session.started_at, session.ended_at
                )
                if inspect.isawaitable(result):
                    result = await result
                periods, cost = result
            except Exception as exc:  # pricing must never lose a session
                log.error("session_pricing_failed", session_id=session.session_id, error=str(exc))
                facts = facts.model_copy(update={"flags": [*facts.flags, Flag.UNPRICED.value]})
        if cost is not None and Flag.NOT_BILLABLE.value in facts.flags:
            # Plugged in but never charged: on record, priced at nothing.
            places = len(str(cost["excl_vat"]).partition(".")[2])  # the currency's minor unit
            zero = f"{0:.{places}f}"
            cost = {**cost, "excl_vat": zero, "vat": zero, "incl_vat": zero, "lines": []}
        default = default_periods(points, session.started_at, session.ended_at)
        try:
            record = facts.priced(default if periods is None else periods, cost)
        except ValidationError as exc:  # a price no record can carry must not lose a session
            log.error("session_price_invalid", session_id=session.session_id, error=str(exc))
            facts = facts.model_copy(update={"flags": [*facts.flags, Flag.UNPRICED.value]})
            record = facts.priced(default, None)
        sealed = await self._store.finish_session(record)
        if self._events is not None:
            await self._events.session_finished(sealed)

    async def _authorize(self, req: RequestAuth) -> None:
        try:
            if self._authorizer is None:
                raise LookupError("no authorizer")
            decision = await self._authorizer.authorize(
                req.token_id, req.token_type, req.charger_id
            )
        except Exception as exc:
            log.error("authorization_failed", charger_id=req.charger_id, error=str(exc))
            status, grant = AuthStatus.UNKNOWN, None
        else:
            status = decision.status
            grant = None
            if decision.accepted:
                token = decision.token
                grant = Grant(
                    user=decision.user,
                    token=token.id if token is not None else req.token_id,
                    token_type=token.type.value if token is not None else req.token_type,
                    auth=decision.source,
                    at=self._clock.time(),
                    group=token.group if token is not None else None,
                    flags=(Flag.OFFLINE_AUTHORIZED.value,) if decision.offline_unknown else (),
                )
        async with self._lock:
            effects = self.tracker.on_auth_result(
                req.charger_id, req.attempt, status, grant, self._clock.time()
            )
            await self._perform(effects)

    async def _set_enabled(self, effect: SetEnabled) -> None:
        assert self._chargers is not None
        lock = self._control_locks.setdefault(effect.charger_id, asyncio.Lock())
        async with lock:
            try:
                await self._chargers.set_enabled(effect.charger_id, effect.enabled)
            except Exception as exc:  # device failures are data: logged, the session goes on
                log.error(
                    "charger_control_failed",
                    charger_id=effect.charger_id,
                    enabled=effect.enabled,
                    error=str(exc),
                )


def _started_at(state: JsonObject) -> float:
    value = state.get("started_at")
    return float(value) if isinstance(value, int | float) else 0.0
