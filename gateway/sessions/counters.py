"""The energy counters of a site as the session tracker reads them, and every decision taken on
their readings alone (the plug/authorization state machine is ``gateway.sessions.tracker``).

``CounterReadings`` keeps the latest two plausible readings of each counter (billing meters, the
chargers' lifetime and session counters) and answers: which counter bills a session, whether a
reading is fresh, where a start reading lies (a plug-in witnessed or not, a tag shown between two
polls, a session counter that restarts at plug-in), whether a drop of the session counter is a car
swap, and the per-sample time and session-counter bookkeeping of an open session.
"""

from __future__ import annotations

import structlog

from gateway.model import ChargerStatus, DeviceSample
from gateway.sessions.connector import Connector, note_power, raw_number
from gateway.sessions.ledger import CLOCK_STEP_BACK_S, Counter, OpenSession, rises_plausibly

__all__ = ["SWAP_MIN_WH", "CounterReadings"]

log = structlog.get_logger(__name__)

SWAP_MIN_WH = 50.0  # session counter must have risen this much before a drop means "new car"


class CounterReadings:
    """The latest readings of every energy counter of the site; see the module docstring."""

    def __init__(self) -> None:
        self._meters: dict[str, tuple[float, int, float | None]] = {}  # id -> (ts, wh, power)
        self._meters_prev: dict[str, tuple[float, int]] = {}  # id -> the reading before

    def take_meter(self, sample: DeviceSample, counter: Counter) -> tuple[float | None, int | None]:
        """Keep a billing meter's reading: (the raw value, or None when the sample has none;
        the value in Wh when plausible: an implausible reading never becomes a start
        reading)."""
        raw = raw_number(sample, "energy_wh") if sample.online else None
        if raw is None:
            return None, None
        energy, _ = counter.check(raw)
        if energy is not None:
            got = self._meters.get(sample.device_id)
            if got is not None:
                self._meters_prev[sample.device_id] = (got[0], got[1])
            self._meters[sample.device_id] = (sample.ts, energy, sample.power_w)
        return raw, energy

    def take_charger(self, conn: Connector, sample: DeviceSample) -> int | None:
        """Keep an online charger sample's lifetime and session counter readings; returns the
        session counter (Wh) when plausible. Implausible counter values are never kept as
        readings (start, split, swap); the session's own counter still sees them, to fall
        back when one ends it."""
        now = sample.ts
        energy, _ = conn.spec.counter("energy_wh").check(raw_number(sample, "energy_wh"))
        if energy is not None:
            conn.energy_prev, conn.energy_wh = conn.energy_wh, (now, energy)
        sc, _ = conn.spec.counter("session_energy_wh").check(
            raw_number(sample, "session_energy_wh")
        )
        if sc is not None:
            conn.session_prev, conn.session_wh = conn.session_wh, (now, sc)
        return sc

    def source(self, conn: Connector) -> str | None:
        if conn.spec.meter_id is not None:
            return f"meter:{conn.spec.meter_id}"
        if conn.spec.prefer_session_counter and conn.session_wh is not None:
            return "session_energy_wh"
        if conn.energy_wh is not None:
            return "energy_wh"
        if conn.session_wh is not None:
            return "session_energy_wh"
        return None

    def reading(self, conn: Connector, now: float, source: str | None = None) -> int | None:
        """The current value of the counter ``source`` (default: the one a session would use),
        or None when it is not known fresh."""
        source = source or self.source(conn)
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

    def previous(self, conn: Connector, source: str | None) -> tuple[float, int] | None:
        """The reading of counter ``source`` before its latest one."""
        if source is None:
            return None
        if source.startswith("meter:"):
            return self._meters_prev.get(source[6:])
        return conn.energy_prev if source == "energy_wh" else conn.session_prev

    def interval(self, conn: Connector, session: OpenSession) -> float:
        if session.source is not None and session.source.startswith("meter:"):
            return conn.spec.meter_poll_interval_s
        return conn.spec.poll_interval_s

    def rose_since_previous(
        self, conn: Connector, source: str | None, reading: int | None, now: float
    ) -> tuple[float, int] | None:
        """The previous reading of counter ``source`` when the counter rose plausibly from it
        to ``reading`` (read at ``now``): energy flowed in between."""
        before = self.previous(conn, source)
        if reading is None or before is None or not before[0] < now or not before[1] < reading:
            return None
        step_wh = conn.spec.counter(source).step_wh(reading)
        interval_s = conn.spec.poll_interval_s
        if source is not None and source.startswith("meter:"):
            interval_s = conn.spec.meter_poll_interval_s
        if not rises_plausibly(
            before[1], before[0], reading, now, interval_s, conn.spec.max_power_w, step_wh
        ):
            return None
        return before

    def new_plug(self, conn: Connector, now: float, reading: int | None) -> None:
        conn.plugged = True
        conn.anchor_at(now, reading)
        conn.stopped_while_plugged = False

    def unwitnessed_plug(self, conn: Connector, now: float) -> None:
        """An EV found plugged in (first sample after a gateway start or a charger outage).

        Energy may already have flowed. Where the charger's session counter restarts at every
        plug-in, the start reading is dated back to the plug-in (counter minus session counter,
        flag ``start_reconstructed``); otherwise the start is read now, flagged
        ``start_latched`` unless the charger shows it has not charged yet (preparing).
        """
        reading = self.reading(conn, now)
        self.new_plug(conn, now, reading)
        if reading is None:
            return
        sc = self.reading(conn, now, "session_energy_wh")
        source = self.source(conn)
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

    def witnessed_plug(self, conn: Connector, now: float) -> None:
        """An EV plugged in since the previous sample, which showed none. A late poll may find
        it charging already: what was counted since the previous sample is this car's, so the
        start reading is the previous sample's; a session counter that restarts at plug-in,
        visibly restarted and shows no more than could have been counted since then dates it
        back to zero. The start time stays this sample's (a tag seen in it is no later)."""
        source = self.source(conn)
        reading = self.reading(conn, now, source)
        self.new_plug(conn, now, reading)
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
        rose = self.rose_since_previous(conn, source, reading, now)
        if rose is not None:
            conn.anchor_wh = rose[1]
            log.info(
                "start_before_plug_sample",
                charger_id=conn.spec.charger_id,
                counted_wh=reading - rose[1],
            )

    def anchor_at_tag(self, conn: Connector, now: float) -> None:
        """Move the start to the beginning of the authorization by a tag first seen at ``now``.

        The tag was shown after the charger's previous sample (which showed none) and by this
        one. When the counter did not move in between, this sample's reading is the start.
        When it rose, the charger may have begun charging right after the tag (a late poll
        sees both at once): the previous sample is the start, or the anchor itself (the
        plug-in, possibly dated back by the session counter) when that is not older."""
        source = self.source(conn)
        reading = self.reading(conn, now, source)
        before = self.rose_since_previous(conn, source, reading, now)
        if before is not None and conn.anchor_ts is not None:
            if before[0] <= conn.anchor_ts:
                return  # no sample between the anchor and the tag: the anchor stands
            log.info(
                "start_before_tag_sample",
                charger_id=conn.spec.charger_id,
                start_wh=before[1],
                tag_sample_wh=reading,
            )
            conn.anchor_at(*before)
        else:
            conn.anchor_at(now, reading)

    def swapped(self, session: OpenSession, sc: float | None) -> bool:
        if sc is None or session.sc_last_wh is None or session.sc_base_wh is None:
            return False
        dropped = sc < session.sc_last_wh - 1.0
        rose = session.sc_last_wh - session.sc_base_wh >= SWAP_MIN_WH
        return dropped and rose

    def swap_confirmed(self, session: OpenSession, now: float, sc: int) -> bool:
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

    def split(
        self, conn: Connector, session: OpenSession, now: float, sc: int, floor: int | None
    ) -> int | None:
        """Counter reading at the swap: the new car got ``sc`` Wh since its plug-in. ``floor``:
        the session's counter when the drop was first seen (what it had for sure)."""
        if session.source == "session_energy_wh":
            return 0
        reading = self.reading(conn, now, session.source)
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
            self.interval(conn, session),
            conn.spec.max_power_w,
            conn.spec.counter(session.source),
        )
        return split

    def feed_charger_counter(
        self, conn: Connector, session: OpenSession, sample: DeviceSample, plugged: bool
    ) -> None:
        if session.source is None:
            session.source = self.source(conn)
        source = session.source
        if source not in ("energy_wh", "session_energy_wh"):
            return
        raw = raw_number(sample, source)
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

    def account(
        self, conn: Connector, session: OpenSession, now: float, *, charging: bool, plugged: bool
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
        note_power(session, conn.power_w, conn.spec.max_power_w)
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
        return changed
