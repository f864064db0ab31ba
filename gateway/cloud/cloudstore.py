"""The reference cloud consumer's store: trusted sessions, site keys, chain problems, quarantine.

One small async interface (``CloudStore``), two back ends chosen by URL:

- ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``: the standard library's sqlite3,
  one connection used from worker threads (``asyncio.to_thread``) behind a lock;
- ``postgresql://user@host:port/db`` (or ``postgres://``): psycopg 3, imported only when such a
  URL is used. A ``?options=-csearch_path%3Dmy_schema`` in the URL puts the tables in a schema.

``record`` keeps the record's JSON text exactly as received, so ``evgw verify --db`` checks the
very bytes the gateway hashed. Inserting a session is idempotent on ``session_id``.

``sessions`` holds only records the consumer trusts (hash, signature by a trusted key of the
site, fields in range); everything else goes to ``quarantine`` with the raw payload and the
reason, and is never billed. ``site_keys`` is the trust store: per site the keys that sign its
records, each ``active``, ``retired`` (replaced by a rotation; records it signed still verify) or
``revoked`` (records it signs are quarantined).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from gateway.cloud.schema import ADDED_COLUMNS, MIGRATION_LOCK, SCHEMA, UNTRUSTED_SESSIONS
from gateway.errors import GatewayError, UsageError
from gateway.model import from_rfc3339
from gateway.records import SessionRecord
from gateway.redact import redact_url

__all__ = [
    "CloudStore",
    "CloudStoreError",
    "NoSuchStoreError",
    "Problem",
    "Quarantined",
    "SiteKey",
    "StoreUrlError",
    "StoredSession",
    "open_cloud_store",
]


_BUSY_S = 30.0  # how long a consumer store connection waits for another's lock


class CloudStoreError(GatewayError):
    """The consumer's store cannot be opened or used (bad URL, missing driver, server down)."""


class StoreUrlError(CloudStoreError, UsageError):
    """A store URL that names no supported store: a usage error."""


class NoSuchStoreError(CloudStoreError, UsageError):
    """A reading command named a store that does not exist (a mistyped path): nothing is
    created, exit 2."""


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
class Quarantined:
    """A message the consumer does not trust: kept with its raw payload, never billed."""

    qid: str
    kind: str  # schema | range | site_mismatch | hash | unsigned | bad_signature | unknown_key
    #            | revoked_key | no_key | unknown_site | conflict | key
    reason: str
    topic: str
    payload: str
    site_id: str | None
    session_id: str | None
    seq: str | None  # as text: a seq out of range is kept as it came
    user_id: str | None
    started_ts: float | None
    received_at: float
    released_at: float | None
    resolution: str | None  # stored | superseded | dismissed: <the operator's note>


@dataclass(frozen=True, slots=True)
class SiteKey:
    site_id: str
    key_id: str
    alg: str
    public_key_pem: str
    status: str  # active | retired | revoked
    source: str  # first_use | trust_dir | rotation | operator | legacy
    received_at: float
    note: str | None


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


def _quarantined(row: Sequence[Any]) -> Quarantined:
    qid, kind, reason, topic, payload, site, sid, seq, user, started, received, rel, res = row
    return Quarantined(
        qid=qid,
        kind=kind,
        reason=reason,
        topic=topic,
        payload=payload,
        site_id=site,
        session_id=sid,
        seq=seq,
        user_id=user,
        started_ts=None if started is None else float(started),
        received_at=float(received),
        released_at=None if rel is None else float(rel),
        resolution=res,
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

    async def _of_site(self, select: str, site_id: str | None, order: str) -> list[tuple[Any, ...]]:
        """The rows of ``select`` (``SELECT ... FROM table``) of one site, or of all."""
        if site_id is None:
            return await self._fetch(f"{select} ORDER BY {order}")
        return await self._fetch(f"{select} WHERE site_id = ? ORDER BY {order}", (site_id,))

    @abstractmethod
    async def _columns(self, table: str) -> set[str]:
        """The column names of a table; empty when there is no such table."""

    async def migrate(self) -> None:
        for statement in SCHEMA:
            await self._execute(statement)
        await self._upgrade()

    async def has_tables(self) -> bool:
        return bool(await self._columns("sessions"))

    async def _upgrade(self) -> None:
        """Bring tables of earlier versions up to date (idempotent)."""
        have = await self._columns("site_keys")
        for table, column, definition in ADDED_COLUMNS:
            if column not in have:
                await self._execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        if await self._columns("rejects"):
            rows = await self._fetch("SELECT topic, payload, reason, received_at FROM rejects")
            for topic, payload, reason, received_at in rows:
                await self._execute(
                    "INSERT INTO quarantine (qid, kind, reason, topic, payload, received_at) "
                    "VALUES (?, 'legacy', ?, ?, ?, ?)",
                    (uuid.uuid4().hex, reason, topic, payload, received_at),
                )
            await self._execute("DROP TABLE rejects")
        for statement in UNTRUSTED_SESSIONS:
            await self._execute(statement)

    # -- sessions ------------------------------------------------------------------------------

    async def insert_session(
        self,
        record: SessionRecord,
        record_json: str,
        *,
        signature_ok: bool | None,
        received_at: float | None = None,
    ) -> bool:
        """Store a (validated) record; False when its session_id is already stored."""
        cost = record.cost
        changed = await self._execute(
            "INSERT INTO sessions (session_id, site_id, seq, user_id, charger_id, started_at, "
            "ended_at, started_ts, energy_wh, currency, incl_vat, hash, prev_hash, signature_ok, "
            "record, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (session_id) DO NOTHING",
            (
                record.session_id,
                record.site_id,
                record.seq,
                record.user.id,
                record.charger_id,
                record.started_at,
                record.ended_at,
                from_rfc3339(record.started_at),
                record.energy_wh,
                cost.currency if cost is not None else None,
                cost.incl_vat if cost is not None else None,
                record.hash,
                record.prev_hash,
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

    async def sessions(self, site_id: str | None = None) -> list[StoredSession]:
        """Every stored session (of one site), ordered by site and seq."""
        rows = await self._of_site(
            f"SELECT {_SESSION_COLUMNS} FROM sessions", site_id, "site_id, seq, session_id"
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

    # -- keys ------------------------------------------------------------------------------------

    async def put_site_key(
        self,
        site_id: str,
        key_id: str,
        alg: str,
        public_key_pem: str,
        *,
        source: str,
        status: str = "active",
        note: str | None = None,
    ) -> bool:
        """Add a key to a site's trust store; False when the key was known already (its status
        is left as it is: a revoked key stays revoked)."""
        changed = await self._execute(
            "INSERT INTO site_keys (site_id, key_id, alg, public_key_pem, received_at, status, "
            "source, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (site_id, key_id) DO NOTHING",
            (site_id, key_id, alg, public_key_pem, time.time(), status, source, note),
        )
        return changed > 0

    async def set_key_status(
        self, site_id: str, key_id: str, status: str, note: str | None = None
    ) -> bool:
        """Change a key's status; False when the site has no such key."""
        changed = await self._execute(
            "UPDATE site_keys SET status = ?, note = ? WHERE site_id = ? AND key_id = ?",
            (status, note, site_id, key_id),
        )
        return changed > 0

    async def key_rows(self, site_id: str | None = None) -> list[SiteKey]:
        rows = await self._of_site(
            "SELECT site_id, key_id, alg, public_key_pem, status, source, received_at, note "
            "FROM site_keys",
            site_id,
            "site_id, received_at, key_id",
        )
        return [
            SiteKey(si, k, a, pem, st, src, float(at), note)
            for si, k, a, pem, st, src, at, note in rows
        ]

    async def site_keys(self) -> dict[tuple[str, str], str]:
        """{(site_id, key_id): public key PEM} of every key not revoked."""
        rows = await self._fetch(
            "SELECT site_id, key_id, public_key_pem FROM site_keys WHERE status != 'revoked'"
        )
        return {(s, k): pem for s, k, pem in rows}

    # -- problems, quarantine ---------------------------------------------------------------------

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
        rows = await self._of_site(
            "SELECT site_id, kind, seq, session_id, detail, found_at FROM chain_problems",
            site_id,
            "found_at",
        )
        return [
            Problem(s, k, None if q is None else int(q), sid, d, float(f))
            for s, k, q, sid, d, f in rows
        ]

    async def quarantine(
        self,
        *,
        kind: str,
        reason: str,
        topic: str,
        payload: str,
        site_id: str | None = None,
        session_id: str | None = None,
        seq: str | None = None,
        user_id: str | None = None,
        started_ts: float | None = None,
    ) -> bool:
        """Keep an untrusted message; False when the same message is already held for the same
        reason (a retained message comes again on every subscription)."""
        held = await self._fetch(
            "SELECT 1 FROM quarantine WHERE topic = ? AND payload = ? AND reason = ? "
            "AND released_at IS NULL",
            (topic, payload, reason),
        )
        if held:
            return False
        await self._execute(
            "INSERT INTO quarantine (qid, kind, reason, topic, payload, site_id, session_id, seq, "
            "user_id, started_ts, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                uuid.uuid4().hex,
                kind,
                reason,
                topic,
                payload,
                site_id,
                session_id,
                seq,
                user_id,
                started_ts,
                time.time(),
            ),
        )
        return True

    async def quarantined(
        self,
        site_id: str | None = None,
        kinds: Sequence[str] = (),
        *,
        released: bool = False,
    ) -> list[Quarantined]:
        """Held messages (or, with ``released``, also those released since), oldest first."""
        clauses: list[str] = [] if released else ["released_at IS NULL"]
        params: list[Any] = []
        if site_id is not None:
            clauses.append("site_id = ?")
            params.append(site_id)
        if kinds:
            clauses.append(f"kind IN ({', '.join('?' for _ in kinds)})")
            params.extend(kinds)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        rows = await self._fetch(
            "SELECT qid, kind, reason, topic, payload, site_id, session_id, seq, user_id, "
            f"started_ts, received_at, released_at, resolution FROM quarantine {where}"
            "ORDER BY received_at, qid",
            params,
        )
        return [_quarantined(r) for r in rows]

    async def release(self, qid: str, resolution: str = "stored") -> bool:
        """Stop holding a message: its record is now stored as trusted (``stored``), held
        again for another reason (``superseded``), or the operator dismissed it
        (``dismissed: <note>``). False when it was not held."""
        changed = await self._execute(
            "UPDATE quarantine SET released_at = ?, resolution = ? "
            "WHERE qid = ? AND released_at IS NULL",
            (time.time(), resolution, qid),
        )
        return changed > 0

    async def quarantine_count(
        self,
        user_id: str | None = None,
        since_ts: float | None = None,
        until_ts: float | None = None,
    ) -> int:
        """Held messages (of a user's sessions that started in [since_ts, until_ts))."""
        clauses = ["released_at IS NULL"]
        params: list[Any] = []
        if user_id is not None:
            clauses.append("user_id = ?")
            params.append(user_id)
        if since_ts is not None and until_ts is not None:
            clauses.append("started_ts >= ? AND started_ts < ?")
            params.extend((since_ts, until_ts))
        rows = await self._fetch(
            f"SELECT COUNT(*) FROM quarantine WHERE {' AND '.join(clauses)}", params
        )
        return int(rows[0][0]) if rows else 0


class _SqliteCloudStore(CloudStore):
    def __init__(self, url: str, conn: sqlite3.Connection) -> None:
        self.url = url
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, path: Path, *, create: bool = True) -> _SqliteCloudStore:
        def connect() -> sqlite3.Connection:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    path, isolation_level=None, check_same_thread=False, timeout=_BUSY_S
                )
            elif not path.is_file():
                raise NoSuchStoreError(f"{path}: no such consumer store (nothing was created)")
            else:  # mode=rw: never creates the file, even if it vanishes meanwhile
                conn = sqlite3.connect(
                    f"{path.absolute().as_uri()}?mode=rw",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=_BUSY_S,
                )
            # A consumer writing (FULL fsyncs) and an operator's `evgw trust` or `statement`
            # share the file: wait for its lock, from the first statement on.
            conn.execute(f"PRAGMA busy_timeout={int(_BUSY_S * 1000)}")
            # Switching a new file to WAL takes an exclusive lock. Two connections that switch at
            # the same moment (consumers of one group, a consumer and `evgw trust`) each hold a
            # read lock and want it: SQLite answers one of them "database is locked" at once,
            # without its busy handler, as waiting would deadlock. Try again until the bound.
            deadline = time.monotonic() + _BUSY_S
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        conn.close()
                        raise
                    time.sleep(0.05)
            conn.execute("PRAGMA synchronous=FULL")  # a stored session is acknowledged upstream
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

    async def _columns(self, table: str) -> set[str]:
        rows = await self._fetch(f"PRAGMA table_info({table})")
        return {str(r[1]) for r in rows}

    async def migrate(self) -> None:
        await self._execute("BEGIN IMMEDIATE")  # the upgrade moves rows: all or nothing
        try:
            await super().migrate()
        except BaseException:
            await self._execute("ROLLBACK")
            raise
        await self._execute("COMMIT")

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._conn.close)


class _PostgresCloudStore(CloudStore):
    def __init__(self, url: str, conn: Any) -> None:
        self.url = url
        self._conn = conn
        self._lock = asyncio.Lock()
        self._migrating = False  # the lock is held by migrate()

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
            await self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            self._migrating = True
            try:
                await super().migrate()
            finally:
                self._migrating = False

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if self._migrating:
            yield
            return
        async with self._lock:
            yield

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._turn():
            cursor = await self._conn.execute(sql.replace("?", "%s"), tuple(params))
            return int(cursor.rowcount)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._turn():
            cursor = await self._conn.execute(sql.replace("?", "%s"), tuple(params))
            rows: list[tuple[Any, ...]] = await cursor.fetchall()
            return rows

    async def _columns(self, table: str) -> set[str]:
        rows = await self._fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {str(r[0]) for r in rows}

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
async def open_cloud_store(url: str, *, create: bool = True) -> AsyncIterator[CloudStore]:
    """Open the store named by ``url``, creating (or upgrading) its tables. With
    ``create=False`` (the reading commands) a store that does not exist yet, a missing SQLite
    file or a PostgreSQL database without the consumer's tables, is a NoSuchStoreError and
    nothing is created."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    store: CloudStore
    if scheme == "sqlite":
        store = await _SqliteCloudStore.open(url, sqlite_path(url), create=create)
    elif scheme in ("postgresql", "postgres"):
        store = await _PostgresCloudStore.open(url)
    else:
        raise StoreUrlError(
            f"{_redact(url)!r}: unsupported store URL (use sqlite:///path.db or postgresql://...)"
        )
    try:
        if not create and not await store.has_tables():
            raise NoSuchStoreError(
                f"{_redact(url)}: no consumer store there (no sessions table; nothing was created)"
            )
        await store.migrate()
        yield store
    finally:
        await store.close()
