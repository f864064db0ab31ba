"""Scenario 3, ingest: readings per second into SQLite through ``Store.add_readings`` (batches of
500, as the app flushes them) against raw ``sqlite3`` ``executemany`` into the same tables
(schema 4: readings + readings_pending) with the same pragmas (WAL, synchronous=NORMAL), JSON
encoding of the values included on both sides (the raw side with the json module)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from bench.common import PROFILE, Result, Size, tempdir
from gateway.modbus.types import DataType
from gateway.profiles import load_profiles
from gateway.store import Store
from gateway.wire import encode_reading

TARGET_RPS = 100_000
BATCH = 500


def sample_values() -> dict[str, Any]:
    """One poll's values of the benchmark profile (numbers; strings stay strings)."""
    out: dict[str, Any] = {}
    for i, spec in enumerate(load_profiles()[PROFILE].registers):
        if spec.type.is_text:
            out[spec.name] = ""
        elif spec.type is DataType.BOOL:
            out[spec.name] = True
        elif spec.scale not in (None, 1, 1.0) or spec.type in (DataType.F32, DataType.F64):
            out[spec.name] = round(230.0 + i * 0.37, 1)
        else:
            out[spec.name] = 1000 + i * 37
    return out


def rows(n: int, devices: int = 50) -> list[tuple[str, float, dict[str, Any]]]:
    values = sample_values()
    t0 = 1_790_000_000.0
    return [(f"cp{i % devices}", t0 + i * 0.01, values) for i in range(n)]


async def gateway_ingest(
    path: Any, data: list[tuple[str, float, dict[str, Any]]]
) -> tuple[float, float]:
    """(readings/s, CPU microseconds a reading over all threads of the process)."""
    async with Store.open(path, site_id="bench", reserve_bytes=0, max_size_mb=4096) as store:
        start, cpu0 = time.perf_counter(), time.process_time()
        for i in range(0, len(data), BATCH):
            await store.add_readings(data[i : i + BATCH])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return len(data) / elapsed, cpu / len(data) * 1e6


def encode_only(data: list[tuple[str, float, dict[str, Any]]]) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    params = [
        (dev, ts, json.dumps(values, separators=(",", ":"), default=str).encode())
        for dev, ts, values in data
    ]
    return len(data) / (time.perf_counter() - start), params


def raw_ingest(
    path: Any, data: list[tuple[str, float, dict[str, Any]]], *, encoded: list[Any] | None = None
) -> float:
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL, "
        "ts REAL NOT NULL, data TEXT NOT NULL, synced INTEGER NOT NULL DEFAULT 0, wire BLOB)"
    )
    db.execute("CREATE TABLE readings_pending (id INTEGER PRIMARY KEY)")
    start = time.perf_counter()
    for i in range(0, len(data), BATCH):
        params = (
            encoded[i : i + BATCH]
            if encoded is not None
            else [
                (dev, ts, json.dumps(values, separators=(",", ":"), default=str).encode())
                for dev, ts, values in data[i : i + BATCH]
            ]
        )
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO readings (device_id, ts, data, wire) VALUES (?, ?, '', ?)", params
        )
        db.execute(
            "INSERT INTO readings_pending (id) SELECT id FROM readings ORDER BY id DESC LIMIT ?",
            (len(params),),
        )
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return len(data) / elapsed


async def run(size: Size) -> Result:
    n = size.pick(40_000, 400_000)
    result = Result("ingest", f"3. Ingest ({n:,} readings, batches of {BATCH})")
    data = rows(n)
    with tempdir() as tmp:
        raw = raw_ingest(tmp / "raw.db", data)
        gw, gw_cpu_us = await gateway_ingest(tmp / "gw.db", data)
        json_rps, encoded = encode_only(data)
        insert_rps = raw_ingest(tmp / "raw2.db", data, encoded=encoded)
    result.add("Store.add_readings", gw, "readings/s", at_least=TARGET_RPS)
    result.add("Store.add_readings CPU a reading (all threads)", gw_cpu_us, "us")
    result.add("readings/s one idle core would do at that CPU cost", 1e6 / gw_cpu_us, "1/s")
    result.add("raw sqlite3 executemany", raw, "readings/s")
    result.add("ratio gateway/raw", gw / raw, "")
    result.add("values per reading", float(len(sample_values())), "")
    result.add("json.dumps alone", json_rps, "readings/s")
    result.add("raw insert of pre-encoded rows", insert_rps, "readings/s")
    start = time.perf_counter()
    for _dev, ts, values in data:
        encode_reading(ts, values)
    result.add("gateway wire encoding alone", n / (time.perf_counter() - start), "readings/s")
    return result
