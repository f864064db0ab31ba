"""``evgw demo``: embedded broker + simulated site + gateway + live view, in one command."""

from __future__ import annotations

import io
from pathlib import Path

from gateway.cli import main
from gateway.demo import run_demo
from gateway.store import Store


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
