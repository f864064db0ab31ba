"""The web side against real parts: a simulated site on the Modbus wire, the real gateway with its
SQLite buffer and (where it matters) a real mosquitto, the aiohttp server on a free port, and a
real HTTP client. Answers are validated against the checked-in OpenAPI file; /metrics is read
with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.profiles import Profile
from gateway.web.users import add_user
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import wait_until
from tests.support.web import basic, get_json, openapi, start_charging, validate, web_site


def _charger(status: dict[str, Any], charger_id: str) -> dict[str, Any]:
    return next(c for c in status["chargers"] if c["id"] == charger_id)


async def test_status_and_sessions_answer_to_their_schema(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    async with web_site(tmp_path, shipped_profiles, broker_port=mosquitto.port) as ws:
        await wait_until(lambda: ws.gw.uplink.online, 10, "uplink")
        code, status = await get_json(ws.url + "api/status")
        assert code == 200
        validate(status, "Status")
        cp1 = _charger(status, "cp1")
        assert cp1["status"] == "available" and cp1["session"] is None
        assert status["site"]["grid"]["limit_a"] == 40.0
        assert status["uplink"]["connected"] is True

        await start_charging(ws.site)
        await wait_until(
            lambda: (s := ws.gw.sessions.tracker.session_of("cp1")) and s.energy() > 100,
            15,
            "energy flowing on cp1",
        )
        code, status = await get_json(ws.url + "api/status")
        validate(status, "Status")
        cp1 = _charger(status, "cp1")
        assert cp1["status"] == "charging" and cp1["power_w"] > 1000
        session = cp1["session"]
        assert session["user"] == "alice" and session["energy_wh"] > 100
        # The running session priced with its frozen tariff: 1.00 flat + 0.30/kWh, 19 % VAT.
        assert session["cost"]["currency"] == "EUR"
        assert (
            float(session["cost"]["excl_vat"]) >= 1.00 + 0.30 * session["energy_wh"] / 1000 - 0.01
        )
        # Load management owns cp1's limit and says why.
        assert cp1["limit"]["reason"] in ("load_share", "charger_max")
        assert cp1["limit"]["current_a"] and cp1["limit"]["current_a"] > 0
        idle = _charger(status, "cp2")["limit"]
        assert idle["reason"] == "idle_minimum" and idle["current_a"] == 6.0

        ws.site.charger("cp1").unplug()
        await wait_until(lambda: ws.gw.live.finished_count == 1, 15, "finished session")
        await wait_until(lambda: _synced(ws.gw), 10, "session acknowledged by the broker")
        code, status = await get_json(ws.url + "api/status")
        validate(status, "Status")
        (recent,) = status["recent_sessions"]
        assert recent["user"] == "alice" and recent["charger_id"] == "cp1"
        assert recent["cost"]["incl_vat"] and recent["synced"] is True
        assert status["uplink"]["last_puback_age_s"] is not None

        code, sessions = await get_json(ws.url + "api/sessions?from=2000-01-01&to=2100-12-31")
        assert code == 200
        validate(sessions, "Sessions")
        assert sessions["count"] == 1
        assert sessions["sessions"][0]["record"]["session_id"] == recent["session_id"]
        code, none = await get_json(ws.url + "api/sessions?from=2000-01-01&to=2000-01-02")
        assert code == 200 and none["count"] == 0
        code, by_user = await get_json(ws.url + "api/sessions?user=bob")
        assert code == 200 and by_user["count"] == 0
        code, spec = await get_json(ws.url + "api/openapi.json")
        assert code == 200 and spec["openapi"].startswith("3.1")


def _synced(gw: Any) -> bool:
    return any(gw.uplink.stats.published.get(s, 0) for s in ("session",))


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("from=yesterday", "from: expected YYYY-MM-DD or an RFC 3339 time"),
        ("to=2026-13-01", "to: not a date (YYYY-MM-DD)"),
        ("from=2026-12-01T08:00:00", "from: a time needs its UTC offset"),
        ("from=2026-12-02&to=2026-12-01", "to: must be after from"),
        ("since=2026-12-01", "unknown parameter 'since'"),
        ("from=2026-12-01&from=2026-12-02", "from: given more than once"),
    ],
)
async def test_sessions_bad_parameters_are_400_with_a_message(
    tmp_path: Path, shipped_profiles: dict[str, Profile], query: str, message: str
) -> None:
    async with web_site(tmp_path, shipped_profiles) as ws:
        code, body = await get_json(ws.url + "api/sessions?" + query)
        assert code == 400
        validate(body, "Error")
        assert body["error"].startswith(message), body


async def test_events_push_a_new_status_when_an_ev_starts(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    async with (
        web_site(tmp_path, shipped_profiles) as ws,
        aiohttp.ClientSession() as http,
        http.get(ws.url + "api/events") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")

        async def statuses() -> Any:
            event = None
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "status":
                    yield json.loads(line[6:])

        stream = statuses()
        first = await asyncio.wait_for(anext(stream), 5)
        validate(first, "Status")
        assert _charger(first, "cp1")["status"] == "available"
        await start_charging(ws.site)
        async with asyncio.timeout(15):
            while True:
                doc = await anext(stream)
                cp1 = _charger(doc, "cp1")
                if cp1["status"] == "charging" and cp1["session"]:
                    break
        validate(doc, "Status")
        assert cp1["session"]["user"] == "alice"


async def test_metrics_parse_with_prometheus_client(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    async with web_site(tmp_path, shipped_profiles, broker_port=mosquitto.port) as ws:
        await wait_until(lambda: ws.gw.uplink.online, 10, "uplink")
        await start_charging(ws.site)
        await wait_until(
            lambda: (s := ws.gw.sessions.tracker.session_of("cp1")) and s.energy() > 50,
            15,
            "energy flowing",
        )
        ws.site.charger("cp1").unplug()
        await wait_until(lambda: ws.gw.live.finished_count == 1, 15, "finished session")
        await wait_until(lambda: _synced(ws.gw), 10, "PUBACK")
        ws.site.set_fault("cp2", "no_answer")
        await wait_until(lambda: not ws.gw.live.devices["cp2"].online, 10, "cp2 offline")
        async with aiohttp.ClientSession() as http, http.get(ws.url + "metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert families["evgw_device_polls"].type == "counter"
    for device in ("cp1", "cp2", "grid"):
        assert value("evgw_device_polls_total", device=device) > 3
    assert value("evgw_device_poll_errors_total", device="cp2", reason="timeout") >= 1
    assert families["evgw_device_poll_duration_seconds"].type == "histogram"
    assert value("evgw_device_poll_duration_seconds_count", device="cp1") > 3
    assert value("evgw_device_poll_duration_seconds_bucket", device="cp1", le="+Inf") > 3
    assert value("evgw_sessions_finished_total", charger="cp1") == 1
    assert value("evgw_session_energy_wh_total", charger="cp1") > 50
    assert value("evgw_sessions_open", charger="cp1") == 0
    assert value("evgw_uplink_connected") == 1
    assert 0 <= value("evgw_uplink_last_puback_age_seconds") < 30
    assert ("evgw_outbox_backlog", (("stream", "readings"),)) in samples
    assert value("evgw_grid_limit_a") == 40
    assert ("evgw_charger_current_limit_a", (("charger", "cp1"),)) in samples
    assert value("evgw_device_online", device="cp2") == 0
    assert value("evgw_device_online", device="grid") == 1


async def test_auth_wrong_password_is_401_and_right_one_passes(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    users = tmp_path / "web-users"
    add_user(users, "site-manager", "correct horse")
    async with web_site(tmp_path, shipped_profiles, users_file=users) as ws:
        async with aiohttp.ClientSession() as http:
            for path in ("", "api/status", "api/events", "metrics", "static/app.js"):
                async with http.get(ws.url + path) as resp:
                    assert resp.status == 401, path
                    assert resp.headers["WWW-Authenticate"].startswith("Basic ")
        wrong = basic("site-manager", "wrong horse")
        nobody = basic("intruder", "correct horse")
        garbled = {"Authorization": "Basic !!!"}
        for headers in (wrong, nobody, garbled):
            async with (
                aiohttp.ClientSession(headers=headers) as http,
                http.get(ws.url + "api/status") as resp,
            ):
                assert resp.status == 401
        right = basic("site-manager", "correct horse")
        code, status = await get_json(ws.url + "api/status", right)
        assert code == 200 and status["site"]["id"] == "web-site"
        async with aiohttp.ClientSession(headers=right) as http:
            async with http.get(ws.url + "metrics") as resp:
                assert resp.status == 200
            async with http.get(ws.url) as resp:
                assert resp.status == 200 and "<title>" in await resp.text()
        # A user added while the gateway runs can log in without a restart.
        add_user(users, "installer", "another secret")
        code, _ = await get_json(ws.url + "api/status", basic("installer", "another secret"))
        assert code == 200


async def test_page_and_assets_are_served_from_the_package(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    async with web_site(tmp_path, shipped_profiles) as ws, aiohttp.ClientSession() as http:
        async with http.get(ws.url) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        # Nothing from another origin: the page works on a site LAN without internet.
        assert "http://" not in page and "https://" not in page
        for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
            async with http.get(ws.url + "static/" + name) as resp:
                assert resp.status == 200 and resp.content_type == ctype
                assert "https://" not in await resp.text()
        async with http.get(ws.url + "static/../server.py") as resp:
            assert resp.status == 404


def test_openapi_file_schemas_are_valid_json_schema() -> None:
    spec = openapi()
    assert spec["openapi"] == "3.1.0"
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    # every path the server routes is documented
    assert set(spec["paths"]) == {
        "/api/status",
        "/api/sessions",
        "/api/events",
        "/metrics",
        "/api/openapi.json",
        "/stats",
    }
