"""Readings to the cloud at a coarser resolution than the local buffer (``uplink.readings``).

The buffer keeps every reading; the uplink sends one reading per device and interval instead:
``last`` (the last reading of the interval), ``mean`` (numbers averaged, everything else as in the
last reading) or ``min_max`` (the last reading plus ``<name>_min`` and ``<name>_max`` for each
number). An aggregate carries the time of the last reading it covers, so a counter (``energy_wh``)
sent with ``last`` is exactly the counter at that time.

Intervals are aligned to the clock (``floor(ts / interval)``). An interval is sent once a later
reading of the same device arrives or, for a device that went quiet, once ``grace_s`` has passed
after its end. Its readings are marked delivered when the aggregate is PUBACKed; until then they
stay undelivered in the buffer, so a dropped connection rebuilds the same aggregates from the
buffer on the next one. A reading that arrives after its interval was sent (a clock stepped
back) goes out as an aggregate of its own: nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

__all__ = ["MODES", "Aggregate", "LeanReadings"]

MODES = ("last", "mean", "min_max")
_decode = msgspec.json.Decoder(dict[str, Any]).decode


@dataclass(slots=True)
class _Bucket:
    index: int
    ids: list[int] = field(default_factory=list)
    ts: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    mins: dict[str, float] = field(default_factory=dict)
    maxs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Aggregate:
    device_id: str
    ts: float
    values: dict[str, Any]
    ids: list[int]  # the buffered readings it covers


def _number(value: Any) -> bool:
    return type(value) is int or type(value) is float


class LeanReadings:
    """Folds buffered readings (id, device id, time, values) into one aggregate per device and
    interval. Pure: the caller says what time it is."""

    def __init__(self, interval_s: float, mode: str, grace_s: float = 3.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive (0 means full resolution: no folding)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.interval_s = float(interval_s)
        self.mode = mode
        self.grace_s = grace_s
        self._open: dict[str, _Bucket] = {}

    @property
    def held(self) -> int:
        """Readings held in intervals not sent yet."""
        return sum(len(b.ids) for b in self._open.values())

    def add(
        self, row_id: int, device_id: str, ts: float, values: dict[str, Any]
    ) -> list[Aggregate]:
        """Take one reading; returns the device's previous interval if this one closed it."""
        index = int(ts // self.interval_s)
        out: list[Aggregate] = []
        bucket = self._open.get(device_id)
        if bucket is not None and bucket.index != index:
            out.append(self._close(device_id, bucket))
            bucket = None
        if bucket is None:
            bucket = self._open[device_id] = _Bucket(index)
        bucket.ids.append(row_id)
        bucket.ts = ts
        bucket.last = values
        if self.mode != "last":
            sums, counts, mins, maxs = bucket.sums, bucket.counts, bucket.mins, bucket.maxs
            for name, value in values.items():
                if not _number(value):
                    continue
                if name in counts:
                    sums[name] += value
                    counts[name] += 1
                    if value < mins[name]:
                        mins[name] = value
                    if value > maxs[name]:
                        maxs[name] = value
                else:
                    sums[name] = value
                    counts[name] = 1
                    mins[name] = maxs[name] = value
        return out

    def add_wire(self, rows: Sequence[tuple[int, str, bytes]]) -> list[Aggregate]:
        """Take buffered readings in their wire form (``gateway.wire``), in id order."""
        out: list[Aggregate] = []
        for row_id, device_id, wire in rows:
            values = _decode(wire)
            ts = _parse_wire_ts(values.pop("ts", None))
            out += self.add(row_id, device_id, ts, values)
        return out

    def due(self, now: float) -> list[Aggregate]:
        """Intervals whose end is ``grace_s`` or more in the past, closed."""
        out = []
        for device_id, bucket in list(self._open.items()):
            if (bucket.index + 1) * self.interval_s + self.grace_s <= now:
                out.append(self._close(device_id, bucket))
        return out

    def _close(self, device_id: str, bucket: _Bucket) -> Aggregate:
        del self._open[device_id]
        values = dict(bucket.last)
        if self.mode == "mean":
            for name, total in bucket.sums.items():
                values[name] = _mean(total, bucket.counts[name])
        elif self.mode == "min_max":
            for name in bucket.sums:
                values[f"{name}_min"] = bucket.mins[name]
                values[f"{name}_max"] = bucket.maxs[name]
        return Aggregate(device_id, bucket.ts, values, bucket.ids)


def _mean(total: float, count: int) -> float:
    value = total / count
    return round(value, 3) if value == value else value  # NaN stays NaN (sent as null)


def _parse_wire_ts(text: Any) -> float:
    """The time of a wire-form reading (``2026-09-21T14:13:20.250Z``)."""
    if not isinstance(text, str):
        raise ValueError(f"reading without a time: {text!r}")
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
