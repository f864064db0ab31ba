"""The charge points' clocks: how far each is off ours, and its timestamps on our clock.

A StatusNotification is sent live (chargers do not queue them), so its timestamp measures the
charger's offset; queued messages (transactions, meter values) carry the charger's own times,
which are corrected by that offset and never allowed to lie in our future.
"""

from __future__ import annotations

import structlog

from gateway.model import Clock
from gateway.ocpp.mapping import parse_timestamp

__all__ = ["FUTURE_SLACK_S", "SKEW_TOLERANCE_S", "ChargePointClocks"]

log = structlog.get_logger(__name__)

FUTURE_SLACK_S = 5.0  # a charger's timestamp ahead of ours by more is its clock, not the event
SKEW_TOLERANCE_S = 2.0  # clock offsets up to this are latency and jitter: not corrected


class ChargePointClocks:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._skew: dict[str, float] = {}  # charge point -> its clock minus ours, seconds

    def forget(self, cp_id: str) -> None:
        """A new connection: its offset is measured anew."""
        self._skew.pop(cp_id, None)

    def observe(self, cp_id: str, text: str | None) -> None:
        """A StatusNotification's timestamp, sent live: its offset from our clock. The largest
        offset of a connection wins: a status a charger replays late would look like a clock
        running behind."""
        if not text:
            return
        try:
            skew = parse_timestamp(text) - self._clock.time()
        except ValueError:
            return
        before = self._skew.get(cp_id)
        if before is not None and skew <= before:
            return
        self._skew[cp_id] = skew
        if abs(skew) > SKEW_TOLERANCE_S and (before is None or abs(skew - before) > 1.0):
            log.warning("ocpp_clock_skew", charge_point_id=cp_id, skew_s=round(skew, 1))

    def skew_s(self, cp_id: str) -> float:
        skew = self._skew.get(cp_id, 0.0)
        return skew if abs(skew) > SKEW_TOLERANCE_S else 0.0

    def event_time(self, text: str | None, cp_id: str | None = None) -> float:
        """A charger's timestamp on our clock (its measured skew taken off); never later than
        now (a clock running ahead), now when it is missing or unreadable."""
        now = self._clock.time()
        if not text:
            return now
        try:
            ts = parse_timestamp(text)
        except ValueError:
            log.warning("ocpp_bad_timestamp", value=text[:40])
            return now
        if cp_id is not None:
            ts -= self.skew_s(cp_id)
        if ts > now + FUTURE_SLACK_S:
            log.warning("ocpp_clock_ahead", ahead_s=round(ts - now, 1))
            return now
        return ts
