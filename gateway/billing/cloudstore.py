"""The reference cloud consumer's store: finished sessions, site keys, chain problems, rejects.

One small async interface (``CloudStore``), two back ends chosen by URL:

- ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``: the standard library's sqlite3,
  one connection used from worker threads (``asyncio.to_thread``) behind a lock;
- ``postgresql://user@host:port/db`` (or ``postgres://``): psycopg 3, imported only when such a
  URL is used. A ``?options=-csearch_path%3Dmy_schema`` in the URL puts the tables in a schema.

``record`` keeps the record's JSON text exactly as received, so ``evgw verify --db`` checks the
very bytes the gateway hashed. Inserting a session is idempotent on ``session_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from gateway.errors import GatewayError
from gateway.model import from_rfc3339
from gateway.redact import redact_url

__all__ = [
    "CloudStore",
    "CloudStoreError",
    "Problem",
    "Reject",
    "StoreUrlError",
    "StoredSession",
    "open_cloud_store",
]


class CloudStoreError(GatewayError):
    """The consumer's store cannot be opened or used (bad URL, missing driver, server down)."""


class StoreUrlError(CloudStoreError):
    """A store URL that names no supported store: a usage error."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class StoredSession:
    session_id: str
    site_id: str
    seq: int
    hash: str
    prev_hash: str
    record_json: str
    signature_ok: bool | None  # None: no key known for the site when it arrived

    @property
    def record(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.record_json)
        return result


@dataclass(frozen=True, slots=True)
class Problem:
    site_id: str
    kind: str  # gap | out_of_order | chain_break | seq_conflict | conflict | bad_signature ...
    seq: int | None
    session_id: str | None
    detail: str
    found_at: float


@dataclass(frozen=True, slots=True)
class Reject:
    topic: str
    payload: str
    reason: str
    received_at: float


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT PRIMARY KEY,
        site_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        user_id TEXT,
        charger_id TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        started_ts DOUBLE PRECISION NOT NULL,
        energy_wh BIGINT NOT NULL,
        currency TEXT,
        incl_vat TEXT,
        hash TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        signature_ok BOOLEAN,
        record TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_site_seq ON sessions (site_id, seq)",
    "CREATE INDEX IF NOT EXISTS sessions_user_start ON sessions (user_id, started_ts)",
    """CREATE TABLE IF NOT EXISTS site_keys (
        site_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        alg TEXT NOT NULL,
        public_key_pem TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (site_id, key_id)
    )""",
    """CREATE TABLE IF NOT EXISTS chain_problems (
        site_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        seq BIGINT,
        session_id TEXT,
        detail TEXT NOT NULL,
        found_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rejects (
        topic TEXT NOT NULL,
        payload TEXT NOT NULL,
        reason TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
    )""",
)

_MIGRATION_LOCK = 0x65766777  # "evgw": pg_advisory_xact_lock key of the table set-up
_SESSION_COLUMNS = "session_id, site_id, seq, hash, prev_hash, record, signature_ok"


def _stored(row: Sequence[Any]) -> StoredSession:
    sid, site, seq, h, prev, rec, sig = row
    return StoredSession(
        session_id=sid,
        site_id=site,
        seq=int(seq),
        hash=h,
        prev_hash=prev,
        record_json=rec,
        signature_ok=None if sig is None else bool(sig),
    )


class CloudStore(ABC):
    """The consumer's tables. Every method is a coroutine; SQL is written once with ``?``."""

    url: str

    # -- the two primitives each back end provides -------------------------------------------

    @abstractmethod
    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    @abstractmethod
    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one query; all its rows."""

    @abstractmethod
    async def close(self) -> None: ...

    async def migrate(self) -> None:
        for statement in _SCHEMA:
            await self._execute(statement)

    # -- sessions ------------------------------------------------------------------------------

    async def insert_session(
        self,
        record: dict[str, Any],
        record_json: str,
        *,
        signature_ok: bool | None,
        received_at: float | None = None,
    ) -> bool:
        """Store a (validated) record; False when its session_id is already stored."""
        cost = record.get("cost") or {}
        user = record.get("user") or {}
        changed = await self._execute(
            "INSERT INTO sessions (session_id, site_id, seq, user_id, charger_id, started_at, "
            "ended_at, started_ts, energy_wh, currency, incl_vat, hash, prev_hash, signature_ok, "
            "record, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (session_id) DO NOTHING",
            (
                record["session_id"],
                record["site_id"],
                int(record["seq"]),
                user.get("id"),
                record["charger_id"],
                record["started_at"],
                record["ended_at"],
                from_rfc3339(record["started_at"]),
                int(record["energy_wh"]),
                cost.get("currency"),
                cost.get("incl_vat"),
                record["hash"],
                record["prev_hash"],
                signature_ok,
                record_json,
                time.time() if received_at is None else received_at,
            ),
        )
        return changed > 0

    async def get_session(self, session_id: str) -> StoredSession | None:
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        )
        return _stored(rows[0]) if rows else None

    async def session_at(self, site_id: str, seq: int) -> list[StoredSession]:
        """Sessions stored with this seq (more than one only when a site reused a seq)."""
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE site_id = ? AND seq = ?",
            (site_id, seq),
        )
        return [_stored(r) for r in rows]

    async def max_seq(self, site_id: str) -> int | None:
        rows = await self._fetch("SELECT MAX(seq) FROM sessions WHERE site_id = ?", (site_id,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    async def set_signature_ok(self, session_id: str, ok: bool) -> None:
        await self._execute(
            "UPDATE sessions SET signature_ok = ? WHERE session_id = ?", (ok, session_id)
        )

    async def unchecked_sessions(self, site_id: str) -> list[StoredSession]:
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE site_id = ? AND signature_ok IS NULL",
            (site_id,),
        )
        return [_stored(r) for r in rows]

    async def sessions(self, site_id: str | None = None) -> list[StoredSession]:
        """Every stored session (of one site), ordered by site and seq."""
        where, params = ("WHERE site_id = ? ", (site_id,)) if site_id is not None else ("", ())
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions {where}ORDER BY site_id, seq, session_id",
            params,
        )
        return [_stored(r) for r in rows]

    async def user_sessions(self, user_id: str, since_ts: float, until_ts: float) -> list[str]:
        """Record JSON of a user's sessions that started in [since_ts, until_ts), by start."""
        rows = await self._fetch(
            "SELECT record FROM sessions WHERE user_id = ? AND started_ts >= ? AND started_ts < ? "
            "ORDER BY started_ts, site_id, seq",
            (user_id, since_ts, until_ts),
        )
        return [r[0] for r in rows]

    async def missing_seqs(self, site_id: str) -> list[tuple[int, int]]:
        """Gaps in a site's seq as (first missing, last missing) ranges, from seq 1 on."""
        rows = await self._fetch(
            "SELECT seq FROM (SELECT DISTINCT seq FROM sessions WHERE site_id = ?) s ORDER BY seq",
            (site_id,),
        )
        gaps: list[tuple[int, int]] = []
        expected = 1
        for (seq,) in rows:
            if int(seq) > expected:
                gaps.append((expected, int(seq) - 1))
            expected = int(seq) + 1
        return gaps

    async def site_ids(self) -> list[str]:
        rows = await self._fetch("SELECT DISTINCT site_id FROM sessions ORDER BY site_id")
        return [r[0] for r in rows]

    # -- keys, problems, rejects ---------------------------------------------------------------

    async def put_site_key(self, site_id: str, key_id: str, alg: str, public_key_pem: str) -> bool:
        """Remember a site's public key; False when it was known already."""
        changed = await self._execute(
            "INSERT INTO site_keys (site_id, key_id, alg, public_key_pem, received_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (site_id, key_id) DO NOTHING",
            (site_id, key_id, alg, public_key_pem, time.time()),
        )
        return changed > 0

    async def site_keys(self) -> dict[tuple[str, str], str]:
        """{(site_id, key_id): public key PEM} of every key ever learnt."""
        rows = await self._fetch("SELECT site_id, key_id, public_key_pem FROM site_keys")
        return {(s, k): pem for s, k, pem in rows}

    async def add_problem(
        self,
        site_id: str,
        kind: str,
        detail: str,
        seq: int | None = None,
        session_id: str | None = None,
    ) -> None:
        await self._execute(
            "INSERT INTO chain_problems (site_id, kind, seq, session_id, detail, found_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (site_id, kind, seq, session_id, detail, time.time()),
        )

    async def problems(self, site_id: str | None = None) -> list[Problem]:
        where, params = ("WHERE site_id = ? ", (site_id,)) if site_id is not None else ("", ())
        rows = await self._fetch(
            "SELECT site_id, kind, seq, session_id, detail, found_at FROM chain_problems "
            f"{where}ORDER BY found_at",
            params,
        )
        return [
            Problem(s, k, None if q is None else int(q), sid, d, float(f))
            for s, k, q, sid, d, f in rows
        ]

    async def add_reject(self, topic: str, payload: str, reason: str) -> None:
        await self._execute(
            "INSERT INTO rejects (topic, payload, reason, received_at) VALUES (?, ?, ?, ?)",
            (topic, payload, reason, time.time()),
        )

    async def rejects(self) -> list[Reject]:
        rows = await self._fetch(
            "SELECT topic, payload, reason, received_at FROM rejects ORDER BY received_at"
        )
        return [Reject(t, p, r, float(at)) for t, p, r, at in rows]


class _SqliteCloudStore(CloudStore):
    def __init__(self, url: str, conn: sqlite3.Connection) -> None:
        self.url = url
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, path: Path) -> _SqliteCloudStore:
        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a stored session is acknowledged upstream
            conn.execute("PRAGMA busy_timeout=5000")
            return conn

        try:
            conn = await asyncio.to_thread(connect)
        except (sqlite3.Error, OSError) as exc:
            raise CloudStoreError(f"{path}: cannot open the consumer store: {exc}") from None
        return cls(url, conn)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._lock:
            cursor = await asyncio.to_thread(self._conn.execute, sql, tuple(params))
            return cursor.rowcount

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            return self._conn.execute(sql, tuple(params)).fetchall()

        async with self._lock:
            return await asyncio.to_thread(run)

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._conn.close)


class _PostgresCloudStore(CloudStore):
    def __init__(self, url: str, conn: Any) -> None:
        self.url = url
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str) -> _PostgresCloudStore:
        try:
            import psycopg
        except ImportError:
            raise CloudStoreError(
                "a postgresql:// store needs psycopg 3: pip install 'psycopg[binary]'"
            ) from None
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CloudStoreError(f"cannot connect to {_redact(url)}: {_redact(first)}") from None
        return cls(url, conn)

    async def migrate(self) -> None:
        # concurrent CREATE TABLE IF NOT EXISTS race in PostgreSQL (a unique violation in
        # pg_type): consumers starting together take turns under an advisory lock
        async with self._lock, self._conn.transaction():
            await self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            for statement in _SCHEMA:
                await self._conn.execute(statement)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._lock:
            cursor = await self._conn.execute(sql.replace("?", "%s"), tuple(params))
            return int(cursor.rowcount)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._lock:
            cursor = await self._conn.execute(sql.replace("?", "%s"), tuple(params))
            rows: list[tuple[Any, ...]] = await cursor.fetchall()
            return rows

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()


def _redact(url: str) -> str:
    return redact_url(url)


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel.db`` -> rel.db, ``sqlite:////abs/x.db`` -> /abs/x.db."""
    rest = url[len("sqlite://") :]
    if not rest.startswith("/") or len(rest) < 2:
        raise StoreUrlError(f"{_redact(url)}: expected sqlite:///path.db")
    return Path(unquote(rest[1:]))


@contextlib.asynccontextmanager
async def open_cloud_store(url: str) -> AsyncIterator[CloudStore]:
    """Open (creating the tables as needed) the store named by ``url``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    store: CloudStore
    if scheme == "sqlite":
        store = await _SqliteCloudStore.open(url, sqlite_path(url))
    elif scheme in ("postgresql", "postgres"):
        store = await _PostgresCloudStore.open(url)
    else:
        raise StoreUrlError(
            f"{_redact(url)!r}: unsupported store URL (use sqlite:///path.db or postgresql://...)"
        )
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()
