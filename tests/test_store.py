"""The SQLite buffer on real files: schema, the sealed session chain, outbox, readings, pruning,
disk full, auth state, the ``evgw sessions`` rendering."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from gateway.errors import StoreError
from gateway.model import AuthStatus, MeterPoint, Token, TokenType
from gateway.records import (
    GENESIS,
    SessionRecord,
    UnsealedRecord,
    canonical_json,
    record_hash,
    seal,
)
from gateway.store import Store
from gateway.store.cli import load_session_rows, render_sessions
from gateway.store.schema import SCHEMA_VERSION
from tests.support.records import unsealed
from tests.support.uplink import pending_readings

T0 = 1_790_000_000.0  # 2026-09-21


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, dt_s: float) -> None:
        self.now += dt_s
        self.mono += dt_s


def record(session_id: str, **extra: Any) -> UnsealedRecord:
    return unsealed(session_id, **extra)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock):  # type: ignore[no-untyped-def]
    async with Store.open(
        tmp_path / "buffer.db", site_id="depot-7", clock=clock, reserve_bytes=0
    ) as s:
        yield s


def wal_bytes(path: Path) -> int:
    wal = Path(str(path) + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def verify_chain(records: list[dict[str, Any]]) -> None:
    prev = GENESIS
    for i, rec in enumerate(records, start=1):
        assert rec["seq"] == i
        assert rec["prev_hash"] == prev
        assert rec["hash"] == record_hash(rec)
        prev = rec["hash"]


# ---------------------------------------------------------------------- schema


async def test_creates_schema_and_reopens_with_data(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "sub" / "dir" / "buffer.db"
    async with Store.open(path, site_id="depot-7", clock=clock, reserve_bytes=0) as s:
        await s.finish_session(record("s1"))
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [r[0] for r in raw.execute("SELECT version FROM schema_version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert wal_bytes(path) == 0  # close() checkpointed everything into the database
    async with Store.open(path, site_id="depot-7", clock=clock, reserve_bytes=0) as s:
        assert [r["session_id"] for r in await s.finished_sessions()] == ["s1"]
        assert (await s.finish_session(record("s2"))).seq == 2


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with Store.open(path, site_id="depot-7", reserve_bytes=0):
        pass
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this gateway"):
        await Store.open(path, site_id="depot-7", reserve_bytes=0)


async def test_garbage_file_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "buffer.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable gateway buffer"):
        await Store.open(bad, site_id="depot-7", reserve_bytes=0)
    with pytest.raises(StoreError, match="no local buffer"):
        await Store.open(tmp_path / "missing.db", site_id="depot-7", create=False)
    assert not (tmp_path / "missing.db").exists()


# ---------------------------------------------------------------------- sessions


async def test_finish_session_chains_seals_and_queues(store: Store) -> None:
    await store.save_open_session("s1", "cp1", {"started_at": T0})
    await store.add_session_point(
        "s1", MeterPoint(ts=T0, energy_wh=0, charging=True, power_w=11000)
    )
    records = [await store.finish_session(record(f"s{i}", energy_wh=1000 * i)) for i in range(1, 6)]
    sealed = [r.to_dict() for r in records]
    verify_chain(sealed)
    assert all(r["site_id"] == "depot-7" for r in sealed)
    assert await store.finished_sessions() == sealed
    assert await store.load_open_sessions() == []
    assert await store.session_points("s1") == []
    rows = await store.outbox_fetch("session", 100)
    assert [r.payload for r in rows] == [r.canonical() for r in records]
    assert {(r.topic, r.qos, r.retain) for r in rows} == {("sessions/finished", 1, False)}


async def test_the_stored_bytes_are_the_canonical_json_of_what_the_record_dumps(
    store: Store,
) -> None:
    """The typed record changes no byte: what the store writes (and so every hash and signature)
    is the canonical JSON of the record's own JSON object, numbers as int or float as given and
    absent optional keys absent."""
    unsealed = record(
        "s1",
        max_power_w=11040.5,
        charging_periods=[{"start": "2026-09-21T08:00:00.000Z", "energy_wh": 22000}],
    )
    sealed = await store.finish_session(unsealed)
    old_way = canonical_json(seal({**unsealed.to_dict(), "seq": 1, "prev_hash": GENESIS}))
    (row,) = await store.outbox_fetch("session", 10)
    assert row.payload == sealed.canonical() == old_way
    assert (await store.finished_sessions())[0] == json.loads(old_way)


async def test_finish_session_is_idempotent_on_session_id(store: Store) -> None:
    first = await store.finish_session(record("s1"))
    again = await store.finish_session(record("s1", energy_wh=99999, stop_reason="remote"))
    assert again == first
    second = await store.finish_session(record("s2"))
    assert second.seq == 2 and second.prev_hash == first.hash
    assert (await store.outbox_backlog())["session"] == 2


async def test_concurrent_finishes_get_distinct_gap_free_seqs(store: Store) -> None:
    ids = [f"s{i:02d}" for i in range(30)]
    results = await asyncio.gather(*(store.finish_session(record(i)) for i in ids + ids[:10]))
    assert sorted({r.seq for r in results}) == list(range(1, 31))
    verify_chain(await store.finished_sessions())


async def test_custom_sealer_signature_is_stored(tmp_path: Path) -> None:
    def sealer(rec: UnsealedRecord, seq: int, prev_hash: str) -> SessionRecord:
        return rec.sealed(
            seq,
            prev_hash,
            lambda digest: {"alg": "ed25519", "key_id": "test", "value": digest.decode()[::-1]},
        )

    async with Store.open(
        tmp_path / "b.db", site_id="depot-7", sealer=sealer, reserve_bytes=0
    ) as s:
        out = (await s.finish_session(record("s1"))).to_dict()
        assert out["signature"] == {"alg": "ed25519", "key_id": "test", "value": out["hash"][::-1]}
        assert (await s.finished_sessions())[0] == out


async def test_a_record_for_another_site_or_without_id_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="site_id"):
        await store.finish_session(record("s1", site_id="other"))
    with pytest.raises(ValidationError, match="session_id"):
        await store.finish_session(record(""))
    assert await store.finished_sessions() == []


async def test_cancelled_caller_cannot_cut_a_finish_in_half(store: Store) -> None:
    await store.save_open_session("s1", "cp1", {"n": 1})
    task = asyncio.create_task(store.finish_session(record("s1")))
    await asyncio.sleep(0)  # let it start its transaction
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The transaction was shielded: it either happened whole or not at all; here it ran on.
    await asyncio.sleep(0.05)
    records = await store.finished_sessions()
    backlog = await store.outbox_backlog()
    opened = await store.load_open_sessions()
    assert (len(records), backlog.get("session", 0), len(opened)) in {(1, 1, 0), (0, 0, 1)}
    assert len(records) == 1  # the shielded transaction completed


async def test_open_sessions_and_points_round_trip(store: Store, tmp_path: Path) -> None:
    await store.save_open_session("s1", "cp1", {"started_at": T0, "user": "alice", "energy_wh": 10})
    await store.save_open_session(
        "s1", "cp1", {"started_at": T0, "user": "alice", "energy_wh": 500}
    )
    await store.save_open_session("s2", "cp2", {"started_at": T0 + 5})
    points = [
        MeterPoint(ts=T0 + 60 * i, energy_wh=180 * i, charging=i % 3 != 0, power_w=10800.0)
        for i in range(10)
    ]
    for p in reversed(points):
        await store.add_session_point("s1", p)
    await store.add_session_point("s2", MeterPoint(ts=T0, energy_wh=0, charging=False))
    opened = await store.load_open_sessions()
    assert opened == [
        {
            "started_at": T0,
            "user": "alice",
            "energy_wh": 500,
            "session_id": "s1",
            "charger_id": "cp1",
        },
        {"started_at": T0 + 5, "session_id": "s2", "charger_id": "cp2"},
    ]
    assert await store.session_points("s1") == points
    await store.finish_session(record("s2", charger_id="cp2"))  # takes its open row and points
    assert await store.session_points("s2") == []
    assert [r["session_id"] for r in await store.open_sessions_rows()] == ["s1"]


async def test_finished_session_filters(store: Store) -> None:
    await store.finish_session(record("a", started_at="2026-09-01T10:00:00.000Z"))
    await store.finish_session(
        record("b", started_at="2026-09-15T10:00:00.000Z", charger_id="cp2", user={"id": "bob"})
    )
    await store.finish_session(record("c", started_at="2026-10-01T00:00:00.000Z"))
    sep_start, oct_start = 1_788_220_800.0, 1_790_812_800.0  # 2026-09-01, 2026-10-01 UTC

    def ids(rows: list[dict[str, Any]]) -> list[str]:
        return [r["session_id"] for r in rows]

    assert ids(await store.finished_sessions(since=sep_start, until=oct_start)) == ["a", "b"]
    assert ids(await store.finished_sessions(since=oct_start)) == ["c"]
    assert ids(await store.finished_sessions(user="bob")) == ["b"]
    assert ids(await store.finished_sessions(charger="cp1")) == ["a", "c"]


# ---------------------------------------------------------------------- outbox


async def test_outbox_streams_in_id_order_and_ack_marks_synced(
    store: Store, clock: FakeClock
) -> None:
    e1 = await store.enqueue("event", "sessions/started", b'{"n":1}')
    s1 = await store.finish_session(record("s1"))
    e2 = await store.enqueue("event", "sessions/started", b"{}", qos=1, retain=True)
    s2 = await store.finish_session(record("s2"))
    e3 = await store.enqueue("event", "sessions/started", b'{"n":2}', qos=0)
    assert await store.outbox_backlog() == {"event": 3, "session": 2, "readings": 0}

    events = await store.outbox_fetch("event", 10)
    assert [r.id for r in events] == [e1, e2, e3]
    assert events[1].retain and not events[0].retain and events[2].qos == 0
    assert [r.payload for r in await store.outbox_fetch("event", 10, after_id=e2)] == [b'{"n":2}']
    sessions = await store.outbox_fetch("session", 1)
    assert [json.loads(r.payload)["seq"] for r in sessions] == [1]
    sessions += await store.outbox_fetch("session", 1, after_id=sessions[0].id)
    assert [json.loads(r.payload)["session_id"] for r in sessions] == ["s1", "s2"]

    clock.advance(10)
    await store.outbox_ack([sessions[0].id, e1])
    assert await store.outbox_backlog() == {"event": 2, "session": 1, "readings": 0}
    assert [r["session_id"] for r in await store.finished_sessions(unsynced_only=True)] == ["s2"]
    rows = await store.finished_session_rows()
    assert [(r["record"]["session_id"], r["synced_at"]) for r in rows] == [
        ("s1", T0 + 10),
        ("s2", None),
    ]
    assert [r["record"] for r in rows] == [s1.to_dict(), s2.to_dict()]  # acking changes none
    # Ids are never reused: a new message after the last was acked still sorts after it.
    await store.outbox_ack([r.id for r in await store.outbox_fetch("event", 10)])
    e4 = await store.enqueue("event", "sessions/started", b"{}")
    assert e4 > e3


async def test_outbox_ack_in_large_batches(store: Store) -> None:
    ids = [await store.enqueue("event", "x", b"%d" % i) for i in range(700)]
    await store.outbox_ack(ids[:600])
    left = await store.outbox_fetch("event", 5000)
    assert [r.id for r in left] == ids[600:]


# ---------------------------------------------------------------------- readings


async def test_readings_batches_page_and_sync(store: Store) -> None:
    for b in range(3):
        await store.add_readings(
            [("m1", T0 + b * 500 + i, {"power_w": i, "energy_wh": 1000 + i}) for i in range(500)]
        )
    first = await pending_readings(store, 400)
    assert len(first) == 400 and first[0].values == {"power_w": 0, "energy_wh": 1000}
    rest = await pending_readings(store, 5000, after_id=first[-1].id)
    assert len(rest) == 1100
    assert [r.id for r in first + rest] == sorted(r.id for r in first + rest)
    await store.readings_mark_synced([r.id for r in first] + [r.id for r in rest[:600]])
    left = await pending_readings(store, 5000)
    assert [r.id for r in left] == [r.id for r in rest[600:]]
    assert (await store.outbox_backlog())["readings"] == 500


async def test_prune_by_age_keeps_sessions_and_recent_readings(
    store: Store, clock: FakeClock
) -> None:
    day = 86_400.0
    await store.add_readings([("m1", T0 - 40 * day + i, {"p": i}) for i in range(100)])
    await store.add_readings([("m1", T0 - 1 * day + i, {"p": i}) for i in range(100)])
    await store.enqueue("event", "sessions/started", b"{}")
    await store.finish_session(record("s1"))
    await store.remember_request_id("r-old")
    clock.advance(31 * day)  # now the first event, the session and the request id are old too
    await store.add_readings([("m1", clock.now, {"p": 0})])
    counts = await store.prune()
    assert counts["readings_by_age"] == 200 and counts["messages_by_age"] == 1
    assert [r.ts for r in await pending_readings(store, 1000)] == [clock.now]
    assert [r["session_id"] for r in await store.finished_sessions()] == ["s1"]
    assert (await store.outbox_backlog())["session"] == 1
    assert await store.remember_request_id("r-old") is True  # forgotten after the retention


async def _fill(store: Store, rows: int, ts: float, width: int = 400) -> None:
    pad = "x" * width
    for start in range(0, rows, 500):
        await store.add_readings([("m1", ts + start + i, {"pad": pad}) for i in range(500)])


async def test_size_cap_deletes_oldest_synced_readings_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with Store.open(
        tmp_path / "b.db", site_id="depot-7", max_size_mb=1, clock=clock, reserve_bytes=0
    ) as s:
        for i in range(20):
            await s.finish_session(record(f"s{i}"))
        await _fill(s, 6000, T0)  # ~3 MB, three times the cap
        all_ids = [r.id for r in await pending_readings(s, 10_000)]
        await s.readings_mark_synced(all_ids[:5000])  # the oldest 5000 are delivered
        assert s.size_bytes() > 1024 * 1024
        counts = await s.prune()
        assert s.size_bytes() <= 1024 * 1024
        assert counts["readings_by_size"] > 0
        # Unsynced readings were not touched; of the synced ones the newest remain.
        unsynced = [r.id for r in await pending_readings(s, 10_000)]
        assert unsynced == all_ids[5000:]
        assert len(await s.finished_sessions()) == 20
        assert (await s.outbox_backlog())["session"] == 20


async def test_size_cap_then_deletes_oldest_unsynced(tmp_path: Path, clock: FakeClock) -> None:
    async with Store.open(
        tmp_path / "b.db", site_id="depot-7", max_size_mb=1, clock=clock, reserve_bytes=0
    ) as s:
        await s.finish_session(record("s1"))
        await _fill(s, 6000, T0)
        all_ids = [r.id for r in await pending_readings(s, 10_000)]
        await s.prune()
        assert s.size_bytes() <= 1024 * 1024
        left = [r.id for r in await pending_readings(s, 10_000)]
        assert 0 < len(left) < 3000
        assert left == all_ids[-len(left) :]  # the newest survive
        verify_chain(await s.finished_sessions())


async def test_disk_full_drops_readings_but_sessions_finish(
    tmp_path: Path, clock: FakeClock
) -> None:
    """SQLite's max_page_count makes it report SQLITE_FULL exactly like a full disk."""
    async with Store.open(tmp_path / "b.db", site_id="depot-7", clock=clock, reserve_bytes=0) as s:
        await s.finish_session(record("s0"))
        raw = s._conn()
        async with raw.execute("PRAGMA page_count") as cur:
            row = await cur.fetchone()
        assert row is not None
        # a per-connection limit: readings are written on a connection of their own
        readings_writer = s._writer_now()
        await raw.execute(f"PRAGMA max_page_count={int(row[0]) + 60}")
        readings_writer.execute(f"PRAGMA max_page_count={int(row[0]) + 60}")
        with capture_logs() as logs:
            for _ in range(40):
                await _fill(s, 500, clock.now, width=200)
            assert s.readings_blocked
            dropped = [e for e in logs if e["event"] == "readings_dropped_disk_full"]
            assert len(dropped) == 1 and dropped[0]["log_level"] == "error"
            assert s.readings_dropped_total > 0
            # A session still finishes: the oldest readings give way.
            await s.save_open_session("s1", "cp1", {"started_at": T0})
            for i in range(1, 30):
                sealed = await s.finish_session(record(f"s{i}", flags=["x" * 2000]))
                assert sealed.seq == i + 1
        verify_chain(await s.finished_sessions())
        assert len(await s.finished_sessions()) == 30
        assert await s.load_open_sessions() == []
        # Space comes back: after the retry interval readings are stored again.
        await raw.execute("PRAGMA max_page_count=1073741823")
        readings_writer.execute("PRAGMA max_page_count=1073741823")
        before = len(await pending_readings(s, 100_000))
        await s.add_readings([("m1", clock.now, {"p": 1})])
        assert len(await pending_readings(s, 100_000)) == before  # still backing off
        clock.advance(60)
        with capture_logs() as logs:
            await s.add_readings([("m1", clock.now, {"p": 2})])
        assert not s.readings_blocked
        assert [e["event"] for e in logs if e["event"].startswith("readings_")] == [
            "readings_resumed"
        ]
        assert (await pending_readings(s, 100_000))[-1].values == {"p": 2}


async def test_readings_wait_for_another_writer_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """Readings are written on the loop's thread; while another process (here: connection)
    holds the write lock, the batch waits on a worker thread and the loop runs on."""
    path = tmp_path / "b.db"
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        await s.add_readings([("m1", T0, {"p": 0})])
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            batch = asyncio.create_task(
                s.add_readings([("m1", T0 + i, {"p": i}) for i in range(1, 6)])
            )
            loop = asyncio.get_running_loop()
            ticks = []
            for _ in range(10):
                before = loop.time()
                await asyncio.sleep(0.02)
                ticks.append(loop.time() - before)
            assert not batch.done()  # still waiting for the lock
            assert max(ticks) < 0.5  # the loop was not held
        finally:
            other.execute("COMMIT")
            other.close()
        await asyncio.wait_for(batch, 10)
        stored = await pending_readings(s, 100)
        assert [r.values for r in stored] == [{"p": i} for i in range(6)]


async def test_readings_keep_the_wal_below_half_the_reserve(tmp_path: Path) -> None:
    """The readings writer never checkpoints at its commits (that would hold the loop on the
    disk); it checkpoints on a worker thread as often as the main connection would."""
    path = tmp_path / "b.db"
    reserve = 512 * 1024
    async with Store.open(path, site_id="depot-7", reserve_bytes=reserve) as s:
        for n in range(40):  # ~2.6 MB of readings, 60 kB a batch
            await s.add_readings(
                [("m1", T0 + n * 200 + i, {"pad": "y" * 300}) for i in range(200)]
            )
            wal = path.with_name(path.name + "-wal").stat().st_size
            assert wal <= reserve // 2 + 200 * 1024, (n, wal)
        assert len(await pending_readings(s, 10_000)) == 8000


_TMPFS_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from gateway.store import Store
    from tests.support.records import unsealed

    def rec(i):
        return unsealed(f"s{i}", energy_wh=i, flags=["x" * 3000])

    async def main(path):
        out = {}
        async with Store.open(path, site_id="depot-7", reserve_bytes=512 * 1024) as s:
            await s.finish_session(rec(0))
            n = 0
            while not s.readings_blocked and n < 100_000:
                await s.add_readings([("m1", float(n + i), {"pad": "y" * 300}) for i in range(200)])
                n += 200
            out["readings_blocked"] = s.readings_blocked
            out["dropped"] = s.readings_dropped_total
            for i in range(1, 40):
                await s.finish_session(rec(i))
        async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
            out["seqs"] = [r["seq"] for r in await s.finished_sessions()]
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_real_full_filesystem(tmp_path: Path) -> None:
    """A 3 MB tmpfs in a private mount namespace fills up for real (ENOSPC)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(_TMPFS_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=3m tmpfs {mnt}"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    cmd = f"mount -t tmpfs -o size=3m tmpfs {mnt} && exec {sys.executable} {script} {mnt}/b.db"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd], capture_output=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out["readings_blocked"] is True and out["dropped"] > 0
    assert out["seqs"] == list(range(1, 41))


# ---------------------------------------------------------------------- small state, auth


async def test_kv_and_request_ids_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        assert await s.kv_get("tariffs") is None and await s.kv_get("nope", 7) == 7
        await s.kv_put("tariffs", json.dumps({"version": 3}))
        await s.kv_put("map", {"a": [1, 2.5, None]})
        await s.kv_put("map", {"a": [3]})
        assert await s.remember_request_id("req-1") is True
        assert await s.remember_request_id("req-1") is False
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        assert json.loads(await s.kv_get("tariffs")) == {"version": 3}
        assert await s.kv_get("map") == {"a": [3]}
        assert await s.remember_request_id("req-1") is False
        assert await s.remember_request_id("req-2") is True


async def test_auth_store_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    tokens = [
        Token("04A2B3", TokenType.RFID, "alice"),
        Token("FOB-1", TokenType.KEYFOB, "bob", AuthStatus.BLOCKED),
        Token("app-9", TokenType.APP, "carol", expires_at=T0 + 3600, group="staff"),
    ]
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        assert await s.load_cloud_list() == (0, [])
        assert await s.load_auth_cache() == []
        await s.save_cloud_list(4, tokens)
        await s.save_cloud_list(5, tokens[:2])
        await s.cache_auth(tokens[2], T0)
        await s.cache_auth(Token("FOB-1", TokenType.KEYFOB, "bob", AuthStatus.EXPIRED), T0 + 1)
        await s.cache_auth(tokens[2], T0 + 2)
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        assert await s.load_cloud_list() == (5, tokens[:2])
        assert await s.load_auth_cache() == [
            (Token("FOB-1", TokenType.KEYFOB, "bob", AuthStatus.EXPIRED), T0 + 1),
            (tokens[2], T0 + 2),
        ]


_TWICE_FULL_SCRIPT = textwrap.dedent(
    """
    import asyncio, contextlib, json, os, sys, time
    from gateway.store import Store
    from tests.support.records import unsealed

    def rec(i):
        return unsealed(f"s{i}", energy_wh=i, flags=["x" * 3000])

    def fill(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        for size in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\\0" * size)
        os.close(fd)

    async def main(db):
        out = {}
        reserve = db + ".reserve"
        filler = os.path.join(os.path.dirname(db), "filler")
        async with Store.open(db, site_id="depot-7", reserve_bytes=512 * 1024) as s:
            await s.finish_session(rec(1))
            fill(filler)  # another program fills the disk
            for i in range(2, 6):
                await s.finish_session(rec(i))
            out["released"] = not os.path.exists(reserve)
            os.unlink(filler)  # space comes back
            time.sleep(1.1)
            await s.finish_session(rec(6))
            out["retaken"] = os.path.exists(reserve)
            fill(filler)  # and the disk fills up again
            for i in range(7, 11):
                await s.finish_session(rec(i))
            os.unlink(filler)
        async with Store.open(db, site_id="depot-7", reserve_bytes=0) as s:
            out["seqs"] = [r["seq"] for r in await s.finished_sessions()]
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1]))
    """
)


def _run_on_a_3mb_tmpfs(tmp_path: Path, script_text: str) -> Any:
    """Run ``script_text`` (given the buffer path as its argument) in a private mount namespace
    with a 3 MB tmpfs, so a full disk is real; its last stdout line is JSON. Skips where no
    tmpfs can be mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(script_text)
    repo = Path(__file__).resolve().parents[1]
    cmd = f"mount -t tmpfs -o size=3m tmpfs {mnt} && exec {sys.executable} {script} {mnt}/b.db"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd], capture_output=True, env=env, timeout=120, check=False
    )
    if done.returncode != 0 and b"mount" in done.stderr and b"Traceback" not in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_second_full_disk_finds_the_reserve_retaken(tmp_path: Path) -> None:
    """The reserve given up on a full disk is taken again as soon as space is back, so a disk
    that fills up again soon after still lets sessions finish. Found by the fault matrix
    (tests/reliability): the second full disk ended the gateway with "nothing is left to free"."""
    out = _run_on_a_3mb_tmpfs(tmp_path, _TWICE_FULL_SCRIPT)
    assert out == {"released": True, "retaken": True, "seqs": list(range(1, 11))}


_RESERVE_KEPT_SCRIPT = textwrap.dedent(
    """
    import asyncio, contextlib, json, os, sys
    from gateway.store import Store
    from tests.support.records import unsealed

    def rec(i):
        return unsealed(f"s{i}", energy_wh=i, flags=["x" * 3000])

    async def main(db):
        out = {}
        filler = os.path.join(os.path.dirname(db), "filler")
        async with Store.open(db, site_id="depot-7", reserve_bytes=512 * 1024) as s:
            await s.finish_session(rec(1))
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            for size in (1 << 16, 1 << 10, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\\0" * size)
            os.close(fd)
            await s.finish_session(rec(2))  # the disk is full: the reserve is given up
            out["released"] = not os.path.exists(db + ".reserve")
            for n in range(20):  # the next readings must not eat what sessions need
                await s.add_readings([("m1", float(n * 100 + i), {"pad": "y" * 300})
                                      for i in range(100)])
            out["readings_blocked"] = s.readings_blocked
            for i in range(3, 25):
                await s.finish_session(rec(i))
            os.unlink(filler)
        async with Store.open(db, site_id="depot-7", reserve_bytes=0) as s:
            out["seqs"] = [r["seq"] for r in await s.finished_sessions()]
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_readings_never_eat_the_released_reserve(tmp_path: Path) -> None:
    """The reserve given up for a session on a full disk is for sessions: readings stop until it
    can be taken again. Found by the soak (tests/reliability): readings took the freed space,
    the next session write had nothing left to free, and the gateway could not even start."""
    out = _run_on_a_3mb_tmpfs(tmp_path, _RESERVE_KEPT_SCRIPT)
    assert out == {"released": True, "readings_blocked": True, "seqs": list(range(1, 25))}


async def test_reserve_file_is_preallocated(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "b.db", site_id="depot-7", reserve_bytes=256 * 1024):
        reserve = tmp_path / "b.db.reserve"
        assert reserve.stat().st_size == 256 * 1024
        assert reserve.stat().st_blocks * 512 >= 256 * 1024  # real blocks, not a sparse file


# ---------------------------------------------------------------------- evgw sessions


async def test_render_sessions_table_and_json(store: Store, clock: FakeClock) -> None:
    await store.save_open_session(
        "open-1", "cp2", {"started_at": T0, "user": {"id": "bob"}, "energy_wh": 1500}
    )
    await store.finish_session(record("done-1"))
    await store.finish_session(record("done-2", cost=None, user={"id": "carol"}, energy_wh=1234))
    await store.outbox_ack([(await store.outbox_fetch("session", 1))[0].id])

    rows = await load_session_rows(store)
    table = render_sessions(rows, "table").splitlines()
    assert table[0].split() == [
        "session", "charger", "user", "start", "end", "energy_kwh", "cost_incl_vat", "synced"
    ]  # fmt: skip
    assert table[1].split()[:3] == ["open-1", "cp2", "bob"] and table[1].endswith("open")
    assert "2026-09-21 08:00:00Z" in table[2] and "22.000" in table[2] and "10.21 EUR" in table[2]
    assert " yes " in table[2]
    assert table[3].split()[2] == "carol" and "1.234" in table[3] and table[3].endswith(" no")

    unsynced = await load_session_rows(store, unsynced=True)
    assert [r["record"]["session_id"] for r in unsynced] == ["done-2"]
    only_open = await load_session_rows(store, open_only=True)
    assert [r["session_id"] for r in only_open] == ["open-1"]

    data = json.loads(render_sessions(rows, "json"))
    assert [r["state"] for r in data] == ["open", "finished", "finished"]
    assert data[1]["record"] == (await store.finished_sessions())[0]
    assert render_sessions([], "table").endswith("(no sessions)")
    bare = render_sessions(await store.finished_sessions(), "table").splitlines()
    assert bare[1].endswith("?")


async def test_size_cap_is_enforced_while_adding_readings(tmp_path: Path, clock: FakeClock) -> None:
    async with Store.open(
        tmp_path / "b.db", site_id="depot-7", max_size_mb=1, clock=clock, reserve_bytes=0
    ) as s:
        await s.finish_session(record("s1"))
        await _fill(s, 10_000, T0, width=200)  # ~2.5 MB offered, no prune() call
        assert s.size_bytes() <= 1024 * 1024 + 512 * 1024
        left = await pending_readings(s, 20_000)
        assert 0 < len(left) < 10_000 and left[-1].ts == T0 + 9_999
        assert len(await s.finished_sessions()) == 1


async def test_run_sessions_prints_the_listing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.config import GatewayConfig, SiteConfig, StorageConfig
    from gateway.store.cli import run_sessions

    config = GatewayConfig(
        site=SiteConfig(id="depot-7"), storage=StorageConfig(path=str(tmp_path / "b.db"))
    )
    with pytest.raises(StoreError, match="no local buffer"):
        await run_sessions(config, open_only=False, unsynced=False, as_json=False)
    async with Store.open(tmp_path / "b.db", site_id="depot-7", reserve_bytes=0) as s:
        await s.finish_session(record("done-1"))
    capsys.readouterr()  # structlog's default printer wrote the migration line to stdout
    assert await run_sessions(config, open_only=False, unsynced=True, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["record"]["session_id"] for r in out] == ["done-1"]
