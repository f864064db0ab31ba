"""Readings stored in their wire form (gateway/wire.py): the encoder, the schema upgrade from
version 1 (rows holding only ``data``) and retention by id range."""

from __future__ import annotations

import datetime
import decimal
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import rfc3339
from gateway.store import Store
from gateway.store.schema import MIGRATIONS, SCHEMA_VERSION
from gateway.uplink.drain import reading_batches
from gateway.wire import encode_reading, readings_batch, wire_ts
from tests.support.uplink import ROOT, check_payload, pending_readings

T0 = 1_790_000_000.0  # 2026-09-21
TOPIC = ROOT + "/readings/{}"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return 1000.0


class Odd:
    def __str__(self) -> str:
        return "odd!"


ENCODER_TABLE: list[tuple[dict[Any, Any], str]] = [
    ({}, ""),
    ({"power_w": 1.5, "energy_wh": 3}, ',"power_w":1.5,"energy_wh":3'),
    ({"b": True, "n": None, "s": "x"}, ',"b":true,"n":null,"s":"x"'),
    (
        {"nan": float("nan"), "inf": float("inf"), "ninf": -1e400},
        ',"nan":null,"inf":null,"ninf":null',
    ),
    ({"ünï": "çødé ✓", "q": 'a"b\\c\n'}, ',"ünï":"çødé ✓","q":"a\\"b\\\\c\\n"'),
    ({"ts": 5, "p": 1}, ',"p":1'),  # the reading's own time wins
    ({"list": [1, 2]}, ',"list":"[1, 2]"'),
    ({"dict": {"a": 1}}, ',"dict":"{\'a\': 1}"'),
    ({"obj": Odd()}, ',"obj":"odd!"'),
    ({"dec": decimal.Decimal("1.25")}, ',"dec":"1.25"'),
    ({"d": datetime.date(2026, 1, 2)}, ',"d":"2026-01-02"'),
    ({3: 1, "z": 2}, ',"3":1,"z":2'),
    ({("a", 1): 1}, ",\"('a', 1)\":1"),  # a key JSON cannot hold becomes its text
    ({"big": 2**70, "neg": -0.0}, f',"big":{2**70},"neg":-0.0'),
]


@pytest.mark.parametrize(("values", "tail"), ENCODER_TABLE)
def test_encoder_table(values: dict[Any, Any], tail: str) -> None:
    wire = encode_reading(T0 + 0.25, values)
    assert wire == ('{"ts":"2026-09-21T14:13:20.250Z"' + tail + "}").encode()
    decoded = json.loads(wire)  # valid JSON, key order kept
    assert next(iter(decoded)) == "ts"
    body = readings_batch("cp-ü", [wire, wire])
    assert check_payload(TOPIC.format("cp-ü"), body) == []


def test_encoder_numpy_like_float_subclass() -> None:
    class F(float):
        pass

    assert json.loads(encode_reading(T0, {"a": F("nan"), "b": F(2.5)})) == {
        "ts": rfc3339(T0),
        "a": None,
        "b": 2.5,
    }


@pytest.mark.parametrize(
    "ts",
    [0.0, 1.5, T0, T0 + 0.0005, T0 + 0.0015, T0 + 0.9999996, T0 - 0.0004, 1234567890.9995, -1.25],
)
def test_wire_ts_matches_rfc3339(ts: float) -> None:
    assert wire_ts(ts) == f'{{"ts":"{rfc3339(ts)}"'


def _make_v1_buffer(path: Path, rows: list[tuple[str, float, dict[str, Any]]]) -> None:
    """A buffer as the gateway wrote it at schema version 1 (readings only in ``data``)."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_ts REAL NOT NULL)"
    )
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (1, ?)", (T0,))
    db.executemany(
        "INSERT INTO readings (device_id, ts, data) VALUES (?, ?, ?)",
        [(d, ts, json.dumps(v, separators=(",", ":"), default=str)) for d, ts, v in rows],
    )
    db.commit()
    db.close()


async def test_version_1_rows_still_drain(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = [("m1", T0 + i, {"power_w": i * 1.5, "energy_wh": i, "label": "é"}) for i in range(5)] + [
        ("m2", T0 + 9, {"ts": "stale", "x": None})
    ]
    _make_v1_buffer(path, old)
    async with Store.open(path, site_id="site-1", reserve_bytes=0, clock=Clock()) as s:
        await s.add_readings([("m1", T0 + 10, {"power_w": float("nan"), "energy_wh": 10})])
        rows = await pending_readings(s, 100)
        assert len(rows) == 7 and all(r.wire for r in rows)
        assert rows[0].values == {"power_w": 0.0, "energy_wh": 0, "label": "é"}
        assert rows[-1].values == {"power_w": None, "energy_wh": 10}
        batches = reading_batches(await s.readings_fetch_wire(100))
        assert [(dev, ids) for dev, _, ids in batches] == [
            ("m1", [rows[i].id for i in (0, 1, 2, 3, 4, 6)]),
            ("m2", [rows[5].id]),
        ]
        for dev, body, _ in batches:
            assert check_payload(TOPIC.format(dev), body) == []
        m1 = json.loads(batches[0][1])["readings"]
        assert m1[1] == {"ts": rfc3339(T0 + 1), "power_w": 1.5, "energy_wh": 1, "label": "é"}
        assert m1[-1] == {"ts": rfc3339(T0 + 10), "power_w": None, "energy_wh": 10}
        assert json.loads(batches[1][1])["readings"] == [{"ts": rfc3339(T0 + 9), "x": None}]
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "readings_by_ts" not in indexes and "readings_unsynced" not in indexes
        # every reading of the old buffer (and the new one) is still pending delivery
        assert db.execute("SELECT COUNT(*) FROM readings_pending").fetchone() == (7,)
    finally:
        db.close()


async def test_prune_by_age_walks_ids_and_skips_future_stamps(tmp_path: Path) -> None:
    day = 86_400.0
    clock = Clock(T0)
    async with Store.open(
        tmp_path / "b.db", site_id="x", reserve_bytes=0, readings_retention_days=30, clock=clock
    ) as s:
        await s.add_readings([("m1", T0 - 40 * day + i, {"p": i}) for i in range(50)])
        await s.add_readings([("m1", T0 + 400 * day, {"p": "future"})])  # a clock set wrong
        await s.add_readings([("m1", T0 - 35 * day + i, {"p": i}) for i in range(50)])
        await s.add_readings([("m1", T0 - 1 * day + i, {"p": i}) for i in range(10)])
        await s.add_readings([("m1", T0 - 50 * day, {"p": "stepped back"})])
        counts = await s.prune()
        assert counts["readings_by_age"] == 100
        left = [r.values["p"] for r in await pending_readings(s, 1000)]
        # the old reading after a recent one waits for a later prune
        assert left == ["future", *range(10), "stepped back"]
        clock.now += 30 * day  # now the 10 recent ones are past the retention too
        counts = await s.prune()
        assert counts["readings_by_age"] == 11
        assert [r.values["p"] for r in await pending_readings(s, 1000)] == ["future"]


def _reference_wire(ts: float, values: dict[Any, Any]) -> bytes:
    """The wire form as the json module alone wrote it before msgspec (the definition the fast
    path must keep, byte for byte)."""
    head = wire_ts(ts)
    plain = {int, float, str, bool, type(None)}
    if "ts" not in values and all(type(v) in plain for v in values.values()):
        try:
            body = json.dumps(values, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (ValueError, TypeError):
            body = None
        if body is not None:
            return (head + ("}" if body == "{}" else "," + body[1:])).encode()
    clean = {
        str(k): (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in values.items()
        if k != "ts"
    }
    body = json.dumps(clean, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (head + ("}" if body == "{}" else "," + body[1:])).encode()


_PLAIN_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e20, max_value=1e20),
    st.sampled_from([1e-4, 9.99999999999999e-05, 1e16, 9999999999999998.0, -0.0, 0.0, 1e-5]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)


_KEYS = st.one_of(
    st.text(max_size=8),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False),
    st.booleans(),
)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(values=st.dictionaries(_KEYS, _PLAIN_VALUES, max_size=20))
def test_fast_encoder_writes_the_same_bytes_as_the_json_module(values: dict[Any, Any]) -> None:
    assert encode_reading(T0 + 0.125, values) == _reference_wire(T0 + 0.125, values)


@pytest.mark.parametrize(
    "values",
    [
        {"mode3_state": "C2", "phase1_w": 1.5},  # keys that look like an exponent's tail
        {"mode3_state": "C2", "power_w": 1e16},
        {"mode3_state": 1.5e-7, "x1e5": 2},
        {"s": "1e5", "t": "0.00001", "p": 230.4},  # strings that do
        {"p": 10.00001, "q": 9.99e-05, "r": -1e-05},
        {1e16: 1, "e1": 2},  # a float key with an exponent
        {"a": 1e22, "b": 1.2345678901234568e17, "c": 5e-324, "d": 9999999999999998.0},
    ],
)
def test_fast_encoder_exponent_hints(values: dict[Any, Any]) -> None:
    """The exponent check (a cheap hint, then the exact pattern) never lets msgspec's exponent
    forms through, whatever the keys and strings look like."""
    assert encode_reading(T0, values) == _reference_wire(T0, values)


async def test_batches_of_any_size_keep_order_and_pending_marks(tmp_path: Path) -> None:
    """Readings go in several rows a statement plus single rows for the rest: every batch size
    around the statement's row count stores each reading once, in order, marked pending."""
    sizes = [1, 49, 50, 51, 99, 100, 101, 137, 500]
    async with Store.open(tmp_path / "b.db", site_id="s1", clock=Clock(), reserve_bytes=0) as s:
        expected: list[tuple[str, bytes]] = []
        n = 0
        for size in sizes:
            batch = [(f"cp{i % 3}", T0 + n + i, {"p": n + i, "q": 0.5}) for i in range(size)]
            n += size
            await s.add_readings(batch)
            expected += [(d, encode_reading(ts, v)) for d, ts, v in batch]
        rows = await s.readings_fetch_wire(10_000)
        assert [(d, w) for _, d, w in rows] == expected
        assert [i for i, _, _ in rows] == list(range(1, n + 1))
        await s.readings_mark_synced(list(range(1, 200)))
        assert len(await s.readings_fetch_wire(10_000)) == n - 199
    db = sqlite3.connect(tmp_path / "b.db")
    assert db.execute("SELECT COUNT(*), MAX(id) FROM readings").fetchone() == (n, n)
    db.close()


def test_fast_encoder_same_bytes_for_the_benchmark_reading() -> None:
    values = {f"v{i}": 230.0 + i * 0.37 for i in range(12)} | {"n": 7, "s": "é", "b": True}
    assert encode_reading(T0, values) == _reference_wire(T0, values)


async def test_version_2_synced_flags_become_pending_marks(tmp_path: Path) -> None:
    """Schema 3 keeps undelivered readings as ids in readings_pending: a version-2 buffer's
    unsynced rows are pending after the upgrade, its synced ones are not, and pruning a reading
    drops its mark."""
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_ts REAL NOT NULL)"
    )
    for statement in (*MIGRATIONS[0], *MIGRATIONS[1]):
        db.execute(statement)
    db.executemany("INSERT INTO schema_version VALUES (?, ?)", [(1, T0), (2, T0)])
    db.executemany(
        "INSERT INTO readings (device_id, ts, data, wire, synced) VALUES (?, ?, '', ?, ?)",
        [("m1", T0 + i, encode_reading(T0 + i, {"p": i}), int(i < 3)) for i in range(6)],
    )
    db.commit()
    db.close()
    async with Store.open(path, site_id="x", reserve_bytes=0, clock=Clock(T0 + 10)) as s:
        assert [r.values["p"] for r in await pending_readings(s, 100)] == [3, 4, 5]
        assert [w for _, _, w in await s.readings_fetch_wire(100)] == [
            encode_reading(T0 + i, {"p": i}) for i in (3, 4, 5)
        ]
        assert (await s.outbox_backlog())["readings"] == 3
        await s.readings_mark_synced([4, 6])  # ids 4 and 6: the readings p=3 and p=5
        assert [r.values["p"] for r in await pending_readings(s, 100)] == [4]
    db = sqlite3.connect(path)
    try:
        db.execute("DELETE FROM readings WHERE id = 5")  # pruned: its mark goes too
        assert db.execute("SELECT COUNT(*) FROM readings_pending").fetchone() == (0,)
    finally:
        db.close()
