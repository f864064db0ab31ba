"""The status page's side of issue 15 items 4 and 6: the limit in force and its source in
``/api/status`` (schema-checked), and ``/stats`` (the statistics page the status page links to),
served by the running gateway from its own buffer."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from gateway.profiles import Profile
from tests.support.uplink import wait_until
from tests.support.web import get_json, start_charging, validate, web_site


@pytest.mark.slow
async def test_limit_in_force_and_statistics_page(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    async with web_site(tmp_path, shipped_profiles) as ws:
        await wait_until(lambda: ws.gw.load.grid_limit is not None, 10, "first decision")
        code, status = await get_json(ws.url + "api/status")
        validate(status, "Status")
        grid = status["site"]["grid"]
        assert (grid["limit_a"], grid["limit_source"], grid["connection_limit_a"]) == (
            40.0,
            "connection",
            40.0,
        )
        assert status["site"]["links"] == {"statistics": "/stats"}

        # The grid operator's command, through the same target the MQTT command handler calls.
        result = await ws.gw.commands.set_grid_limit(
            "r-1", "site", 20.0, None, time.time() + 600, "grid operator"
        )
        assert result["in_force"]["source"] == "cloud"
        code, status = await get_json(ws.url + "api/status")
        validate(status, "Status")
        grid = status["site"]["grid"]
        assert (grid["limit_a"], grid["limit_source"], grid["limit_reason"]) == (
            20.0,
            "cloud",
            "grid operator",
        )
        assert grid["limit_expires_at"] is not None
        async with aiohttp.ClientSession() as http, http.get(ws.url + "metrics") as resp:
            metrics = await resp.text()
        assert "evgw_grid_limit_a 20.0" in metrics
        assert 'evgw_grid_limit_source{source="cloud"} 1.0' in metrics
        assert "evgw_grid_connection_limit_a 40.0" in metrics

        # One finished session today, then the statistics page of this week.
        await start_charging(ws.site)
        await wait_until(
            lambda: (s := ws.gw.sessions.tracker.session_of("cp1")) and s.energy() > 100,
            15,
            "energy on cp1",
        )
        ws.site.charger("cp1").unplug()

        async def finished() -> bool:
            return len(await ws.gw.store.finished_sessions()) == 1

        await wait_until(finished, 15, "session finished")
        today = datetime.now(ZoneInfo("Europe/Berlin")).date().isoformat()
        code, doc = await get_json(ws.url + "stats?format=json")
        assert code == 200 and doc["schema"] == "evgw.stats/1" and doc["to"] == today
        assert doc["totals"]["sessions"] == 1 and doc["chargers"]["cp1"]["sessions"] == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(ws.url + "stats") as resp:
                page = await resp.text()
                assert resp.status == 200 and resp.content_type == "text/html"
                assert "script-src" not in resp.headers["Content-Security-Policy"]
                assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            assert page.count("<svg") >= 4 and "<script" not in page
            async with http.get(ws.url + "stats?from=2026-13-01") as resp:
                assert resp.status == 400 and "error" in await resp.json()
            async with http.get(ws.url + "stats?format=pdf") as resp:
                assert resp.status == 400
