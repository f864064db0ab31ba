"""Billing reports from hand-made session records (Europe/Berlin, May 2026: UTC+2, no DST change).

Records in May 2026 (local time = UTC + 2 h):
- s1 alice on cp1, Mon 04 10:00-12:00, 22.000 kWh, charging 5400 s, 8.58 / 1.63 / 10.21 EUR
- s2 alice on cp2, Tue 05 22:00-23:00, 5.000 kWh, charging 3600 s, 1.00 / 0.19 / 1.19 EUR
- s3 "<script>..." on cp1, Wed 06 08:30-08:45, nothing charged, no cost (not_billable)
- s6 carol on cp2, Sun 31 23:30-24:00, 1.000 kWh, charging 1800 s, 0.40 / 0.08 / 0.48 EUR
- s4 (Thu 30 April 23:30 local) and s5 (1 June 00:30 local) lie outside the period.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date
from typing import Any

import pytest

from gateway.billing.report import build_report, usage_stats
from gateway.records import GENESIS, SessionRecord, UnsealedRecord, seal

TZ = "Europe/Berlin"
MAY = (date(2026, 5, 1), date(2026, 5, 31))
EVIL = "<script>alert(1)</script> & co"


def record(
    sid: str,
    user: str,
    charger: str,
    started: str,
    ended: str,
    energy_wh: int,
    charging_s: int,
    idle_s: int,
    cost: tuple[str, str, str] | None,
    flags: list[str] | None = None,
) -> SessionRecord:
    return sealed_record(
        {
            "session_id": sid,
            "charger_id": charger,
            "user": {"id": user, "token": "T", "token_type": "rfid", "auth": "local"},
            "started_at": started,
            "ended_at": ended,
            "energy_wh": energy_wh,
            "charging_s": charging_s,
            "idle_s": idle_s,
            "tariff_id": "standard" if cost else None,
            "cost": (
                {
                    "currency": "EUR",
                    "excl_vat": cost[0],
                    "vat": cost[1],
                    "incl_vat": cost[2],
                    "lines": [],
                }
                if cost
                else None
            ),
            "flags": flags or [],
        }
    )


def sealed_record(fields: dict[str, Any]) -> SessionRecord:
    """A sealed record of the fields a report reads; the others as a Modbus charger's."""
    body: dict[str, Any] = {
        "schema": "evgw.session/1",
        "seq": 1,
        "site_id": "depot-7",
        "connector": 1,
        "meter_start_wh": 0,
        "meter_stop_wh": fields["energy_wh"],
        "max_power_w": None,
        "stop_reason": "ev_disconnected",
        "tariff_version": None,
        "charging_periods": [],
        "prev_hash": GENESIS,
        **fields,
    }
    return SessionRecord.from_dict(seal(body))


SESSIONS = [
    record(
        "s1",
        "alice",
        "cp1",
        "2026-05-04T08:00:00.000Z",
        "2026-05-04T10:00:00.000Z",
        22000,
        5400,
        1800,
        ("8.58", "1.63", "10.21"),
    ),
    record(
        "s2",
        "alice",
        "cp2",
        "2026-05-05T20:00:00.000Z",
        "2026-05-05T21:00:00.000Z",
        5000,
        3600,
        0,
        ("1.00", "0.19", "1.19"),
    ),
    record(
        "s3",
        EVIL,
        "cp1",
        "2026-05-06T06:30:00.000Z",
        "2026-05-06T06:45:00.000Z",
        0,
        0,
        900,
        None,
        ["not_billable"],
    ),
    record(
        "s4",
        "alice",
        "cp1",
        "2026-04-30T21:30:00.000Z",
        "2026-04-30T22:00:00.000Z",
        9000,
        1800,
        0,
        ("9.00", "1.71", "10.71"),
    ),
    record(
        "s5",
        "carol",
        "cp1",
        "2026-05-31T22:30:00.000Z",
        "2026-05-31T23:00:00.000Z",
        9000,
        1800,
        0,
        ("9.00", "1.71", "10.71"),
    ),
    record(
        "s6",
        "carol",
        "cp2",
        "2026-05-31T21:30:00.000Z",
        "2026-05-31T22:00:00.000Z",
        1000,
        1800,
        0,
        ("0.40", "0.08", "0.48"),
    ),
]


def test_csv_by_user() -> None:
    text = build_report(SESSIONS, "user", *MAY, TZ, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    sessions = [r for r in rows if r["row"] == "session"]
    assert [r["session_id"] for r in sessions] == [
        "s3",
        "s1",
        "s2",
        "s6",
    ]  # grouped by user, sorted
    s1 = next(r for r in sessions if r["session_id"] == "s1")
    assert (
        s1["started"] == "2026-05-04T10:00:00+02:00" and s1["ended"] == "2026-05-04T12:00:00+02:00"
    )
    assert (s1["energy_kwh"], s1["charging_h"], s1["idle_h"]) == ("22.000", "1.50", "0.50")
    totals = {r["key"]: r for r in rows if r["row"] == "total"}
    # alice: 22 + 5 kWh; 5400 + 3600 s = 2.50 h; 8.58 + 1.00 = 9.58; 1.63 + 0.19 = 1.82; 11.40
    a = totals["alice"]
    assert (a["sessions"], a["energy_kwh"], a["charging_h"]) == ("2", "27.000", "2.50")
    assert (a["currency"], a["excl_vat"], a["vat"], a["incl_vat"]) == (
        "EUR",
        "9.58",
        "1.82",
        "11.40",
    )
    assert totals[EVIL]["sessions"] == "1" and totals[EVIL]["currency"] == ""  # unpriced
    # everyone: 4 sessions, 28.000 kWh, 10800 s = 3.00 h, 9.98 / 1.90 / 11.88 EUR
    all_ = totals["(all)"]
    assert (all_["sessions"], all_["energy_kwh"], all_["charging_h"]) == ("4", "28.000", "3.00")
    assert (all_["excl_vat"], all_["vat"], all_["incl_vat"]) == ("9.98", "1.90", "11.88")
    assert next(r for r in sessions if r["session_id"] == "s3")["flags"] == "not_billable"


def test_json_by_charger_with_usage() -> None:
    doc = json.loads(
        build_report(SESSIONS, "charger", *MAY, TZ, "json", chargers=["cp1", "cp2", "cp3"])
    )
    assert doc["schema"] == "evgw.report/1" and doc["by"] == "charger"
    groups = {g["key"]: g for g in doc["groups"]}
    assert set(groups) == {"cp1", "cp2"}
    # cp1: s1 + s3: 22.000 kWh, 1.50 h, one unpriced; money only from s1
    assert groups["cp1"]["sessions"] == 2 and groups["cp1"]["unpriced_sessions"] == 1
    assert groups["cp1"]["cost"] == {
        "EUR": {"excl_vat": "8.58", "vat": "1.63", "incl_vat": "10.21"}
    }
    # cp2: s2 + s6: 6.000 kWh, 3600 + 1800 s = 1.50 h, 1.40 / 0.27 / 1.67
    assert (groups["cp2"]["energy_kwh"], groups["cp2"]["charging_h"]) == ("6.000", "1.50")
    assert groups["cp2"]["cost"]["EUR"] == {"excl_vat": "1.40", "vat": "0.27", "incl_vat": "1.67"}
    assert [s["session_id"] for s in groups["cp2"]["sessions_list"]] == ["s2", "s6"]
    assert doc["totals"]["sessions"] == 4
    usage = doc["usage"]
    # May has 31 days = 744 h. cp1 occupied 2 h + 0.25 h = 2.25 h -> 2.25 / 744 = 0.0030;
    # cp2 1 h + 0.5 h = 1.5 h -> 0.0020; cp3 never used.
    assert usage["period_h"] == 744.0
    assert usage["chargers"]["cp1"] == {
        "sessions": 2,
        "energy_kwh": "22.000",
        "occupied_h": 2.25,
        "utilisation": 0.003,
    }
    assert (
        usage["chargers"]["cp2"]["occupied_h"] == 1.5
        and usage["chargers"]["cp2"]["utilisation"] == 0.002
    )
    assert usage["chargers"]["cp3"] == {
        "sessions": 0,
        "energy_kwh": "0.000",
        "occupied_h": 0.0,
        "utilisation": 0.0,
    }


def test_usage_stats_hours_weekdays_and_peaks() -> None:
    usage = usage_stats(SESSIONS, ["cp1", "cp2"], *MAY, TZ)
    # local start hours: s1 10, s2 22, s3 8, s6 23
    expected_hours = [0] * 24
    for h in (10, 22, 8, 23):
        expected_hours[h] += 1
    assert usage["sessions_by_hour"] == expected_hours
    # Mon 04, Tue 05, Wed 06, Sun 31
    assert usage["sessions_by_weekday"] == {
        "MONDAY": 1,
        "TUESDAY": 1,
        "WEDNESDAY": 1,
        "THURSDAY": 0,
        "FRIDAY": 0,
        "SATURDAY": 0,
        "SUNDAY": 1,
    }
    # occupancy: 10-12 (s1: 1 h in 10, 1 h in 11), 22 (s2: 1 h), 8 (s3: 0.25 h), 23 (s6: 0.5 h)
    occ = usage["occupied_h_by_hour"]
    assert (occ[8], occ[10], occ[11], occ[22], occ[23]) == (0.25, 1.0, 1.0, 1.0, 0.5)
    assert sum(occ) == 3.75
    assert usage["peak_hours"] == [10, 11, 22]


def test_html_is_self_contained_and_escaped() -> None:
    page = build_report(SESSIONS, "user", *MAY, TZ, "html", chargers=["cp1", "cp2"])
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page  # the user name is data, never markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "src=" not in page and "href=" not in page  # nothing external
    assert "11.40 EUR" in page  # alice's total incl. VAT
    assert "2026-05-04T10:00:00+02:00" in page  # local times
    assert "not_billable" in page


def test_dst_local_times_and_period_edges() -> None:
    # 2026-10-25: the day has 25 hours in Berlin; a session at 02:30 CET (second pass) shows +01:00
    rec = record(
        "d1",
        "dora",
        "cp1",
        "2026-10-25T01:30:00.000Z",
        "2026-10-25T02:00:00.000Z",
        100,
        1800,
        0,
        None,
    )
    doc = json.loads(
        build_report([rec], "user", date(2026, 10, 25), date(2026, 10, 25), TZ, "json")
    )
    assert doc["groups"][0]["sessions_list"][0]["started"] == "2026-10-25T02:30:00+01:00"
    assert doc["usage"]["period_h"] == 25.0


@pytest.mark.parametrize(("by", "fmt"), [("day", "csv"), ("user", "pdf")])
def test_bad_arguments(by: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        build_report(SESSIONS, by, *MAY, TZ, fmt)


async def test_run_report_reads_the_real_buffer(tmp_path: Any) -> None:
    """Priced records go through the real SQLite store and come out in the report."""
    from gateway.billing.cost import make_pricer
    from gateway.billing.report import run_report
    from gateway.config import DeviceConfig, GatewayConfig, SiteConfig, StorageConfig
    from gateway.model import MeterPoint, from_rfc3339
    from gateway.store import Store

    db = tmp_path / "buffer.db"
    pricer = make_pricer(TZ)
    tariff = {
        "currency": "EUR",
        "vat_percent": 19,
        "elements": [{"components": [{"type": "energy", "price": "0.39"}]}],
    }
    async with Store.open(db, site_id="depot-7") as store:
        for rec in (r.to_dict() for r in SESSIONS):
            if rec["cost"] is None:
                continue
            started, ended = from_rfc3339(rec["started_at"]), from_rfc3339(rec["ended_at"])
            points = [MeterPoint(ended, rec["energy_wh"], True)]
            periods, cost = pricer(tariff, points, started, ended)
            await store.finish_session(
                UnsealedRecord.from_dict(
                    {
                        **{k: v for k, v in rec.items() if k not in ("seq", "prev_hash", "hash")},
                        "site_id": "depot-7",
                        "connector": 1,
                        "meter_start_wh": 1_000_000,
                        "meter_stop_wh": 1_000_000 + rec["energy_wh"],
                        "max_power_w": 11000,
                        "stop_reason": "ev_disconnected",
                        "tariff_version": "0123456789abcdef",
                        "charging_periods": periods,
                        "cost": cost,
                    }
                )
            )
    config = GatewayConfig(
        site=SiteConfig(id="depot-7", timezone=TZ),
        storage=StorageConfig(path=str(db)),
        devices=(
            DeviceConfig(id="cp1", driver="no-such-driver", host="127.0.0.1", tariff="standard"),
        ),
    )
    out = tmp_path / "report.json"
    assert (
        await run_report(config, by="user", start=MAY[0], end=MAY[1], fmt="json", output=out) == 0
    )
    doc = json.loads(out.read_text(encoding="utf-8"))
    # in May: s1 22 kWh x 0.39 = 8.58 (VAT 1.63), s2 5 kWh = 1.95 (VAT 0.3705 -> 0.37),
    # s6 1 kWh = 0.39 (VAT 0.0741 -> 0.07). alice: 10.53 / 2.00 / 12.53; carol: 0.39 / 0.07 / 0.46
    groups = {g["key"]: g for g in doc["groups"]}
    assert groups["alice"]["cost"]["EUR"] == {
        "excl_vat": "10.53",
        "vat": "2.00",
        "incl_vat": "12.53",
    }
    assert groups["carol"]["cost"]["EUR"] == {"excl_vat": "0.39", "vat": "0.07", "incl_vat": "0.46"}
    assert doc["totals"]["sessions"] == 3
    assert "cp1" in doc["usage"]["chargers"]  # listed from the config even without a profile


async def test_run_report_leaves_out_records_that_fail_their_checks(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record changed in the buffer behind the gateway's back (or signed by no key of this
    gateway) is not billed; the report says how many it left out."""
    import sqlite3

    from gateway.billing.report import run_report
    from gateway.billing.signing import Signer
    from gateway.config import load_config
    from gateway.records import seal
    from gateway.store import Store
    from tests.support.consumer import unsealed_body

    buffer = tmp_path / "buffer.db"
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"site: {{id: depot-7, timezone: UTC}}\nstorage: {{path: {buffer}}}\n")
    signer = Signer.load_or_create(buffer.with_name("evgw-signing.key"))
    stranger = Signer.load_or_create(tmp_path / "stranger.key")
    async with Store.open(
        buffer,
        site_id="depot-7",
        reserve_bytes=0,
        sealer=lambda r, seq, prev: r.sealed(seq, prev, signer.sign),
    ) as store:
        for i in range(1, 4):
            await store.finish_session(unsealed_body(i, start=1_790_000_000 + i * 7200))
    with sqlite3.connect(buffer) as db:
        (text,) = db.execute("SELECT record FROM finished_sessions WHERE seq = 2").fetchone()
        rec = json.loads(text)
        rec["cost"]["incl_vat"] = "0.01"  # changed, hash left
        db.execute("UPDATE finished_sessions SET record = ? WHERE seq = 2", (json.dumps(rec),))
        (text,) = db.execute("SELECT record FROM finished_sessions WHERE seq = 3").fetchone()
        rec3 = seal(json.loads(text), stranger.sign)  # re-sealed by someone else's key
        db.execute("UPDATE finished_sessions SET record = ? WHERE seq = 3", (json.dumps(rec3),))
    out = tmp_path / "r.json"
    day = date(2026, 9, 21)
    config = load_config(cfg)
    capsys.readouterr()
    assert await run_report(config, by="user", start=day, end=day, fmt="json", output=out) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["totals"]["sessions"] == 1 and doc["excluded_records"] == 2
    assert capsys.readouterr().err.endswith(
        "evgw report: 2 record(s) left out: they fail their checks (`evgw verify -c` names them)\n"
    )
