"""A buffer that never lies: a real SQLite file damaged on purpose (a page overwritten) is found at
start, reported, moved aside and salvaged into a fresh buffer; the read-only tools say so in one
line; file modes are 0600 whatever the umask; a file system turning read-only mid-run keeps what
was committed."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.errors import StoreError
from gateway.store import Store
from gateway.store.salvage import quick_check
from tests.test_store import record, verify_chain

REPO = Path(__file__).resolve().parent.parent
SESSIONS = 60


async def _buffer(path: Path) -> None:
    """A buffer whose finished sessions span many pages, with unsent outbox rows and an open
    session; closed cleanly (the WAL checkpointed into the file)."""
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        for i in range(SESSIONS):
            await s.finish_session(record(f"s{i:03d}", flags=["x" * 600]))
        await s.save_open_session("open-1", "cp2", {"started_at": "2026-09-21T10:00:00Z"})
        await s.kv_put("tariffs", {"version": 3})


def _leaf_pages(path: Path, table: str) -> list[int]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (table,),
        ).fetchall()
        size = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    assert len(rows) >= 3, rows
    assert size == 4096
    return [int(r[0]) for r in rows]


def _damage(path: Path, page: int) -> None:
    """Overwrite one whole page with garbage, as a failing SD card would."""
    with path.open("r+b") as fh:
        fh.seek((page - 1) * 4096)
        fh.write(bytes([0xA5]) * 4096)


@pytest.fixture
async def damaged(tmp_path: Path) -> Path:
    path = tmp_path / "buffer.db"
    await _buffer(path)
    leaves = _leaf_pages(path, "finished_sessions")
    _damage(path, leaves[len(leaves) // 2])
    assert quick_check(path) is not None
    return path


async def test_damaged_buffer_is_moved_aside_and_salvaged(damaged: Path) -> None:
    with capture_logs() as logs:
        async with Store.open(damaged, site_id="depot-7", reserve_bytes=0) as s:
            finished = await s.finished_sessions()
            opened = await s.load_open_sessions()
            assert await s.kv_get("tariffs") == {"version": 3}
            rows = await s.outbox_fetch("session", 1000)
            # The gateway goes on: the next session continues the chain.
            sealed = await s.finish_session(record("after"))
    events = {e["event"]: e for e in logs}
    assert events["store_damaged"]["log_level"] == "error"
    moved = Path(events["store_damaged"]["moved_to"])
    assert moved.is_file() and moved.name.startswith("buffer.db.damaged-")  # noqa: ASYNC240
    salvaged = events["store_salvaged"]
    # The rows on the lost page were not yet acknowledged: their outbox messages bring them back.
    assert salvaged["unreadable"] == {"finished_sessions": "database disk image is malformed"}
    assert salvaged["rebuilt_from_outbox"] > 0
    assert salvaged["finished_sessions_lost_seqs"] == []
    verify_chain(finished)
    assert len(finished) == SESSIONS
    assert [o["session_id"] for o in opened] == ["open-1"]
    assert {json.loads(r.payload)["session_id"] for r in rows} == {
        r["session_id"] for r in finished
    }
    assert sealed.seq == SESSIONS + 1
    assert quick_check(damaged) is None
    # The damaged copy is left as it was, for a person to look at.
    assert quick_check(moved) is not None


async def test_lost_outbox_page_requeues_unsynced_sessions(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    await _buffer(path)
    leaves = _leaf_pages(path, "outbox")
    _damage(path, leaves[len(leaves) // 2])
    with capture_logs() as logs:
        async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
            finished = await s.finished_sessions()
            rows = await s.outbox_fetch("session", 1000)
    salvaged = next(e for e in logs if e["event"] == "store_salvaged")
    assert salvaged["requeued"] > 0
    verify_chain(finished)
    assert sorted(json.loads(r.payload)["session_id"] for r in rows) == sorted(
        r["session_id"] for r in finished
    )


async def test_lost_page_of_delivered_sessions_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    await _buffer(path)
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        await s.outbox_ack([r.id for r in await s.outbox_fetch("session", 1000)])
    leaves = _leaf_pages(path, "finished_sessions")
    _damage(path, leaves[len(leaves) // 2])
    with capture_logs() as logs:
        async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
            finished = await s.finished_sessions()
    salvaged = next(e for e in logs if e["event"] == "store_salvaged")
    lost = salvaged["finished_sessions_lost_seqs"]
    # Delivered already (the cloud holds them), so the buffer says which seqs it lost.
    assert 0 < len(lost) <= 10
    assert {r["seq"] for r in finished} == set(range(1, SESSIONS + 1)) - set(lost)


async def test_read_only_open_of_damaged_buffer_is_one_clear_error(damaged: Path) -> None:
    with pytest.raises(StoreError) as info:
        async with Store.open(damaged, site_id="depot-7", create=False):
            pass
    assert "the local buffer is damaged" in str(info.value)
    assert damaged.is_file()  # noqa: ASYNC240 (read-only tools never move it)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "argv",
    [
        ["sessions"],
        ["report", "--by", "user", "--from", "2026-09-01", "--to", "2026-10-01"],
        ["verify"],
    ],
)
async def test_cli_tools_on_damaged_buffer_print_one_line(
    damaged: Path, tmp_path: Path, argv: list[str]
) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(
        f"site: {{id: depot-7, timezone: Europe/Berlin}}\nstorage: {{path: {damaged}}}\n"
    )
    proc = _cli(*argv, "-c", str(config))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "damaged" in lines[0]


@pytest.mark.e2e
async def test_cli_tools_on_garbage_file_print_one_line(tmp_path: Path) -> None:
    buffer = tmp_path / "buffer.db"
    buffer.write_bytes(b"this is no database\n" * 500)
    config = tmp_path / "site.yaml"
    config.write_text(
        f"site: {{id: depot-7, timezone: Europe/Berlin}}\nstorage: {{path: {buffer}}}\n"
    )
    proc = _cli("sessions", "-c", str(config))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


async def test_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "buffer.db"
        async with Store.open(path, site_id="depot-7", reserve_bytes=64 * 1024) as s:
            await s.finish_session(record("s1"))
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        # An existing buffer left world-readable by an older version is tightened.
        os.chmod(path, 0o644)
        async with Store.open(path, site_id="depot-7", reserve_bytes=0):
            pass
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


async def test_writes_refused_mid_run_keep_what_was_committed(tmp_path: Path) -> None:
    """A file system that turns read-only under a running gateway. It cannot be staged for real
    here: the kernel refuses to remount a file system read-only while a file on it is open for
    writing (EBUSY), and neither device-mapper nor ext4's trigger_fs_error is available in this
    VM. So SQLite itself is made to refuse writes (``PRAGMA query_only``: the SQLITE_READONLY
    path every write then takes) on the live connection."""
    path = tmp_path / "b.db"
    async with Store.open(path, site_id="depot-7", reserve_bytes=64 * 1024) as s:
        for i in range(1, 6):
            await s.finish_session(record(f"s{i}"))
        await s._conn().execute("PRAGMA query_only=1")
        errors = []
        for i in range(6, 9):
            with pytest.raises(StoreError) as info:
                await s.finish_session(record(f"s{i}"))
            errors.append(str(info.value))
        await s.add_readings([("m1", 2.0, {"p": 2})])  # readings give way without raising
        assert [r["session_id"] for r in await s.finished_sessions()] == [
            f"s{i}" for i in range(1, 6)
        ]
        await s._conn().execute("PRAGMA query_only=0")
    assert all("readonly" in e and "Traceback" not in e for e in errors), errors
    assert len({e.count("\n") for e in errors}) == 1 and "\n" not in errors[0]
    async with Store.open(path, site_id="depot-7", reserve_bytes=0) as s:
        recs = await s.finished_sessions()
    verify_chain(recs)
    assert [r["session_id"] for r in recs] == [f"s{i}" for i in range(1, 6)]
