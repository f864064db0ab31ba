"""Turning device samples into billable sessions.

``SessionTracker`` is pure logic: it is fed samples, authorization results and commands, with
the time carried by the samples (or passed in), and returns *effects* (persist, start, finish,
ask for authorization, enable/disable a charger, publish a status, add a curve point). It never
awaits. ``SessionManager`` performs those effects through the ``gateway.ports`` Protocols, so
neither imports SQLite, MQTT or Modbus code.

Rules (one connector per charger device):

* A session starts when an EV is plugged in *and* the connector is authorized, in either order:
  a tag shown by the charger and accepted by the ``Authorizer`` (tag before or after plug-in),
  or a remote start by the app. An authorization made before plug-in waits ``plug_timeout_s``.
  A charger that delivers energy without any authorization (it authorizes by itself, or shows
  no tag) gets a session with ``user.id`` null, ``user.auth`` "local" and the flag
  ``unidentified``; a tag accepted later identifies that same session.
* Its start time and start reading are taken at the later of plug-in and the beginning of the
  authorization (a self-authorizing charger may start charging while the cloud answers).
* It ends at unplug (``ev_disconnected``), remote stop (``remote``), deauthorization
  (``deauthorized``, after a token list change blocks its token), a different tag on the same
  connector (``local``), or a car swap within one poll seen as a drop of the charger's session
  counter (``ev_disconnected``). A charger found unplugged after being offline longer than
  ``grace_s`` (or after a gateway restart) ends it at its last seen activity with the flag
  ``end_estimated``.
* Energy comes from one cumulative counter chosen at the start: the charger's ``meter:``
  device, else the charger's ``energy_wh``, else its ``session_energy_wh``. See ``OpenSession.feed``
  for the guards (latched start, resets, rollovers, implausible jumps, gaps).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from gateway.config import GatewayConfig
from gateway.errors import CommandError
from gateway.model import (
    SESSION_SCHEMA,
    SESSION_STARTED_SCHEMA,
    AuthSource,
    AuthStatus,
    ChargerStatus,
    Clock,
    DeviceSample,
    Flag,
    IecState,
    MeterPoint,
    StopReason,
    SystemClock,
    new_session_id,
    rfc3339,
)
from gateway.ports import ChargerControl, SessionStore
from gateway.tags import normalise_tag

__all__ = [
    "AddPoint",
    "ChargerSpec",
    "Effect",
    "FinishSession",
    "Grant",
    "OpenSession",
    "RequestAuth",
    "SaveSession",
    "SessionManager",
    "SessionTracker",
    "SetEnabled",
    "StartSession",
    "StatusChanged",
    "default_periods",
]

log = structlog.get_logger(__name__)

DEFAULT_MAX_POWER_W = 100_000.0  # no AC charger on a Modbus gateway delivers more
SLACK_WH = 100.0  # counter resolution / timing slack in the plausibility bound
SWAP_MIN_WH = 50.0  # session counter must have risen this much before a drop means "new car"
POINT_EVERY_S = 60.0
GAP_POLLS = 3  # readings missing for more than this many poll intervals: comms_gap
CHARGING_POWER_W = 100.0  # status-less chargers: this much power means charging

UNIDENTIFIED = Flag.UNIDENTIFIED.value
UNPRICED = Flag.UNPRICED.value


# --------------------------------------------------------------------------- types
@dataclass(frozen=True, slots=True)
class ChargerSpec:
    charger_id: str
    connector: int = 1
    meter_id: str | None = None
    poll_interval_s: float = 1.0
    meter_poll_interval_s: float = 1.0
    max_power_w: float = DEFAULT_MAX_POWER_W
    controllable: bool = False
    # False when the device was only guessed to be a charger (not a configured meter): it is
    # treated as one once a sample shows a charger status, IEC state or tag.
    confirmed: bool = True
    # The charger's session counter restarts at every plug-in (profile ``session_energy_resets:
    # plug``): a plug-in the gateway did not witness can be dated back by it.
    session_counter_resets_on_plug: bool = False
    # Bill from that session counter rather than a coarse lifetime counter (Vestel counts its
    # lifetime energy in 0.1 kWh steps but the session in Wh).
    prefer_session_counter: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    """An accepted authorization of a connector, waiting for (or used by) a session."""

    user: str | None
    token: str | None
    token_type: str | None
    auth: AuthSource
    at: float
    group: str | None = None
    flags: tuple[str, ...] = ()
    tag: str | None = None  # the tag as the charger shows it (may be a truncated UID)


@dataclass(slots=True)
class OpenSession:
    """The durable state of a running session (``to_state``/``from_state`` round-trip JSON)."""

    session_id: str
    charger_id: str
    connector: int
    started_at: float
    user: dict[str, Any]
    group: str | None = None
    flags: list[str] = field(default_factory=list)
    tag: str | None = None  # as shown by the charger: a different one ends the session
    source: str | None = None  # "meter:<id>" | "energy_wh" | "session_energy_wh"
    meter_start_wh: float | None = None
    seg_start_wh: float | None = None
    last_wh: float | None = None
    banked_wh: float = 0.0
    last_counter_ts: float | None = None
    undo: list[float] | None = None  # [seg_start, last_wh, last_ts, banked] before last reset
    charging_s: float = 0.0
    idle_s: float = 0.0
    max_power_w: float = 0.0
    charging: bool = False  # measured state at the last sample
    ever_charged: bool = False
    last_sample_ts: float | None = None
    last_activity_ts: float = 0.0  # last time seen online and plugged in
    sc_base_wh: float | None = None  # charger's session counter at start (swap detection)
    sc_last_wh: float | None = None
    tariff_id: str | None = None
    tariff_version: str | None = None
    tariff_data: dict[str, Any] | None = None
    last_point_ts: float | None = None
    last_point_wh: int = 0
    interval_charging: bool = False
    ended_at: float | None = None
    stop_reason: str | None = None

    # ------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OpenSession:
        known = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        session = cls(**known)
        session.flags = list(session.flags)
        return session

    def flag(self, name: str) -> bool:
        """Add a flag; True when it is new."""
        if name in self.flags:
            return False
        self.flags.append(name)
        return True

    # ----------------------------------------------------------- energy
    def energy(self) -> float:
        if self.seg_start_wh is None or self.last_wh is None:
            return 0.0
        return max(0.0, self.banked_wh + self.last_wh - self.seg_start_wh)

    def feed(self, reading_wh: float, ts: float, interval_s: float, max_power_w: float) -> bool:
        """Take one reading of the session's cumulative counter. Returns True when something a
        bill reader must know changed (a flag, a rebase), so the state should be persisted.

        Guards:
        * no start reading yet (meter silent at start): the first reading becomes the start
          (flag ``start_latched``); a lifetime counter is never taken as session energy;
        * a reading older than the previous one is ignored (late sample);
        * a gap of more than ``GAP_POLLS`` poll intervals between readings: flag ``comms_gap``
          (energy stays exact: it is the counter difference);
        * a drop (reset, rollover, replaced meter) or a rise above ``max_power_w`` x elapsed
          time + ``SLACK_WH`` (implausible jump, e.g. a replaced meter with a higher count):
          - nothing counted yet: rebase the start on the new value (e.g. ABB Terra AC resetting
            its session counter just after plug-in), no flag;
          - otherwise flag ``meter_reset``, bank the energy of the segment before, and start a
            new segment at 0 if the new value is itself plausible as energy since the reset
            (counter restarted from zero), else at the new value;
          - a reading that continues the segment from before the reset (a one-sample glitch)
            undoes the reset, so the energy stays exact.
        """
        if self.seg_start_wh is None or self.last_wh is None or self.last_counter_ts is None:
            latched = self.meter_start_wh is None and ts > self.started_at + interval_s
            self.meter_start_wh = self.seg_start_wh = self.last_wh = reading_wh
            self.last_counter_ts = ts
            if latched:
                self.flag(Flag.START_LATCHED)
                log.warning(
                    "session_start_latched", session_id=self.session_id, meter_wh=reading_wh
                )
            return True
        if ts < self.last_counter_ts:
            return False
        changed = False
        gap_s = ts - self.last_counter_ts
        if gap_s > GAP_POLLS * interval_s:
            changed |= self.flag(Flag.COMMS_GAP)
        limit_wh = max_power_w * max(gap_s, interval_s) / 3600.0 + SLACK_WH
        delta = reading_wh - self.last_wh
        if 0 <= delta <= limit_wh:
            self.last_wh = reading_wh
            self.last_counter_ts = ts
            return changed
        if self.undo is not None:
            seg, last, last_ts, banked = self.undo
            back = reading_wh - last
            if 0 <= back <= max_power_w * max(ts - last_ts, interval_s) / 3600.0 + SLACK_WH:
                self.seg_start_wh, self.banked_wh = seg, banked
                self.last_wh, self.last_counter_ts, self.undo = reading_wh, ts, None
                log.warning("meter_glitch_undone", session_id=self.session_id, meter_wh=reading_wh)
                return True
        if self.energy() <= 0.0:
            log.info(
                "session_counter_rebased",
                session_id=self.session_id,
                old_wh=self.last_wh,
                new_wh=reading_wh,
            )
            self.meter_start_wh = self.seg_start_wh = self.last_wh = reading_wh
            self.last_counter_ts = ts
            return True
        self.undo = [self.seg_start_wh, self.last_wh, self.last_counter_ts, self.banked_wh]
        self.banked_wh += self.last_wh - self.seg_start_wh
        restarted = delta < 0 and reading_wh <= limit_wh
        self.seg_start_wh = 0.0 if restarted else reading_wh
        log.warning(
            "meter_reset",
            session_id=self.session_id,
            previous_wh=self.last_wh,
            reading_wh=reading_wh,
            restarted_from_zero=restarted,
        )
        self.last_wh = reading_wh
        self.last_counter_ts = ts
        self.flag(Flag.METER_RESET)
        return True

    # ----------------------------------------------------------- record
    def to_record(self, site_id: str) -> dict[str, Any]:
        assert self.ended_at is not None and self.stop_reason is not None
        flags = list(self.flags)
        if self.meter_start_wh is None:
            for name in (Flag.NO_METER, Flag.NOT_BILLABLE):
                if name not in flags:
                    flags.append(name)
        elif round(self.energy()) == 0 and Flag.NOT_BILLABLE not in flags:
            flags.append(Flag.NOT_BILLABLE)
        return {
            "schema": SESSION_SCHEMA,
            "session_id": self.session_id,
            "site_id": site_id,
            "charger_id": self.charger_id,
            "connector": self.connector,
            "user": dict(self.user),
            "started_at": rfc3339(self.started_at),
            "ended_at": rfc3339(self.ended_at),
            "charging_s": round(self.charging_s),
            "idle_s": round(self.idle_s),
            "meter_start_wh": None if self.meter_start_wh is None else round(self.meter_start_wh),
            "meter_stop_wh": None if self.last_wh is None else round(self.last_wh),
            "energy_wh": round(self.energy()),
            "max_power_w": round(self.max_power_w),
            "stop_reason": self.stop_reason,
            "tariff_id": self.tariff_id,
            "tariff_version": self.tariff_version,
            "flags": [str(f) for f in flags],
        }


# --------------------------------------------------------------------------- effects
@dataclass(frozen=True, slots=True)
class SaveSession:
    session: OpenSession


@dataclass(frozen=True, slots=True)
class StartSession:
    """Persist (after freezing the tariff), then publish ``sessions/started``."""

    session: OpenSession


@dataclass(frozen=True, slots=True)
class FinishSession:
    session: OpenSession
    record: dict[str, Any]  # without charging_periods/cost (pricer) and seq/hashes (store)


@dataclass(frozen=True, slots=True)
class RequestAuth:
    charger_id: str
    token_id: str
    token_type: str
    attempt: int


@dataclass(frozen=True, slots=True)
class SetEnabled:
    charger_id: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class StatusChanged:
    charger_id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AddPoint:
    session_id: str
    point: MeterPoint


Effect = (
    SaveSession | StartSession | FinishSession | RequestAuth | SetEnabled | StatusChanged | AddPoint
)


# --------------------------------------------------------------------------- tracker
@dataclass(slots=True)
class _Connector:
    spec: ChargerSpec
    confirmed: bool = True
    online: bool | None = None
    offline_since: float | None = None
    last_online_ts: float | None = None
    plugged: bool = False
    status: ChargerStatus | None = None
    power_w: float | None = None
    seen_tag: str | None = None
    energy_wh: tuple[float, float] | None = None  # (ts, value) of the charger's lifetime counter
    session_wh: tuple[float, float] | None = None  # (ts, value) of the charger's session counter
    sc_plug_base: float | None = None
    anchor_ts: float | None = None
    anchor_wh: float | None = None
    anchor_latched: bool = False
    anchor_reconstructed: bool = False
    anchor_seen_wh: float | None = None  # the counter when a reconstructed anchor was made
    grant: Grant | None = None
    attempt: int = 0
    pending_token: str | None = None
    stopped_while_plugged: bool = False
    session: OpenSession | None = None
    resumed: bool = False
    last_status: tuple[str, bool, str | None] | None = None


def _plugged(sample: DeviceSample, previous: bool) -> bool:
    if sample.iec in (IecState.B, IecState.C, IecState.D):
        return True
    if sample.iec is IecState.A:
        return False
    if sample.status is None:
        return previous
    if sample.status.plugged:
        return True
    if sample.status is ChargerStatus.AVAILABLE:
        return False
    return previous  # faulted / unavailable: the cable state is not known


def _charging(sample: DeviceSample) -> bool:
    if sample.status is not None:
        return sample.status is ChargerStatus.CHARGING
    power = sample.power_w
    return power is not None and power >= CHARGING_POWER_W


def _norm_tag(tag: str | None) -> str | None:
    return normalise_tag(tag)


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
        self._conns: dict[str, _Connector] = {}
        self._meters: dict[str, tuple[float, float, float | None]] = {}  # id -> (ts, wh, power)
        self._meter_of: dict[str, list[str]] = {}
        for spec in chargers:
            self.add_charger(spec)

    # ---------------------------------------------------------------- setup
    def add_charger(self, spec: ChargerSpec) -> None:
        self._conns[spec.charger_id] = _Connector(spec, confirmed=spec.confirmed)
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
            conn = _Connector(ChargerSpec(session.charger_id, session.connector))
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
            conn.anchor_ts, conn.anchor_wh = now, self._reading(conn, now)
            conn.anchor_latched = False
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
        if session.user.get("id") is not None or UNIDENTIFIED not in session.flags:
            return False
        session.user = _user_of(grant)
        session.group = grant.group
        session.tag = grant.tag or session.tag
        session.flags.remove(UNIDENTIFIED)
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
        energy = sample.energy_wh if sample.online else None
        if energy is None:
            return
        self._meters[sample.device_id] = (sample.ts, energy, sample.power_w)
        for charger_id in self._meter_of[sample.device_id]:
            conn = self._conns[charger_id]
            if conn.session is None:
                if conn.anchor_ts is not None and conn.anchor_wh is None and conn.plugged:
                    conn.anchor_wh = energy  # latched: the start reading comes late
                    conn.anchor_latched = True
                continue
            session = conn.session
            if session.source != f"meter:{sample.device_id}":
                continue
            power = sample.power_w
            if power is not None:
                session.max_power_w = max(session.max_power_w, power)
            if session.feed(
                energy, sample.ts, conn.spec.meter_poll_interval_s, conn.spec.max_power_w
            ):
                effects.append(SaveSession(session))

    def _source(self, conn: _Connector) -> str | None:
        if conn.spec.meter_id is not None:
            return f"meter:{conn.spec.meter_id}"
        if conn.spec.prefer_session_counter and conn.session_wh is not None:
            return "session_energy_wh"
        if conn.energy_wh is not None:
            return "energy_wh"
        if conn.session_wh is not None:
            return "session_energy_wh"
        return None

    def _reading(self, conn: _Connector, now: float, source: str | None = None) -> float | None:
        """The current value of the counter ``source`` (default: the one a session would use),
        or None when it is not known fresh."""
        source = source or self._source(conn)
        if source is None:
            return None
        if source.startswith("meter:"):
            got = self._meters.get(source[6:])
            fresh_s = 2 * conn.spec.meter_poll_interval_s + 1.0
            if got is None or now - got[0] > fresh_s:
                return None
            return got[1]
        value = conn.energy_wh if source == "energy_wh" else conn.session_wh
        if value is None or now - value[0] > 2 * conn.spec.poll_interval_s + 1.0:
            return None
        return value[1]

    # ------------------------------------------------------------- chargers
    def _on_charger(self, conn: _Connector, s: DeviceSample, effects: list[Effect]) -> None:
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
        if s.energy_wh is not None:
            conn.energy_wh = (now, s.energy_wh)
        sc = s.session_energy_wh
        if sc is not None:
            conn.session_wh = (now, sc)
        plugged = _plugged(s, conn.plugged)
        charging = _charging(s)
        tag = _norm_tag(s.tag)
        new_tag = tag is not None and tag != conn.seen_tag
        conn.seen_tag = tag

        session = conn.session
        if session is not None:
            swapped = self._swapped(session, sc)
            if not swapped:
                self._feed_charger_counter(conn, session, now)
            estimated = resumed or offline_s > self.grace_s
            # An estimated end is the last time the session was seen alive.
            end_at = session.last_activity_ts if estimated else now
            token = session.tag
            if not plugged:
                self._account(conn, session, now, charging=False, plugged=False)
                self._end(conn, StopReason.EV_DISCONNECTED, end_at, effects, estimated=estimated)
            elif swapped:
                # The EV was unplugged and another plugged in between two polls: the charger's
                # session counter restarted. Split the lifetime counter with it where possible.
                assert sc is not None
                split = self._split(conn, session, now, sc)
                self._account(conn, session, now, charging=False, plugged=True)
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
                self._new_plug(conn, now, split)
                new_tag = tag is not None
            elif new_tag and token is not None and tag != token:
                self._account(conn, session, now, charging=charging, plugged=True)
                log.info("tag_changed", charger_id=cid, session_id=session.session_id, tag=tag)
                self._end(
                    conn,
                    StopReason.LOCAL,
                    end_at,
                    effects,
                    estimated=estimated,
                )
                self._new_plug(conn, now, self._reading(conn, now))
            else:
                self._account(conn, session, now, charging=charging, plugged=True)
                self._points(session, now, effects)
                if session.user.get("id") is None and tag and new_tag and not conn.pending_token:
                    self._request(conn, tag, now, effects)  # identify the running session
                    new_tag = False
        if conn.session is None:
            if plugged and not conn.plugged:
                if unwitnessed:
                    self._unwitnessed_plug(conn, now)
                else:
                    self._new_plug(conn, now, self._reading(conn, now))
            elif not plugged and conn.plugged:
                conn.plugged = False
                conn.anchor_ts = conn.anchor_wh = None
                conn.stopped_while_plugged = False
            conn.plugged = plugged
            source = self._source(conn)
            if plugged and conn.anchor_wh is None and source and not source.startswith("meter:"):
                conn.anchor_wh = self._reading(conn, now)  # latched from the charger
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
                    flags=(UNIDENTIFIED,),
                    tag=tag,
                )
                log.warning("unidentified_charging", charger_id=cid, tag=tag)
                self._start(conn, unidentified, now, effects)
            elif plugged and charging and conn.stopped_while_plugged:
                log.debug("charging_after_stop", charger_id=cid)
            session = conn.session
            if session is not None:
                self._account(conn, session, now, charging=charging, plugged=True)
                self._points(session, now, effects)
        else:
            conn.plugged = plugged
        self._status(conn, now, effects)

    def _swapped(self, session: OpenSession, sc: float | None) -> bool:
        if sc is None or session.sc_last_wh is None or session.sc_base_wh is None:
            return False
        dropped = sc < session.sc_last_wh - 1.0
        rose = session.sc_last_wh - session.sc_base_wh >= SWAP_MIN_WH
        return dropped and rose

    def _split(self, conn: _Connector, session: OpenSession, now: float, sc: float) -> float | None:
        """Counter reading at the swap: the new car got ``sc`` Wh since its plug-in."""
        if session.source == "session_energy_wh":
            return 0.0
        reading = self._reading(conn, now, session.source)
        if reading is None:
            return None
        split = reading - sc
        if session.last_wh is not None:
            split = max(split, session.last_wh)
        split = min(split, reading)
        session.feed(split, now, self._interval(conn, session), conn.spec.max_power_w)
        return split

    def _interval(self, conn: _Connector, session: OpenSession) -> float:
        if session.source is not None and session.source.startswith("meter:"):
            return conn.spec.meter_poll_interval_s
        return conn.spec.poll_interval_s

    def _feed_charger_counter(self, conn: _Connector, session: OpenSession, now: float) -> None:
        if session.source is None:
            session.source = self._source(conn)
        if session.source in ("energy_wh", "session_energy_wh"):
            value = conn.energy_wh if session.source == "energy_wh" else conn.session_wh
            if value is not None and value[0] == now:
                session.feed(value[1], now, conn.spec.poll_interval_s, conn.spec.max_power_w)

    def _account(
        self, conn: _Connector, session: OpenSession, now: float, *, charging: bool, plugged: bool
    ) -> bool:
        """Time, power and session-counter bookkeeping for one online sample; True when the
        measured charging state changed."""
        if session.last_sample_ts is not None and now > session.last_sample_ts:
            dt = now - session.last_sample_ts
            if session.charging:
                session.charging_s += dt
            else:
                session.idle_s += dt
        if session.last_sample_ts is None or now > session.last_sample_ts:
            session.last_sample_ts = now
        if plugged:
            session.last_activity_ts = now
        if conn.power_w is not None:
            session.max_power_w = max(session.max_power_w, conn.power_w)
        if conn.session_wh is not None and conn.session_wh[0] == now:
            sc = conn.session_wh[1]
            if session.sc_base_wh is None or sc < session.sc_base_wh:
                session.sc_base_wh = sc
            session.sc_last_wh = sc
        changed = charging != session.charging
        session.charging = charging
        session.ever_charged |= charging
        return changed

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

    def _new_plug(self, conn: _Connector, now: float, reading: float | None) -> None:
        conn.plugged = True
        conn.anchor_ts = now
        conn.anchor_wh = reading
        conn.anchor_latched = False
        conn.anchor_reconstructed = False
        conn.stopped_while_plugged = False

    def _unwitnessed_plug(self, conn: _Connector, now: float) -> None:
        """An EV found plugged in (first sample after a gateway start or a charger outage).

        Energy may already have flowed. Where the charger's session counter restarts at every
        plug-in, the start reading is dated back to the plug-in (counter minus session counter,
        flag ``start_reconstructed``); otherwise the start is read now, flagged
        ``start_latched`` unless the charger shows it has not charged yet (preparing).
        """
        reading = self._reading(conn, now)
        self._new_plug(conn, now, reading)
        if reading is None:
            return
        sc = self._reading(conn, now, "session_energy_wh")
        source = self._source(conn)
        if conn.spec.session_counter_resets_on_plug and sc is not None and sc >= 0:
            start = 0.0 if source == "session_energy_wh" else reading - sc
            if 0 <= start <= reading:
                conn.anchor_wh = start
                conn.anchor_reconstructed = True
                conn.anchor_seen_wh = reading
                return
        # Found still waiting to charge (preparing): nothing can have flowed before.
        conn.anchor_latched = (
            source != "session_energy_wh" and conn.status is not ChargerStatus.PREPARING
        )

    def _request(self, conn: _Connector, tag: str, now: float, effects: list[Effect]) -> None:
        conn.attempt += 1
        conn.pending_token = tag
        if conn.session is None:
            conn.grant = None
            # The start reading is taken when the authorization begins, unless the EV was
            # plugged in at this very sample (a swap keeps its split reading).
            if conn.plugged and (conn.anchor_ts is None or conn.anchor_ts < now):
                conn.anchor_ts, conn.anchor_wh = now, self._reading(conn, now)
                conn.anchor_latched = False
        effects.append(RequestAuth(conn.spec.charger_id, tag, "rfid", conn.attempt))

    def _start(
        self, conn: _Connector, grant: Grant, now: float, effects: list[Effect]
    ) -> OpenSession:
        # The anchor is the later of plug-in and the beginning of the authorization.
        started_at = conn.anchor_ts if conn.anchor_ts is not None else now
        source = self._source(conn)
        session = OpenSession(
            session_id=self._new_id(started_at),
            charger_id=conn.spec.charger_id,
            connector=conn.spec.connector,
            started_at=started_at,
            user=_user_of(grant),
            group=grant.group,
            flags=list(grant.flags),
            tag=grant.tag,
            source=source,
            last_activity_ts=now,
            last_sample_ts=started_at,
        )
        start = conn.anchor_wh if conn.anchor_ts is not None else self._reading(conn, now)
        if start is not None:
            session.meter_start_wh = session.seg_start_wh = session.last_wh = start
            session.last_counter_ts = now
            if conn.anchor_latched:
                session.flag(Flag.START_LATCHED)
            if conn.anchor_reconstructed and conn.anchor_seen_wh is not None:
                session.flag(Flag.START_RECONSTRUCTED)
                # Plausibility checks continue from the reading that was seen, not from the
                # dated-back start (whose time is unknown).
                session.last_wh = conn.anchor_seen_wh
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
        conn: _Connector,
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
        record = session.to_record(self.site_id)
        log.info(
            "session_finished",
            session_id=session.session_id,
            charger_id=session.charger_id,
            stop_reason=reason.value,
            energy_wh=record["energy_wh"],
            flags=record["flags"],
        )
        effects.append(FinishSession(session, record))
        conn.session = None
        conn.grant = None
        conn.anchor_ts = conn.anchor_wh = None

    def _status(self, conn: _Connector, now: float, effects: list[Effect]) -> None:
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


def _user_of(grant: Grant) -> dict[str, Any]:
    return {
        "id": grant.user,
        "token": grant.token,
        "token_type": grant.token_type,
        "auth": grant.auth.value,
    }


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


# --------------------------------------------------------------------------- manager
PricerResult = tuple[list[dict[str, Any]], dict[str, Any] | None]
Pricer = Callable[
    [dict[str, Any] | None, Sequence[MeterPoint], float, float],
    PricerResult | Awaitable[PricerResult],
]
TariffsResolver = Callable[[str, str | None], tuple[str, str, dict[str, Any]] | None]
EventSink = Callable[[str, dict[str, Any]], Awaitable[None] | None]


def _max_power_w(max_current_a: float | None) -> float:
    if max_current_a is None:
        return DEFAULT_MAX_POWER_W
    return 3 * 230.0 * max_current_a * 1.25  # three phases, with margin for voltage and meters


class SessionManager:
    """Feeds samples to a ``SessionTracker`` and performs its effects: persist before publish,
    finish through the store (which seals and queues), enable/disable chargers, authorize in
    background tasks so one slow cloud answer never blocks other chargers."""

    def __init__(
        self,
        config: GatewayConfig,
        store: SessionStore,
        authorizer: Any,
        chargers: ChargerControl | None,
        pricer: Pricer | None = None,
        tariffs_resolver: TariffsResolver | None = None,
        clock: Clock | None = None,
        on_event: EventSink | None = None,
        *,
        charger_ids: Iterable[str] | None = None,
        grace_s: float = 120.0,
        plug_timeout_s: float = 120.0,
        time_scale: float = 1.0,
        plug_reset_counters: Iterable[str] = (),
        prefer_session_counters: Iterable[str] = (),
    ) -> None:
        """``time_scale``: simulated seconds per wall second when the devices are simulated
        faster than real time (``evgw demo``); it widens the plausibility bound on counter
        steps, which is measured against the gateway's wall clock."""
        self._config = config
        self._store = store
        self._authorizer = authorizer
        self._chargers = chargers
        self._pricer = pricer
        self._resolver = tariffs_resolver
        self._clock = clock or SystemClock()
        self._on_event = on_event
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
        resets = set(plug_reset_counters)  # chargers whose session counter restarts at plug-in
        prefer = set(prefer_session_counters) & resets
        specs = []
        for cid in ids:
            dev = devices[cid]
            meter = devices.get(dev.meter) if dev.meter else None
            specs.append(
                ChargerSpec(
                    charger_id=cid,
                    connector=dev.connector,
                    meter_id=dev.meter,
                    poll_interval_s=dev.poll_interval_s,
                    meter_poll_interval_s=meter.poll_interval_s if meter else dev.poll_interval_s,
                    max_power_w=_max_power_w(dev.max_current_a) * max(1.0, time_scale),
                    controllable=chargers is not None and chargers.can_control(cid),
                    session_counter_resets_on_plug=cid in resets,
                    prefer_session_counter=cid in prefer,
                    confirmed=not guessed,
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
        add_listener = getattr(authorizer, "add_listener", None)
        if add_listener is not None:
            add_listener(self.revalidate)

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
        by_charger: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            state = row.get("state", row) if isinstance(row.get("state"), dict) else row
            by_charger.setdefault(str(state["charger_id"]), []).append(state)
        count = 0
        effects: list[Effect] = []
        async with self._lock:
            for states in by_charger.values():
                states.sort(key=lambda st: st.get("started_at", 0.0))
                for state in states[:-1]:  # never two open sessions on one connector
                    stale = OpenSession.from_state(state)
                    stale.flag(Flag.END_ESTIMATED)
                    stale.ended_at = max(stale.last_activity_ts, stale.started_at)
                    stale.stop_reason = StopReason.UNKNOWN.value
                    await self._load_points(stale.session_id)
                    effects.append(FinishSession(stale, stale.to_record(self._config.site.id)))
                session = self.tracker.restore(states[-1])
                await self._load_points(session.session_id)
                count += 1
                log.info(
                    "session_resumed", session_id=session.session_id, charger_id=session.charger_id
                )
            await self._perform(effects)
        return count

    async def _load_points(self, session_id: str) -> None:
        getter = getattr(self._store, "session_points", None)
        points: list[MeterPoint] = []
        if getter is not None:
            for p in await getter(session_id):
                points.append(p if isinstance(p, MeterPoint) else MeterPoint(**p))
        self._points[session_id] = points

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
        if known is not None and known.status_at(now) is not AuthStatus.ACCEPTED:
            raise CommandError("not_authorized", f"user {user!r} is {known.status_at(now).value}")
        grant = Grant(
            user=user,
            token=token if token is not None else (known.id if known is not None else None),
            token_type="app" if token is not None or known is None else known.type.value,
            auth=AuthSource.REMOTE,
            at=now,
            group=known.group if known is not None else None,
        )
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
        check = getattr(self._authorizer, "check", None)
        if check is None:
            return
        async with self._lock:
            for session in self.tracker.sessions():
                token = session.user.get("token")
                if token is None or session.user.get("auth") == AuthSource.REMOTE.value:
                    continue
                status = check(token)
                if status in (AuthStatus.BLOCKED, AuthStatus.EXPIRED):
                    log.info("session_deauthorized", session_id=session.session_id, token=token)
                    await self._perform(
                        self.tracker.stop(
                            session.charger_id, StopReason.DEAUTHORIZED, self._clock.time()
                        )
                    )

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
                adder = getattr(self._store, "add_session_point", None)
                if adder is not None:
                    await adder(effect.session_id, effect.point)
            elif isinstance(effect, FinishSession):
                await self._finish(effect)
            elif isinstance(effect, RequestAuth):
                self._spawn(self._authorize(effect), f"authorize-{effect.charger_id}")
            elif isinstance(effect, SetEnabled):
                if self._chargers is not None and self._chargers.can_control(effect.charger_id):
                    self._spawn(self._set_enabled(effect), f"enable-{effect.charger_id}")
            elif isinstance(effect, StatusChanged):
                await self._emit("status", dict(effect.payload))

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
                resolved = None
            if resolved is not None:
                session.tariff_id, session.tariff_version, session.tariff_data = resolved
        await self._save(session)  # on disk before anything is published
        await self._emit(
            "session_started",
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
        session, record = effect.session, dict(effect.record)
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
                record["flags"] = [*record["flags"], UNPRICED]
        if cost is not None and Flag.NOT_BILLABLE.value in record["flags"]:
            # Plugged in but never charged: on record, priced at nothing.
            places = len(str(cost["excl_vat"]).partition(".")[2])  # the currency's minor unit
            zero = f"{0:.{places}f}"
            cost = {**cost, "excl_vat": zero, "vat": zero, "incl_vat": zero, "lines": []}
        if periods is None:
            periods = default_periods(points, session.started_at, session.ended_at)
        record["charging_periods"] = periods
        record["cost"] = cost
        sealed = await self._store.finish_session(record)
        await self._emit("session_finished", sealed)

    async def _authorize(self, req: RequestAuth) -> None:
        try:
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

    async def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        res = self._on_event(kind, payload)
        if res is not None:
            await res
