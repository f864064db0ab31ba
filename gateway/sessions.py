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
  authorization (a self-authorizing charger may start charging while the cloud answers). A tag
  is shown at some moment between two polls: when the poll that first shows it also shows
  energy counted since the poll before, the start is that earlier poll (or the plug-in, when
  no poll came in between), never the reading taken together with the tag. Likewise a plug-in
  first seen by a poll that shows energy already: the start reading is the previous poll's
  (or zero on a session counter that visibly restarted at the plug-in).
* It ends at unplug (``ev_disconnected``), remote stop (``remote``), deauthorization
  (``deauthorized``, after a token list change blocks its token), a different tag on the same
  connector (``local``), or a car swap within one poll seen as a drop of the charger's session
  counter that the next sample confirms (``ev_disconnected``; a one-poll glitch is ignored).
  A charger found unplugged after being offline longer than ``grace_s`` (or after a gateway
  restart) ends it at its last seen activity with the flag
  ``end_estimated``.
* Energy comes from one cumulative counter chosen at the start: the charger's ``meter:``
  device, else the charger's ``energy_wh``, else its ``session_energy_wh``. See ``OpenSession.feed``
  for the guards (latched start, resets, rollovers, implausible jumps, gaps).
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from pydantic import ValidationError

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
from gateway.records import SessionFacts
from gateway.tags import normalise_tag

__all__ = [
    "AddPoint",
    "ChargerSpec",
    "Counter",
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
    "max_power_w",
]

log = structlog.get_logger(__name__)

DEFAULT_MAX_POWER_W = 100_000.0  # no AC charger on a Modbus gateway delivers more
# The plausibility bound on counter steps, from a current per phase: three phases at 230 V x
# POWER_MARGIN (253 V, the EN 50160 +10 % voltage limit, is x 1.1; the rest covers meter class
# and the time between the meter counting and the gateway stamping its reading).
POWER_MARGIN = 1.25
NOMINAL_V = 230.0
# A profile's current_limit.max_a is what the gateway may command, and not always the hardware
# maximum (heidelberg-ec, amperfied-connect: 16 A "assumes the 11 kW model"). The bound taken
# from a profile is therefore never below this: the largest current of a common 22 kW wallbox.
PROFILE_FLOOR_A = 32.0
# No energy counter on a charging site shows more: a 1 MW connection needs 114 years to count
# 1 TWh. Counters whose register could show more (i64, u64, floats) are capped here.
MAX_COUNTER_WH = 10**12
MAX_SUSPECT_CHAINS = 8  # glitches and a new counter can interleave: follow this many at once
SWAP_MIN_WH = 50.0  # session counter must have risen this much before a drop means "new car"
POINT_EVERY_S = 60.0
GAP_POLLS = 3  # readings missing for more than this many poll intervals: comms_gap
# A reading dated this much before the previous one is no late sample (the poll queue never holds
# one that long): the wall clock was set back (an NTP step after a boot without a real-time clock).
CLOCK_STEP_BACK_S = 10.0
CHARGING_POWER_W = 100.0  # status-less chargers: this much power means charging
# A charger reporting its own transactions sends meter values every few minutes (OCPP
# MeterValueSampleInterval) and replays them after an outage: comms_gap only beyond 3 x this.
TRANSACTION_INTERVAL_S = 300.0

UNIDENTIFIED = Flag.UNIDENTIFIED.value
UNPRICED = Flag.UNPRICED.value


@dataclass(frozen=True, slots=True)
class Counter:
    """What is known of one cumulative energy counter: the largest value it can show (its
    register's range, at most ``MAX_COUNTER_WH``) and the step it counts in. ``float_bits`` is
    the significand width of a floating-point register (24 for float32): its step grows with
    the value (an SDM630 at 100,000 kWh counts in 7.8 Wh steps)."""

    max_wh: int = MAX_COUNTER_WH
    resolution_wh: int = 1
    float_bits: int = 0
    scale: float = 1.0

    def check(self, reading: object) -> tuple[int | None, str]:
        """The reading in integer Wh, or None and why it cannot be true."""
        if isinstance(reading, bool) or not isinstance(reading, int | float):
            return None, "not a number"
        if isinstance(reading, float) and not math.isfinite(reading):
            return None, "not finite"
        if reading < 0:
            return None, "negative"
        if reading > self.max_wh:
            return None, f"beyond the counter's range 0..{self.max_wh}"
        return round(reading), ""

    def step_wh(self, value_wh: int) -> int:
        """The counter's resolution at ``value_wh``."""
        if self.float_bits and value_wh > 0 and self.scale:
            raw = value_wh / abs(self.scale)
            ulp_wh = 2.0 ** (math.frexp(raw)[1] - self.float_bits) * abs(self.scale)
            return max(self.resolution_wh, math.ceil(ulp_wh))
        return self.resolution_wh


DEFAULT_COUNTER = Counter()


def _rises_plausibly(
    prev_wh: int,
    prev_ts: float,
    value_wh: int,
    ts: float,
    interval_s: float,
    max_power_w: float,
    step_wh: int,
) -> bool:
    """``value_wh`` at ``ts`` can follow ``prev_wh`` at ``prev_ts``: no drop, no jump beyond
    max power x elapsed time (at least one poll interval) + one resolution step."""
    elapsed_s = max(ts - prev_ts, interval_s)
    return 0 <= value_wh - prev_wh <= max_power_w * elapsed_s / 3600.0 + step_wh


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
    # The charger reports its own transactions (OCPP StartTransaction/StopTransaction): its
    # sessions open and close only through ``begin_transaction``/``end_transaction``; its
    # samples carry status, power and currents (live view, load management) only.
    transactional: bool = False
    # Range and resolution of each counter by source ("energy_wh", "session_energy_wh",
    # "meter:<id>"), from the device profiles; unknown ones get ``DEFAULT_COUNTER``.
    counters: Mapping[str, Counter] = field(default_factory=dict)

    def counter(self, source: str | None) -> Counter:
        return self.counters.get(source or "", DEFAULT_COUNTER)


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
    # Energy accounting, all in integer Wh (never a float sum): see ``feed``.
    meter_start_wh: int | None = None
    seg_start_wh: int | None = None
    last_wh: int | None = None  # last plausible reading of the current segment
    banked_wh: int = 0  # energy of the segments before the last counter reset
    last_counter_ts: float | None = None
    # [seg_start, last_wh, last_ts, banked, meter_start, reset_flag_added, adopted_wh] before
    # the last reset or rebase, to undo it when the old counter turns out to continue.
    undo: list[Any] | None = None
    # The plausible reading before the start reading [wh, ts]: if the start reading was a
    # glitch, a rebase goes back to it.
    pre_start: list[Any] | None = None
    # Readings that do not continue the counter, as chains of readings that continue each
    # other: [first_wh, first_ts, last_wh, last_ts, count], the newest last.
    suspects: list[list[Any]] = field(default_factory=list)
    bound_ts: float | None = None  # energy since this time is bounded by max power x time
    bound_wh: int = 0  # the session energy at ``bound_ts``
    rejected: int = 0  # implausible readings seen (not billed)
    tail_suspect: bool = False  # the latest reading was not taken: the end falls back
    read_ts: float | None = None  # the latest reading, plausible or not (comms_gap)
    # [ts, session counter, last_wh]: the session counter dropped (a car swap, or a glitch?)
    swap_seen: list[Any] | None = None
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
    # What the charger's own protocol knows of the session (OCPP: charge point, transaction id,
    # signed meter values); copied into the record as ``ocpp``.
    ocpp: dict[str, Any] | None = None

    # ------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OpenSession:
        known = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        session = cls(**known)
        session.flags = list(session.flags)
        # States written before integer accounting carried float Wh and a 4-item undo.
        for name in ("meter_start_wh", "seg_start_wh", "last_wh"):
            value = getattr(session, name)
            if value is not None:
                setattr(session, name, round(value))
        session.banked_wh = round(session.banked_wh)
        session.bound_wh = round(session.bound_wh)
        if session.undo is not None and len(session.undo) == 4:
            seg, last, last_ts, banked = session.undo
            session.undo = [round(seg), round(last), last_ts, round(banked), None, True, None]
        return session

    def flag(self, name: str) -> bool:
        """Add a flag; True when it is new."""
        if name in self.flags:
            return False
        self.flags.append(name)
        return True

    # ----------------------------------------------------------- energy
    def energy(self) -> int:
        """Session energy in Wh: the banked segments plus the current one (integers only)."""
        if self.seg_start_wh is None or self.last_wh is None:
            return 0
        return max(0, self.banked_wh + self.last_wh - self.seg_start_wh)

    def begin(self, start_wh: int, ts: float, seen_wh: int | None = None) -> None:
        """Take the start reading. ``seen_wh`` is the counter as read at ``ts`` when the start
        was dated back (reconstructed from a session counter): checks continue from it."""
        self.meter_start_wh = self.seg_start_wh = start_wh
        self.last_wh = start_wh if seen_wh is None else seen_wh
        self.last_counter_ts = ts
        self.bound_ts, self.bound_wh = ts, self.energy()
        self.suspects, self.tail_suspect = [], False

    def feed(
        self,
        reading: float,
        ts: float,
        interval_s: float,
        max_power_w: float,
        counter: Counter | None = None,
    ) -> bool:
        """Take one reading of the session's cumulative counter. Returns True when something a
        bill reader must know changed (a flag, a rebase), so the state should be persisted.

        A reading is *implausible* and never billed when it is NaN, infinite, negative or
        beyond the counter's range (``counter.max_wh``). A plausible reading *continues* the
        counter when it rose by at most ``max_power_w`` x elapsed time + the counter's
        resolution since the last accepted reading, and the whole session stays within
        ``max_power_w`` x its duration + one resolution step. Then:

        * no start reading yet (meter silent at start): the first plausible reading becomes the
          start (flag ``start_latched``); a lifetime counter is never taken as session energy;
        * a reading older than the previous one is ignored (late sample), unless it is older by
          more than ``CLOCK_STEP_BACK_S`` (or two poll intervals): then the wall clock was set
          back, and every time the session keeps moves back with it, so the counter counts on;
        * a gap of more than ``GAP_POLLS`` poll intervals: flag ``comms_gap`` (energy stays
          exact: it is the counter difference);
        * a reading that does not continue the counter (a drop, a jump) is *suspect*, not
          billed. When a later reading continues the counter again, the suspects were a
          transient glitch and the energy stays exact. When instead two or more suspects
          continue each other and rise (or nothing was counted yet), the counter really was
          reset, rolled over or replaced: the segment before is banked (flag ``meter_reset``;
          a reset to a value plausible as energy since the reset counts from zero) or, with
          nothing counted yet, the start is rebased without a flag (a session counter that
          restarts at plug-in). A later reading that continues the old counter undoes that.
        * a session that ends while its latest reading was implausible or suspect keeps the
          last plausible reading (flag ``energy_fallback``, added by ``to_record``).
        """
        if self.last_counter_ts is not None and ts < self.last_counter_ts - max(
            CLOCK_STEP_BACK_S, 2 * interval_s
        ):
            self._shift_clock(ts - interval_s - self.last_counter_ts, ts - interval_s)
        counter = counter or DEFAULT_COUNTER
        value, why = counter.check(reading)
        previous_read_ts = self.read_ts if self.read_ts is not None else self.last_counter_ts
        if previous_read_ts is None or ts > previous_read_ts:
            self.read_ts = ts
        if value is None:
            self.rejected += 1
            # Logged once per run of bad readings (a meter may answer garbage for hours).
            if not self.tail_suspect and (self.last_wh is not None or self.rejected == 1):
                log.warning(
                    "meter_reading_rejected",
                    session_id=self.session_id,
                    reading=reading,
                    reason=why,
                )
            self.tail_suspect = self.last_wh is not None
            return False
        if self.seg_start_wh is None or self.last_wh is None or self.last_counter_ts is None:
            latched = self.meter_start_wh is None and ts > self.started_at + interval_s
            self.begin(value, ts)
            if latched:
                self.flag(Flag.START_LATCHED)
                log.warning("session_start_latched", session_id=self.session_id, meter_wh=value)
            return True
        if ts < self.last_counter_ts:
            return False
        changed = False
        if previous_read_ts is not None and ts - previous_read_ts > GAP_POLLS * interval_s:
            changed |= self.flag(Flag.COMMS_GAP)
        step_wh = counter.step_wh(value)
        if _rises_plausibly(
            self.last_wh, self.last_counter_ts, value, ts, interval_s, max_power_w, step_wh
        ) and self._bounded(
            self.banked_wh + value - self.seg_start_wh, ts, interval_s, max_power_w, step_wh
        ):
            if self.tail_suspect:
                log.warning(
                    "meter_glitch_ignored",
                    session_id=self.session_id,
                    meter_wh=value,
                    rejected=self.rejected,
                )
            self.last_wh, self.last_counter_ts = value, ts
            self.tail_suspect = False
            if self.energy() > 0:  # while nothing is counted the suspects may be the truth
                self.suspects = []
            return changed
        if self.undo is not None and self._undo(value, ts, interval_s, max_power_w, step_wh):
            return True
        first_of_run = not self.tail_suspect
        self.tail_suspect = True
        for chain in reversed(self.suspects):
            if _rises_plausibly(chain[2], chain[3], value, ts, interval_s, max_power_w, step_wh):
                chain[2], chain[3], chain[4] = value, ts, chain[4] + 1
                if (value > chain[0] or self.energy() == 0) and self._adopt(
                    chain, ts, interval_s, max_power_w, step_wh
                ):
                    return True
                return changed
        self.suspects = [*self.suspects[-(MAX_SUSPECT_CHAINS - 1) :], [value, ts, value, ts, 1]]
        if first_of_run:
            log.warning(
                "meter_reading_suspect",
                session_id=self.session_id,
                previous_wh=self.last_wh,
                reading_wh=value,
            )
        return changed

    def _shift_clock(self, delta_s: float, floor_ts: float) -> None:
        """The wall clock was set back (an NTP step): move every time the counter checks use by
        ``delta_s``, as if the last reading came one poll interval before this one."""
        log.warning("wall_clock_stepped_back", session_id=self.session_id, by_s=round(-delta_s, 1))
        assert self.last_counter_ts is not None
        self.last_counter_ts += delta_s
        if self.read_ts is not None:
            self.read_ts = min(self.read_ts + delta_s, floor_ts)
        if self.bound_ts is not None:
            self.bound_ts += delta_s
        if self.undo is not None and self.undo[2] is not None:
            self.undo[2] += delta_s
        if self.pre_start is not None:
            self.pre_start[1] += delta_s
        for chain in self.suspects:
            chain[1] += delta_s
            chain[3] += delta_s
        if self.swap_seen is not None:
            self.swap_seen[0] += delta_s

    def _bounded(
        self, energy_wh: int, ts: float, interval_s: float, max_power_w: float, step_wh: int
    ) -> bool:
        """Session energy ``energy_wh`` at ``ts`` is within max power x duration + one step."""
        if self.bound_ts is None:
            return True
        elapsed_s = max(0.0, ts - self.bound_ts) + interval_s
        return energy_wh - self.bound_wh <= max_power_w * elapsed_s / 3600.0 + step_wh

    def _undo(
        self, value: int, ts: float, interval_s: float, max_power_w: float, step_wh: int
    ) -> bool:
        """``value`` continues the counter from before the last reset/rebase: it was a glitch."""
        assert self.undo is not None
        seg, last, last_ts, banked, start, flagged, adopted = self.undo
        if not _rises_plausibly(last, last_ts, value, ts, interval_s, max_power_w, step_wh):
            return False
        if value == last and adopted is not None and self.last_wh != adopted:
            # The old counter stands still while the adopted one has counted on: a stuck
            # value (a glitch repeating itself) is no reason to give up a counter that runs.
            return False
        if not self._bounded(banked + value - seg, ts, interval_s, max_power_w, step_wh):
            return False
        self.seg_start_wh, self.banked_wh = seg, banked
        if start is not None:
            self.meter_start_wh = start
        if flagged and Flag.METER_RESET.value in self.flags:
            self.flags.remove(Flag.METER_RESET.value)
        self.last_wh, self.last_counter_ts = value, ts
        self.undo, self.suspects, self.tail_suspect = None, [], False
        log.warning("meter_glitch_undone", session_id=self.session_id, meter_wh=value)
        return True

    def _adopt(
        self, chain: list[Any], ts: float, interval_s: float, max_power_w: float, step_wh: int
    ) -> bool:
        """A suspect chain is a counter of its own: rebase on it or bank a reset."""
        assert self.last_wh is not None
        assert self.seg_start_wh is not None and self.last_counter_ts is not None
        first, first_ts, value = chain[0], chain[1], chain[2]
        before = [
            self.seg_start_wh,
            self.last_wh,
            self.last_counter_ts,
            self.banked_wh,
            self.meter_start_wh,
            False,
            value,
        ]
        if self.energy() == 0:
            base = first
            pre = self.pre_start
            if (
                pre is not None
                and _rises_plausibly(
                    pre[0], pre[1], first, first_ts, interval_s, max_power_w, step_wh
                )
                and self._bounded(value - pre[0], ts, interval_s, max_power_w, step_wh)
            ):
                base = pre[0]  # the start reading was the glitch: the one before it stands
            if not self._bounded(value - base, ts, interval_s, max_power_w, step_wh):
                return False
            log.info(
                "session_counter_rebased",
                session_id=self.session_id,
                old_wh=self.last_wh,
                new_wh=base,
            )
            self.meter_start_wh = self.seg_start_wh = base
            self.pre_start = None
        else:
            banked = self.banked_wh + self.last_wh - self.seg_start_wh
            # A drop to a value that could have been counted since the reset: from zero.
            since_s = max(first_ts - self.last_counter_ts, interval_s)
            restarted = first < self.last_wh and first <= max_power_w * since_s / 3600 + step_wh
            seg = 0 if restarted else first
            if not self._bounded(banked + value - seg, ts, interval_s, max_power_w, step_wh):
                restarted, seg = False, first
                if not self._bounded(banked + value - seg, ts, interval_s, max_power_w, step_wh):
                    return False
            log.warning(
                "meter_reset",
                session_id=self.session_id,
                previous_wh=self.last_wh,
                reading_wh=first,
                restarted_from_zero=restarted,
            )
            before[5] = self.flag(Flag.METER_RESET)
            self.banked_wh, self.seg_start_wh = banked, seg
        self.undo = before
        self.last_wh, self.last_counter_ts = value, ts
        self.suspects, self.tail_suspect = [], False
        return True

    # ----------------------------------------------------------- record
    def to_record(self, site_id: str) -> SessionFacts:
        assert self.ended_at is not None and self.stop_reason is not None
        flags = list(self.flags)
        if self.meter_start_wh is None:
            for name in (Flag.NO_METER, Flag.NOT_BILLABLE):
                if name not in flags:
                    flags.append(name)
        else:
            if self.tail_suspect and Flag.ENERGY_FALLBACK not in flags:
                # The session ended on an implausible or suspect reading: the last plausible
                # reading stands.
                flags.append(Flag.ENERGY_FALLBACK)
                log.warning(
                    "session_energy_fallback",
                    session_id=self.session_id,
                    meter_stop_wh=self.last_wh,
                    rejected=self.rejected,
                )
            if self.energy() == 0 and Flag.NOT_BILLABLE not in flags:
                flags.append(Flag.NOT_BILLABLE)
        facts = {
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
            "meter_start_wh": self.meter_start_wh,
            "meter_stop_wh": self.last_wh,
            "energy_wh": self.energy(),
            "max_power_w": round(self.max_power_w),
            "stop_reason": self.stop_reason,
            "tariff_id": self.tariff_id,
            "tariff_version": self.tariff_version,
            "flags": [str(f) for f in flags],
        } | ({"ocpp": dict(self.ocpp)} if self.ocpp is not None else {})
        return SessionFacts.from_dict(facts)


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
    record: SessionFacts


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
    energy_wh: tuple[float, int] | None = None  # (ts, value) of the charger's lifetime counter
    session_wh: tuple[float, int] | None = None  # (ts, value) of the charger's session counter
    energy_prev: tuple[float, int] | None = None  # the readings before those two
    session_prev: tuple[float, int] | None = None
    sc_plug_base: float | None = None
    anchor_ts: float | None = None
    anchor_wh: int | None = None
    anchor_latched: bool = False
    anchor_reconstructed: bool = False
    anchor_seen_wh: int | None = None  # the counter when a reconstructed anchor was made
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
        self._meters: dict[str, tuple[float, int, float | None]] = {}  # id -> (ts, wh, power)
        self._meters_prev: dict[str, tuple[float, int]] = {}  # id -> the reading before
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
            conn.anchor_latched = conn.anchor_reconstructed = False
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
        raw = _raw_number(sample, "energy_wh") if sample.online else None
        if raw is None:
            return
        source = f"meter:{sample.device_id}"
        chargers = self._meter_of[sample.device_id]
        counter = self._conns[chargers[0]].spec.counter(source)
        energy, _ = counter.check(raw)  # an implausible reading never becomes a start reading
        if energy is not None:
            got = self._meters.get(sample.device_id)
            if got is not None:
                self._meters_prev[sample.device_id] = (got[0], got[1])
            self._meters[sample.device_id] = (sample.ts, energy, sample.power_w)
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
            _note_power(session, sample.power_w, conn.spec.max_power_w)
            if session.feed(
                raw, sample.ts, conn.spec.meter_poll_interval_s, conn.spec.max_power_w, counter
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

    def _reading(self, conn: _Connector, now: float, source: str | None = None) -> int | None:
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
        # Implausible counter values are never kept as readings (start, split, swap); the
        # session's own counter still sees them below, to fall back when one ends it.
        energy, _ = conn.spec.counter("energy_wh").check(_raw_number(s, "energy_wh"))
        if energy is not None:
            conn.energy_prev, conn.energy_wh = conn.energy_wh, (now, energy)
        sc, _ = conn.spec.counter("session_energy_wh").check(_raw_number(s, "session_energy_wh"))
        if sc is not None:
            conn.session_prev, conn.session_wh = conn.session_wh, (now, sc)
        plugged = _plugged(s, conn.plugged)
        charging = _charging(s)
        tag = _norm_tag(s.tag)
        new_tag = tag is not None and tag != conn.seen_tag
        conn.seen_tag = tag

        session = conn.session
        if session is not None:
            swapped = self._swapped(session, sc)
            if swapped and not (new_tag and session.tag is not None and tag != session.tag):
                # A drop of the session counter alone could be a glitch: the next sample, the
                # new car's counter going on from it, confirms the swap.
                assert sc is not None
                swapped = self._swap_confirmed(session, now, sc)
            elif session.swap_seen is not None:
                log.warning(
                    "session_counter_glitch_ignored",
                    session_id=session.session_id,
                    seen_wh=session.swap_seen[1],
                    session_counter_wh=sc,
                )
                session.swap_seen = None
            if not swapped and session.swap_seen is None:
                self._feed_charger_counter(conn, session, s, plugged)
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
                floor = session.swap_seen[2] if session.swap_seen is not None else None
                session.swap_seen = None
                split = self._split(conn, session, now, sc, floor)
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
                    self._witnessed_plug(conn, now)
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

    # ---------------------------------------------------- transactional chargers
    def _on_transactional(self, conn: _Connector, s: DeviceSample, effects: list[Effect]) -> None:
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
            conn.plugged = _plugged(s, conn.plugged)
            session = conn.session
            if session is not None and conn.plugged:
                session.last_activity_ts = max(session.last_activity_ts, now)
                if conn.power_w is not None:
                    session.max_power_w = max(session.max_power_w, conn.power_w)
        self._status(conn, now, effects)

    def begin_transaction(
        self,
        charger_id: str,
        grant: Grant,
        ts: float,
        meter_start_wh: float,
        ocpp: Mapping[str, Any],
    ) -> tuple[list[Effect], OpenSession]:
        """A transaction the charger started at ``ts`` with its register at ``meter_start_wh``.

        A session still open on the connector lost its end (the charger never reported it):
        it is closed first at its last activity, flagged ``end_estimated``."""
        conn = self._conns[charger_id]
        effects: list[Effect] = []
        if conn.session is not None:
            old = conn.session
            log.warning(
                "transaction_end_missing",
                charger_id=charger_id,
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
        conn.anchor_ts, conn.anchor_wh = ts, round(meter_start_wh)
        conn.anchor_latched = conn.anchor_reconstructed = False
        session = self._start(conn, grant, ts, effects)
        session.source = "transaction"
        session.ocpp = dict(ocpp)
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
        charger_id = self.find_session(session_id)
        if charger_id is None:
            return effects
        conn = self._conns[charger_id]
        session = conn.session
        assert session is not None
        if session.feed(energy_wh, ts, TRANSACTION_INTERVAL_S, conn.spec.max_power_w):
            effects.append(SaveSession(session))
        if power_w is not None:
            session.max_power_w = max(session.max_power_w, power_w)
        charging = conn.status is ChargerStatus.CHARGING or (
            power_w is not None and power_w >= CHARGING_POWER_W
        )
        self._account(conn, session, ts, charging=charging, plugged=True)
        self._points(session, ts, effects)
        return effects

    def end_transaction(
        self,
        session_id: str,
        ts: float,
        meter_stop_wh: float,
        reason: StopReason,
        ocpp: Mapping[str, Any] | None = None,
        *,
        estimated: bool = False,
    ) -> list[Effect]:
        """The charger's end of a transaction (StopTransaction, possibly replayed later), or
        ``estimated``: the charger shows no EV and never sent its end."""
        effects: list[Effect] = []
        charger_id = self.find_session(session_id)
        if charger_id is None:
            return effects
        conn = self._conns[charger_id]
        session = conn.session
        assert session is not None
        if ocpp:
            session.ocpp = {**(session.ocpp or {}), **ocpp}
        ts = max(ts, session.started_at)
        session.feed(meter_stop_wh, ts, TRANSACTION_INTERVAL_S, conn.spec.max_power_w)
        self._account(conn, session, ts, charging=False, plugged=True)
        self._end(conn, reason, ts, effects, estimated=estimated)
        conn.plugged = bool(conn.status is not None and conn.status.plugged)
        self._status(conn, ts, effects)
        return effects

    def _swap_confirmed(self, session: OpenSession, now: float, sc: int) -> bool:
        seen = session.swap_seen
        if seen is not None and sc >= seen[1]:
            return True
        session.swap_seen = [now, sc, session.last_wh]
        log.info(
            "session_counter_drop_seen",
            session_id=session.session_id,
            session_counter_wh=sc,
            previous_wh=session.sc_last_wh,
        )
        return False

    def _swapped(self, session: OpenSession, sc: float | None) -> bool:
        if sc is None or session.sc_last_wh is None or session.sc_base_wh is None:
            return False
        dropped = sc < session.sc_last_wh - 1.0
        rose = session.sc_last_wh - session.sc_base_wh >= SWAP_MIN_WH
        return dropped and rose

    def _split(
        self, conn: _Connector, session: OpenSession, now: float, sc: int, floor: int | None
    ) -> int | None:
        """Counter reading at the swap: the new car got ``sc`` Wh since its plug-in. ``floor``:
        the session's counter when the drop was first seen (what it had for sure)."""
        if session.source == "session_energy_wh":
            return 0
        reading = self._reading(conn, now, session.source)
        if reading is None:
            return None
        split = reading - sc
        last = session.last_wh
        if last is not None:
            split = max(split, last if floor is None else min(floor, last))
        split = min(split, reading)
        if last is not None and split < last and session.seg_start_wh is not None:
            if split >= session.seg_start_wh:
                # A meter read while the swap waited for confirmation counted the new car's
                # first Wh into this session: they go back to the new one.
                session.last_wh = split
            return split
        session.feed(
            split,
            now,
            self._interval(conn, session),
            conn.spec.max_power_w,
            conn.spec.counter(session.source),
        )
        return split

    def _previous(self, conn: _Connector, source: str | None) -> tuple[float, int] | None:
        """The reading of counter ``source`` before its latest one."""
        if source is None:
            return None
        if source.startswith("meter:"):
            return self._meters_prev.get(source[6:])
        return conn.energy_prev if source == "energy_wh" else conn.session_prev

    def _interval(self, conn: _Connector, session: OpenSession) -> float:
        if session.source is not None and session.source.startswith("meter:"):
            return conn.spec.meter_poll_interval_s
        return conn.spec.poll_interval_s

    def _feed_charger_counter(
        self, conn: _Connector, session: OpenSession, sample: DeviceSample, plugged: bool
    ) -> None:
        if session.source is None:
            session.source = self._source(conn)
        source = session.source
        if source not in ("energy_wh", "session_energy_wh"):
            return
        raw = _raw_number(sample, source)
        if raw is None:
            return
        if (
            source == "session_energy_wh"
            and not plugged
            and session.last_wh is not None
            and raw < session.last_wh
        ):
            return  # a session counter cleared at unplug: the session ended before it
        session.feed(
            raw,
            sample.ts,
            conn.spec.poll_interval_s,
            conn.spec.max_power_w,
            conn.spec.counter(source),
        )

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
        if (
            session.last_sample_ts is None
            or now > session.last_sample_ts
            or now < session.last_sample_ts - CLOCK_STEP_BACK_S  # the wall clock was set back
        ):
            session.last_sample_ts = now
        if plugged:
            session.last_activity_ts = now
        _note_power(session, conn.power_w, conn.spec.max_power_w)
        if (
            conn.session_wh is not None
            and conn.session_wh[0] == now
            and session.swap_seen is None  # a drop not yet confirmed is not bookkept
        ):
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

    def _new_plug(self, conn: _Connector, now: float, reading: int | None) -> None:
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
            start = 0 if source == "session_energy_wh" else reading - sc
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
                self._anchor_at_tag(conn, now)
        effects.append(RequestAuth(conn.spec.charger_id, tag, "rfid", conn.attempt))

    def _rose_since_previous(
        self, conn: _Connector, source: str | None, reading: int | None, now: float
    ) -> tuple[float, int] | None:
        """The previous reading of counter ``source`` when the counter rose plausibly from it
        to ``reading`` (read at ``now``): energy flowed in between."""
        before = self._previous(conn, source)
        if reading is None or before is None or not before[0] < now or not before[1] < reading:
            return None
        step_wh = conn.spec.counter(source).step_wh(reading)
        interval_s = conn.spec.poll_interval_s
        if source is not None and source.startswith("meter:"):
            interval_s = conn.spec.meter_poll_interval_s
        if not _rises_plausibly(
            before[1], before[0], reading, now, interval_s, conn.spec.max_power_w, step_wh
        ):
            return None
        return before

    def _witnessed_plug(self, conn: _Connector, now: float) -> None:
        """An EV plugged in since the previous sample, which showed none. A late poll may find
        it charging already: what was counted since the previous sample is this car's, so the
        start reading is the previous sample's; a session counter that restarts at plug-in,
        visibly restarted and shows no more than could have been counted since then dates it
        back to zero. The start time stays this sample's (a tag seen in it is no later)."""
        source = self._source(conn)
        reading = self._reading(conn, now, source)
        self._new_plug(conn, now, reading)
        if reading is None:
            return
        if source == "session_energy_wh" and conn.spec.session_counter_resets_on_plug:
            before = conn.session_prev
            # It visibly restarted (dropped from the last car's value, or rose from zero).
            restarted = before is not None and (reading < before[1] or before[1] == 0)
            if reading > 0 and before is not None and before[0] < now and restarted:
                elapsed_s = max(now - before[0], conn.spec.poll_interval_s)
                step_wh = conn.spec.counter(source).step_wh(reading)
                if reading <= conn.spec.max_power_w * elapsed_s / 3600.0 + step_wh:
                    conn.anchor_wh = 0
                    log.info(
                        "start_before_plug_sample",
                        charger_id=conn.spec.charger_id,
                        counted_wh=reading,
                    )
            return
        rose = self._rose_since_previous(conn, source, reading, now)
        if rose is not None:
            conn.anchor_wh = rose[1]
            log.info(
                "start_before_plug_sample",
                charger_id=conn.spec.charger_id,
                counted_wh=reading - rose[1],
            )

    def _anchor_at_tag(self, conn: _Connector, now: float) -> None:
        """Move the start to the beginning of the authorization by a tag first seen at ``now``.

        The tag was shown after the charger's previous sample (which showed none) and by this
        one. When the counter did not move in between, this sample's reading is the start.
        When it rose, the charger may have begun charging right after the tag (a late poll
        sees both at once): the previous sample is the start, or the anchor itself (the
        plug-in, possibly dated back by the session counter) when that is not older."""
        source = self._source(conn)
        reading = self._reading(conn, now, source)
        before = self._rose_since_previous(conn, source, reading, now)
        if before is not None and conn.anchor_ts is not None:
            if before[0] <= conn.anchor_ts:
                return  # no sample between the anchor and the tag: the anchor stands
            log.info(
                "start_before_tag_sample",
                charger_id=conn.spec.charger_id,
                start_wh=before[1],
                tag_sample_wh=reading,
            )
            conn.anchor_ts, conn.anchor_wh = before
        else:
            conn.anchor_ts, conn.anchor_wh = now, reading
        # A start read by the gateway: neither latched late nor dated back.
        conn.anchor_latched = conn.anchor_reconstructed = False

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
            seen: int | None = None
            if conn.anchor_reconstructed and conn.anchor_seen_wh is not None:
                session.flag(Flag.START_RECONSTRUCTED)
                # Plausibility checks continue from the reading that was seen, not from the
                # dated-back start (whose time is unknown).
                seen = round(conn.anchor_seen_wh)
            session.begin(round(start), now, seen)
            if conn.anchor_latched:
                session.flag(Flag.START_LATCHED)
            pre = self._previous(conn, source)
            fresh_s = 3 * self._interval(conn, session) + 1.0
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
            energy_wh=record.energy_wh,
            flags=record.flags,
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


def _raw_number(sample: DeviceSample, name: str) -> float | None:
    """A numeric value as the device sent it, NaN and infinities included (they must be seen
    to be refused); None when the device did not report it."""
    value = sample.values.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _note_power(session: OpenSession, power_w: float | None, max_power_w: float) -> None:
    """Keep the session's peak power; a value no charger can draw (a glitch) is not kept."""
    if power_w is not None and math.isfinite(power_w) and 0 <= power_w <= max_power_w:
        session.max_power_w = max(session.max_power_w, power_w)


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
# (charger id, user group) -> (tariff id, version, data[, what was meant if it fell back])
TariffsResolver = Callable[[str, str | None], tuple[Any, ...] | None]
EventSink = Callable[[str, dict[str, Any]], Awaitable[None] | None]


def max_power_w(max_current_a: float | None, profile_max_a: float | None = None) -> float:
    """The most a charger can deliver, for the plausibility of its counters: the tightest known
    bound. The site's ``max_current_a`` for the device (how it is wired), else its profile's
    ``current_limit.max_a`` (at least ``PROFILE_FLOOR_A``), else ``DEFAULT_MAX_POWER_W``; a
    current becomes power as three phases x 230 V x ``POWER_MARGIN``."""
    if max_current_a is not None:
        amps = max_current_a
    elif profile_max_a is not None:
        amps = max(profile_max_a, PROFILE_FLOOR_A)
    else:
        return DEFAULT_MAX_POWER_W
    return 3 * NOMINAL_V * amps * POWER_MARGIN


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
        transactional: Iterable[str] = (),
        counters: Mapping[str, Mapping[str, Counter]] | None = None,
        profile_max_a: Mapping[str, float] | None = None,
    ) -> None:
        """``time_scale``: simulated seconds per wall second when the devices are simulated
        faster than real time (``evgw demo``); it widens the plausibility bound on counter
        steps, which is measured against the gateway's wall clock. ``profile_max_a``: charger
        id -> its profile's ``current_limit.max_a`` (see :func:`max_power_w`)."""
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
                status = check(token, session.charger_id)
                if status in (AuthStatus.BLOCKED, AuthStatus.EXPIRED):
                    log.info("session_deauthorized", session_id=session.session_id, token=token)
                    await self._perform(
                        self.tracker.stop(
                            session.charger_id, StopReason.DEAUTHORIZED, self._clock.time()
                        )
                    )

    async def begin_transaction(
        self,
        charger_id: str,
        grant: Grant,
        ts: float,
        meter_start_wh: float,
        ocpp: Mapping[str, Any],
    ) -> str:
        """Open the session of a transaction the charger reported; returns its session id
        (persisted before this returns)."""
        async with self._lock:
            effects, session = self.tracker.begin_transaction(
                charger_id, grant, ts, meter_start_wh, ocpp
            )
            await self._perform(effects)
            return session.session_id

    async def transaction_meter(
        self, session_id: str, ts: float, energy_wh: float, power_w: float | None = None
    ) -> None:
        async with self._lock:
            await self._perform(self.tracker.transaction_meter(session_id, ts, energy_wh, power_w))

    async def end_transaction(
        self,
        session_id: str,
        ts: float,
        meter_stop_wh: float,
        reason: StopReason,
        ocpp: Mapping[str, Any] | None = None,
        *,
        estimated: bool = False,
    ) -> bool:
        """Close a reported transaction's session (finished, priced, sealed and queued before
        this returns); False when no such session is open."""
        async with self._lock:
            if self.tracker.find_session(session_id) is None:
                return False
            await self._perform(
                self.tracker.end_transaction(
                    session_id, ts, meter_stop_wh, reason, ocpp, estimated=estimated
                )
            )
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
                session.flag(Flag.UNPRICED)
                resolved = None
            if resolved is not None:
                session.tariff_id, session.tariff_version, session.tariff_data = resolved[:3]
                if len(resolved) > 3 and resolved[3] is not None:
                    # Priced by another tariff than the one meant: never silently.
                    session.flag(Flag.TARIFF_FALLBACK)
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
                facts = facts.model_copy(update={"flags": [*facts.flags, UNPRICED]})
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
            facts = facts.model_copy(update={"flags": [*facts.flags, UNPRICED]})
            record = facts.priced(default, None)
        sealed = await self._store.finish_session(record.to_dict())
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
