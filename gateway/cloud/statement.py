"""``evgw statement``: one user's monthly statement from the consumer's store.

Every session that started in the month (local time of ``tz``) with start and end in that
zone, charger, site, energy, duration, the cost lines and the total, and totals per currency
that are the exact (Decimal) sums of the sessions' own amounts: never recomputed from prices.
Formats: ``csv``, ``json`` (``evgw.statement/1``), ``html`` (self-contained, every value
escaped) and ``ocpi`` (a JSON array of OCPI 2.2.1 CDR objects).

Only trusted records are billed (the consumer keeps the others in quarantine); the statement
says how many quarantined records name this user in this month, and the command warns on stderr
when the store holds any. CSV cells are safe from formula injection and every text shown has its
control characters escaped (``gateway.safeout``).
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.cloud.ocpi import CdrParty, session_to_cdr
from gateway.errors import GatewayError
from gateway.records import SessionRecord
from gateway.safeout import csv_row, printable

__all__ = ["FORMATS", "build_statement", "month_bounds", "render_statement", "run_statement"]

FORMATS = ("csv", "json", "html", "ocpi")


def month_bounds(month: str, tz: str) -> tuple[float, float]:
    """Unix seconds of the local month's first instant and of the next month's."""
    try:
        first = date.fromisoformat(month + "-01")
    except ValueError:
        raise GatewayError(f"not a month (YYYY-MM): {month!r}") from None
    zone = _zone(tz)
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    lo = datetime(first.year, first.month, 1, tzinfo=zone).timestamp()
    hi = datetime(nxt.year, nxt.month, 1, tzinfo=zone).timestamp()
    return lo, hi


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise GatewayError(f"unknown time zone {tz!r}") from None


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


def _duration(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _line_text(line: dict[str, Any]) -> str:
    return (
        f"{line['type']} {line['quantity']} {line['unit']} x {line['unit_price']} = "
        f"{line['amount']}"
    )


def build_statement(
    records: list[dict[str, Any]], user: str, month: str, tz: str = "UTC", quarantined: int = 0
) -> dict[str, Any]:
    """The statement as data (``evgw.statement/1``); sessions in start order. ``quarantined``:
    how many untrusted records of the user's month were left out."""
    zone = _zone(tz)
    sessions: list[dict[str, Any]] = []
    totals: dict[str, dict[str, Decimal]] = {}
    energy_wh = 0
    unpriced = 0
    for rec in sorted(records, key=lambda r: (_parse(r["started_at"]), r["session_id"])):
        started, ended = _parse(rec["started_at"]), _parse(rec["ended_at"])
        cost = rec.get("cost")
        energy_wh += int(rec["energy_wh"])
        item: dict[str, Any] = {
            "session_id": rec["session_id"],
            "site_id": rec["site_id"],
            "charger_id": rec["charger_id"],
            "start": started.astimezone(zone).isoformat(timespec="seconds"),
            "end": ended.astimezone(zone).isoformat(timespec="seconds"),
            "duration_s": round((ended - started).total_seconds()),
            "energy_kwh": f"{Decimal(int(rec['energy_wh'])) / 1000:.3f}",
            "tariff_id": rec.get("tariff_id"),
            "flags": list(rec.get("flags") or []),
            "currency": None,
            "lines": [],
            "excl_vat": None,
            "vat": None,
            "incl_vat": None,
        }
        if cost:
            item.update(
                currency=cost["currency"],
                lines=list(cost.get("lines", [])),
                excl_vat=cost["excl_vat"],
                vat=cost["vat"],
                incl_vat=cost["incl_vat"],
            )
            total = totals.setdefault(
                cost["currency"],
                {
                    "sessions": Decimal(0),
                    "excl_vat": Decimal(0),
                    "vat": Decimal(0),
                    "incl_vat": Decimal(0),
                },
            )
            total["sessions"] += 1
            for key in ("excl_vat", "vat", "incl_vat"):
                total[key] += Decimal(cost[key])
        else:
            unpriced += 1
        sessions.append(item)
    return {
        "schema": "evgw.statement/1",
        "user": user,
        "month": month,
        "timezone": tz,
        "sessions": sessions,
        "totals": {
            currency: {
                "sessions": int(t["sessions"]),
                "excl_vat": str(t["excl_vat"]),
                "vat": str(t["vat"]),
                "incl_vat": str(t["incl_vat"]),
            }
            for currency, t in sorted(totals.items())
        },
        "energy_kwh": f"{Decimal(energy_wh) / 1000:.3f}",
        "unpriced_sessions": unpriced,
        "quarantined_records": quarantined,
    }


def render_statement(
    doc: dict[str, Any],
    fmt: str,
    records: list[dict[str, Any]] | None = None,
    party: CdrParty | None = None,
) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return _csv(doc)
    if fmt == "html":
        return _html(doc)
    if fmt == "ocpi":
        cdrs = [session_to_cdr(SessionRecord.from_dict(r), party) for r in records or []]
        cdrs.sort(key=lambda c: (c["start_date_time"], c["id"]))
        return json.dumps(cdrs, indent=2, ensure_ascii=False) + "\n"
    raise GatewayError(f"unknown statement format {fmt!r} (one of {', '.join(FORMATS)})")


_CSV_COLUMNS = (
    "row",
    "session_id",
    "site_id",
    "charger_id",
    "start",
    "end",
    "duration",
    "energy_kwh",
    "currency",
    "excl_vat",
    "vat",
    "incl_vat",
    "cost_lines",
    "flags",
)


def _csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for s in doc["sessions"]:
        writer.writerow(
            csv_row(
                [
                    "session",
                    s["session_id"],
                    s["site_id"],
                    s["charger_id"],
                    s["start"],
                    s["end"],
                    _duration(s["duration_s"]),
                    s["energy_kwh"],
                    s["currency"] or "",
                    s["excl_vat"] or "",
                    s["vat"] or "",
                    s["incl_vat"] or "",
                    "; ".join(_line_text(line) for line in s["lines"]),
                    " ".join(s["flags"]),
                ]
            )
        )
    for currency, t in doc["totals"].items():
        writer.writerow(
            csv_row(
                [
                    "total",
                    f"{t['sessions']} sessions",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    currency,
                    t["excl_vat"],
                    t["vat"],
                    t["incl_vat"],
                    "",
                    "",
                ]
            )
        )
    if doc.get("quarantined_records"):
        n = doc["quarantined_records"]
        note = f"{n} quarantined record(s) not billed"
        writer.writerow(["quarantined", note, *([""] * (len(_CSV_COLUMNS) - 2))])
    return buf.getvalue()


def _e(value: Any) -> str:
    return html.escape(printable(value), quote=True)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;width:100%}
th,td{border:1px solid #bbb;padding:.3em .5em;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#eee}
ul{margin:0;padding-left:1.2em}
@media print{body{margin:0}}
"""


def _html(doc: dict[str, Any]) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Statement {_e(doc['user'])} {_e(doc['month'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Charging statement: {_e(doc['user'])}</h1>",
        f"<p>Month {_e(doc['month'])}, times in {_e(doc['timezone'])}. "
        f"{len(doc['sessions'])} sessions, {_e(doc['energy_kwh'])} kWh.</p>",
        "<table><tr><th>Start</th><th>End</th><th>Site</th><th>Charger</th>"
        '<th class="n">Duration</th><th class="n">Energy (kWh)</th><th>Cost lines</th>'
        '<th class="n">Total incl. VAT</th></tr>',
    ]
    for s in doc["sessions"]:
        lines = "".join(f"<li>{_e(_line_text(line))}</li>" for line in s["lines"])
        total = f"{_e(s['incl_vat'])} {_e(s['currency'])}" if s["currency"] else "unpriced"
        flags = f"<br><small>{_e(', '.join(s['flags']))}</small>" if s["flags"] else ""
        out.append(
            f"<tr><td>{_e(s['start'])}</td><td>{_e(s['end'])}</td><td>{_e(s['site_id'])}</td>"
            f"<td>{_e(s['charger_id'])}{flags}</td>"
            f'<td class="n">{_e(_duration(s["duration_s"]))}</td>'
            f'<td class="n">{_e(s["energy_kwh"])}</td><td><ul>{lines}</ul></td>'
            f'<td class="n">{total}</td></tr>'
        )
    out.append("</table><h2>Totals</h2>")
    out.append(
        '<table><tr><th>Currency</th><th class="n">Sessions</th><th class="n">Excl. VAT</th>'
        '<th class="n">VAT</th><th class="n">Incl. VAT</th></tr>'
    )
    for currency, t in doc["totals"].items():
        out.append(
            f'<tr><td>{_e(currency)}</td><td class="n">{_e(t["sessions"])}</td>'
            f'<td class="n">{_e(t["excl_vat"])}</td><td class="n">{_e(t["vat"])}</td>'
            f'<td class="n">{_e(t["incl_vat"])}</td></tr>'
        )
    out.append("</table>")
    if doc["unpriced_sessions"]:
        out.append(f"<p>{_e(doc['unpriced_sessions'])} session(s) without a price.</p>")
    if doc.get("quarantined_records"):
        out.append(
            f"<p><strong>{_e(doc['quarantined_records'])} quarantined record(s)</strong> of this "
            "user and month are not billed: the consumer could not trust them.</p>"
        )
    out.append("</body></html>\n")
    return "\n".join(out)


async def run_statement(
    db_url: str,
    user: str,
    month: str,
    fmt: str = "html",
    tz: str = "UTC",
    output: Path | None = None,
) -> int:
    """``evgw statement``: print (or write to ``output``) the user's statement for the month."""
    from gateway.cloud.cloudstore import open_cloud_store

    if fmt not in FORMATS:
        raise GatewayError(f"unknown statement format {fmt!r} (one of {', '.join(FORMATS)})")
    lo, hi = month_bounds(month, tz)
    async with open_cloud_store(db_url, create=False) as store:
        texts = await store.user_sessions(user, lo, hi)
        held = await store.quarantine_count(user, lo, hi)
        held_all = await store.quarantine_count()
    records = [json.loads(t) for t in texts]
    doc = build_statement(records, user, month, tz, quarantined=held)
    text = render_statement(doc, fmt, records)
    if output is None:
        sys.stdout.write(text)
    else:
        await asyncio.to_thread(Path(output).write_text, text, encoding="utf-8")
    if held_all:
        sys.stderr.write(
            f"evgw statement: {held} quarantined record(s) of {printable(user)} in {month} "
            f"not billed; {held_all} in the store (`evgw trust quarantine --db ...` lists them)\n"
        )
    return 0
