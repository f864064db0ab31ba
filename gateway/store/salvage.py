"""A damaged buffer: found at start, moved aside, and what can still be read carried over.

``quick_check`` runs SQLite's own structural check (``PRAGMA quick_check``: every page of every
b-tree, without the slower index-content cross-check of ``integrity_check``). ``move_aside``
renames the file and its WAL and shared-memory files together, so the damaged copy stays openable
for a person who wants to look at it. ``salvage`` copies every row of the tables that matter
(finished and open sessions, the outbox with its unsent messages, small state) that SQLite can
still read, scanning each table from both ends so that one bad page in the middle costs only the
rows on it. Readings are not carried over: they are the one thing the buffer lets go of first.

All of it is blocking sqlite3 work, run through ``asyncio.to_thread`` by the Store.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from gateway.outgoing import SESSION_STREAM, SESSION_TOPIC
from gateway.records import SessionRecord
from gateway.store.failures import is_damage
from gateway.store.finished import INSERT_FINISHED, finished_row

__all__ = [
    "SALVAGED_TABLES",
    "SalvageReport",
    "companion_files",
    "is_sqlite_file",
    "move_aside",
    "quick_check",
    "salvage",
    "secure_file",
]

# Order matters only for readability of the report: no foreign keys are declared.
SALVAGED_TABLES = (
    "finished_sessions",
    "outbox",
    "open_sessions",
    "session_points",
    "kv",
    "request_ids",
    "auth_cache",
)
_SUFFIXES = ("", "-wal", "-shm", "-journal")


def companion_files(path: Path) -> list[Path]:
    """The database file and the files SQLite keeps next to it."""
    return [path.with_name(path.name + s) for s in _SUFFIXES]


def secure_file(path: Path) -> None:
    """Owner read/write only (0600), whatever the umask: the buffer holds user ids, tokens and
    billing records. SQLite gives the WAL and -shm files the database file's mode."""
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    for p in companion_files(path):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)


def is_sqlite_file(path: Path) -> bool:
    """The file starts with SQLite's magic header. A file that does not is no buffer at all (a
    wrong storage.path, say): it is refused, never moved aside."""
    with path.open("rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def quick_check(path: Path) -> str | None:
    """None when ``path`` is a sound SQLite file; else one line saying what is wrong. Errors that
    are not damage (locked, permission denied) are raised as they are."""
    # Read-write (never create): a read-only open of a WAL database fails without its -shm file.
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5.0)
    try:
        rows = db.execute("PRAGMA quick_check(20)").fetchall()
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            return str(exc)
        raise
    finally:
        db.close()
    problems = [str(r[0]) for r in rows]
    if problems == ["ok"]:
        return None
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")


def move_aside(path: Path, now: float | None = None) -> Path:
    """Rename the database and its companions to ``<name>.damaged-<UTC time>``; the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    for suffix in _SUFFIXES:
        src = path.with_name(path.name + suffix)
        if src.exists():
            os.replace(src, target.with_name(target.name + suffix))
    return target


@dataclass
class SalvageReport:
    """Rows carried over per table, and the tables (with the reason) that could not be read."""

    copied: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    seq_gaps: list[int] = field(default_factory=list)  # finished-session seqs missing
    rebuilt_from_outbox: int = 0  # finished rows lost, rebuilt from their unsent outbox message
    requeued: int = 0  # unsynced finished sessions whose outbox message was lost, queued again


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [str(r[1]) for r in db.execute(f"PRAGMA table_info({table})").fetchall()]


def _scan(db: sqlite3.Connection, sql: str, rows: dict[int, tuple[object, ...]]) -> str | None:
    """Add (rowid -> row) from ``sql`` until the first unreadable page; the error, if any."""
    try:
        for row in db.execute(sql):
            rows.setdefault(int(row[0]), tuple(row[1:]))
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None


def _rebuild_finished(dst: sqlite3.Connection) -> int:
    """A sealed record lives twice until it is acknowledged: in finished_sessions and as the
    payload of its outbox message. A finished row on a lost page comes back from the outbox."""
    have = {int(r[0]) for r in dst.execute("SELECT seq FROM finished_sessions")}
    rebuilt = 0
    rows = dst.execute(
        "SELECT id, payload, created_ts FROM outbox WHERE stream = ? ORDER BY id", (SESSION_STREAM,)
    ).fetchall()
    for outbox_id, payload, created_ts in rows:
        try:
            rec = json.loads(payload)
            seq = int(rec["seq"])
            site_id, session_id, hash_ = str(rec["site_id"]), str(rec["session_id"]), rec["hash"]
        except (ValueError, TypeError, KeyError):
            continue
        if seq in have:
            continue
        typed: SessionRecord | None
        try:
            typed = SessionRecord.from_dict(rec)
        except ValidationError:  # kept and still sent, but no query finds it by its columns
            typed = None
        text = payload.decode() if isinstance(payload, bytes) else str(payload)
        dst.execute(
            "INSERT OR IGNORE " + INSERT_FINISHED,
            finished_row(
                site_id, seq, session_id, typed, text, str(hash_), outbox_id, float(created_ts)
            ),
        )
        have.add(seq)
        rebuilt += 1
    return rebuilt


def _requeue_unsynced(dst: sqlite3.Connection) -> int:
    """An unsynced finished session whose outbox message was on a lost page is queued again (the
    consumer deduplicates by session id, so a message that did get through costs nothing)."""
    rows = dst.execute(
        "SELECT f.seq, f.record, f.finished_ts FROM finished_sessions f "
        "LEFT JOIN outbox o ON o.id = f.outbox_id "
        "WHERE f.synced_at IS NULL AND o.id IS NULL ORDER BY f.seq"
    ).fetchall()
    for seq, record, finished_ts in rows:
        cur = dst.execute(
            "INSERT INTO outbox (stream, topic, payload, qos, retain, created_ts) "
            "VALUES (?, ?, ?, 1, 0, ?)",
            (SESSION_STREAM, SESSION_TOPIC, str(record).encode(), float(finished_ts)),
        )
        dst.execute(
            "UPDATE finished_sessions SET outbox_id = ? WHERE seq = ?", (cur.lastrowid, seq)
        )
    return len(rows)


def salvage(damaged: Path, fresh: Path) -> SalvageReport:
    """Copy what can be read from ``damaged`` into the (migrated, empty) buffer ``fresh``."""
    report = SalvageReport()
    try:
        src = sqlite3.connect(f"file:{damaged}?mode=rw", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        report.unreadable["*"] = str(exc)
        return report
    dst = sqlite3.connect(fresh, timeout=30.0, isolation_level=None)
    try:
        dst.execute("BEGIN IMMEDIATE")
        for table in SALVAGED_TABLES:
            try:
                have = set(_columns(src, table))
            except sqlite3.DatabaseError as exc:
                report.unreadable[table] = str(exc)
                continue
            cols = [c for c in _columns(dst, table) if c in have]
            if not cols:
                report.unreadable[table] = "table missing"
                continue
            select = ", ".join(cols)
            rows: dict[int, tuple[object, ...]] = {}
            err = _scan(src, f"SELECT rowid, {select} FROM {table} ORDER BY rowid", rows)
            if err is not None:
                # The rows behind the bad page: read from the other end until it is met again.
                _scan(src, f"SELECT rowid, {select} FROM {table} ORDER BY rowid DESC", rows)
                report.unreadable[table] = err
            marks = ", ".join("?" for _ in cols)
            dst.executemany(
                f"INSERT OR IGNORE INTO {table} ({select}) VALUES ({marks})",
                [rows[k] for k in sorted(rows)],
            )
            report.copied[table] = len(rows)
        report.rebuilt_from_outbox = _rebuild_finished(dst)
        report.requeued = _requeue_unsynced(dst)
        seqs = [int(r[0]) for r in dst.execute("SELECT seq FROM finished_sessions ORDER BY seq")]
        if seqs:
            present = set(seqs)
            report.seq_gaps = [s for s in range(1, seqs[-1] + 1) if s not in present]
        dst.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            dst.execute("ROLLBACK")
        raise
    finally:
        src.close()
        dst.close()
    return report
