"""evgw statement: a user's month from the consumer's store; totals are the sums of the sessions'
own amounts; csv/json/html/ocpi outputs."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.billing.signing import Signer
from gateway.cli import main
from gateway.cloud.cloudstore import open_cloud_store
from gateway.cloud.consumer import SessionConsumer
from gateway.cloud.ocpi import CdrParty, session_to_cdr
from gateway.cloud.statement import month_bounds
from gateway.records import GENESIS, SessionRecord, seal

SITE = "depot-7"
# 2026-10-01 00:00 Europe/Berlin is 2026-09-30T22:00Z
OCT_START_BERLIN = datetime(2026, 9, 30, 22, 0, tzinfo=UTC).timestamp()


SIGNER = Signer(Ed25519PrivateKey.generate())
KEY_MSG = json.dumps(SIGNER.public_key_payload()).encode()


def _chain(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out, prev = [], GENESIS
    for seq, body in enumerate(bodies, start=1):
        rec = seal({**body, "seq": seq, "prev_hash": prev}, SIGNER.sign)
        out.append(rec)
        prev = rec["hash"]
    return out


def _bodies() -> list[dict[str, Any]]:
    from tests.support.consumer import record_body

    return [
        record_body(1, energy_wh=22000, start=OCT_START_BERLIN - 1800),  # Sep in Berlin
        record_body(2, energy_wh=12345, price="0.39", start=OCT_START_BERLIN + 600),
        record_body(3, energy_wh=7777, price="0.29", start=OCT_START_BERLIN + 86400 * 3),
        record_body(4, user="bob", start=OCT_START_BERLIN + 86400 * 4),
        record_body(5, energy_wh=5000, currency="CHF", start=OCT_START_BERLIN + 86400 * 5),
        record_body(
            6, energy_wh=1001, start=OCT_START_BERLIN + 86400 * 31 + 3660
        ),  # Nov (CET after DST)
    ]


@pytest.fixture
async def db(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    chain = _chain(_bodies())
    url = f"sqlite:///{tmp_path}/consumer.db"
    async with open_cloud_store(url) as store:
        consumer = SessionConsumer(store)
        assert await consumer.handle(f"evgw/{SITE}/gateway/key", KEY_MSG) == "key"
        for rec in chain:
            await consumer.handle(f"evgw/{SITE}/sessions/finished", json.dumps(rec).encode())
    return url, chain


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 0
    return capsys.readouterr().out


def test_month_bounds_follow_the_zone() -> None:
    assert month_bounds("2026-10", "Europe/Berlin")[0] == OCT_START_BERLIN
    lo, hi = month_bounds("2026-12", "UTC")
    assert datetime.fromtimestamp(hi, UTC) == datetime(2027, 1, 1, tzinfo=UTC)
    assert hi - lo == 31 * 86400


def test_json_totals_are_the_sum_of_session_costs(
    db: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, chain = db
    out = _run(
        [
            "statement",
            "--db",
            url,
            "--user",
            "alice",
            "--month",
            "2026-10",
            "--format",
            "json",
            "--timezone",
            "Europe/Berlin",
        ],
        capsys,
    )
    doc = json.loads(out)
    assert doc["schema"] == "evgw.statement/1"
    ids = [s["session_id"] for s in doc["sessions"]]
    assert ids == [chain[1]["session_id"], chain[2]["session_id"], chain[4]["session_id"]]
    assert doc["sessions"][0]["start"] == "2026-10-01T00:10:00+02:00"
    assert doc["sessions"][0]["duration_s"] == 6000
    assert doc["sessions"][0]["energy_kwh"] == "12.345"
    for currency in ("EUR", "CHF"):
        mine = [
            c
            for c in (chain[1]["cost"], chain[2]["cost"], chain[4]["cost"])
            if c["currency"] == currency
        ]
        for key in ("excl_vat", "vat", "incl_vat"):
            assert Decimal(doc["totals"][currency][key]) == sum(Decimal(c[key]) for c in mine)
        assert doc["totals"][currency]["sessions"] == len(mine)
    assert doc["totals"]["EUR"]["incl_vat"] == "8.41"  # 4.81 (+0.91) and 2.26 (+0.43)
    # in UTC 22:10Z on Sep 30 is September, 23:01Z on Oct 31 (00:01 CET) October
    out = _run(
        ["statement", "--db", url, "--user", "alice", "--month", "2026-10", "--format", "json"],
        capsys,
    )
    utc_ids = [s["session_id"] for s in json.loads(out)["sessions"]]
    assert utc_ids == [chain[i]["session_id"] for i in (2, 4, 5)]


def test_csv_and_html(
    db: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, _ = db
    out = _run(
        [
            "statement",
            "--db",
            url,
            "--user",
            "alice",
            "--month",
            "2026-10",
            "--format",
            "csv",
            "--timezone",
            "Europe/Berlin",
        ],
        capsys,
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    sessions = [r for r in rows if r["row"] == "session"]
    totals = {r["currency"]: r for r in rows if r["row"] == "total"}
    assert len(sessions) == 3
    eur = [r for r in sessions if r["currency"] == "EUR"]
    assert Decimal(totals["EUR"]["incl_vat"]) == sum(Decimal(r["incl_vat"]) for r in eur)
    assert sessions[0]["cost_lines"] == "energy 12.345 kWh x 0.39 = 4.81"
    assert sessions[0]["duration"] == "1:40:00"

    target = tmp_path / "statement.html"
    assert (
        main(
            [
                "statement",
                "--db",
                url,
                "--user",
                "alice",
                "--month",
                "2026-10",
                "--format",
                "html",
                "-o",
                str(target),
            ]
        )
        == 0
    )
    page = target.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "<style>" in page and "http" not in page  # self-contained


async def test_html_escapes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.consumer import record_body

    evil = "<script>alert(1)</script>"
    body = record_body(1, user=evil, charger='cp"<b>')
    body["flags"] = ["end_estimated"]
    url = f"sqlite:///{tmp_path}/c.db"
    async with open_cloud_store(url) as store:
        consumer = SessionConsumer(store)
        assert await consumer.handle(f"evgw/{SITE}/gateway/key", KEY_MSG) == "key"
        rec = _chain([body])[0]
        assert (
            await consumer.handle(f"evgw/{SITE}/sessions/finished", json.dumps(rec).encode())
            == "stored"
        )
    month = rec["started_at"][:7]
    from gateway.cloud.statement import run_statement

    assert await run_statement(url, evil, month, "html") == 0
    page = capsys.readouterr().out
    assert evil not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "end_estimated" in page


def test_empty_month_is_an_empty_statement(
    db: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = db
    out = _run(
        ["statement", "--db", url, "--user", "nobody", "--month", "2026-10", "--format", "json"],
        capsys,
    )
    doc = json.loads(out)
    assert doc["sessions"] == [] and doc["totals"] == {}


def test_unknown_zone_is_one_clear_line(
    db: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = db
    rc = main(
        [
            "statement",
            "--db",
            url,
            "--user",
            "alice",
            "--month",
            "2026-10",
            "--timezone",
            "Mars/Olympus",
        ]
    )
    assert rc == 1
    assert capsys.readouterr().err.strip() == "evgw statement: unknown time zone 'Mars/Olympus'"


# ---------------------------------------------------------------------------- OCPI

# OCPI 2.2.1 CDR object: the fields that are required (cardinality 1 or +)
CDR_REQUIRED = {
    "country_code",
    "party_id",
    "id",
    "start_date_time",
    "end_date_time",
    "cdr_token",
    "auth_method",
    "cdr_location",
    "currency",
    "charging_periods",
    "total_cost",
    "total_energy",
    "total_time",
    "last_updated",
}
CDR_TOKEN_REQUIRED = {"country_code", "party_id", "uid", "type", "contract_id"}
CDR_LOCATION_REQUIRED = {
    "id",
    "address",
    "city",
    "country",
    "coordinates",
    "evse_uid",
    "evse_id",
    "connector_id",
    "connector_standard",
    "connector_format",
    "connector_power_type",
}


def test_ocpi_export_has_the_required_fields(
    db: tuple[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, chain = db
    out = _run(
        [
            "statement",
            "--db",
            url,
            "--user",
            "alice",
            "--month",
            "2026-10",
            "--format",
            "ocpi",
            "--timezone",
            "Europe/Berlin",
        ],
        capsys,
    )
    cdrs = json.loads(out)
    assert [c["id"] for c in cdrs] == [chain[i]["session_id"] for i in (1, 2, 4)]
    for cdr, rec in zip(cdrs, (chain[1], chain[2], chain[4]), strict=True):
        assert cdr.keys() >= CDR_REQUIRED
        assert cdr["cdr_token"].keys() >= CDR_TOKEN_REQUIRED
        assert cdr["cdr_location"].keys() >= CDR_LOCATION_REQUIRED
        assert cdr["cdr_token"]["type"] == "RFID"
        assert cdr["cdr_token"]["contract_id"] == "alice"
        assert cdr["auth_method"] == "WHITELIST"
        assert cdr["currency"] == rec["cost"]["currency"]
        assert cdr["total_cost"] == {
            "excl_vat": float(rec["cost"]["excl_vat"]),
            "incl_vat": float(rec["cost"]["incl_vat"]),
        }
        assert isinstance(cdr["total_cost"]["incl_vat"], float)
        assert cdr["total_energy"] == rec["energy_wh"] / 1000
        assert cdr["total_time"] == pytest.approx(6000 / 3600, abs=1e-4)
        assert cdr["total_parking_time"] == pytest.approx(600 / 3600, abs=1e-4)
        [period] = cdr["charging_periods"]
        dims = {d["type"]: d["volume"] for d in period["dimensions"]}
        assert dims == {
            "ENERGY": rec["energy_wh"] / 1000,
            "TIME": 1.5,
            "PARKING_TIME": pytest.approx(0.1667, abs=1e-4),
        }
        assert period["start_date_time"] == rec["started_at"]
        assert cdr["total_energy_cost"] == {"excl_vat": float(rec["cost"]["excl_vat"])}


def test_ocpi_party_is_configurable_and_unpriced_sessions_say_so() -> None:
    from tests.support.consumer import record_body

    body = record_body(1)
    body.update(cost=None, flags=["end_estimated"])
    body["user"] = {"id": "app-user-7", "token": None, "token_type": "app", "auth": "remote"}
    rec = seal({**body, "prev_hash": GENESIS})
    cdr = session_to_cdr(
        SessionRecord.from_dict(rec),
        CdrParty(country_code="DE", party_id="ABC", location={"city": "Berlin"}),
    )
    assert (cdr["country_code"], cdr["party_id"]) == ("DE", "ABC")
    assert cdr["cdr_token"] == {
        "country_code": "DE",
        "party_id": "ABC",
        "uid": "app-user-7",
        "type": "APP_USER",
        "contract_id": "app-user-7",
    }
    assert cdr["auth_method"] == "COMMAND"
    assert cdr["cdr_location"]["city"] == "Berlin"
    assert cdr["total_cost"] == {"excl_vat": 0.0, "incl_vat": 0.0}
    assert cdr["remark"] == "evgw flags: unpriced, end_estimated"
