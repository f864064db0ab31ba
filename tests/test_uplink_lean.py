"""``uplink.readings``: the cloud gets one reading per device and interval (last, mean or
min_max) while the local buffer keeps every reading; against a real mosquitto."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from test_uplink_mqtt import make_uplink, uplink_config

from gateway.config import UplinkReadingsConfig
from gateway.model import rfc3339
from gateway.store import Store
from gateway.uplink.lean import LeanReadings
from gateway.wire import encode_reading
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import SITE, Recorder, running, wait_until

T0 = 1_790_000_040.0  # a minute boundary (1_790_000_040 / 60 = 29_833_334)


def _fold(mode: str, readings: list[tuple[str, float, dict[str, Any]]]) -> list[Any]:
    lean = LeanReadings(60, mode)
    out = []
    for i, (dev, ts, values) in enumerate(readings):
        out += lean.add(i + 1, dev, ts, values)
    return out + lean.due(math.inf)


MINUTE = [
    ("cp1", T0 + s, {"power_w": float(s), "energy_wh": 100 + s, "st": f"s{s}"}) for s in (0, 20, 40)
]


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("last", {"power_w": 40.0, "energy_wh": 140, "st": "s40"}),
        ("mean", {"power_w": 20.0, "energy_wh": 120.0, "st": "s40"}),
        (
            "min_max",
            {
                "power_w": 40.0,
                "energy_wh": 140,
                "st": "s40",
                "power_w_min": 0.0,
                "power_w_max": 40.0,
                "energy_wh_min": 100,
                "energy_wh_max": 140,
            },
        ),
    ],
)
def test_modes_fold_a_minute(mode: str, values: dict[str, Any]) -> None:
    [agg] = _fold(mode, MINUTE)
    assert (agg.device_id, agg.ts, agg.values, agg.ids) == ("cp1", T0 + 40, values, [1, 2, 3])


def test_intervals_align_to_the_clock_per_device_and_close_on_time() -> None:
    lean = LeanReadings(60, "last", grace_s=3)
    assert lean.add(1, "cp1", T0 + 59, {"p": 1}) == []
    assert lean.add(2, "cp2", T0 + 59.5, {"p": 2}) == []
    [first] = lean.add(3, "cp1", T0 + 60, {"p": 3})  # the next minute closes cp1's
    assert (first.device_id, first.ids) == ("cp1", [1])
    assert lean.held == 2
    assert lean.due(T0 + 62.9) == []  # cp2's minute ended, but within the grace
    [quiet] = lean.due(T0 + 63)
    assert (quiet.device_id, quiet.ids) == ("cp2", [2])
    # a reading whose minute was already sent (clock stepped back) is not dropped
    [late] = lean.add(4, "cp1", T0 + 30, {"p": 4})
    assert late.ids == [3]
    assert [a.ids for a in lean.due(math.inf)] == [[4]]


def test_mean_skips_missing_and_non_numbers() -> None:
    rows = [
        ("m", T0, {"p": 1.0, "flag": True}),
        ("m", T0 + 1, {"p": None, "flag": False}),
        ("m", T0 + 2, {"p": 2.0, "flag": True}),
    ]
    [agg] = _fold("mean", rows)
    assert agg.values == {"p": 1.5, "flag": True}


def test_wire_rows_fold_like_values() -> None:
    lean = LeanReadings(60, "mean")
    rows = [(i + 1, d, encode_reading(ts, v)) for i, (d, ts, v) in enumerate(MINUTE)]
    assert lean.add_wire(rows) == []
    [agg] = lean.due(math.inf)
    assert agg.ts == pytest.approx(T0 + 40) and agg.values["power_w"] == 20.0


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        LeanReadings(60, "median")
    with pytest.raises(ValueError, match="interval"):
        LeanReadings(0, "last")


async def test_cloud_gets_one_mean_a_minute_and_the_buffer_keeps_every_reading(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # three finished minutes for two chargers (one reading a second), and the current minute
    now = time.time()
    start = (now // 60 - 3) * 60
    rows = [
        (dev, start + s, {"power_w": float(s % 60) * k, "energy_wh": 1000 * k + s})
        for s in range(180)
        for dev, k in (("cp1", 1), ("cp2", 2))
    ]
    current = [("cp1", now, {"power_w": 7.0, "energy_wh": 9999})]
    cfg = uplink_config(mosquitto.url, readings=UplinkReadingsConfig(interval_s=60, mode="mean"))
    db = tmp_path / "buffer.db"
    async with Store.open(db, site_id=SITE, reserve_bytes=0) as store:
        await store.add_readings(rows)
        await store.add_readings(current)
        rec = Recorder(mosquitto.port)
        async with running(rec.run(), "recorder"):
            await rec.connected.wait()
            async with running(make_uplink(cfg, store).run(), "uplink"):
                await wait_until(lambda: rec.readings_count() >= 6, 10, "six aggregates")
                # delivered = the three minutes; the open minute stays pending
                await wait_until(
                    lambda: _pending(store, 1), 10, "the folded readings marked delivered"
                )
    assert rec.problems == []
    got: dict[str, list[dict[str, Any]]] = {}
    for m in rec.messages:
        if "/readings/" in m.topic:
            body = json.loads(m.payload)
            got.setdefault(body["device_id"], []).extend(body["readings"])
    for dev, k in (("cp1", 1), ("cp2", 2)):
        assert [r["ts"] for r in got[dev]] == [rfc3339(start + 60 * m + 59) for m in range(3)]
        assert [r["power_w"] for r in got[dev]] == [29.5 * k] * 3
        assert [r["energy_wh"] for r in got[dev]] == [1000 * k + 60 * m + 29.5 for m in range(3)]
    con = sqlite3.connect(db)
    try:  # full resolution stays local
        assert con.execute("SELECT COUNT(*) FROM readings").fetchone() == (361,)
    finally:
        con.close()


async def _pending(store: Store, n: int) -> bool:
    return (await store.outbox_backlog()).get("readings", 0) == n
