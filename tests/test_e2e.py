"""The whole gateway, end to end: simulated chargers and meters on the real Modbus wire ->
``Gateway`` (engine, sessions, SQLite buffer, uplink) -> a real mosquitto -> a cloud subscriber.

Three chargers with three tag encodings (KEBA raw hex, Webasto ASCII, Vestel one character per
register), one of them billed from an external meter behind an RTU-over-TCP serial server.
"""

from __future__ import annotations

import asyncio
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import load_config
from gateway.profiles import Profile
from gateway.records import record_hash
from gateway.sim.devices import SimCharger
from gateway.sim.site import SimSite
from tests.support.mqtt_broker import MosquittoBroker, free_port
from tests.support.uplink import PREFIX, SITE, Recorder, running, wait_until

SPEED = 60.0  # simulated seconds per second

SITE_YAML = """
site: {{id: {site}, timezone: Europe/Berlin}}
storage: {{path: ./buffer.db}}
uplink:
  {{url: "mqtt://127.0.0.1:{broker}", client_id: evgw-e2e, topic_prefix: {prefix}, keepalive: 5s,
    readings: {{interval: 1s, mode: mean}}}}
buses:
  - {{id: gw, type: rtu-over-tcp, host: 127.0.0.1, tcp_port: {p_bus}}}
devices:
  - {{id: cp1, driver: keba-p30, host: 127.0.0.1, port: {p1}, poll_interval: 200ms}}
  - {{id: cp2, driver: webasto-next, host: 127.0.0.1, port: {p2}, poll_interval: 200ms,
     tariff: standard}}
  - {{id: cp3, driver: vestel-evc04, host: 127.0.0.1, port: {p3}, poll_interval: 200ms, meter: m3}}
  - {{id: m3, driver: eastron-sdm630, bus: gw, unit: 3, poll_interval: 200ms}}
auth:
  tokens:
    - {{id: "04A2B3C4D5E6F7", type: rfid, user: alice}}
    - {{id: "FOB-0042", type: keyfob, user: bob}}
    - {{id: "CAROL-0001", type: rfid, user: carol}}
tariffs:
  standard:
    currency: EUR
    vat_percent: 19
    elements: [{{components: [{{type: energy, price: "0.30"}}]}}]
billing: {{default_tariff: standard}}
"""


def write_site(tmp_path: Path, broker_port: int) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        SITE_YAML.format(
            site=SITE,
            prefix=PREFIX,
            broker=broker_port,
            p_bus=free_port(),
            p1=free_port(),
            p2=free_port(),
            p3=free_port(),
        )
    )
    return path


def expected_cost(energy_wh: int) -> str:
    kwh = (Decimal(energy_wh) / 1000).quantize(Decimal("0.001"), ROUND_HALF_UP)
    excl = (kwh * Decimal("0.30")).quantize(Decimal("0.01"), ROUND_HALF_UP)
    vat = (excl * Decimal("0.19")).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return str(excl + vat)


@pytest.mark.slow
async def test_site_lifecycle_end_to_end(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    config = load_config(write_site(tmp_path, mosquitto.port))
    recorder = Recorder(mosquitto.port)
    async with (
        running(recorder.run(), "recorder"),
        SimSite(config, shipped_profiles, speed=SPEED, traffic=False) as site,
        Gateway(config, shipped_profiles, time_scale=SPEED) as gw,
        running(gw.run(), "gateway"),
    ):
        await wait_until(recorder.connected.is_set, 5, "cloud subscriber")
        await wait_until(lambda: gw.uplink.online, 10, "gateway uplink")
        cp1, cp2, cp3 = site.charger("cp1"), site.charger("cp2"), site.charger("cp3")
        await asyncio.sleep(1.0)  # every device polled once: the gateway sees them idle

        # Cars start drawing a few polls after their card was shown: at 60x a simulated
        # minute is one real second, five polls of 200 ms. (A car that draws before the
        # gateway has seen its card loses at most one poll's energy to the start reading.)
        # cp1: card first seen after plug-in; the car stops by itself when full.
        cp1.plug_in(power_w=11_000, energy_need_wh=2_000)
        await site.sleep(20)
        cp1.present_tag("04A2B3C4D5E6F7")  # KEBA shows only the first 4 UID bytes
        # cp2: key fob at plug-in, pauses and resumes (one session), then the EV pauses again.
        cp2.plug_in(tag="FOB-0042", power_w=7_400)
        # cp3: billed from its external meter m3.
        cp3.plug_in(power_w=22_000, energy_need_wh=3_000)
        await site.sleep(5)
        cp3.present_tag("CAROL-0001")
        await site.sleep(60)
        for charger in (cp1, cp2, cp3):
            charger.start_charging()
        await site.sleep(300)
        cp2.suspend()
        await site.sleep(120)
        cp2.resume()
        await site.sleep(300)
        cp2.suspend()
        await site.sleep(60)  # everybody's counters stand still before they leave
        for charger in (cp1, cp2, cp3):
            charger.unplug()

        async def finished() -> list[dict[str, Any]]:
            return await gw.store.finished_sessions()

        await wait_until(lambda: _count(finished(), 3), 15, "three finished sessions")
        await wait_until(lambda: len(recorder.sessions()) >= 3, 15, "sessions at the subscriber")
        await wait_until(
            lambda: all(
                recorder.on(f"chargers/{c}/status")
                and recorder.on(f"chargers/{c}/status")[-1].json()["status"] == "available"
                for c in ("cp1", "cp2", "cp3")
            ),
            10,
            "final charger statuses",
        )
        records = {r["charger_id"]: r for r in await gw.store.finished_sessions()}
        m3_final_wh = site.meter("m3").energy_wh

    truth = {c.device_id: c.sessions for c in (cp1, cp2, cp3)}
    users = {"cp1": ("alice", "rfid"), "cp2": ("bob", "keyfob"), "cp3": ("carol", "rfid")}
    for charger_id, (user, token_type) in users.items():
        rec = records[charger_id]
        (sim,) = truth[charger_id]
        assert rec["user"]["id"] == user and rec["user"]["token_type"] == token_type
        assert rec["user"]["auth"] == "local"
        assert rec["stop_reason"] == "ev_disconnected"
        # Energy from the cumulative counters equals what the simulated EV took.
        assert abs(rec["energy_wh"] - sim["energy_wh"]) <= 1, (charger_id, rec, sim)
        assert rec["energy_wh"] == rec["meter_stop_wh"] - rec["meter_start_wh"]
        assert rec["cost"]["incl_vat"] == expected_cost(rec["energy_wh"])
        assert rec["hash"] == record_hash(rec)
        assert "not_billable" not in rec["flags"]
    assert records["cp1"]["user"]["token"] == "04A2B3C4D5E6F7"  # the full UID on record
    # cp3 is billed from m3's counter, not from the charger's own
    assert abs(records["cp3"]["meter_stop_wh"] - m3_final_wh) <= 1
    assert abs(records["cp3"]["meter_stop_wh"] - truth["cp3"][0]["counter_end_wh"]) > 1000
    # Durations are gateway (real) seconds: 600 simulated s of charging = 10 s at 60x, and the
    # 120 s pause counts as idle, not charging.
    assert records["cp2"]["idle_s"] >= 2
    assert 8 <= records["cp2"]["charging_s"] <= 13

    # The cloud got every session, in seq order, each valid against its schema.
    assert recorder.problems == []
    got = recorder.sessions()
    assert sorted({s["seq"] for s in got}) == [1, 2, 3]
    firsts: dict[str, int] = {}
    for s in got:
        firsts.setdefault(s["session_id"], s["seq"])
    assert list(firsts.values()) == sorted(firsts.values())
    assert {s["session_id"] for s in got} == {r["session_id"] for r in records.values()}
    assert len(recorder.on("sessions/started")) >= 3
    assert any("/readings/" in m.topic for m in recorder.messages)


async def _count(coro: Any, n: int) -> bool:
    return len(await coro) >= n


def _full(charger: SimCharger) -> bool:
    """The car on ``charger`` took all the energy it needed (it draws no more)."""
    return charger.ev is not None and charger.ev.satisfied


@pytest.mark.slow
async def test_tariffs_command_reprices_only_new_sessions_and_survives_a_restart(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    import json

    config = load_config(write_site(tmp_path, mosquitto.port))
    new_tariffs = {
        "standard": {
            "currency": "EUR",
            "vat_percent": 19,
            "elements": [{"components": [{"type": "energy", "price": "0.50"}]}],
        }
    }
    recorder = Recorder(mosquitto.port)
    async with (
        running(recorder.run(), "recorder"),
        SimSite(config, shipped_profiles, speed=SPEED, traffic=False) as site,
    ):
        await wait_until(recorder.connected.is_set, 5, "cloud subscriber")
        cp1, cp2 = site.charger("cp1"), site.charger("cp2")
        async with (
            Gateway(config, shipped_profiles, time_scale=SPEED) as gw,
            running(gw.run(), "gateway"),
        ):
            await wait_until(lambda: gw.uplink.online, 10, "gateway uplink")
            await asyncio.sleep(1.0)
            cp1.plug_in(tag="04A2B3C4D5E6F7", power_w=11_000, energy_need_wh=1_000)
            await site.sleep(5)
            cp1.start_charging()
            await site.sleep(30)  # cp1's session runs under the old tariff
            cheap = {
                "currency": "EUR",
                "elements": [{"components": [{"type": "energy", "price": "0.01"}]}],
            }
            huge_price = {
                "currency": "EUR",
                "elements": [{"components": [{"type": "energy", "price": "1e30"}]}],
            }
            pushes = (
                ("t-1", {"version": 2, "tariffs": new_tariffs}),
                ("t-bad", {"version": 3, "tariffs": {"standard": {"currency": "EURO"}}}),
                ("t-old", {"version": 1, "tariffs": new_tariffs}),
                # cp2 (and the default) name "standard": a push without it is refused whole
                ("t-drop", {"version": 3, "tariffs": {"cheap": cheap}}),
                ("t-huge-price", {"version": 3, "tariffs": {"standard": huge_price}}),
                # a version no later push could exceed
                ("t-huge-version", {"version": 10**300, "tariffs": new_tariffs}),
            )
            for request_id, body in pushes:
                await recorder.publish(
                    "commands/tariffs", json.dumps({"request_id": request_id, **body})
                )
            await wait_until(
                lambda: len(recorder.on("commands/tariffs/reply")) >= len(pushes), 10, "replies"
            )
            replies = {
                m.json()["request_id"]: m.json() for m in recorder.on("commands/tariffs/reply")
            }
            assert replies["t-1"]["ok"] is True
            assert replies["t-bad"]["ok"] is False  # invalid: nothing changes
            assert replies["t-old"]["ok"] is False
            assert replies["t-old"]["error"]["code"] == "stale_version"
            drop = replies["t-drop"]["error"]
            assert drop["code"] == "invalid_tariff"
            assert "chargers.cp2.tariff: unknown tariff 'standard'" in drop["message"]
            assert "billing.default_tariff" in drop["message"]
            price = replies["t-huge-price"]["error"]
            assert price["code"] == "invalid_tariff" and "at most 1000000000" in price["message"]
            assert replies["t-huge-version"]["ok"] is False
            # The same bound for token lists; a refused version leaves room for the next.
            tokens = [{"id": "VIP-0001", "type": "rfid", "user": "vera", "group": "vip"}]
            for request_id, version in (("k-huge", 10**300), ("k-5", 5)):
                await recorder.publish(
                    "commands/tokens",
                    json.dumps(
                        {
                            "request_id": request_id,
                            "version": version,
                            "mode": "replace",
                            "tokens": tokens,
                        }
                    ),
                )
            await wait_until(
                lambda: len(recorder.on("commands/tokens/reply")) >= 2, 10, "token replies"
            )
            token_replies = {
                m.json()["request_id"]: m.json() for m in recorder.on("commands/tokens/reply")
            }
            assert token_replies["k-huge"]["ok"] is False
            assert token_replies["k-5"]["ok"] is True
        # the gateway restarts: the pushed tariffs are still in force
        async with (
            Gateway(config, shipped_profiles, time_scale=SPEED) as gw,
            running(gw.run(), "gateway"),
        ):
            await asyncio.sleep(1.0)
            cp2.plug_in(tag="FOB-0042", power_w=11_000, energy_need_wh=1_000)
            await site.sleep(5)
            cp2.start_charging()
            await wait_until(lambda: _full(cp1) and _full(cp2), 30, "both cars full")
            await site.sleep(60)  # the counters stand still before they leave
            cp1.unplug()
            cp2.unplug()
            await wait_until(lambda: _count(gw.store.finished_sessions(), 2), 15, "sessions")
            # A pushed card whose group names no tariff: priced by the charger's, flagged.
            await site.sleep(5)
            cp2.plug_in(tag="VIP-0001", power_w=11_000, energy_need_wh=500)
            await site.sleep(5)
            cp2.start_charging()
            await wait_until(lambda: _full(cp2), 30, "vera's car full")
            await site.sleep(60)
            cp2.unplug()
            await wait_until(lambda: _count(gw.store.finished_sessions(), 3), 15, "sessions")
            finished = await gw.store.finished_sessions()
            records = {r["charger_id"]: r for r in finished[:2]}
            vip = finished[2]
    old, new = records["cp1"], records["cp2"]
    assert old["cost"]["lines"][0]["unit_price"] == "0.30"  # frozen at its start
    assert new["cost"]["lines"][0]["unit_price"] == "0.50"
    assert old["tariff_version"] != new["tariff_version"]
    assert "tariff_fallback" not in old["flags"] + new["flags"]
    assert vip["user"]["id"] == "vera" and vip["tariff_id"] == "standard"
    assert "tariff_fallback" in vip["flags"]
    assert vip["cost"]["lines"][0]["unit_price"] == "0.50"
