"""The ledger of one open session: its durable state, its energy bookkeeping in integer Wh,
and the billable record it becomes.

``OpenSession.feed`` takes the readings of the one cumulative counter a session is billed from
and decides which are plausible (``Counter``: a counter's range and resolution; a charger's
maximum power bounds every step, see :func:`max_power_w`). ``build_record`` is the one place the
finished record is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.model import SESSION_SCHEMA, Flag, rfc3339
from gateway.records import SessionFacts

__all__ = [
    "CLOCK_STEP_BACK_S",
    "DEFAULT_COUNTER",
    "DEFAULT_MAX_POWER_W",
    "MAX_COUNTER_WH",
    "MAX_SUSPECT_CHAINS",
    "Counter",
    "OpenSession",
    "build_record",
    "max_power_w",
    "rises_plausibly",
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
GAP_POLLS = 3  # readings missing for more than this many poll intervals: comms_gap
# A reading dated this much before the previous one is no late sample (the poll queue never holds
# one that long): the wall clock was set back (an NTP step after a boot without a real-time clock).
CLOCK_STEP_BACK_S = 10.0
# Across such a step the time since the previous reading is unknown (the gateway may have been
# down meanwhile): a rise is taken as counted at most at max power over up to this long.
CLOCK_STEP_UNSEEN_MAX_S = 3600.0


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


def rises_plausibly(
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
          back, and every time the session keeps moves back with it, so the counter counts on
          (as if the previous reading came one poll interval earlier, or as long earlier as
          the rise needs at max power: the gateway may have been down across the step);
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
          last plausible reading (flag ``energy_fallback``, added by ``build_record``).
        """
        counter = counter or DEFAULT_COUNTER
        value, why = counter.check(reading)
        if self.last_counter_ts is not None and ts < self.last_counter_ts - max(
            CLOCK_STEP_BACK_S, 2 * interval_s
        ):
            elapsed_s = self._unseen_s(value, interval_s, max_power_w, counter)
            self._shift_clock(ts - elapsed_s - self.last_counter_ts)
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
        if rises_plausibly(
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
            if rises_plausibly(chain[2], chain[3], value, ts, interval_s, max_power_w, step_wh):
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

    def _unseen_s(
        self, value: int | None, interval_s: float, max_power_w: float, counter: Counter
    ) -> float:
        """How long before a reading dated after a clock step back the previous one came, as far
        as the counter can tell: one poll interval, or, when the counter rose by more than that
        allows, the time the rise takes at max power (up to ``CLOCK_STEP_UNSEEN_MAX_S``). The
        wall clock cannot say, and the gateway may have been down meanwhile (a restart with a
        car charging on); one interval made a minute of charging look like a meter reset."""
        if value is None or self.last_wh is None or value < self.last_wh or max_power_w <= 0:
            return interval_s
        rise_wh = value - self.last_wh - counter.step_wh(value)
        return min(max(interval_s, rise_wh * 3600.0 / max_power_w), CLOCK_STEP_UNSEEN_MAX_S)

    def _shift_clock(self, delta_s: float) -> None:
        """The wall clock was set back (an NTP step): move every time the counter checks use by
        ``delta_s``, as if the last reading came that much before this one (``_unseen_s``)."""
        log.warning("wall_clock_stepped_back", session_id=self.session_id, by_s=round(-delta_s, 1))
        assert self.last_counter_ts is not None
        self.last_counter_ts += delta_s
        if self.read_ts is not None:
            self.read_ts = min(self.read_ts + delta_s, self.last_counter_ts)
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
        if not rises_plausibly(last, last_ts, value, ts, interval_s, max_power_w, step_wh):
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
                and rises_plausibly(
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


def build_record(session: OpenSession, site_id: str) -> SessionFacts:
    """The finished session as its billable record (CONTRACT ``sessions/finished``), without
    ``charging_periods``/``cost`` (the pricer adds them) and ``seq``/hashes (the store seals
    it). The flags a bill reader must see are settled here: ``no_meter``/``not_billable``
    without a start reading, ``energy_fallback`` when the last reading was not taken."""
    assert session.ended_at is not None and session.stop_reason is not None
    flags = list(session.flags)
    if session.meter_start_wh is None:
        for name in (Flag.NO_METER, Flag.NOT_BILLABLE):
            if name not in flags:
                flags.append(name)
    else:
        if session.tail_suspect and Flag.ENERGY_FALLBACK not in flags:
            # The session ended on an implausible or suspect reading: the last plausible
            # reading stands.
            flags.append(Flag.ENERGY_FALLBACK)
            log.warning(
                "session_energy_fallback",
                session_id=session.session_id,
                meter_stop_wh=session.last_wh,
                rejected=session.rejected,
            )
        if session.energy() == 0 and Flag.NOT_BILLABLE not in flags:
            flags.append(Flag.NOT_BILLABLE)
    facts = {
        "schema": SESSION_SCHEMA,
        "session_id": session.session_id,
        "site_id": site_id,
        "charger_id": session.charger_id,
        "connector": session.connector,
        "user": dict(session.user),
        "started_at": rfc3339(session.started_at),
        "ended_at": rfc3339(session.ended_at),
        "charging_s": round(session.charging_s),
        "idle_s": round(session.idle_s),
        "meter_start_wh": session.meter_start_wh,
        "meter_stop_wh": session.last_wh,
        "energy_wh": session.energy(),
        "max_power_w": round(session.max_power_w),
        "stop_reason": session.stop_reason,
        "tariff_id": session.tariff_id,
        "tariff_version": session.tariff_version,
        "flags": [str(f) for f in flags],
    } | ({"ocpp": dict(session.ocpp)} if session.ocpp is not None else {})
    return SessionFacts.from_dict(facts)
