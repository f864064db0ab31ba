"""``evgw stats`` on a real SQLite buffer written through the project's store, with known answers.

Europe/Berlin, week of Monday 1 June 2026 (local = UTC + 2 h), chargers cp1..cp3, grid meter m-site:
- A cp1 Mon 08:00-10:00, 11 kWh (periods: 10 kWh from 08:00, 1 kWh from 09:00), charging 1 h
- B cp2 Mon 09:30-11:30, 4 kWh, no periods (1 kWh per half hour), charging 2 h
- C cp1 Sun 31 May 23:00 - Mon 01:00, 2 kWh, charging 1 h: starts before the week, half inside
- D cp2 Sun 7 June 23:00 - Mon 8 June 01:00, 2 kWh, charging 2 h: half inside
- E cp3 Mon 8 June 10:00: after the week
Readings (UTC): cp1 11 kW at 07:45:00 and :30, 9 kW at 07:46; cp2 7 and 8 kW at 07:45:10/40,
4 kW at 07:47; the grid meter 25 kW at 07:45:05; noise that must be ignored.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from gateway.config import DeviceConfig, GatewayConfig, GridConfig, SiteConfig, StorageConfig
from gateway.model import MeterPoint, from_rfc3339
from gateway.records import UnsealedRecord
from gateway.stats import SitePower, compute_stats, render_stats, run_stats
from gateway.store import Store

TZ = "Europe/Berlin"
WEEK = (date(2026, 6, 1), date(2026, 6, 7))
EVIL = "cp<script>x</script>"


def rec(
    sid: str,
    charger: str,
    started: str,
    ended: str,
    energy_wh: int,
    charging_s: int,
    periods: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    duration = int(from_rfc3339(ended) - from_rfc3339(started))
    return {
        "schema": "evgw.session/1",
        "session_id": sid,
        "site_id": "depot-7",
        "charger_id": charger,
        "connector": 1,
        "user": {"id": "alice", "token": "T", "token_type": "rfid", "auth": "local"},
        "started_at": started,
        "ended_at": ended,
        "charging_s": charging_s,
        "idle_s": duration - charging_s,
        "meter_start_wh": 1000,
        "meter_stop_wh": 1000 + energy_wh,
        "energy_wh": energy_wh,
        "max_power_w": 11000,
        "stop_reason": "ev_disconnected",
        "tariff_id": None,
        "tariff_version": None,
        "charging_periods": [
            {"start": s, "tariff_element": i, "energy_wh": e, "charging_s": 0, "idle_s": 0}
            for i, (s, e) in enumerate(periods or [])
        ],
        "cost": None,
        "flags": [],
    }


SESSIONS = [
    rec(
        "A",
        "cp1",
        "2026-06-01T06:00:00.000Z",
        "2026-06-01T08:00:00.000Z",
        11000,
        3600,
        [("2026-06-01T06:00:00.000Z", 10000), ("2026-06-01T07:00:00.000Z", 1000)],
    ),
    rec("B", "cp2", "2026-06-01T07:30:00.000Z", "2026-06-01T09:30:00.000Z", 4000, 7200),
    rec("C", "cp1", "2026-05-31T21:00:00.000Z", "2026-05-31T23:00:00.000Z", 2000, 3600),
    rec("D", "cp2", "2026-06-07T21:00:00.000Z", "2026-06-07T23:00:00.000Z", 2000, 7200),
    rec("E", "cp3", "2026-06-08T08:00:00.000Z", "2026-06-08T09:00:00.000Z", 5000, 3600),
]


def _ts(text: str) -> float:
    return from_rfc3339(text)


READINGS: list[tuple[str, float, dict[str, Any]]] = [
    ("cp1", _ts("2026-06-01T07:45:00Z"), {"power_w": 11000.0, "status": "charging"}),
    ("cp2", _ts("2026-06-01T07:45:10Z"), {"power_w": 7000.0}),
    ("m-site", _ts("2026-06-01T07:45:05Z"), {"power_w": 25000.0}),
    ("cp1", _ts("2026-06-01T07:45:30Z"), {"power_w": 11000.0}),
    ("cp2", _ts("2026-06-01T07:45:40Z"), {"power_w": 8000.0}),
    ("cp1", _ts("2026-06-01T07:46:00Z"), {"power_w": 9000.0}),
    ("cp2", _ts("2026-06-01T07:47:00Z"), {"power_w": 4000.0}),
    # ignored: not a number, a device that is not a charger, outside the week
    ("cp1", _ts("2026-06-01T07:46:10Z"), {"power_w": float("nan")}),
    ("cp1", _ts("2026-06-01T07:46:20Z"), {"status": "charging"}),
    ("m2", _ts("2026-06-01T07:45:00Z"), {"power_w": 99000.0}),
    ("cp1", _ts("2026-05-31T21:30:00Z"), {"power_w": 50000.0}),
]


def _config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(
        site=SiteConfig(id="depot-7", timezone=TZ),
        storage=StorageConfig(path=str(tmp_path / "buffer.db")),
        devices=(
            DeviceConfig(id="cp1", driver="abb-terra-ac", host="127.0.0.1"),
            DeviceConfig(id="cp2", driver="abb-terra-ac", host="127.0.0.1", port=5021),
            DeviceConfig(id="cp3", driver="keba-p30", host="127.0.0.1", port=5022),
            DeviceConfig(id="m-site", driver="eastron-sdm630", host="127.0.0.1", port=5023),
        ),
        grid=GridConfig(max_current_a=63, meter="m-site"),
    )


async def _fill(path: Path) -> None:
    async with Store.open(path, site_id="depot-7") as store:
        for r in SESSIONS:
            # Written as the session manager writes them: points first, then the sealed record.
            await store.add_session_point(
                r["session_id"], MeterPoint(_ts(r["ended_at"]), r["energy_wh"], True)
            )
            await store.finish_session(UnsealedRecord.from_dict(r))
        await store.add_readings(READINGS)


@pytest.fixture
async def buffer(tmp_path: Path) -> GatewayConfig:
    config = _config(tmp_path)
    await _fill(Path(config.storage.path))
    return config


async def _doc(config: GatewayConfig, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "stats.json"
    assert await run_stats(config, start=WEEK[0], end=WEEK[1], fmt="json", output=out) == 0
    doc: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return doc


async def test_known_answers_from_the_real_buffer(buffer: GatewayConfig, tmp_path: Path) -> None:
    doc = await _doc(buffer, tmp_path)
    assert doc["schema"] == "evgw.stats/1" and doc["period_h"] == 168
    cp1, cp2, cp3 = (doc["chargers"][c] for c in ("cp1", "cp2", "cp3"))
    # cp1: A (2 h, 1 h charging, 11 kWh) + the half of C inside the week (1 h, 0.5 h, 1 kWh)
    assert cp1 == {
        "sessions": 1,
        "energy_kwh": 12.0,
        "connected_h": 3.0,
        "charging_h": 1.5,
        "idle_connected_h": 1.5,
        "utilisation": {"connected": 0.0179, "charging": 0.0089, "idle_connected": 0.0089},
    }
    # cp2: B (2 h charging, 4 kWh) + half of D (1 h charging, 1 kWh)
    assert cp2["sessions"] == 2 and cp2["energy_kwh"] == 5.0
    assert (cp2["connected_h"], cp2["charging_h"], cp2["idle_connected_h"]) == (3.0, 3.0, 0.0)
    assert cp3["sessions"] == 0 and cp3["utilisation"]["connected"] == 0.0  # E is after the week
    assert doc["totals"] == {
        "sessions": 3,
        "energy_kwh": 17.0,
        "peak_concurrent_sessions": 2,
        "peak_concurrent_at": "2026-06-01T09:30:00+02:00",
    }
    sessions, energy = doc["heatmap"]["sessions"], doc["heatmap"]["energy_kwh"]
    mon, sun = 0, 6
    assert {(w, h): n for w in range(7) for h in range(24) if (n := sessions[w][h])} == {
        (mon, 8): 1,
        (mon, 9): 1,
        (sun, 23): 1,
    }
    assert {(w, h): e for w in range(7) for h in range(24) if (e := energy[w][h])} == {
        (mon, 0): 1.0,  # C's second hour
        (mon, 8): 10.0,  # A's first charging period
        (mon, 9): 2.0,  # A's second period + B's first half hour
        (mon, 10): 2.0,
        (mon, 11): 1.0,
        (sun, 23): 1.0,  # D's first hour
    }
    daily = {d["date"]: (d["sessions"], d["energy_kwh"]) for d in doc["daily"]}
    assert len(daily) == 7
    assert daily["2026-06-01"] == (2, 16.0) and daily["2026-06-07"] == (1, 1.0)
    assert daily["2026-06-03"] == (0, 0.0)
    # 07:45Z: 11 + 7.5 kW; 07:46: 9 + 7.5 (cp2 not read: keeps its mean); 07:47: 9 + 4
    site = doc["site_power"]
    assert site["peak_w"] == 18500 and site["peak_at"] == "2026-06-01T09:45:00+02:00"
    assert site["hourly"] == [
        {
            "hour": "2026-06-01T09:00:00+02:00",
            "max_w": 18500,
            "mean_w": (18500 + 16500 + 13000) // 3,
        }
    ]
    assert doc["grid_power"]["peak_w"] == 25000


def test_an_empty_period_and_bad_arguments() -> None:
    doc = compute_stats([], ["cp1"], *WEEK, TZ, power=SitePower(["cp1"]))
    assert doc["totals"]["sessions"] == 0 and doc["totals"]["peak_concurrent_at"] is None
    assert doc["site_power"] == {"peak_w": None, "peak_at": None, "hourly": []}
    for fmt in ("csv", "json", "html", "svg"):
        assert render_stats(doc, fmt)
    with pytest.raises(ValueError):
        render_stats(doc, "pdf")
    with pytest.raises(ValueError):
        compute_stats([], ["cp1"], WEEK[1], WEEK[0], TZ)


async def test_csv_is_one_tidy_table(buffer: GatewayConfig, tmp_path: Path) -> None:
    out = tmp_path / "stats.csv"
    await run_stats(buffer, start=WEEK[0], end=WEEK[1], fmt="csv", output=out)
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert {r["table"] for r in rows} == {
        "totals",
        "charger",
        "heatmap",
        "daily",
        "site_power",
        "grid_power",
    }
    got = {(r["table"], r["key"], r["hour"], r["metric"]): r["value"] for r in rows}
    assert got[("charger", "cp1", "", "utilisation_connected")] == "0.0179"
    assert got[("heatmap", "MONDAY", "8", "energy_kwh")] == "10.0"
    assert got[("daily", "2026-06-01", "", "energy_kwh")] == "16.0"
    assert got[("site_power", "", "", "peak_w")] == "18500"


def test_names_are_escaped_in_html_and_svg() -> None:
    record = rec("X", EVIL, "2026-06-02T10:00:00.000Z", "2026-06-02T11:00:00.000Z", 1000, 3600)
    doc = compute_stats([record], [], *WEEK, TZ)
    assert EVIL in doc["chargers"]
    page = render_stats(doc, "html")
    assert "<script" not in page
    svg = render_stats(doc, "svg")
    assert "<script" not in svg
    ET.fromstring(svg)  # well-formed XML


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(page: Path, png: Path, profile: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1000,2600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


ARTEFACTS = Path(__file__).resolve().parent.parent / "test-artefacts"


@pytest.mark.e2e
async def test_html_and_svg_render_in_headless_chromium(
    buffer: GatewayConfig, tmp_path: Path
) -> None:
    """The page and the SVG draw in a real browser without network; the screenshots are kept
    in test-artefacts/ to look at."""
    from PIL import Image

    html_file = tmp_path / "stats.html"
    svg_file = tmp_path / "stats.svg"
    await run_stats(buffer, start=WEEK[0], end=WEEK[1], fmt="html", output=html_file)
    await run_stats(buffer, start=WEEK[0], end=WEEK[1], fmt="svg", output=svg_file)
    page = html_file.read_text(encoding="utf-8")
    # Nothing to fetch: the only URLs are XML namespaces.
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    assert page.count("<svg") >= 5 and "<script" not in page
    ARTEFACTS.mkdir(exist_ok=True)
    for source, name in ((html_file, "stats-html.png"), (svg_file, "stats-svg.png")):
        png = ARTEFACTS / name
        png.unlink(missing_ok=True)
        _screenshot(source, png, tmp_path / f"profile-{name}")
        image = Image.open(png).convert("RGB")
        # Not a blank page: the charts' colours are there (pygal's first two series colours).
        colours = {c for _, c in image.getcolors(maxcolors=1 << 20) or []}
        assert (0x1F, 0x77, 0xB4) in colours and (0xFF, 0x7F, 0x0E) in colours


async def test_command_line(buffer: GatewayConfig, tmp_path: Path) -> None:
    """``evgw stats`` through the real command line and config loader; bad input: one line."""
    import asyncio

    from gateway.cli import main

    config = tmp_path / "site.yaml"
    config.write_text(
        "site: {id: depot-7, timezone: Europe/Berlin}\n"
        f"storage: {{path: {buffer.storage.path}}}\n"
        "devices:\n"
        "  - {id: cp1, driver: abb-terra-ac, host: 127.0.0.1}\n"
        "  - {id: cp2, driver: abb-terra-ac, host: 127.0.0.1, port: 5021}\n",
        encoding="utf-8",
    )
    out = tmp_path / "week.svg"
    argv = ["stats", "-c", str(config), "--from", "2026-06-01", "--to", "2026-06-07"]
    code = await asyncio.to_thread(main, [*argv, "--format", "svg", "-o", str(out)])
    assert code == 0
    root = ET.fromstring(out.read_text(encoding="utf-8"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and len(root.findall("{*}svg")) == 5
    bad = ["stats", "-c", str(config), "--from", "2026-06-07", "--to", "2026-06-01"]
    assert await asyncio.to_thread(main, bad) == 2


async def test_reading_values_of_new_and_old_rows(tmp_path: Path) -> None:
    """SQLite picks the value out of both stored forms: the wire text, and the JSON ``data`` of
    rows written before schema version 2; a reading without it gives None."""
    import sqlite3

    path = tmp_path / "buffer.db"
    async with Store.open(path, site_id="depot-7") as store:
        await store.add_readings([("cp1", 100.0, {"power_w": 7.5}), ("cp1", 101.0, {"x": 1})])
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO readings (device_id, ts, data, wire) VALUES ('cp2', 102.0, ?, NULL)",
            ('{"power_w": 3}',),
        )
    async with Store.open(path, site_id="depot-7") as store:
        rows = await store.reading_values("power_w", 0.0, 200.0)
        assert [(d, ts, v) for _, d, ts, v in rows] == [
            ("cp1", 100.0, 7.5),
            ("cp1", 101.0, None),
            ("cp2", 102.0, 3),
        ]
        assert await store.reading_values("power_w", 0.0, 200.0, devices=["cp2"], limit=1) == [
            (rows[2][0], "cp2", 102.0, 3)
        ]
        with pytest.raises(ValueError):
            await store.reading_values("x'); DROP TABLE readings; --", 0.0, 1.0)
