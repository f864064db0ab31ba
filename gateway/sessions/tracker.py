"""The plug/authorization state machine of the session tracker: pure, no awaits, no I/O.

``SessionTracker`` is fed samples, authorization results and commands, with the time carried by
the samples (or passed in), and returns effects (``gateway.sessions.effects``). What it decides on
counter readings alone (start readings, swaps, bookkeeping) is ``gateway.sessions.counters``;
a session's energy and record are ``gateway.sessions.ledger``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import structlog

from gateway.errors import CommandError
from gateway.model import (
    AuthSource,
    AuthStatus,
    ChargerStatus,
    DeviceSample,
    Flag,
    MeterPoint,
    StopReason,
    new_session_id,
    rfc3339,
)
from gateway.sessions.connector import (
    CHARGING_POWER_W,
    ChargerSpec,
    Connector,
    Grant,
    TransactionEnd,
    TransactionStart,
    is_charging,
    is_plugged,
    note_power,
    user_of,
)
from gateway.sessions.counters import CounterReadings
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
from gateway.sessions.ledger import OpenSession, build_record
from gateway.tags import normalise_tag

__all__ = ["SessionTracker"]

log = structlog.get_logger(__name__)

POINT_EVERY_S = 60.0
# A charger reporting its own transactions sends meter values every few minutes (OCPP
# MeterValueSampleInterval) and replays them after an outage: comms_gap only beyond 3 x this.
TRANSACTION_INTERVAL_S = 300.0


class SessionTracker:
    """Pure session state machine over all charger connectors of a site (no awaits, no I/O)."""

    def __init__(
        self,
        chargers: Iterable[ChargerSpec],
        *,
        site_id: str,
        grace_s: float = 120.0,
        plug_timeout_s: float = 120.0,
        new_id: Callable[[float], str] = new_session_id,
    ) -> None:
        self.site_id = site_id
        self.grace_s = grace_s
        self.plug_timeout_s = plug_timeout_s
        self._new_id = new_id
        self._conns: dict[str, Connector] = {}
        self._counters = CounterReadings()
        self._meter_of: dict[str, list[str]] = {}
        for spec in chargers:
            self.add_charger(spec)

    # ---------------------------------------------------------------- setup
    def add_charger(self, spec: ChargerSpec) -> None:
        self._conns[spec.charger_id] = Connector(spec, confirmed=spec.confirmed)
        if spec.meter_id is not None:
            self._meter_of.setdefault(spec.meter_id, []).append(spec.charger_id)

    def is_charger(self, device_id: str) -> bool:
        return device_id in self._conns

    def session_of(self, charger_id: str) -> OpenSession | None:
        conn = self._conns.get(charger_id)
        return None if conn is None else conn.session

    def sessions(self) -> list[OpenSession]:
        return [c.session for c in self._conns.values() if c.session is not None]

    def restore(self, state: Mapping[str, Any]) -> OpenSession:
        """Continue a persisted open session after a restart. Its fate is decided by the first
        online sample of its charger: same plug -> continue; unplugged, a different tag or a
        session-counter drop -> close it with ``end_estimated`` at its last persisted activity."""
        session = OpenSession.from_state(state)
        conn = self._conns.get(session.charger_id)
        if conn is None:
            conn = Connector(ChargerSpec(session.charger_id, session.connector))
            self._conns[session.charger_id] = conn
        conn.session = session
        conn.confirmed = True
        conn.resumed = True
        conn.plugged = True
        conn.seen_tag = session.tag
        conn.offline_since = session.last_activity_ts
        return session

    # ----------------------------------------------------------------- input
    def on_sample(self, sample: DeviceSample) -> list[Effect]:
        effects: list[Effect] = []
        if sample.device_id in self._meter_of:
            self._on_meter(sample, effects)
        conn = self._conns.get(sample.device_id)
        if conn is not None:
            self._on_charger(conn, sample, effects)
        return effects

    def on_auth_result(
        self,
        charger_id: str,
        attempt: int,
        status: AuthStatus,
        grant: Grant | None,
        now: float,
    ) -> list[Effect]:
        """The answer to a ``RequestAuth``; ``grant`` is set when accepted. Answers to an
        attempt that was superseded (tag changed, unplug+new tag) are ignored."""
        effects: list[Effect] = []
        conn = self._conns[charger_id]
        if attempt != conn.attempt or conn.pending_token is None:
            log.info("auth_result_stale", charger_id=charger_id, attempt=attempt)
            return effects
        token = conn.pending_token
        conn.pending_token = None
        if grant is not None:
            grant = replace(grant, tag=token)
        if grant is None or status is not AuthStatus.ACCEPTED:
            log.info("charging_refused", charger_id=charger_id, token=token, status=status.value)
            effects.append(SetEnabled(charger_id, False))
            return effects
        session = conn.session
        if session is not None:
            self._identify(session, grant, effects)
            effects.append(SetEnabled(charger_id, True))
            return effects
        conn.grant = grant
        conn.stopped_while_plugged = False
        effects.append(SetEnabled(charger_id, True))
        if conn.plugged and conn.online:
            self._start(conn, grant, now, effects)
        self._status(conn, now, effects)
        return effects

    def remote_start(
        self, charger_id: str, grant: Grant, now: float
    ) -> tuple[list[Effect], str | None]:
        """Authorize a connector from the app. Raises CommandError when the charger is unknown,
        offline or busy. Returns the effects and the new session id (None until plug-in)."""
        conn = self._conns.get(charger_id)
        if conn is None:
            raise CommandError("unknown_charger", f"no charger {charger_id!r}")
        if conn.online is False:
            raise CommandError("charger_offline", f"charger {charger_id} is offline")
        effects: list[Effect] = []
        if conn.session is not None:
            if self._identify(conn.session, grant, effects):  # the app names the anonymous one
                effects.append(SetEnabled(charger_id, True))
                return effects, conn.session.session_id
            raise CommandError(
                "busy", f"charger {charger_id} has session {conn.session.session_id}"
            )
        conn.grant = grant
        conn.pending_token = None
        conn.attempt += 1
        conn.stopped_while_plugged = False
        effects.append(SetEnabled(charger_id, True))
        session_id: str | None = None
        if conn.plugged:
            conn.anchor_at(now, self._counters.reading(conn, now))
            session_id = self._start(conn, grant, now, effects).session_id
        self._status(conn, now, effects)
        return effects, session_id

    def stop(self, charger_id: str, reason: StopReason, now: float) -> list[Effect]:
        """End the connector's session for ``reason`` (remote stop, deauthorization) and disable
        the charger; raises CommandError when it has none."""
        conn = self._conns.get(charger_id)
        if conn is None or conn.session is None:
            raise CommandError("no_session", f"no open session on {charger_id!r}")
        effects: list[Effect] = []
        ended_at = max(now, conn.session.last_sample_ts or now)
        self._end(conn, reason, ended_at, effects)
        conn.stopped_while_plugged = conn.plugged
        effects.append(SetEnabled(charger_id, False))
        self._status(conn, now, effects)
        return effects

    def _identify(self, session: OpenSession, grant: Grant, effects: list[Effect]) -> bool:
        """Name the user of an unidentified session (tag accepted late, app start)."""
        if session.user.get("id") is not None or Flag.UNIDENTIFIED.value not in session.flags:
            return False
        session.user = user_of(grant)
        session.group = grant.group
        session.tag = grant.tag or session.tag
        session.flags.remove(Flag.UNIDENTIFIED.value)
        for f in grant.flags:
            session.flag(f)
        log.info("session_identified", session_id=session.session_id, user=grant.user)
        effects.append(SaveSession(session))
        return True

    def find_session(self, session_id: str) -> str | None:
        for charger_id, conn in self._conns.items():
            if conn.session is not None and conn.session.session_id == session_id:
                return charger_id
        return None

    # -------------------------------------------------------------- meters
    def _on_meter(self, sample: DeviceSample, effects: list[Effect]) -> None:
        source = f"meter:{sample.device_id}"
        chargers = self._meter_of[sample.device_id]
        counter = self._conns[chargers[0]].spec.counter(source)
        raw, energy = self._counters.take_meter(sample, counter)
        if raw is None:
            return
        for charger_id in chargers:
            conn = self._conns[charger_id]
            if conn.session is None:
                if (
                    energy is not None
                    and conn.anchor_ts is not None
                    and conn.anchor_wh is None
                    and conn.plugged
                ):
                    conn.anchor_wh = energy  # latched: the start reading comes late
                    conn.anchor_latched = True
                continue
            session = conn.session
            if session.source != source:
                continue
            note_power(session, sample.power_w, conn.spec.max_power_w)
            if session.feed(
                raw, sample.ts, conn.spec.meter_poll_interval_s, conn.spec.max_power_w, counter
            ):
                effects.append(SaveSession(session))

    # ------------------------------------------------------------- chargers
    def _on_charger(self, conn: Connector, s: DeviceSample, effects: list[Effect]) -> None:
        if conn.spec.transactional:
            self._on_transactional(conn, s, effects)
            return
        now = s.ts
        cid = conn.spec.charger_id
        if not conn.confirmed:
            if s.status is None and s.iec is None and not s.tag:
                return  # a meter nobody named as a charger's meter: not ours
            conn.confirmed = True
        if not s.online:
            if conn.online is not False:
                conn.offline_since = conn.last_online_ts if conn.last_online_ts is not None else now
                log.warning("charger_offline", charger_id=cid, error=s.error)
            conn.online = False
            conn.status = None
            conn.power_w = None
            self._status(conn, now, effects)
            return
        returning = conn.online is False or conn.resumed
        # A plug-in seen on the first sample after a start or an outage was not witnessed.
        unwitnessed = conn.online is not True or conn.resumed
        offline_s = (
            now - conn.offline_since if (returning and conn.offline_since is not None) else 0.0
        )
        resumed = conn.resumed
        conn.online = True
        conn.resumed = False
        conn.offline_since = None
        conn.last_online_ts = now
        conn.status = s.status
        conn.power_w = s.power_w
        sc = self._counters.take_charger(conn, s)
        plugged = is_plugged(s, conn.plugged)
        charging = is_charging(s)
        tag = normalise_tag(s.tag)
        new_tag = tag is not None and tag != conn.seen_tag
        conn.seen_tag = tag

        session = conn.session
        if session is not None:
            swapped = self._counters.swapped(session, sc)
            if swapped and not (new_tag and session.tag is not None and tag != session.tag):
                # A drop of the session counter alone could be a glitch: the next sample, the
                # new car's counter going on from it, confirms the swap.
                assert sc is not None
                swapped = self._counters.swap_confirmed(session, now, sc)
            elif session.swap_seen is not None:
                log.warning(
                    "session_counter_glitch_ignored",
                    session_id=session.session_id,
                    seen_wh=session.swap_seen[1],
                    session_counter_wh=sc,
                )
                session.swap_seen = None
            if not swapped and session.swap_seen is None:
                self._counters.feed_charger_counter(conn, session, s, plugged)
            estimated = resumed or offline_s > self.grace_s
            # An estimated end is the last time the session was seen alive.
            end_at = session.last_activity_ts if estimated else now
            token = session.tag
            if not plugged:
                self._counters.account(conn, session, now, charging=False, plugged=False)
                self._end(conn, StopReason.EV_DISCONNECTED, end_at, effects, estimated=estimated)
            elif swapped:
                # The EV was unplugged and another plugged in between two polls: the charger's
                # session counter restarted. Split the lifetime counter with it where possible.
                assert sc is not None
                floor = session.swap_seen[2] if session.swap_seen is not None else None
                session.swap_seen = None
                split = self._counters.split(conn, session, now, sc, floor)
                self._counters.account(conn, session, now, charging=False, plugged=True)
                stop = (
                    StopReason.LOCAL
                    if (new_tag and token and tag != token)
                    else StopReason.EV_DISCONNECTED
                )
                log.info("car_swap_detected", charger_id=cid, session_id=session.session_id)
                self._end(
                    conn,
                    stop,
                    end_at,
                    effects,
                    estimated=estimated,
                )
                self._counters.new_plug(conn, now, split)
                new_tag = tag is not None
            elif new_tag and token is not None and tag != token:
                self._counters.account(conn, session, now, charging=charging, plugged=True)
                log.info("tag_changed", charger_id=cid, session_id=session.session_id, tag=tag)
                self._end(
                    conn,
                    StopReason.LOCAL,
                    end_at,
                    effects,
                    estimated=estimated,
                )
                self._counters.new_plug(conn, now, self._counters.reading(conn, now))
            else:
                self._counters.account(conn, session, now, charging=charging, plugged=True)
                self._points(session, now, effects)
                if session.user.get("id") is None and tag and new_tag and not conn.pending_token:
                    self._request(conn, tag, now, effects)  # identify the running session
                    new_tag = False
        if conn.session is None:
            if plugged and not conn.plugged:
                if unwitnessed:
                    self._counters.unwitnessed_plug(conn, now)
                else:
                    self._counters.witnessed_plug(conn, now)
            elif not plugged and conn.plugged:
                conn.plugged = False
                conn.anchor_ts = conn.anchor_wh = None
                conn.stopped_while_plugged = False
            conn.plugged = plugged
            source = self._counters.source(conn)
            if plugged and conn.anchor_wh is None and source and not source.startswith("meter:"):
                conn.anchor_wh = self._counters.reading(conn, now)  # latched from the charger
                conn.anchor_latched = conn.anchor_wh is not None
            if new_tag and tag is not None:
                self._request(conn, tag, now, effects)
            grant = conn.grant
            if grant is not None and not plugged and now - grant.at > self.plug_timeout_s:
                log.info("authorization_expired", charger_id=cid, user=grant.user)
                conn.grant = None
                effects.append(SetEnabled(cid, False))
            elif grant is not None and plugged:
                self._start(conn, grant, now, effects)
            elif (
                plugged
                and charging
                and conn.pending_token is None
                and not conn.stopped_while_plugged
            ):
                # The charger authorized by itself (no tag, or its own card list).
                unidentified = Grant(
                    user=None,
                    token=tag,
                    token_type=None,
                    auth=AuthSource.LOCAL,
                    at=now,
                    flags=(Flag.UNIDENTIFIED.value,),
                    tag=tag,
                )
                log.warning("unidentified_charging", charger_id=cid, tag=tag)
                self._start(conn, unidentified, now, effects)
            elif plugged and charging and conn.stopped_while_plugged:
                log.debug("charging_after_stop", charger_id=cid)
            session = conn.session
            if session is not None:
                self._counters.account(conn, session, now, charging=charging, plugged=True)
                self._points(session, now, effects)
        else:
            conn.plugged = plugged
        self._status(conn, now, effects)

    # ---------------------------------------------------- transactional chargers
    def _on_transactional(self, conn: Connector, s: DeviceSample, effects: list[Effect]) -> None:
        """Status and power of a charger that reports its transactions itself: never opens or
        closes a session (a queued StopTransaction may still be on its way)."""
        now = s.ts
        conn.resumed = False
        if not s.online:
            if conn.online is not False:
                log.warning("charger_offline", charger_id=conn.spec.charger_id, error=s.error)
            conn.online, conn.status, conn.power_w = False, None, None
        else:
            conn.online = True
            conn.last_online_ts = now
            if s.status is not None:
                conn.status = s.status
            conn.power_w = s.power_w if s.power_w is not None else conn.power_w
            conn.plugged = is_plugged(s, conn.plugged)
            session = conn.session
            if session is not None and conn.plugged:
                session.last_activity_ts = max(session.last_activity_ts, now)
                if conn.power_w is not None:
                    session.max_power_w = max(session.max_power_w, conn.power_w)
        self._status(conn, now, effects)

    def begin_transaction(self, start: TransactionStart) -> tuple[list[Effect], OpenSession]:
        """A session still open on the connector lost its end (the charger never reported it):
        it is closed first at its last activity, flagged ``end_estimated``."""
        ts = start.ts
        conn = self._conns[start.charger_id]
        effects: list[Effect] = []
        if conn.session is not None:
            old = conn.session
            log.warning(
                "transaction_end_missing",
                charger_id=start.charger_id,
                session_id=old.session_id,
                ocpp=old.ocpp,
            )
            self._end(
                conn,
                StopReason.UNKNOWN,
                min(max(old.last_activity_ts, old.started_at), ts),
                effects,
                estimated=True,
            )
        conn.anchor_at(ts, round(start.meter_start_wh))
        session = self._start(conn, start.grant, ts, effects)
        session.source = "transaction"
        session.ocpp = dict(start.ocpp)
        session.charging = conn.status is ChargerStatus.CHARGING
        session.last_activity_ts = max(session.last_activity_ts, ts)
        conn.plugged = True
        self._status(conn, ts, effects)
        return effects, session

    def transaction_meter(
        self, session_id: str, ts: float, energy_wh: float, power_w: float | None = None
    ) -> list[Effect]:
        """A reading of the charger's energy register within an open transaction (MeterValues,
        transactionData). Readings older than the last one are ignored by ``OpenSession.feed``;
        the same guards as for Modbus counters apply."""
        effects: list[Effect] = []
        found = self._open_transaction(session_id)
        if found is None:
            return effects
        conn, session = found
        if session.feed(energy_wh, ts, TRANSACTION_INTERVAL_S, conn.spec.max_power_w):
            effects.append(SaveSession(session))
        if power_w is not None:
            session.max_power_w = max(session.max_power_w, power_w)
        charging = conn.status is ChargerStatus.CHARGING or (
            power_w is not None and power_w >= CHARGING_POWER_W
        )
        self._counters.account(conn, session, ts, charging=charging, plugged=True)
        self._points(session, ts, effects)
        return effects

    def end_transaction(self, end: TransactionEnd) -> list[Effect]:
        effects: list[Effect] = []
        found = self._open_transaction(end.session_id)
        if found is None:
            return effects
        conn, session = found
        if end.ocpp:
            session.ocpp = {**(session.ocpp or {}), **end.ocpp}
        ts = max(end.ts, session.started_at)
        session.feed(end.meter_stop_wh, ts, TRANSACTION_INTERVAL_S, conn.spec.max_power_w)
        self._counters.account(conn, session, ts, charging=False, plugged=True)
        self._end(conn, end.reason, ts, effects, estimated=end.estimated)
        conn.plugged = bool(conn.status is not None and conn.status.plugged)
        self._status(conn, ts, effects)
        return effects

    def _open_transaction(self, session_id: str) -> tuple[Connector, OpenSession] | None:
        """The connector and open session of ``session_id``; None when it is not (or no
        longer) open: a replayed or unknown transaction."""
        charger_id = self.find_session(session_id)
        if charger_id is None:
            return None
        conn = self._conns[charger_id]
        assert conn.session is not None
        return conn, conn.session

    def _points(self, session: OpenSession, now: float, effects: list[Effect]) -> None:
        energy = round(session.energy())
        grew = energy > session.last_point_wh
        if session.last_point_ts is None:
            self._point(session, now, False, effects)
            session.interval_charging = session.charging
            return
        if session.charging != session.interval_charging:
            self._point(session, now, session.interval_charging or grew, effects)
            session.interval_charging = session.charging
            effects.append(SaveSession(session))
        elif now - session.last_point_ts >= POINT_EVERY_S:
            self._point(session, now, session.interval_charging or grew, effects)
            effects.append(SaveSession(session))

    def _point(
        self, session: OpenSession, ts: float, charging: bool, effects: list[Effect]
    ) -> None:
        if session.last_point_ts is not None:
            ts = max(ts, session.last_point_ts)
        energy = round(session.energy())
        session.last_point_ts = ts
        session.last_point_wh = energy
        power = self._conns[session.charger_id].power_w or 0.0
        effects.append(AddPoint(session.session_id, MeterPoint(ts, energy, charging, power)))

    def _request(self, conn: Connector, tag: str, now: float, effects: list[Effect]) -> None:
        conn.attempt += 1
        conn.pending_token = tag
        if conn.session is None:
            conn.grant = None
            # The start reading is taken when the authorization begins, unless the EV was
            # plugged in at this very sample (a swap keeps its split reading).
            if conn.plugged and (conn.anchor_ts is None or conn.anchor_ts < now):
                self._counters.anchor_at_tag(conn, now)
        effects.append(RequestAuth(conn.spec.charger_id, tag, "rfid", conn.attempt))

    def _start(
        self, conn: Connector, grant: Grant, now: float, effects: list[Effect]
    ) -> OpenSession:
        # The anchor is the later of plug-in and the beginning of the authorization.
        started_at = conn.anchor_ts if conn.anchor_ts is not None else now
        source = self._counters.source(conn)
        session = OpenSession(
            session_id=self._new_id(started_at),
            charger_id=conn.spec.charger_id,
            connector=conn.spec.connector,
            started_at=started_at,
            user=user_of(grant),
            group=grant.group,
            flags=list(grant.flags),
            tag=grant.tag,
            source=source,
            last_activity_ts=now,
            last_sample_ts=started_at,
        )
        start = conn.anchor_wh if conn.anchor_ts is not None else self._counters.reading(conn, now)
        if start is not None:
            seen: int | None = None
            if conn.anchor_reconstructed and conn.anchor_seen_wh is not None:
                session.flag(Flag.START_RECONSTRUCTED)
                # Plausibility checks continue from the reading that was seen, not from the
                # dated-back start (whose time is unknown).
                seen = round(conn.anchor_seen_wh)
            session.begin(round(start), now, seen)
            if conn.anchor_latched:
                session.flag(Flag.START_LATCHED)
            pre = self._counters.previous(conn, source)
            fresh_s = 3 * self._counters.interval(conn, session) + 1.0
            if seen is None and pre is not None and pre[1] != start and now - pre[0] <= fresh_s:
                session.pre_start = [pre[1], pre[0]]
        if conn.session_wh is not None:
            session.sc_base_wh = session.sc_last_wh = conn.session_wh[1]
        conn.session = session
        conn.grant = None
        conn.anchor_ts = conn.anchor_wh = None
        log.info(
            "session_started",
            session_id=session.session_id,
            charger_id=session.charger_id,
            user=grant.user,
            auth=grant.auth.value,
            meter_start_wh=start,
            source=source,
        )
        effects.append(StartSession(session))
        self._point(session, started_at, False, effects)
        session.interval_charging = False
        return session

    def _end(
        self,
        conn: Connector,
        reason: StopReason,
        ended_at: float,
        effects: list[Effect],
        *,
        estimated: bool = False,
    ) -> None:
        session = conn.session
        assert session is not None
        if estimated:
            session.flag(Flag.END_ESTIMATED)
        session.ended_at = max(ended_at, session.started_at)
        session.stop_reason = reason.value
        self._point(
            session, session.ended_at, session.interval_charging or session.charging, effects
        )
        record = build_record(session, self.site_id)
        log.info(
            "session_finished",
            session_id=session.session_id,
            charger_id=session.charger_id,
            stop_reason=reason.value,
            energy_wh=record.energy_wh,
            flags=record.flags,
        )
        effects.append(FinishSession(session, record))
        conn.session = None
        conn.grant = None
        conn.anchor_ts = conn.anchor_wh = None

    def _status(self, conn: Connector, now: float, effects: list[Effect]) -> None:
        if not conn.online:
            status = ChargerStatus.UNAVAILABLE
        elif conn.status is not None:
            status = conn.status
        else:
            status = ChargerStatus.PREPARING if conn.plugged else ChargerStatus.AVAILABLE
        session_id = conn.session.session_id if conn.session is not None else None
        key = (status.value, bool(conn.online), session_id)
        if key == conn.last_status:
            return
        conn.last_status = key
        power = conn.power_w if conn.online else None
        effects.append(
            StatusChanged(
                conn.spec.charger_id,
                {
                    "device_id": conn.spec.charger_id,
                    "status": status.value,
                    "online": bool(conn.online),
                    "session_id": session_id,
                    "power_w": None if power is None else round(power),
                    "ts": rfc3339(now),
                },
            )
        )
