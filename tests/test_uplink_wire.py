"""Readings spliced from their stored wire form reach a real mosquitto as schema-valid batches."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from test_uplink_mqtt import make_uplink, uplink_config

from gateway.model import rfc3339
from gateway.store import Store
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import SITE, Recorder, running, wait_until


async def test_odd_values_published_as_valid_batches(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    now = round(time.time(), 3)
    odd = {
        "power_w": float("nan"),
        "energy_wh": float("inf"),
        "current_a": float("-inf"),
        "phases": [1, 2, 3],
        "meta": {"fw": "1.2"},
        "since": datetime.date(2026, 1, 2),
        "label": 'Zählpunkt ✓ "quoted"',
        "ok": True,
        "none": None,
        "ts": "ignored",
    }
    async with Store.open(tmp_path / "buffer.db", site_id=SITE, reserve_bytes=0) as store:
        await store.add_readings(
            [("m-ü", now, odd)] + [(f"m{i % 2}", now + i, {"power_w": i * 0.5}) for i in range(7)]
        )
        rec = Recorder(mosquitto.port)
        async with running(rec.run(), "recorder"):
            await rec.connected.wait()
            uplink = make_uplink(uplink_config(mosquitto.url, readings_batch=3), store)
            async with running(uplink.run(), "uplink"):
                await wait_until(lambda: rec.readings_count() >= 8, 10, "readings")
                await wait_until(lambda: _backlog_empty(store), 10, "readings marked synced")
    assert rec.problems == []
    batches = [m.json() for m in rec.messages if "/readings/" in m.topic]
    assert all(len(b["readings"]) <= 3 for b in batches)
    by_device: dict[str, list[dict[str, object]]] = {}
    for b in batches:
        assert list(b) == ["schema", "device_id", "readings"]
        by_device.setdefault(b["device_id"], []).extend(b["readings"])
    assert by_device["m-ü"] == [
        {
            "ts": rfc3339(now),
            "power_w": None,
            "energy_wh": None,
            "current_a": None,
            "phases": "[1, 2, 3]",
            "meta": "{'fw': '1.2'}",
            "since": "2026-01-02",
            "label": 'Zählpunkt ✓ "quoted"',
            "ok": True,
            "none": None,
        }
    ]
    assert [r["power_w"] for r in by_device["m0"]] == [0.0, 1.0, 2.0, 3.0]
    assert [r["power_w"] for r in by_device["m1"]] == [0.5, 1.5, 2.5]
    assert any(m.topic.endswith("/readings/m-ü") for m in rec.messages)


async def _backlog_empty(store: Store) -> bool:
    return (await store.outbox_backlog()).get("readings", 0) == 0
