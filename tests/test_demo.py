"""``evgw demo``: embedded broker + simulated site + gateway + live view, in one command."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli import main
from gateway.config import load_config
from gateway.demo import run_demo
from gateway.store import Store
from tests.support.uplink import wait_until

pytestmark = pytest.mark.e2e  # the whole demo, its embedded broker included


@pytest.mark.slow
async def test_demo_finishes_priced_sessions_and_delivers_them(tmp_path: Path) -> None:
    out = io.StringIO()
    assert await run_demo(duration_s=24.0, speed=60.0, workdir=tmp_path, view=True, out=out) == 0
    text = out.getvalue()
    assert "mosquitto_sub -h 127.0.0.1 -p" in text
    assert f"The demo's database is {tmp_path / 'demo-buffer.db'}" in text
    async with Store.open(tmp_path / "demo-buffer.db", site_id="demo-site", create=False) as store:
        records = await store.finished_sessions()
        backlog = await store.outbox_backlog()
    by_charger = {r["charger_id"]: r for r in records}
    # alice (RFID on KEBA), bob (key fob on Webasto), carol (app start on Vestel)
    assert by_charger["cp1"]["user"]["id"] == "alice"
    assert by_charger["cp2"]["user"]["id"] == "bob"
    assert by_charger["cp3"]["user"]["id"] == "carol"
    assert by_charger["cp3"]["user"]["auth"] == "remote"
    # the OCPP charger (a simulated charge point on the OCPP-J server): bob's key fob
    assert by_charger["cp4"]["user"]["id"] == "bob"
    assert by_charger["cp4"]["ocpp"]["charge_point_id"] == "DEMO-CP4"
    assert by_charger["cp4"]["energy_wh"] == 1233  # 10 x 60 s at 7.4 kW, whole Wh
    # ... and the demo site takes signed commands only: carol's start was signed by the demo cloud
    config = load_config(tmp_path / "demo-site.yaml")
    assert config.uplink is not None
    assert config.uplink.command_key == str(tmp_path / "demo-cloud.pem.pub.pem")
    assert (tmp_path / "demo-cloud.pem").stat().st_mode & 0o077 == 0
    for rec in records:
        if "not_billable" not in rec["flags"]:
            assert rec["energy_wh"] > 0
            assert rec["cost"]["currency"] == "EUR" and float(rec["cost"]["incl_vat"]) > 0
    # mallory's blocked card started nothing
    assert all(r["user"]["id"] != "mallory" for r in records)
    # every finished session was delivered over MQTT (PUBACK from the embedded broker)
    assert backlog.get("session", 0) == 0
    assert "last finished sessions:" in text and "uplink: online" in text
    assert "cp4" in text


def test_demo_and_sessions_command_line(tmp_path: Path, capsys: object) -> None:
    assert main(["demo", "--duration", "3s", "--dir", str(tmp_path), "--no-view"]) == 0
    assert main(["sessions", "-c", str(tmp_path / "demo-site.yaml")]) == 0


@pytest.mark.slow
async def test_demo_prints_the_status_page_url_and_it_answers(tmp_path: Path) -> None:
    out = io.StringIO()
    demo = asyncio.create_task(
        # long enough for the checks below (the page answers about a second after the start),
        # short enough not to idle once they are done: the demo must still end by itself
        run_demo(duration_s=7.0, speed=30.0, workdir=tmp_path, view=False, out=out)
    )
    try:
        pattern = re.compile(r"status page: +(http://127\.0\.0\.1:\d+/)")
        await wait_until(lambda: pattern.search(out.getvalue()), 10, "the page's URL")
        match = pattern.search(out.getvalue())
        assert match is not None
        url = match[1]
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert resp.status == 200 and "<title>" in await resp.text()
            async with http.get(url + "api/status") as resp:
                status = await resp.json()
                assert status["site"]["id"] == "demo-site"
                assert [c["id"] for c in status["chargers"]] == ["cp1", "cp2", "cp3", "cp4"]
            async with http.get(url + "metrics") as resp:
                names = {f.name for f in text_string_to_metric_families(await resp.text())}
                assert {"evgw_device_polls", "evgw_uplink_connected"} <= names
            async with http.get(url + "api/events") as resp:
                async with asyncio.timeout(5):
                    async for line in resp.content:
                        if line.startswith(b"event: status"):
                            break
        assert await demo == 0
    finally:
        demo.cancel()
