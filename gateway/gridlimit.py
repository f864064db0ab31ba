"""The limit the grid can set: which of the site's limit sources is in force now.

Pure logic (no I/O, time passed in). Four sources, each a per-phase current for the whole site:

- ``connection``: ``grid.max_current_a``, the connection's own limit; always in force;
- ``schedule``: ``grid.schedule`` rules, by local weekday and time of day;
- ``signal``: a grid operator's relay (ripple-control receiver, section 14a EnWG control box)
  read through a Modbus I/O module (``grid.signal``, polled by gateway/gridsignal.py); when the
  module cannot be read, ``grid.signal.when_offline`` decides (``limit`` by default: the reduced
  limit applies, as if the relay had switched);
- ``cloud``: the ``limit`` command, for the site or one charger, until ``expires_at``.

The site limit in force is the lowest of them (a source can lower, never raise, the
connection's limit); per-charger limits come from the cloud only. A power limit is converted to a
per-phase current at 230 V on three phases. ``LoadManager`` asks :meth:`GridLimits.effective`
before every decision and hands the result to the ``LoadBalancer``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.model import rfc3339

__all__ = [
    "SOURCES",
    "CloudLimit",
    "EffectiveLimit",
    "GridLimits",
    "LimitValue",
    "ScheduleRule",
]

VOLTAGE_V = 230.0
PHASES = 3
SOURCES = ("connection", "schedule", "signal", "cloud")
# On a tie the more specific source is named: the grid operator's wish, not the fuse.
_RANK = {"cloud": 0, "signal": 1, "schedule": 2, "connection": 3}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class LimitValue:
    """A limit as asked for: a per-phase current or a power for the whole site (or charger)."""

    current_a: float | None = None
    power_w: float | None = None

    def __post_init__(self) -> None:
        if (self.current_a is None) == (self.power_w is None):
            raise ValueError("a limit is either max_current_a or max_power_w")
        value = self.current_a if self.current_a is not None else self.power_w
        if value is None or not value >= 0:
            raise ValueError("a limit must be a number >= 0")

    @property
    def amps(self) -> float:
        """Per-phase current (a power is spread over three phases at 230 V)."""
        if self.current_a is not None:
            return self.current_a
        assert self.power_w is not None
        return self.power_w / (VOLTAGE_V * PHASES)

    def as_dict(self) -> dict[str, float]:
        if self.current_a is not None:
            return {"max_current_a": self.current_a}
        assert self.power_w is not None
        return {"max_power_w": self.power_w}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LimitValue:
        return cls(data.get("max_current_a"), data.get("max_power_w"))


@dataclass(frozen=True, slots=True)
class CloudLimit:
    """A ``limit`` command in force."""

    scope: str  # "site" or a charger id
    value: LimitValue
    expires_at: float | None
    reason: str | None
    request_id: str
    set_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            **self.value.as_dict(),
            "expires_at": self.expires_at,
            "reason": self.reason,
            "request_id": self.request_id,
            "set_at": self.set_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CloudLimit:
        return cls(
            scope=str(data["scope"]),
            value=LimitValue.from_mapping(data),
            expires_at=None if data.get("expires_at") is None else float(data["expires_at"]),
            reason=data.get("reason"),
            request_id=str(data["request_id"]),
            set_at=float(data["set_at"]),
        )


@dataclass(frozen=True, slots=True)
class ScheduleRule:
    """``value`` applies on ``days`` (0 = Monday) from ``start_min`` to ``end_min`` (minutes
    after local midnight); an end at or before the start runs past midnight into the next day."""

    days: frozenset[int]
    start_min: int
    end_min: int
    value: LimitValue
    reason: str | None = None

    def active(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start_min < self.end_min:
            return day in self.days and self.start_min <= minute < self.end_min
        # Overnight: the evening part belongs to the rule's day, the morning part to the next.
        return (day in self.days and minute >= self.start_min) or (
            (day - 1) % 7 in self.days and minute < self.end_min
        )

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> ScheduleRule:
        days = data.get("days") or _DAYS
        return cls(
            days=frozenset(_DAYS.index(d) for d in days),
            start_min=_minutes(data["start"]),
            end_min=_minutes(data["end"]),
            value=LimitValue.from_mapping(data),
            reason=data.get("reason"),
        )


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True, slots=True)
class EffectiveLimit:
    """What is in force now."""

    site_a: float  # per phase
    source: str  # one of SOURCES
    reason: str | None = None
    expires_at: float | None = None  # of a cloud limit in force
    chargers: Mapping[str, float] = field(default_factory=dict)  # per-phase caps from the cloud
    signal: bool | None = None  # the relay: True = reduce, None = unknown or not configured

    def key(self) -> tuple[Any, ...]:
        """What a change of is logged and published."""
        return (
            round(self.site_a, 3),
            self.source,
            self.reason,
            self.expires_at,
            tuple(sorted((d, round(a, 3)) for d, a in self.chargers.items())),
            self.signal,
        )

    def payload(self, now: float) -> dict[str, Any]:
        """The retained ``P/S/grid/limit`` message."""
        return {
            "schema": "evgw.grid-limit/1",
            "max_current_a": round(self.site_a, 2),
            "source": self.source,
            "reason": self.reason,
            "expires_at": rfc3339(self.expires_at) if self.expires_at is not None else None,
            "chargers": {d: round(a, 2) for d, a in sorted(self.chargers.items())},
            "signal": self.signal,
            "ts": rfc3339(now),
        }


class GridLimits:
    """The site's limit sources; ask :meth:`effective` for the one in force."""

    def __init__(
        self,
        connection_a: float,
        *,
        timezone: str = "UTC",
        schedule: Sequence[ScheduleRule] = (),
        signal_value: LimitValue | None = None,
        signal_reason: str | None = None,
        signal_when_offline: str = "limit",
    ) -> None:
        if signal_when_offline not in ("limit", "ignore"):
            raise ValueError("when_offline is limit or ignore")
        self.connection_a = connection_a
        self.zone = ZoneInfo(timezone)
        self.schedule = tuple(schedule)
        self.signal_value = signal_value
        self.signal_reason = signal_reason
        self.signal_when_offline = signal_when_offline
        self.signal: bool | None = None  # last read state; None: not (yet) readable
        self._cloud: dict[str, CloudLimit] = {}

    @classmethod
    def from_config(cls, grid: Any, timezone: str) -> GridLimits:
        """From a ``GridConfig`` with ``max_current_a`` set."""
        signal = grid.signal
        return cls(
            grid.max_current_a,
            timezone=timezone,
            schedule=[ScheduleRule.from_config(r) for r in grid.schedule],
            signal_value=LimitValue.from_mapping(signal) if signal else None,
            signal_reason=(signal or {}).get("reason") or "grid operator signal",
            signal_when_offline=(signal or {}).get("when_offline", "limit"),
        )

    # -- inputs --------------------------------------------------------------------------------
    def set_cloud(self, limit: CloudLimit) -> None:
        self._cloud[limit.scope] = limit

    def clear_cloud(self, scope: str) -> CloudLimit | None:
        return self._cloud.pop(scope, None)

    def set_signal(self, active: bool | None) -> None:
        """The relay's state as read (None: the I/O module did not answer)."""
        self.signal = active

    def expire(self, now: float) -> list[CloudLimit]:
        """Drop cloud limits whose time is over; the dropped ones."""
        gone = [c for c in self._cloud.values() if c.expires_at is not None and c.expires_at <= now]
        for c in gone:
            del self._cloud[c.scope]
        return gone

    def cloud_limits(self) -> list[CloudLimit]:
        return sorted(self._cloud.values(), key=lambda c: c.scope)

    def load(self, entries: Iterable[Mapping[str, Any]]) -> None:
        for data in entries:
            limit = CloudLimit.from_json(data)
            self._cloud[limit.scope] = limit

    # -- the answer ----------------------------------------------------------------------------
    def signal_active(self) -> bool:
        if self.signal_value is None:
            return False
        if self.signal is None:
            return self.signal_when_offline == "limit"
        return self.signal

    def effective(self, now: float) -> EffectiveLimit:
        candidates: list[tuple[float, str, str | None, float | None]] = [
            (self.connection_a, "connection", None, None)
        ]
        local = datetime.fromtimestamp(now, self.zone)
        for rule in self.schedule:
            if rule.active(local):
                candidates.append((rule.value.amps, "schedule", rule.reason, None))
        if self.signal_value is not None and self.signal_active():
            reason = self.signal_reason
            if self.signal is None:
                reason = f"{reason} (I/O module unreadable)"
            candidates.append((self.signal_value.amps, "signal", reason, None))
        chargers: dict[str, float] = {}
        for c in self._cloud.values():
            if c.expires_at is not None and c.expires_at <= now:
                continue
            if c.scope == "site":
                candidates.append((c.value.amps, "cloud", c.reason, c.expires_at))
            else:
                chargers[c.scope] = c.value.amps
        amps, source, reason, expires = min(
            candidates, key=lambda c: (round(min(c[0], self.connection_a), 6), _RANK[c[1]])
        )
        return EffectiveLimit(
            site_a=min(amps, self.connection_a),
            source=source,
            reason=reason,
            expires_at=expires,
            chargers=chargers,
            signal=self.signal if self.signal_value is not None else None,
        )
