"""Costing of a finished session under the tariff frozen at its start.

The session's time line (its meter points) is cut into pieces at every instant where the
applicable tariff element may change: local start/end times of day and midnights in the site
time zone (both readings of an hour repeated at the end of DST, and the DST transitions
themselves), the ``min_kwh``/``max_kwh`` crossings (energy is spread linearly over time between
two points) and the ``min_duration``/``max_duration`` instants. Each piece is priced per
dimension by the FIRST element whose restrictions hold at the piece and that has a component of
that dimension (OCPI 2.2.1). ``time`` counts only pieces whose points say energy was flowing,
``parking_time`` only the others, never the wall clock.

Restrictions are evaluated at the middle of each piece: local date, weekday and time of day;
energy of the session so far (kWh); duration since the session started (s); power = the average
power of the piece (energy over time, kW) or, for a zero-length energy jump, the point's
``power_w``.

Rounding rule (also in docs/billing.md):

1. Quantities: energy in whole Wh (cumulative energy rounded half-up at every cut, so the pieces
   sum exactly to the session energy), time in milliseconds, each dimension's total then in
   whole seconds (half-up).
2. ``step_size`` (OCPI): the session total of a dimension is rounded UP to a whole number of steps
   of the element that priced the dimension last; the extra goes to that element's line.
3. Line quantity: kWh with 3 decimals (exact), hours with 4 decimals (half-up), ``"1"`` for flat.
   Line amount = quantity as printed x unit price, rounded HALF_UP to the currency's minor unit
   (2 decimals; 0 for JPY, KRW, ...; 3 for BHD, KWD, ...).
4. ``excl_vat`` = sum of line amounts; below ``min_price`` a ``min_price_adjustment`` line adds the
   difference, above ``max_price`` a ``max_price_adjustment`` line (negative) caps it, so lines
   always sum to ``excl_vat``.
5. ``vat`` = excl_vat x vat_percent / 100 rounded HALF_UP to the minor unit (``0`` when the tariff
   has no ``vat_percent``: no VAT applicable); ``incl_vat`` = excl_vat + vat.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from gateway.billing.tariff import Dimension, Restrictions, Tariff, parse_tariff, tariff_version
from gateway.model import MeterPoint, rfc3339

__all__ = [
    "MINOR_UNITS",
    "AsyncPricer",
    "PricedSession",
    "Pricer",
    "make_pricer",
    "minor_unit",
    "off_the_loop",
    "price_session",
]

# ISO 4217 exponents that are not 2 (the default).
MINOR_UNITS: dict[str, int] = {
    "BHD": 3, "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "IQD": 3, "ISK": 0, "JOD": 3, "JPY": 0,
    "KMF": 0, "KRW": 0, "KWD": 3, "LYD": 3, "OMR": 3, "PYG": 0, "RWF": 0, "TND": 3, "UGX": 0,
    "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
}  # fmt: skip

_DIMS = (Dimension.ENERGY, Dimension.TIME, Dimension.PARKING_TIME)
_UNITS = {
    Dimension.ENERGY: "kWh",
    Dimension.TIME: "h",
    Dimension.PARKING_TIME: "h",
    Dimension.FLAT: "session",
}


def minor_unit(currency: str) -> int:
    return MINOR_UNITS.get(currency, 2)


def _money(value: Decimal, currency: str) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-minor_unit(currency)), rounding=ROUND_HALF_UP)


def _half_up_int(value: float) -> int:
    return math.floor(value + 0.5)


@dataclass(frozen=True, slots=True)
class PricedSession:
    charging_periods: list[dict[str, Any]]
    cost: dict[str, Any]
    charging_s: int = 0  # sums of the periods, for the record's own fields
    idle_s: int = 0


@dataclass(slots=True)
class _Piece:
    start_ms: int
    end_ms: int
    energy_wh: int
    charging: bool
    elements: dict[Dimension, int | None] = field(default_factory=dict)
    label: int | None = None


# --- the time line ---------------------------------------------------------------------


def _local_cuts(tariff: Tariff | None, zone: ZoneInfo, start_ms: int, end_ms: int) -> list[int]:
    """Every instant (ms) in the range where a local time-of-day or date restriction can flip."""
    if tariff is None or end_ms <= start_ms:
        return []
    tods = {time(0, 0)}
    for el in tariff.elements:
        for t in (el.restrictions.start_time, el.restrictions.end_time):
            if t is not None:
                tods.add(t)
    first = datetime.fromtimestamp(start_ms / 1000, zone).date() - timedelta(days=1)
    last = datetime.fromtimestamp(end_ms / 1000, zone).date() + timedelta(days=1)
    cuts: set[int] = set()
    day = first
    while day <= last:
        for tod in tods:
            for fold in (0, 1):
                cuts.add(
                    round(
                        datetime.combine(day, tod, tzinfo=zone).replace(fold=fold).timestamp()
                        * 1000
                    )
                )
        cuts.update(_offset_changes(zone, day))
        day += timedelta(days=1)
    return sorted(c for c in cuts if start_ms < c < end_ms)


def _offset_changes(zone: ZoneInfo, day: date) -> list[int]:
    """DST transitions (ms) during a local day, found by bisection to the second."""
    lo = int(datetime.combine(day, time(0), tzinfo=zone).timestamp())
    hi = lo + 26 * 3600

    def offset(ts: int) -> timedelta | None:
        return datetime.fromtimestamp(ts, zone).utcoffset()

    if offset(lo) == offset(hi):
        return []
    out = []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if offset(mid) == offset(lo):
            lo = mid
        else:
            hi = mid
    out.append(hi * 1000)
    return out


def _holds(
    r: Restrictions, local: datetime, energy_wh: float, duration_s: float, power_kw: float
) -> bool:
    if r.empty:
        return True
    d = local.date()
    if r.start_date is not None and d < r.start_date:
        return False
    if r.end_date is not None and d >= r.end_date:
        return False
    if r.day_of_week is not None and local.weekday() not in r.day_of_week:
        return False
    if r.start_time is not None or r.end_time is not None:
        tod = local.time().replace(tzinfo=None)
        if r.start_time is not None and r.end_time is not None:
            if r.start_time < r.end_time:
                if not r.start_time <= tod < r.end_time:
                    return False
            elif r.end_time <= tod < r.start_time:  # window spans midnight
                return False
        elif (r.start_time is not None and tod < r.start_time) or (
            r.end_time is not None and tod >= r.end_time
        ):
            return False
    kwh = energy_wh / 1000
    if r.min_kwh is not None and kwh < float(r.min_kwh):
        return False
    if r.max_kwh is not None and kwh >= float(r.max_kwh):
        return False
    if r.min_duration_s is not None and duration_s < r.min_duration_s:
        return False
    if r.max_duration_s is not None and duration_s >= r.max_duration_s:
        return False
    if r.min_power_kw is not None and power_kw < float(r.min_power_kw):
        return False
    return not (r.max_power_kw is not None and power_kw >= float(r.max_power_kw))


def _pieces(
    tariff: Tariff | None,
    points: Sequence[MeterPoint],
    started_at: float,
    ended_at: float,
    zone: ZoneInfo,
) -> list[_Piece]:
    start_ms = round(started_at * 1000)
    end_ms = round(ended_at * 1000)
    if end_ms < start_ms:
        raise ValueError(f"session ends ({ended_at}) before it starts ({started_at})")
    # Nodes: (ms, cumulative energy, charging during the interval ending here, power_w)
    nodes: list[tuple[int, int, bool, float]] = [(start_ms, 0, False, 0.0)]
    for p in sorted(points, key=lambda p: p.ts):
        ms = min(max(round(p.ts * 1000), start_ms), end_ms)
        nodes.append((ms, int(p.energy_wh), bool(p.charging), float(p.power_w)))
    if nodes[-1][0] < end_ms or len(nodes) == 1:
        nodes.append((end_ms, nodes[-1][1], False, 0.0))
    # Energy never flows backwards: a curve that fell (a counter glitch the session undid) is
    # capped by what came later, so no period gets negative energy and the total stays.
    low = nodes[-1][1]
    for i in range(len(nodes) - 1, -1, -1):
        low = min(low, nodes[i][1])
        if nodes[i][1] != low:
            nodes[i] = (nodes[i][0], low, nodes[i][2], nodes[i][3])

    tod_cuts = _local_cuts(tariff, zone, start_ms, end_ms)
    dur_cuts: set[int] = set()
    kwh_thresholds: set[float] = set()
    for el in tariff.elements if tariff is not None else ():
        r = el.restrictions
        kwh_thresholds.update(float(k * 1000) for k in (r.min_kwh, r.max_kwh) if k is not None)
        dur_cuts.update(
            start_ms + d * 1000 for d in (r.min_duration_s, r.max_duration_s) if d is not None
        )

    pieces: list[_Piece] = []
    for (t0, e0, _, _), (t1, e1, charging, power_w) in itertools.pairwise(nodes):
        cuts = set(tod_cuts[bisect.bisect_right(tod_cuts, t0) : bisect.bisect_left(tod_cuts, t1)])
        cuts.update(c for c in dur_cuts if t0 < c < t1)
        if t1 > t0 and e1 != e0:
            for th in kwh_thresholds:
                if min(e0, e1) < th < max(e0, e1):
                    c = round(t0 + (th - e0) * (t1 - t0) / (e1 - e0))
                    if t0 < c < t1:
                        cuts.add(c)
        bounds = [t0, *sorted(cuts), t1]
        span = t1 - t0
        prev_e = e0
        for a, b in itertools.pairwise(bounds):
            e_b = e1 if b == t1 else _half_up_int(e0 + (e1 - e0) * (b - t0) / span)
            if a == b and e_b == prev_e:
                continue  # a repeated point: nothing to price, no period to open
            piece = _Piece(start_ms=a, end_ms=b, energy_wh=e_b - prev_e, charging=charging)
            prev_e = e_b
            if tariff is not None:
                mid = (a + b) / 2
                if span > 0:
                    e_mid = e0 + (e1 - e0) * (mid - t0) / span
                    power_kw = (e1 - e0) / span * 3600.0  # Wh per ms -> kW
                else:
                    e_mid = (e0 + e1) / 2
                    power_kw = power_w / 1000
                if not charging and e1 == e0:
                    power_kw = 0.0
                local = datetime.fromtimestamp(mid / 1000, zone)
                duration_s = (mid - start_ms) / 1000
                holds = [
                    _holds(el.restrictions, local, e_mid, duration_s, power_kw)
                    for el in tariff.elements
                ]
                for dim in (*_DIMS, Dimension.FLAT):
                    piece.elements[dim] = next(
                        (
                            i
                            for i, el in enumerate(tariff.elements)
                            if holds[i] and el.component(dim) is not None
                        ),
                        None,
                    )
                piece.label = _label(piece)
            pieces.append(piece)
    return pieces


def _label(piece: _Piece) -> int | None:
    """The element a charging period names: energy's while charging (else time's); parking's
    while idle (else energy's)."""
    order = (
        (Dimension.ENERGY, Dimension.TIME, Dimension.PARKING_TIME)
        if piece.charging or piece.energy_wh
        else (Dimension.PARKING_TIME, Dimension.ENERGY, Dimension.TIME)
    )
    for dim in order:
        idx = piece.elements.get(dim)
        if idx is not None:
            return idx
    return None


def _periods(pieces: list[_Piece], start_ms: int) -> tuple[list[dict[str, Any]], int, int]:
    groups: list[list[_Piece]] = []
    for piece in pieces:
        if groups and groups[-1][-1].label == piece.label:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    periods: list[dict[str, Any]] = []
    total_charging = total_idle = 0
    for group in groups:
        a, b = group[0].start_ms, group[-1].end_ms
        # Elapsed seconds are rounded at period boundaries, so durations sum to the session's.
        duration_s = _half_up_int((b - start_ms) / 1000) - _half_up_int((a - start_ms) / 1000)
        charging_ms = sum(p.end_ms - p.start_ms for p in group if p.charging)
        charging_s = min(duration_s, _half_up_int(charging_ms / 1000))
        periods.append(
            {
                "start": rfc3339(a / 1000),
                "tariff_element": group[0].label,
                "energy_wh": sum(p.energy_wh for p in group),
                "charging_s": charging_s,
                "idle_s": duration_s - charging_s,
            }
        )
        total_charging += charging_s
        total_idle += duration_s - charging_s
    return periods, total_charging, total_idle


# --- money -----------------------------------------------------------------------------


def _hours(seconds: int) -> Decimal:
    return (Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def _cost(tariff: Tariff, pieces: list[_Piece]) -> dict[str, Any]:
    cur = tariff.currency
    # Raw quantities per dimension and element, in first-use order: Wh or ms.
    raw: dict[Dimension, dict[int, int]] = {d: {} for d in _DIMS}
    last: dict[Dimension, int] = {}
    for p in pieces:
        dur_ms = p.end_ms - p.start_ms
        amounts = {
            Dimension.ENERGY: p.energy_wh,
            Dimension.TIME: dur_ms if p.charging else 0,
            Dimension.PARKING_TIME: 0 if p.charging else dur_ms,
        }
        for dim, amount in amounts.items():
            idx = p.elements.get(dim)
            if idx is None or amount == 0:
                continue
            raw[dim][idx] = raw[dim].get(idx, 0) + amount
            last[dim] = idx

    lines: list[dict[str, Any]] = []
    flat_idx = next(
        (p.elements[Dimension.FLAT] for p in pieces if p.elements.get(Dimension.FLAT) is not None),
        None,
    )
    if flat_idx is not None:
        comp = tariff.elements[flat_idx].component(Dimension.FLAT)
        assert comp is not None
        lines.append(_line(Dimension.FLAT, Decimal(1), "1", comp.price, flat_idx, cur))

    for dim in _DIMS:
        per_el = raw[dim]
        if not per_el:
            continue
        # Whole units (Wh, s), cumulatively rounded so that the elements sum to the total.
        units: dict[int, int] = {}
        acc = 0
        done = 0
        scale = 1 if dim is Dimension.ENERGY else 1000
        for idx, raw_qty in per_el.items():
            acc += raw_qty
            whole = _half_up_int(acc / scale)
            units[idx] = whole - done
            done = whole
        total = done
        step_comp = tariff.elements[last[dim]].component(dim)
        assert step_comp is not None
        if total > 0 and step_comp.step_size > 1:
            billed = -(-total // step_comp.step_size) * step_comp.step_size
            units[last[dim]] += billed - total
        for idx, qty_units in units.items():
            if qty_units <= 0:
                continue
            comp = tariff.elements[idx].component(dim)
            assert comp is not None
            qty = (
                (Decimal(qty_units) / 1000).quantize(Decimal("0.001"))
                if dim is Dimension.ENERGY
                else _hours(qty_units)
            )
            lines.append(_line(dim, qty, str(qty), comp.price, idx, cur))

    excl = sum((Decimal(line["amount"]) for line in lines), Decimal(0))
    excl = _money(excl, cur)
    if tariff.min_price is not None and excl < tariff.min_price:
        diff = _money(tariff.min_price - excl, cur)
        lines.append(_adjustment("min_price_adjustment", diff, cur))
        excl += diff
    if tariff.max_price is not None and excl > tariff.max_price:
        diff = _money(tariff.max_price - excl, cur)
        lines.append(_adjustment("max_price_adjustment", diff, cur))
        excl += diff
    vat = (
        _money(excl * tariff.vat_percent / 100, cur)
        if tariff.vat_percent is not None
        else _money(Decimal(0), cur)
    )
    return {
        "currency": cur,
        "excl_vat": str(excl),
        "vat": str(vat),
        "incl_vat": str(_money(excl + vat, cur)),
        "lines": lines,
    }


def _line(
    dim: Dimension, qty: Decimal, qty_text: str, price: Decimal, idx: int, cur: str
) -> dict[str, Any]:
    return {
        "type": dim.value,
        "quantity": qty_text,
        "unit": _UNITS[dim],
        "unit_price": format(price, "f"),  # never exponent notation
        "amount": str(_money(qty * price, cur)),
        "tariff_element": idx,
    }


def _adjustment(kind: str, amount: Decimal, cur: str) -> dict[str, Any]:
    return {
        "type": kind,
        "quantity": "1",
        "unit": "session",
        "unit_price": str(amount),
        "amount": str(_money(amount, cur)),
        "tariff_element": None,
    }


# --- API -------------------------------------------------------------------------------


def price_session(
    tariff: Tariff, points: Sequence[MeterPoint], started_at: float, ended_at: float, tz: str
) -> PricedSession:
    """Cost a finished session. ``points`` carry the session energy so far (Wh, from 0) and
    whether energy flowed since the previous point; times are Unix seconds; ``tz`` is the site's
    IANA time zone. Prices what it is given (a zero-energy session still pays a flat fee)."""
    zone = ZoneInfo(tz)
    pieces = _pieces(tariff, points, started_at, ended_at, zone)
    periods, charging_s, idle_s = _periods(pieces, round(started_at * 1000))
    return PricedSession(periods, _cost(tariff, pieces), charging_s, idle_s)


Pricer = Callable[
    [dict[str, Any] | None, Sequence[MeterPoint], float, float],
    tuple[list[dict[str, Any]], dict[str, Any] | None],
]
AsyncPricer = Callable[
    [dict[str, Any] | None, Sequence[MeterPoint], float, float],
    Awaitable[tuple[list[dict[str, Any]], dict[str, Any] | None]],
]


def make_pricer(tz: str) -> Pricer:
    """The session manager's pricer: ``pricer(tariff_data, points, started_at, ended_at) ->
    (charging_periods, cost)``. ``tariff_data`` is the raw tariff frozen at the session start;
    ``None`` gives periods without elements and no cost. Parsed tariffs are cached by version."""
    zone = ZoneInfo(tz)
    cache: dict[str, Tariff] = {}

    def pricer(
        tariff_data: dict[str, Any] | None,
        points: Sequence[MeterPoint],
        started_at: float,
        ended_at: float,
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        if tariff_data is None:
            pieces = _pieces(None, points, started_at, ended_at, zone)
            periods, _, _ = _periods(pieces, round(started_at * 1000))
            return periods, None
        version = tariff_version(tariff_data)
        tariff = cache.get(version)
        if tariff is None:
            tariff = cache[version] = parse_tariff(tariff_data)
        priced = price_session(tariff, points, started_at, ended_at, tz)
        return priced.charging_periods, priced.cost

    return pricer


def off_the_loop(pricer: Pricer) -> AsyncPricer:
    """``pricer`` run in a worker thread. Pricing a long session against a tariff with many
    time-restricted elements is pure CPU (a day of one-minute points against 100 elements: about
    a second on a small board); in a thread the event loop keeps polling devices and serving the
    uplink meanwhile (the interpreter hands it the GIL every few milliseconds)."""

    async def priced(
        tariff_data: dict[str, Any] | None,
        points: Sequence[MeterPoint],
        started_at: float,
        ended_at: float,
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        return await asyncio.to_thread(pricer, tariff_data, list(points), started_at, ended_at)

    return priced
