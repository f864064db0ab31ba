"""Site statistics from the local buffer (``evgw stats``): how the chargers were used and when.

Over the local dates ``start``..``end`` (inclusive, site time zone):

- per charger, from the finished session records: sessions started, energy, and the time a car
  was connected, charging, and connected but not charging ("idle while connected"), each also as
  a share of the period (utilisation). A session that crosses an edge of the period counts with
  the part inside it; its charging and idle time are split in proportion (a record holds their
  totals, not when they happened);
- a heat map of peak hours: session starts and energy by local weekday x hour of day. A record's
  energy is spread evenly over each of its ``charging_periods`` (or over the whole session when it
  has none): the record does not say more precisely when the energy flowed;
- energy and sessions per local day, and the most sessions open at once (and when);
- site power from the buffered readings (the chargers' ``power_w``, one-minute means summed over
  the chargers; a charger not read in a minute keeps its last mean for up to 5 minutes), its peak
  and an hourly profile; the grid meter's peak where one is configured. Readings are pruned after
  ``storage.readings_retention_days``: older periods have no power figures (``null``).

Formats: ``json`` (schema ``evgw.stats/1``), ``csv`` (one tidy table: ``table,key,hour,metric,
value``), ``html`` (one self-contained file: inline CSS and SVG charts, no script or font from
elsewhere) and ``svg`` (the same charts in one SVG document). Charts are drawn with pygal (see
docs/dependencies.md for why that library).
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog

from gateway.model import from_rfc3339

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = [
    "FORMATS",
    "STATS_SCHEMA",
    "SitePower",
    "collect_stats",
    "compute_stats",
    "render_stats",
    "run_stats",
]

log = structlog.get_logger(__name__)

STATS_SCHEMA = "evgw.stats/1"
FORMATS = ("csv", "json", "html", "svg")
WEEKDAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")
SLICE_S = 900  # quarter hours in UTC line up with local hours in every real time zone
MINUTE_S = 60
HOLD_S = 300  # a device not read in a minute keeps its last mean this long
LOOKBACK_S = 31 * 86400  # sessions started this long before the period may still reach into it
READINGS_PAGE = 20_000


def period_bounds(start: date, end: date, zone: ZoneInfo) -> tuple[float, float]:
    """Unix seconds of local midnight at ``start`` and after ``end``."""
    lo = datetime.combine(start, time(0), tzinfo=zone).timestamp()
    hi = datetime.combine(end + timedelta(days=1), time(0), tzinfo=zone).timestamp()
    return lo, hi


@dataclass(slots=True)
class _Series:
    """One-minute sums of a device's ``power_w``."""

    sums: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, ts: float, power_w: float) -> None:
        minute = int(ts // MINUTE_S)
        self.sums[minute] = self.sums.get(minute, 0.0) + power_w
        self.counts[minute] = self.counts.get(minute, 0) + 1

    def means(self) -> dict[int, float]:
        return {m: self.sums[m] / self.counts[m] for m in self.sums}


class SitePower:
    """Collects readings one at a time (a month of one-second polls does not fit a list on a
    Pi) and sums the chargers' power per minute."""

    def __init__(self, chargers: Iterable[str], grid_meter: str | None = None) -> None:
        self.chargers = frozenset(chargers)
        self.grid_meter = grid_meter
        self._series: dict[str, _Series] = {}
        self.readings = 0

    def add(self, device_id: str, ts: float, power: Any) -> None:
        """One ``power_w`` reading (anything but a finite number is ignored)."""
        if device_id not in self.chargers and device_id != self.grid_meter:
            return
        if (
            isinstance(power, bool)
            or not isinstance(power, int | float)
            or not math.isfinite(power)
        ):
            return
        self.readings += 1
        self._series.setdefault(device_id, _Series()).add(ts, float(power))

    def site_minutes(self) -> dict[int, float]:
        """Minute -> summed power of the chargers (W)."""
        means = {d: s.means() for d, s in self._series.items() if d in self.chargers}
        minutes = sorted({m for per in means.values() for m in per})
        if not minutes:
            return {}
        hold = HOLD_S // MINUTE_S
        out: dict[int, float] = {}
        last: dict[str, tuple[int, float]] = {}
        for m in range(minutes[0], minutes[-1] + 1):
            for d, per in means.items():
                if m in per:
                    last[d] = (m, per[m])
            held = [w for seen, w in last.values() if m - seen < hold]
            if held:
                out[m] = sum(held)
        return out

    def grid_minutes(self) -> dict[int, float]:
        series = self._series.get(self.grid_meter or "")
        return series.means() if series is not None else {}


@dataclass(slots=True)
class _Use:
    sessions: int = 0
    energy_wh: float = 0.0
    connected_s: float = 0.0
    charging_s: float = 0.0


def _slices(a: float, b: float) -> Iterable[tuple[float, float]]:
    t = a
    while t < b:
        nxt = min(b, (t // SLICE_S + 1) * SLICE_S)
        yield t, nxt
        t = nxt


def _energy_intervals(
    rec: Mapping[str, Any], started: float, ended: float
) -> list[tuple[float, float, float]]:
    """(from, to, Wh) pieces of a session's energy, from its charging periods when they add up
    to the session's energy, else the whole session."""
    total = float(rec.get("energy_wh") or 0)
    periods = rec.get("charging_periods") or []
    try:
        starts = [from_rfc3339(p["start"]) for p in periods]
        energies = [float(p.get("energy_wh") or 0) for p in periods]
    except (KeyError, TypeError, ValueError):
        starts, energies = [], []
    if not starts or abs(sum(energies) - total) > 1.0 or starts != sorted(starts):
        return [(started, ended, total)]
    bounds = [*starts[1:], ended]
    return [(a, max(a, b), e) for a, b, e in zip(starts, bounds, energies, strict=True)]


def _local(ts: float, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts, zone).isoformat(timespec="seconds")


def _r(value: float, digits: int = 3) -> float:
    return round(value + 0.0, digits)


def compute_stats(
    sessions: Iterable[Mapping[str, Any]],
    chargers: Iterable[str],
    start: date,
    end: date,
    tz: str,
    *,
    power: SitePower | None = None,
    site_id: str | None = None,
) -> dict[str, Any]:
    """The statistics document (schema ``evgw.stats/1``) of finished session records."""
    if end < start:
        raise ValueError("the period ends before it starts")
    zone = ZoneInfo(tz)
    lo, hi = period_bounds(start, end, zone)
    period_s = hi - lo
    use: dict[str, _Use] = {c: _Use() for c in chargers}
    heat_sessions = [[0] * 24 for _ in WEEKDAYS]
    heat_wh = [[0.0] * 24 for _ in WEEKDAYS]
    days = (end - start).days + 1
    daily_wh = [0.0] * days
    daily_sessions = [0] * days
    edges: list[tuple[float, int]] = []

    for rec in sessions:
        try:
            started = from_rfc3339(rec["started_at"])
            ended = from_rfc3339(rec["ended_at"]) if rec.get("ended_at") else started
        except (KeyError, TypeError, ValueError):
            log.warning("stats_record_skipped", session_id=rec.get("session_id"))
            continue
        ended = max(ended, started)
        a, b = max(started, lo), min(ended, hi)
        if a >= b and not lo <= started < hi:
            continue
        u = use.setdefault(str(rec.get("charger_id")), _Use())
        if lo <= started < hi:
            u.sessions += 1
            local = datetime.fromtimestamp(started, zone)
            heat_sessions[local.weekday()][local.hour] += 1
            daily_sessions[(local.date() - start).days] += 1
        if b > a:
            duration = ended - started
            u.connected_s += b - a
            charging = min(float(rec.get("charging_s") or 0), duration)
            u.charging_s += charging * (b - a) / duration
            edges += [(a, 1), (b, -1)]
        for p_from, p_to, wh in _energy_intervals(rec, started, ended):
            if p_to <= p_from:  # energy at one instant
                pieces: Iterable[tuple[float, float, float]] = (
                    [(p_from, p_from, wh)] if lo <= p_from < hi else []
                )
            else:
                pieces = (
                    (x, y, wh * (y - x) / (p_to - p_from))
                    for x, y in _slices(max(p_from, lo), min(p_to, hi))
                )
            for x, y, share in pieces:
                local = datetime.fromtimestamp((x + y) / 2, zone)
                heat_wh[local.weekday()][local.hour] += share
                daily_wh[(local.date() - start).days] += share
                u.energy_wh += share

    # Ends sort before starts at the same instant: back-to-back sessions are not concurrent.
    edges.sort()
    concurrent = peak = 0
    peak_at: float | None = None
    for ts, step in edges:
        concurrent += step
        if concurrent > peak:
            peak, peak_at = concurrent, ts

    chargers_doc = {}
    for cid, u in sorted(use.items()):
        idle = max(0.0, u.connected_s - u.charging_s)
        chargers_doc[cid] = {
            "sessions": u.sessions,
            "energy_kwh": _r(u.energy_wh / 1000),
            "connected_h": _r(u.connected_s / 3600),
            "charging_h": _r(u.charging_s / 3600),
            "idle_connected_h": _r(idle / 3600),
            "utilisation": {
                "connected": _r(u.connected_s / period_s, 4),
                "charging": _r(u.charging_s / period_s, 4),
                "idle_connected": _r(idle / period_s, 4),
            },
        }
    doc: dict[str, Any] = {
        "schema": STATS_SCHEMA,
        "site_id": site_id,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "timezone": tz,
        "period_h": _r(period_s / 3600, 2),
        "totals": {
            "sessions": sum(u.sessions for u in use.values()),
            "energy_kwh": _r(sum(u.energy_wh for u in use.values()) / 1000),
            "peak_concurrent_sessions": peak,
            "peak_concurrent_at": _local(peak_at, zone) if peak_at is not None else None,
        },
        "chargers": chargers_doc,
        "heatmap": {
            "weekdays": list(WEEKDAYS),
            "sessions": heat_sessions,
            "energy_kwh": [[_r(wh / 1000) for wh in row] for row in heat_wh],
        },
        "daily": [
            {
                "date": (start + timedelta(days=i)).isoformat(),
                "sessions": daily_sessions[i],
                "energy_kwh": _r(daily_wh[i] / 1000),
            }
            for i in range(days)
        ],
        "site_power": _power_doc(power.site_minutes() if power else {}, lo, hi, zone),
        "grid_power": (
            _power_doc(power.grid_minutes(), lo, hi, zone)
            if power is not None and power.grid_meter
            else None
        ),
    }
    return doc


def _power_doc(
    minutes: Mapping[int, float], lo: float, hi: float, zone: ZoneInfo
) -> dict[str, Any]:
    """Peak and hourly profile (max and mean of the one-minute means) inside ``lo``..``hi``."""
    inside = {m: w for m, w in minutes.items() if lo <= m * MINUTE_S < hi}
    if not inside:
        return {"peak_w": None, "peak_at": None, "hourly": []}
    peak_minute = min(inside, key=lambda m: (-inside[m], m))
    hours: dict[int, list[float]] = {}
    for m, w in inside.items():
        hours.setdefault(m * MINUTE_S // 3600, []).append(w)
    return {
        "peak_w": round(inside[peak_minute]),
        "peak_at": _local(peak_minute * MINUTE_S, zone),
        "hourly": [
            {
                "hour": _local(h * 3600, zone),
                "max_w": round(max(ws)),
                "mean_w": round(sum(ws) / len(ws)),
            }
            for h, ws in sorted(hours.items())
        ],
    }


# -- rendering ---------------------------------------------------------------------------------


def render_stats(doc: Mapping[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return _csv(doc)
    if fmt == "svg":
        from gateway.charts import compose_svg, stats_charts

        return compose_svg(stats_charts(doc))
    if fmt == "html":
        return _html(doc)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def _csv(doc: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["table", "key", "hour", "metric", "value"])
    for metric, value in doc["totals"].items():
        out.writerow(["totals", "", "", metric, value])
    for cid, c in doc["chargers"].items():
        for metric in ("sessions", "energy_kwh", "connected_h", "charging_h", "idle_connected_h"):
            out.writerow(["charger", cid, "", metric, c[metric]])
        for metric, value in c["utilisation"].items():
            out.writerow(["charger", cid, "", f"utilisation_{metric}", value])
    heat = doc["heatmap"]
    for w, day in enumerate(heat["weekdays"]):
        for h in range(24):
            out.writerow(["heatmap", day, h, "sessions", heat["sessions"][w][h]])
            out.writerow(["heatmap", day, h, "energy_kwh", heat["energy_kwh"][w][h]])
    for d in doc["daily"]:
        out.writerow(["daily", d["date"], "", "sessions", d["sessions"]])
        out.writerow(["daily", d["date"], "", "energy_kwh", d["energy_kwh"]])
    for name in ("site_power", "grid_power"):
        p = doc.get(name)
        if not p:
            continue
        out.writerow([name, "", "", "peak_w", p["peak_w"]])
        out.writerow([name, "", "", "peak_at", p["peak_at"]])
        for row in p["hourly"]:
            out.writerow([name, row["hour"], "", "max_w", row["max_w"]])
            out.writerow([name, row["hour"], "", "mean_w", row["mean_w"]])
    return buf.getvalue()


_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:24px;color:#222;max-width:980px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
.chart svg{width:100%;height:auto}.note{color:#555;font-size:13px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _html(doc: Mapping[str, Any]) -> str:
    from gateway.charts import stats_charts

    t = doc["totals"]
    sp = doc["site_power"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Site statistics {_e(doc.get('site_id') or '')} {_e(doc['from'])} to "
        f"{_e(doc['to'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Site statistics {_e(doc.get('site_id') or '')}</h1>",
        f"<p>{_e(doc['from'])} to {_e(doc['to'])} ({_e(doc['timezone'])}), "
        f"{_e(t['sessions'])} sessions, {_e(t['energy_kwh'])} kWh; at most "
        f"{_e(t['peak_concurrent_sessions'])} sessions at once"
        + (f" ({_e(t['peak_concurrent_at'])})" if t["peak_concurrent_at"] else "")
        + "; peak site power "
        + (f"{_e(sp['peak_w'])} W ({_e(sp['peak_at'])})" if sp["peak_w"] is not None else "unknown")
        + ".</p>",
        "<h2>Chargers</h2><table><tr><th>charger</th><th>sessions</th><th>kWh</th>"
        "<th>connected h</th><th>charging h</th><th>idle while connected h</th>"
        "<th>connected</th><th>charging</th></tr>",
    ]
    for cid, c in doc["chargers"].items():
        u = c["utilisation"]
        out.append(
            f"<tr><td>{_e(cid)}</td><td>{c['sessions']}</td><td>{c['energy_kwh']}</td>"
            f"<td>{c['connected_h']}</td><td>{c['charging_h']}</td><td>{c['idle_connected_h']}</td>"
            f"<td>{u['connected'] * 100:.1f} %</td><td>{u['charging'] * 100:.1f} %</td></tr>"
        )
    out.append("</table>")
    for title, svg in stats_charts(doc):
        out.append(f'<h2>{_e(title)}</h2><div class="chart">{svg}</div>')
    out.append(
        '<p class="note">Energy by hour is spread evenly over each charging period of a '
        "session; site power is the sum of the chargers' one-minute mean power from the "
        "buffered readings.</p></body></html>\n"
    )
    return "\n".join(out)


# -- the command -------------------------------------------------------------------------------


async def collect_stats(
    store: Any, config: GatewayConfig, start: date, end: date
) -> dict[str, Any]:
    """The statistics document of ``start``..``end`` from an open store (the command's own, or
    the running gateway's for its status page)."""
    from gateway.billing.report import _charger_ids

    if end < start:
        raise ValueError("the period ends before it starts")
    zone = ZoneInfo(config.site.timezone)
    lo, hi = period_bounds(start, end, zone)
    chargers = _charger_ids(config)
    grid_meter = config.grid.meter if config.grid is not None else None
    power = SitePower(chargers, grid_meter)
    wanted: Sequence[str] = [*chargers, *([grid_meter] if grid_meter else [])]
    sessions = await store.finished_sessions(since=lo - LOOKBACK_S, until=hi)
    after = 0
    while True:
        page = await store.reading_values("power_w", lo, hi, after, READINGS_PAGE, wanted)
        for _, device_id, ts, power_w in page:
            power.add(device_id, ts, power_w)
        if len(page) < READINGS_PAGE:
            break
        after = page[-1][0]
    return compute_stats(
        sessions, chargers, start, end, config.site.timezone, power=power, site_id=config.site.id
    )


async def run_stats(
    config: GatewayConfig, *, start: date, end: date, fmt: str, output: Path | None = None
) -> int:
    """``evgw stats``: read sessions and readings from the local buffer and print the stats."""
    from gateway.store import Store

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    async with Store.for_site(config, create=False) as store:
        doc = await collect_stats(store, config, start, end)
    text = await asyncio.to_thread(render_stats, doc, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        await asyncio.to_thread(output.write_text, text, encoding="utf-8")
    return 0
