"""Billing reports over finished session records (``evgw report``).

A report covers the sessions that STARTED on a local date from ``start`` to ``end`` (both
inclusive, site time zone), grouped by user or by charger: per group the number of sessions,
energy (kWh), charging time (h) and money per currency (excl. VAT, VAT, incl. VAT, summed from
the records' decimal strings, never recomputed), and each session with its times in the site
time zone. Sessions without a cost (no tariff) are counted and listed as unpriced.

Formats: ``csv`` (one table: ``row`` is ``session`` or ``total``), ``json`` (with usage
statistics) and ``html`` (a self-contained statement with inline CSS; every value escaped).

``run_report`` bills only records that pass the checks a consumer applies (schema, ranges, hash,
the gateway's own signature): any other record of the buffer is left out and counted
(``excluded``). CSV cells are safe from formula injection, and control characters in user ids,
tags and charger ids are escaped in every format but JSON (``gateway.safeout``).
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import structlog

from gateway.model import from_rfc3339
from gateway.records import Cost, SessionRecord
from gateway.safeout import csv_cell, printable

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["REPORT_SCHEMA", "build_report", "run_report", "usage_stats"]

log = structlog.get_logger(__name__)

REPORT_SCHEMA = "evgw.report/1"
_WEEKDAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")
_CSV_FIELDS = (
    "row",
    "key",
    "session_id",
    "charger_id",
    "user",
    "started",
    "ended",
    "sessions",
    "energy_kwh",
    "charging_h",
    "idle_h",
    "currency",
    "excl_vat",
    "vat",
    "incl_vat",
    "tariff_id",
    "flags",
)


def _period(start: date, end: date, zone: ZoneInfo) -> tuple[float, float]:
    """Unix seconds of local midnight at ``start`` and after ``end``."""
    lo = datetime.combine(start, time(0), tzinfo=zone).timestamp()
    hi = datetime.combine(end + timedelta(days=1), time(0), tzinfo=zone).timestamp()
    return lo, hi


def _local(ts: float, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts, zone).isoformat(timespec="seconds")


def _kwh(wh: int) -> str:
    return str((Decimal(wh) / 1000).quantize(Decimal("0.001")))


def _hours(seconds: float) -> str:
    return str((Decimal(round(seconds)) / 3600).quantize(Decimal("0.01")))


def _user_id(record: SessionRecord) -> str:
    return record.user.id or "(unknown)"


@dataclass(slots=True)
class _Money:
    excl_vat: Decimal = Decimal(0)
    vat: Decimal = Decimal(0)
    incl_vat: Decimal = Decimal(0)

    def add(self, cost: Cost) -> None:
        self.excl_vat += Decimal(cost.excl_vat)
        self.vat += Decimal(cost.vat)
        self.incl_vat += Decimal(cost.incl_vat)

    def as_dict(self) -> dict[str, str]:
        return {
            "excl_vat": str(self.excl_vat),
            "vat": str(self.vat),
            "incl_vat": str(self.incl_vat),
        }


@dataclass(slots=True)
class _Group:
    key: str
    sessions: int = 0
    energy_wh: int = 0
    charging_s: int = 0
    idle_s: int = 0
    unpriced: int = 0
    money: dict[str, _Money] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, rec: SessionRecord, item: dict[str, Any]) -> None:
        self.sessions += 1
        self.energy_wh += rec.energy_wh
        self.charging_s += int(rec.charging_s)
        self.idle_s += int(rec.idle_s)
        cost = rec.cost
        if cost is not None:
            self.money.setdefault(cost.currency, _Money()).add(cost)
        else:
            self.unpriced += 1
        self.items.append(item)

    def totals(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "energy_kwh": _kwh(self.energy_wh),
            "charging_h": _hours(self.charging_s),
            "idle_h": _hours(self.idle_s),
            "unpriced_sessions": self.unpriced,
            "cost": {cur: m.as_dict() for cur, m in sorted(self.money.items())},
        }


def _select(
    sessions: Iterable[SessionRecord], lo: float, hi: float
) -> list[tuple[float, SessionRecord]]:
    out = []
    for rec in sessions:
        started = from_rfc3339(rec.started_at)
        if lo <= started < hi:
            out.append((started, rec))
    out.sort(key=lambda pair: (pair[0], pair[1].session_id))
    return out


def _item(rec: SessionRecord, started: float, zone: ZoneInfo) -> dict[str, Any]:
    cost = rec.cost
    return {
        "session_id": rec.session_id,
        "charger_id": rec.charger_id,
        "user": _user_id(rec),
        "started": _local(started, zone),
        "ended": _local(from_rfc3339(rec.ended_at), zone),
        "energy_kwh": _kwh(rec.energy_wh),
        "charging_h": _hours(rec.charging_s),
        "idle_h": _hours(rec.idle_s),
        "currency": cost.currency if cost is not None else None,
        "excl_vat": cost.excl_vat if cost is not None else None,
        "vat": cost.vat if cost is not None else None,
        "incl_vat": cost.incl_vat if cost is not None else None,
        "tariff_id": rec.tariff_id,
        "flags": list(rec.flags),
    }


def _groups(
    selected: Sequence[tuple[float, SessionRecord]], by: str, zone: ZoneInfo
) -> tuple[list[_Group], _Group]:
    groups: dict[str, _Group] = {}
    overall = _Group(key="(all)")
    for started, rec in selected:
        key = _user_id(rec) if by == "user" else rec.charger_id
        item = _item(rec, started, zone)
        groups.setdefault(key, _Group(key=key)).add(rec, item)
        overall.add(rec, item)
    return [groups[k] for k in sorted(groups)], overall


def usage_stats(
    sessions: Iterable[SessionRecord], chargers: Iterable[str], start: date, end: date, tz: str
) -> dict[str, Any]:
    """How the site was used from ``start`` to ``end`` (local dates, inclusive).

    ``sessions_by_hour``/``sessions_by_weekday`` count session starts by local hour and weekday;
    ``occupied_h_by_hour`` sums the hours chargers were occupied (plugged in) in each local hour
    of day; ``peak_hours`` are the (up to 3) busiest hours by that measure; per charger:
    sessions, energy, occupied hours and utilisation = occupied time / period length.
    """
    zone = ZoneInfo(tz)
    lo, hi = _period(start, end, zone)
    period_s = hi - lo
    by_hour = [0] * 24
    by_weekday = dict.fromkeys(_WEEKDAYS, 0)
    occupied_by_hour = [0.0] * 24
    per_charger: dict[str, dict[str, Any]] = {
        cid: {"sessions": 0, "energy_wh": 0, "occupied_s": 0.0} for cid in chargers
    }
    for started, rec in _select(sessions, lo, hi):
        local = datetime.fromtimestamp(started, zone)
        by_hour[local.hour] += 1
        by_weekday[_WEEKDAYS[local.weekday()]] += 1
        ended = from_rfc3339(rec.ended_at)
        a, b = max(started, lo), min(ended, hi)
        # Quarter-hour UTC steps line up with local hours in every real time zone.
        t = a
        while t < b:
            nxt = min(b, (t // 900 + 1) * 900)
            occupied_by_hour[datetime.fromtimestamp((t + nxt) / 2, zone).hour] += nxt - t
            t = nxt
        stats = per_charger.setdefault(
            rec.charger_id, {"sessions": 0, "energy_wh": 0, "occupied_s": 0.0}
        )
        stats["sessions"] += 1
        stats["energy_wh"] += rec.energy_wh
        stats["occupied_s"] += max(0.0, b - a)
    ranked = sorted(
        (h for h in range(24) if occupied_by_hour[h] > 0), key=lambda h: (-occupied_by_hour[h], h)
    )
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "timezone": tz,
        "period_h": round(period_s / 3600, 2),
        "sessions_by_hour": by_hour,
        "sessions_by_weekday": by_weekday,
        "occupied_h_by_hour": [round(s / 3600, 3) for s in occupied_by_hour],
        "peak_hours": sorted(ranked[:3]),
        "chargers": {
            cid: {
                "sessions": s["sessions"],
                "energy_kwh": _kwh(s["energy_wh"]),
                "occupied_h": round(s["occupied_s"] / 3600, 3),
                "utilisation": round(s["occupied_s"] / period_s, 4) if period_s > 0 else 0.0,
            }
            for cid, s in sorted(per_charger.items())
        },
    }


def build_report(
    sessions: Sequence[SessionRecord],
    by: str,
    start: date,
    end: date,
    tz: str,
    fmt: str,
    chargers: Iterable[str] = (),
    excluded: int = 0,
) -> str:
    """Render the report of ``sessions`` (finished records) as ``csv``, ``json`` or ``html``.

    ``chargers`` lists the site's chargers, so that idle ones show in the usage statistics;
    ``excluded`` counts the records left out because they failed their checks.
    """
    if by not in ("user", "charger"):
        raise ValueError(f"by must be 'user' or 'charger', not {by!r}")
    if end < start:
        raise ValueError("end is before start")
    zone = ZoneInfo(tz)
    lo, hi = _period(start, end, zone)
    selected = _select(sessions, lo, hi)
    groups, overall = _groups(selected, by, zone)
    if fmt == "csv":
        return _csv(groups, overall, excluded)
    usage = usage_stats([rec for _, rec in selected], chargers, start, end, tz)
    doc = {
        "schema": REPORT_SCHEMA,
        "by": by,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "timezone": tz,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "groups": [{"key": g.key, **g.totals(), "sessions_list": g.items} for g in groups],
        "totals": overall.totals(),
        "excluded_records": excluded,
        "usage": usage,
    }
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "html":
        return _html(doc)
    raise ValueError(f"format must be csv, json or html, not {fmt!r}")


class _SafeWriter:
    """A DictWriter whose every cell goes through ``csv_cell``."""

    def __init__(self, buf: io.StringIO) -> None:
        self._writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")

    def writeheader(self) -> None:
        self._writer.writeheader()

    def writerow(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: "" if v is None else csv_cell(v) for k, v in row.items()})


def _csv(groups: list[_Group], overall: _Group, excluded: int = 0) -> str:
    buf = io.StringIO()
    writer = _SafeWriter(buf)
    writer.writeheader()
    for group in [*groups, overall]:
        if group is not overall:
            for item in group.items:
                writer.writerow(
                    {
                        "row": "session",
                        "key": group.key,
                        "sessions": 1,
                        **{k: v for k, v in item.items() if k != "flags"},
                        "flags": " ".join(item["flags"]),
                    }
                )
        totals = group.totals()
        base = {
            "row": "total",
            "key": group.key,
            "sessions": totals["sessions"],
            "energy_kwh": totals["energy_kwh"],
            "charging_h": totals["charging_h"],
            "idle_h": totals["idle_h"],
        }
        if not totals["cost"]:
            writer.writerow(base)
        for cur, money in totals["cost"].items():
            writer.writerow({**base, "currency": cur, **money})
    if excluded:
        writer.writerow({"row": "excluded", "key": f"{excluded} record(s) failed their checks"})
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d2330}
h1{font-size:1.4rem;margin-bottom:.2rem}
h2{font-size:1.1rem;margin-top:2rem;border-bottom:2px solid #2b6cb0}
.meta{color:#5a6270;margin-top:0}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}
th,td{padding:.3rem .5rem;border-bottom:1px solid #dde2ea;text-align:left;font-size:.9rem}
th{background:#f0f4fa}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;border-top:2px solid #8a94a6}.flag{color:#b7791f;font-size:.8rem}
@media print{body{margin:0}h2{page-break-after:avoid}}
"""

_SESSION_HEAD = (
    "Start", "End", "Charger", "User", "#Energy (kWh)", "#Charging (h)",
    "#Excl. VAT", "#VAT", "#Incl. VAT", "Tariff",
)  # fmt: skip


def _e(value: Any) -> str:
    return html.escape(printable(value), quote=True)


def _row(cells: Iterable[Any], *, head: bool = False, css: str = "", raw: bool = False) -> str:
    """A table row; a cell text starting with ``#`` is numeric (right-aligned). ``raw`` cells
    are already escaped HTML."""
    tag = "th" if head else "td"
    parts = []
    for cell in cells:
        text = "" if cell is None else str(cell)
        numeric = text.startswith("#")
        text = text[1:] if numeric else text
        parts.append(f"<{tag}{' class=n' if numeric else ''}>{text if raw else _e(text)}</{tag}>")
    return f"<tr{f' class={css}' if css else ''}>{''.join(parts)}</tr>"


def _money_text(cost: dict[str, dict[str, str]], key: str) -> str:
    return "#" + ("<br>".join(f"{_e(v[key])} {_e(cur)}" for cur, v in cost.items()) or "–")


def _html(doc: dict[str, Any]) -> str:
    title = f"Charging report by {doc['by']}: {doc['from']} to {doc['to']}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Times in {_e(doc["timezone"])}. Generated {_e(doc["generated_at"])}.</p>',
    ]
    for group in doc["groups"]:
        out.append(f"<h2>{_e(doc['by'].capitalize())}: {_e(group['key'])}</h2>")
        out.append("<table>" + _row(_SESSION_HEAD, head=True))
        for s in group["sessions_list"]:
            cur = f" {s['currency']}" if s["currency"] else ""
            money = [
                f"#{s[k]}{cur}" if s[k] is not None else "#–"
                for k in ("excl_vat", "vat", "incl_vat")
            ]
            cells = [s["started"], s["ended"], s["charger_id"], s["user"]]
            cells += [f"#{s['energy_kwh']}", f"#{s['charging_h']}", *money]
            cells.append(" ".join([s["tariff_id"] or "", *(f"[{f}]" for f in s["flags"])]))
            out.append(_row(cells))
        cost = group["cost"]
        out.append(
            _row(
                [
                    _e(f"{group['sessions']} sessions"), "", "", "",
                    f"#{_e(group['energy_kwh'])}", f"#{_e(group['charging_h'])}",
                    _money_text(cost, "excl_vat"), _money_text(cost, "vat"),
                    _money_text(cost, "incl_vat"), "",
                ],
                css="total",
                raw=True,
            )
        )  # fmt: skip
        out.append("</table>")
    totals = doc["totals"]
    out.append("<h2>Totals</h2><table>")
    head = ["Sessions", "#Energy (kWh)", "#Charging (h)", "#Excl. VAT", "#VAT", "#Incl. VAT"]
    out.append(_row([*head, "#Unpriced"], head=True))
    cost = totals["cost"]
    cells = [
        str(totals["sessions"]),
        f"#{_e(totals['energy_kwh'])}",
        f"#{_e(totals['charging_h'])}",
    ]
    cells += [_money_text(cost, k) for k in ("excl_vat", "vat", "incl_vat")]
    out.append(_row([*cells, f"#{totals['unpriced_sessions']}"], css="total", raw=True))
    out.append("</table>")
    if doc.get("excluded_records"):
        out.append(
            f"<p><strong>{_e(doc['excluded_records'])} record(s) left out</strong>: they fail "
            "their checks (schema, ranges, hash or signature); `evgw verify -c` names them.</p>"
        )
    usage = doc["usage"]
    out.append("<h2>Usage</h2><table>")
    head = ["Charger", "#Sessions", "#Energy (kWh)", "#Occupied (h)", "#Utilisation"]
    out.append(_row(head, head=True))
    for cid, st in usage["chargers"].items():
        util = f"#{st['utilisation'] * 100:.1f} %"
        cells = [cid, f"#{st['sessions']}", f"#{st['energy_kwh']}", f"#{st['occupied_h']}", util]
        out.append(_row(cells))
    out.append("</table>")
    peaks = ", ".join(f"{h:02d}:00–{(h + 1) % 24:02d}:00" for h in usage["peak_hours"]) or "–"
    out.append(f"<p>Peak hours (by occupancy): {_e(peaks)}</p>")
    out.append("<table>" + _row(["Hour", *(f"#{h:02d}" for h in range(24))], head=True))
    out.append(_row(["Starts", *(f"#{n}" for n in usage["sessions_by_hour"])]) + "</table>")
    out.append("<table>" + _row([f"#{d.title()}" for d in _WEEKDAYS], head=True))
    out.append(_row(f"#{n}" for n in usage["sessions_by_weekday"].values()) + "</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


async def run_report(
    config: GatewayConfig, *, by: str, start: date, end: date, fmt: str, output: Path | None = None
) -> int:
    """``evgw report``: read finished sessions from the local buffer and print the report."""
    from gateway.store import Store

    zone = ZoneInfo(config.site.timezone)
    lo, hi = _period(start, end, zone)
    from gateway.billing.checks import RecordProblem, checked_local_record
    from gateway.billing.verify import buffer_keys

    async with Store.for_site(config, create=False) as store:
        sessions = await store.finished_sessions(since=lo, until=hi)
    keys = await asyncio.to_thread(
        buffer_keys, Path(config.storage.path).with_name("evgw-signing.key")
    )
    good: list[SessionRecord] = []
    excluded = 0
    for rec in sessions:
        try:
            good.append(checked_local_record(rec, keys))
        except RecordProblem as problem:
            excluded += 1
            log.warning(
                "report_record_excluded",
                session_id=printable(rec.get("session_id") if isinstance(rec, dict) else None),
                problem=printable(str(problem)),
            )
    chargers = _charger_ids(config)
    text = build_report(
        good, by, start, end, config.site.timezone, fmt, chargers=chargers, excluded=excluded
    )
    if output is None:
        sys.stdout.write(text)
    else:
        await asyncio.to_thread(output.write_text, text, encoding="utf-8")
    if excluded:
        sys.stderr.write(
            f"evgw report: {excluded} record(s) left out: they fail their checks "
            "(`evgw verify -c` names them)\n"
        )
    return 0


def _charger_ids(config: GatewayConfig) -> list[str]:
    try:
        from gateway.profiles import load_profiles

        profiles = load_profiles(config.drivers_path)
        return [
            d.id
            for d in config.devices
            if d.driver == "ocpp" or str(profiles[d.driver].kind) == "charger"
        ]
    except Exception as exc:  # without profiles, idle chargers are merely missing from usage
        log.warning("report_profiles_unavailable", error=str(exc))
        return [d.id for d in config.devices if d.tariff is not None or d.meter is not None]
