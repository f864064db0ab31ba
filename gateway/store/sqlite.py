"""The durable local buffer: one SQLite file in WAL mode, reached through aiosqlite.

What it promises (CONTRACT section 5): a finished session, once ``finish_session`` returned, is
never lost or changed, whatever happens to the process, the broker, the power or the disk.
Readings are the only thing that gives way: pruned by age, by the size cap (oldest synced first,
then oldest unsynced) and dropped while the disk is full.

How:
- Session transitions commit with ``synchronous=FULL`` (the WAL is fsynced at each commit);
  everything else commits at ``NORMAL`` (durable against a killed process, may roll back the last
  commits on power loss, which for readings and acks only means a resend).
- Every transaction runs in its own task behind a shield: a caller that is cancelled half way
  cannot leave a transaction half written; it either commits whole or rolls back.
- One asyncio lock orders all statements on the single connection, so a reader never sees
  another coroutine's uncommitted rows.
- Disk full: a reserve file of preallocated bytes sits next to the database. A session write that
  hits SQLITE_FULL deletes the reserve and the oldest readings, and retries. A readings write that
  hits it drops the batch, logs ``readings_dropped_disk_full`` once, and retries later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite
import structlog

from gateway.errors import StoreError
from gateway.model import (
    AuthStatus,
    Clock,
    MeterPoint,
    SystemClock,
    Token,
    TokenType,
    from_rfc3339,
)
from gateway.ports import OutboxRow, ReadingRow, Sealer
from gateway.records import GENESIS, canonical_json, seal
from gateway.store.salvage import (
    SESSION_STREAM,
    SESSION_TOPIC,
    is_sqlite_file,
    move_aside,
    quick_check,
    salvage,
    secure_file,
)
from gateway.store.schema import MIGRATIONS, SCHEMA_VERSION
from gateway.wire import WireValues, encode_reading

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["SESSION_STREAM", "SESSION_TOPIC", "Store"]

log = structlog.get_logger(__name__)

T = TypeVar("T")
Body = Callable[[aiosqlite.Connection], Awaitable[T]]

_DAY_S = 86_400.0
_MB = 1024 * 1024
_CHUNK = 500  # ids per IN (...) list: below SQLite's default variable limit everywhere
_DEFAULT_RESERVE_BYTES = 4 * _MB
_READINGS_RETRY_S = 30.0  # while the disk is full, try storing readings again this often
_CAP_CHECK_ROWS = 5_000  # check the size cap after this many readings were added
_CLOUD_LIST_KEY = "auth.cloud_list"
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_READONLY = 8


def _is_disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL, or an I/O error (ENOSPC can surface as SQLITE_IOERR_WRITE)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in (_SQLITE_FULL, _SQLITE_IOERR)
    text = str(exc).lower()
    return "disk is full" in text or "disk i/o error" in text


def _is_read_only(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) == _SQLITE_READONLY
    return "readonly database" in str(exc).lower()


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _token_to_json(token: Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "type": token.type.value,
        "user": token.user,
        "status": token.status.value,
        "expires_at": token.expires_at,
        "group": token.group,
    }


def _token_from_json(data: Mapping[str, Any]) -> Token:
    return Token(
        id=data["id"],
        type=TokenType(data["type"]),
        user=data["user"],
        status=AuthStatus(data.get("status", "accepted")),
        expires_at=data.get("expires_at"),
        group=data.get("group"),
    )


def _ts_or_none(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return from_rfc3339(value)
        except ValueError:
            return None
    return None


def _chunks(ids: Sequence[int]) -> Generator[list[int], None, None]:
    for i in range(0, len(ids), _CHUNK):
        yield [int(x) for x in ids[i : i + _CHUNK]]


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """``ids`` as (first, last) runs of consecutive integers, ascending."""
    runs: list[tuple[int, int]] = []
    first = last = None
    for i in sorted(set(ids)):
        if last is not None and i == last + 1:
            last = i
            continue
        if first is not None and last is not None:
            runs.append((first, last))
        first = last = i
    if first is not None and last is not None:
        runs.append((first, last))
    return runs


class _Opening:
    """What ``Store.open`` returns: await it for a Store, or use it as ``async with``."""

    __slots__ = ("_factory", "_store")

    def __init__(self, factory: Callable[[], Awaitable[Store]]) -> None:
        self._factory = factory
        self._store: Store | None = None

    def __await__(self) -> Generator[Any, None, Store]:
        return self._factory().__await__()

    async def __aenter__(self) -> Store:
        self._store = await self._factory()
        return self._store

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._store is not None:
            await self._store.close()


def _finished_rows(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """(record, synced_at, finished_ts) rows wrapped with their local state."""
    return [
        {"state": "finished", "synced_at": synced, "finished_at": fin, "record": json.loads(rec)}
        for rec, synced, fin in rows
    ]


class Store:
    """The gateway's SQLite buffer. Implements ``SessionStore``, ``UplinkStore`` and ``AuthStore``
    of gateway.ports. Open with ``await Store.open(path, site_id=...)`` or
    ``async with Store.open(path, site_id=...) as store``."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        *,
        site_id: str,
        max_size_mb: float,
        readings_retention_days: float,
        sealer: Sealer,
        clock: Clock,
        reserve_bytes: int,
    ) -> None:
        self._db: aiosqlite.Connection | None = db
        self.path = path
        self.site_id = site_id
        self.max_size_bytes = int(max_size_mb * _MB)
        self.readings_retention_s = float(readings_retention_days) * _DAY_S
        self._sealer = sealer
        self._clock = clock
        self._reserve_path = path.with_name(path.name + ".reserve")
        self._reserve_bytes = reserve_bytes
        self._lock = asyncio.Lock()
        # The uplink's reads run on a connection of their own (``_read_now``).
        self._sync_reader: sqlite3.Connection | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._readings_blocked_at: float | None = None  # monotonic time readings stopped
        self._reserve_retry_at = 0.0  # monotonic time the given-up reserve is next retaken
        self._readings_dropped = 0  # since they stopped
        self.readings_dropped_total = 0
        self._rows_since_cap_check = 0

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def for_site(cls, config: GatewayConfig, **kwargs: Any) -> _Opening:
        """The buffer a site config names, with its size and retention settings; read-only
        tools pass ``create=False``."""
        return cls.open(
            config.storage.path,
            site_id=config.site.id,
            max_size_mb=config.storage.max_size_mb,
            readings_retention_days=config.storage.readings_retention_days,
            **kwargs,
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        site_id: str,
        max_size_mb: float = 512,
        readings_retention_days: float = 30,
        sealer: Sealer | None = None,
        clock: Clock | None = None,
        reserve_bytes: int | None = None,
        create: bool = True,
    ) -> _Opening:
        """Open (creating and migrating as needed) the buffer at ``path``.

        ``reserve_bytes`` of disk are kept preallocated next to the database and given up when
        the disk fills, so a session can still be finished (0 disables the reserve; the default
        is 4 MiB, or none with ``create=False``). With ``create=False`` a missing file is a
        StoreError instead of a new buffer (for read-only tools such as ``evgw sessions``).
        """

        async def factory() -> Store:
            return await cls._open(
                Path(path),
                site_id=site_id,
                max_size_mb=max_size_mb,
                readings_retention_days=readings_retention_days,
                sealer=sealer or seal,
                clock=clock or SystemClock(),
                reserve_bytes=(
                    reserve_bytes
                    if reserve_bytes is not None
                    else (_DEFAULT_RESERVE_BYTES if create else 0)
                ),
                create=create,
            )

        return _Opening(factory)

    @classmethod
    async def _open(
        cls,
        path: Path,
        *,
        site_id: str,
        max_size_mb: float,
        readings_retention_days: float,
        sealer: Sealer,
        clock: Clock,
        reserve_bytes: int,
        create: bool,
    ) -> Store:
        if not create and not await asyncio.to_thread(path.exists):
            raise StoreError(
                f"{path}: no local buffer here (has the gateway run with this config?)"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create its directory: {exc.strerror or exc}") from exc
        damaged: Path | None = None
        if await asyncio.to_thread(_has_content, path):
            try:
                if not await asyncio.to_thread(is_sqlite_file, path):
                    raise StoreError(
                        f"{path}: not a usable gateway buffer: not an SQLite file (move it away "
                        "or point storage.path elsewhere)"
                    )
                problem = await asyncio.to_thread(quick_check, path)
            except sqlite3.Error as exc:
                raise StoreError(f"{path}: cannot open the local buffer: {exc}") from exc
            if problem is not None:
                if not create:
                    raise StoreError(
                        f"{path}: the local buffer is damaged ({problem}); the gateway moves it "
                        "aside and salvages what it can at its next start (evgw run)"
                    )
                damaged = await asyncio.to_thread(move_aside, path)
                log.error("store_damaged", path=str(path), problem=problem, moved_to=str(damaged))
        if create:
            try:
                await asyncio.to_thread(secure_file, path)
            except OSError as exc:
                raise StoreError(f"{path}: cannot create the local buffer: {exc}") from exc
        try:
            db = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the local buffer: {exc}") from exc
        store = cls(
            db,
            path,
            site_id=site_id,
            max_size_mb=max_size_mb,
            readings_retention_days=readings_retention_days,
            sealer=sealer,
            clock=clock,
            reserve_bytes=reserve_bytes,
        )
        try:
            await store._prepare()
            if create:
                # SQLite gave the new WAL and -shm files the database's mode; make sure anyway.
                await asyncio.to_thread(secure_file, path)
            if damaged is not None:
                await store._salvage_from(damaged)
        except BaseException:
            await db.close()
            raise
        return store

    async def _salvage_from(self, damaged: Path) -> None:
        async with self._lock:
            try:
                report = await asyncio.to_thread(salvage, damaged, self.path)
            except sqlite3.Error as exc:
                raise StoreError(
                    f"{self.path}: could not salvage the damaged buffer {damaged}: {exc}"
                ) from exc
        log.error(
            "store_salvaged",
            path=str(self.path),
            damaged=str(damaged),
            copied=report.copied,
            unreadable=report.unreadable,
            finished_sessions_lost_seqs=report.seq_gaps[:100],
            rebuilt_from_outbox=report.rebuilt_from_outbox,
            requeued=report.requeued,
        )

    async def _prepare(self) -> None:
        db = self._conn()
        try:
            await db.execute("PRAGMA busy_timeout=5000")
            # Only takes effect on a new, empty file: lets prune() give pages back to the disk.
            await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            async with db.execute("PRAGMA journal_mode=WAL") as cur:
                row = await cur.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"{self.path}: the file system does not support SQLite WAL mode")
            await db.execute("PRAGMA synchronous=NORMAL")
            # A checkpoint leaves the WAL no larger than this instead of at its high-water mark.
            await db.execute(f"PRAGMA journal_size_limit={16 * _MB}")
            if self._reserve_bytes > 0:
                # Keep the WAL below half the reserve: on a full disk, releasing the reserve
                # then always leaves room to checkpoint the WAL into the database file.
                async with db.execute("PRAGMA page_size") as cur:
                    row = await cur.fetchone()
                pages = max(16, self._reserve_bytes // (int(row[0]) if row else 4096) // 2)
                await db.execute(f"PRAGMA wal_autocheckpoint={pages}")
            await self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: not a usable gateway buffer: {exc}") from exc
        if self._reserve_bytes > 0:
            await asyncio.to_thread(self._ensure_reserve)

    async def _migrate(self) -> None:
        db = self._conn()
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_ts "
            "REAL NOT NULL)"
        )
        async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version") as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: the buffer has schema version {current}, newer than this gateway "
                f"understands ({SCHEMA_VERSION}); run a newer evgw or point storage.path elsewhere"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version - 1]:
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_version (version, applied_ts) VALUES (?, ?)",
                    (version, self._clock.time()),
                )
                await db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise
            log.info("store_migrated", path=str(self.path), version=version)

    async def close(self) -> None:
        """Wait for writes in flight, checkpoint the WAL into the database, close."""
        if self._db is None:
            return
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._sync_reader is not None:
            self._sync_reader.close()
            self._sync_reader = None
        async with self._lock:
            db, self._db = self._db, None
            if db is None:
                return
            try:
                with contextlib.suppress(sqlite3.Error):
                    async with db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                        await cur.fetchall()
            finally:
                await db.close()
        if self._readings_blocked_at is not None:
            log.error(
                "readings_dropped_disk_full",
                dropped=self._readings_dropped,
                dropped_total=self.readings_dropped_total,
                still_full=True,
            )

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: the store is closed")
        return self._db

    # ------------------------------------------------------------------ transactions

    async def _write(self, body: Body[T], *, durable: bool = False) -> T:
        """Run ``body`` in one write transaction, in its own shielded task so that a cancelled
        caller cannot cut it in half. ``durable`` commits with synchronous=FULL."""
        task = asyncio.create_task(self._transaction(body, durable), name="store-transaction")
        self._inflight.add(task)
        task.add_done_callback(self._write_done)
        return await asyncio.shield(task)

    def _write_done(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller (if still there) got it through the shield

    async def _transaction(self, body: Body[T], durable: bool) -> T:
        async with self._lock:
            db = self._conn()
            if durable:
                # Set outside the transaction: SQLite applies it at the next commit.
                await db.execute("PRAGMA synchronous=FULL")
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    result = await body(db)
                    await db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                    raise
            finally:
                if durable:
                    with contextlib.suppress(sqlite3.Error):
                        await db.execute("PRAGMA synchronous=NORMAL")
            return result

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            return list(await self._conn().execute_fetchall(sql, params))  # one thread hop

    async def _durable_session_write(self, body: Body[T], what: str) -> T:
        """A session-side write: FULL sync, and when the disk is full, make room and retry."""
        for attempt in range(3):
            try:
                result = await self._write(body, durable=True)
            except sqlite3.Error as exc:
                if not _is_disk_full(exc):
                    raise StoreError(f"{self.path}: {what} failed: {exc}") from exc
                log.error(
                    "store_disk_full_session_write", what=what, attempt=attempt + 1, error=str(exc)
                )
                if not await self._make_room():
                    break
            else:
                await self._retake_reserve()
                return result
        raise StoreError(
            f"{self.path}: {what} failed: the disk is full and nothing is left to free"
        )

    # ------------------------------------------------------------------ SessionStore

    async def load_open_sessions(self) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT session_id, charger_id, state FROM open_sessions ORDER BY session_id"
        )
        out = []
        for session_id, charger_id, state in rows:
            data = json.loads(state)
            data.setdefault("session_id", session_id)
            data.setdefault("charger_id", charger_id)
            out.append(data)
        return out

    async def save_open_session(
        self, session_id: str, charger_id: str, state: dict[str, Any]
    ) -> None:
        text = json.dumps(state, separators=(",", ":"))
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO open_sessions (session_id, charger_id, state, updated_ts) VALUES (?, "
                "?, ?, ?) "
                "ON CONFLICT(session_id) DO UPDATE SET charger_id=excluded.charger_id, "
                "state=excluded.state, updated_ts=excluded.updated_ts",
                (session_id, charger_id, text, now),
            )

        await self._durable_session_write(body, "saving open session")

    async def drop_open_session(self, session_id: str) -> None:
        """Forget an open session that never became billable (and its points)."""

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute("DELETE FROM open_sessions WHERE session_id = ?", (session_id,))
            await db.execute("DELETE FROM session_points WHERE session_id = ?", (session_id,))

        await self._durable_session_write(body, "dropping open session")

    async def add_session_point(self, session_id: str, point: MeterPoint) -> None:
        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO session_points (session_id, ts, energy_wh, charging, power_w) VALUES "
                "(?, ?, ?, ?, ?)",
                (
                    session_id,
                    point.ts,
                    int(point.energy_wh),
                    int(point.charging),
                    float(point.power_w),
                ),
            )

        await self._durable_session_write(body, "saving session point")

    async def session_points(self, session_id: str) -> list[MeterPoint]:
        rows = await self._read(
            "SELECT ts, energy_wh, charging, power_w FROM session_points WHERE session_id = ? "
            "ORDER BY ts, id",
            (session_id,),
        )
        return [
            MeterPoint(ts=ts, energy_wh=int(e), charging=bool(c), power_w=float(p))
            for ts, e, c, p in rows
        ]

    async def finish_session(self, record: dict[str, Any]) -> dict[str, Any]:
        session_id = record.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise StoreError("a finished session record needs a session_id")
        site_id = record.get("site_id", self.site_id)
        if site_id != self.site_id:
            raise StoreError(
                f"session {session_id}: site_id {site_id!r} is not this store's {self.site_id!r}"
            )
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> str:
            async with db.execute(
                "SELECT record FROM finished_sessions WHERE session_id = ?", (session_id,)
            ) as cur:
                done = await cur.fetchone()
            if done is not None:
                return str(done[0])
            async with db.execute(
                "SELECT seq, hash FROM finished_sessions WHERE site_id = ? ORDER BY seq DESC "
                "LIMIT 1",
                (self.site_id,),
            ) as cur:
                last = await cur.fetchone()
            body_record = dict(record)
            body_record["site_id"] = self.site_id
            body_record["seq"] = int(last[0]) + 1 if last else 1
            body_record["prev_hash"] = str(last[1]) if last else GENESIS
            body_record.pop("hash", None)
            body_record.pop("signature", None)
            sealed = self._sealer(body_record)
            if "hash" not in sealed:
                raise StoreError(
                    f"session {session_id}: the sealer returned a record without a hash"
                )
            try:
                payload = canonical_json(sealed)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"session {session_id}: record is not JSON: {exc}") from exc
            cursor = await db.execute(
                "INSERT INTO outbox (stream, topic, payload, qos, retain, created_ts) VALUES (?, "
                "?, ?, 1, 0, ?)",
                (SESSION_STREAM, SESSION_TOPIC, payload, now),
            )
            outbox_id = cursor.lastrowid
            user = sealed.get("user")
            user_id = user.get("id") if isinstance(user, dict) else user
            energy = sealed.get("energy_wh")
            await db.execute(
                "INSERT INTO finished_sessions (site_id, seq, session_id, charger_id, user_id, "
                "started_ts, "
                "ended_ts, energy_wh, record, hash, outbox_id, finished_ts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.site_id,
                    sealed["seq"],
                    session_id,
                    sealed.get("charger_id"),
                    user_id if isinstance(user_id, str) else None,
                    _ts_or_none(sealed.get("started_at")),
                    _ts_or_none(sealed.get("ended_at")),
                    int(energy)
                    if isinstance(energy, int | float) and not isinstance(energy, bool)
                    else None,
                    payload.decode(),
                    sealed["hash"],
                    outbox_id,
                    now,
                ),
            )
            await db.execute("DELETE FROM open_sessions WHERE session_id = ?", (session_id,))
            await db.execute("DELETE FROM session_points WHERE session_id = ?", (session_id,))
            return payload.decode()

        text = await self._durable_session_write(body, f"finishing session {session_id}")
        result: dict[str, Any] = json.loads(text)
        return result

    async def enqueue(
        self, stream: str, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int:
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(
                "INSERT INTO outbox (stream, topic, payload, qos, retain, created_ts) VALUES (?, "
                "?, ?, ?, ?, ?)",
                (stream, topic, bytes(payload), int(qos), int(retain), now),
            )
            return int(cursor.lastrowid or 0)

        return await self._durable_session_write(body, f"queueing {stream} message")

    async def add_readings(self, rows: Sequence[tuple[str, float, Mapping[str, Any]]]) -> None:
        """Buffer readings in one transaction. While the disk is full they are dropped (logged
        once with counts, again when storing resumes); they never block session writes."""
        if not rows:
            return
        blocked_at = self._readings_blocked_at
        if blocked_at is not None and (
            self._clock.monotonic() - blocked_at < _READINGS_RETRY_S
            # Space has come back only once the reserve can be allocated again.
            or (self._reserve_bytes > 0 and not await asyncio.to_thread(self._ensure_reserve))
        ):
            if self._reserve_bytes > 0:
                self._readings_blocked_at = max(blocked_at, self._clock.monotonic())
            self._count_dropped(len(rows))
            return
        # Encoded once, in the form the uplink sends (gateway/wire.py).
        params = [(dev, float(ts), encode_reading(ts, values)) for dev, ts, values in rows]

        async def body(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "INSERT INTO readings (device_id, ts, data, wire) VALUES (?, ?, '', ?)", params
            )
            # One writer at a time (BEGIN IMMEDIATE): the newest ids are the rows just added.
            await db.execute(
                "INSERT INTO readings_pending (id) SELECT id FROM readings ORDER BY id DESC "
                "LIMIT ?",
                (len(params),),
            )

        try:
            await self._write(body)
        except sqlite3.Error as exc:
            # A read-only file system (the kernel's answer to a failing card) is treated like
            # a full disk: readings give way, and are tried again later.
            if not (_is_disk_full(exc) or _is_read_only(exc)):
                raise StoreError(f"{self.path}: storing readings failed: {exc}") from exc
            first = self._readings_blocked_at is None
            self._readings_blocked_at = self._clock.monotonic()
            self._count_dropped(len(rows))
            if first:
                log.error(
                    "readings_dropped_disk_full",
                    dropped=len(rows),
                    dropped_total=self.readings_dropped_total,
                    db_bytes=self.size_bytes(),
                    error=str(exc),
                )
            return
        if self._readings_blocked_at is not None:
            log.warning(
                "readings_resumed",
                dropped=self._readings_dropped,
                dropped_total=self.readings_dropped_total,
            )
            self._readings_blocked_at = None
            self._readings_dropped = 0
        self._rows_since_cap_check += len(rows)
        if self._rows_since_cap_check >= _CAP_CHECK_ROWS:
            self._rows_since_cap_check = 0
            if self.size_bytes() > self.max_size_bytes:
                await self._enforce_cap()

    def _count_dropped(self, n: int) -> None:
        self._readings_dropped += n
        self.readings_dropped_total += n

    @property
    def readings_blocked(self) -> bool:
        """True while readings are being dropped because the disk is full."""
        return self._readings_blocked_at is not None

    # ------------------------------------------------------------------ UplinkStore

    async def outbox_fetch(self, stream: str, limit: int, after_id: int = 0) -> list[OutboxRow]:
        rows = self._read_now(
            "SELECT id, stream, topic, payload, qos, retain, created_ts FROM outbox "
            "WHERE stream = ? AND id > ? ORDER BY id LIMIT ?",
            (stream, int(after_id), int(limit)),
        )
        return [
            OutboxRow(
                id=i, stream=s, topic=t, payload=bytes(p), qos=int(q), retain=bool(r), created_ts=c
            )
            for i, s, t, p, q, r, c in rows
        ]

    async def outbox_ack(self, ids: Sequence[int]) -> None:
        """Delivered (PUBACK seen): drop the rows; a session's record becomes ``synced``."""
        if not ids:
            return
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> None:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                await db.execute(
                    "UPDATE finished_sessions SET synced_at = ? WHERE synced_at IS NULL AND "
                    f"outbox_id IN ({marks})",
                    (now, *chunk),
                )
                await db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)

        await self._write(body)

    async def outbox_backlog(self) -> dict[str, int]:
        rows = await self._read("SELECT stream, COUNT(*) FROM outbox GROUP BY stream")
        backlog = {str(s): int(n) for s, n in rows}
        rows = await self._read("SELECT COUNT(*) FROM readings_pending")
        backlog["readings"] = int(rows[0][0]) if rows else 0
        return backlog

    async def readings_fetch_unsynced(self, limit: int, after_id: int = 0) -> list[ReadingRow]:
        rows = await self._read(
            "SELECT r.id, r.device_id, r.ts, r.data, r.wire FROM readings_pending p "
            "JOIN readings r ON r.id = p.id WHERE p.id > ? ORDER BY p.id LIMIT ?",
            (int(after_id), int(limit)),
        )
        out = []
        for i, d, ts, data, wire in rows:
            if wire is None:  # written before schema version 2: encode it now
                values = json.loads(data)
                out.append(ReadingRow(i, d, ts, values, encode_reading(ts, values)))
            else:
                out.append(ReadingRow(i, d, ts, WireValues(wire), wire))
        return out

    async def readings_fetch_wire(
        self, limit: int, after_id: int = 0
    ) -> list[tuple[int, str, bytes]]:
        """(id, device_id, wire form) of undelivered readings in id order: what the uplink
        splices into batches, with no per-row objects (read as ``_read_now`` says)."""
        rows: list[tuple[int, str, bytes]] = self._read_now(
            "SELECT r.id, r.device_id, r.wire FROM readings_pending p "
            "JOIN readings r ON r.id = p.id WHERE p.id > ? ORDER BY p.id LIMIT ?",
            (int(after_id), int(limit)),
        )
        if all(row[2] is not None for row in rows):
            return rows
        return [
            (row.id, row.device_id, row.wire or b"")
            for row in await self.readings_fetch_unsynced(limit, after_id)
        ]

    def _read_now(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The uplink's reads, on the event loop's thread from a read-only WAL connection of
        their own (a WAL reader never waits for the writer). A thread hop looked cheaper but is
        not: sqlite3 releases the GIL around every row step, so a fetch on a worker thread
        trades the GIL with the busy loop once per row (13 ms for 2000 readings against 2 ms
        here), and each hop's latency stalled the drain between pages. The callers bound the
        rows a call, hence the time the loop is held. A busy database reads as empty: the
        uplink asks again on its next round."""
        self._conn()  # refuse when closed
        if self._sync_reader is None:
            try:
                reader = sqlite3.connect(
                    str(self.path), isolation_level=None, check_same_thread=False
                )
                # short: this runs on the loop's thread (a WAL reader is rarely ever busy)
                reader.execute("PRAGMA busy_timeout=50")
                reader.execute("PRAGMA query_only=ON")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot open a reader: {exc}") from exc
            self._sync_reader = reader
        try:
            return self._sync_reader.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise StoreError(f"{self.path}: reading for the uplink failed: {exc}") from exc
            return []

    async def reading_values(
        self,
        name: str,
        since: float,
        until: float,
        after_id: int = 0,
        limit: int = 20_000,
        devices: Sequence[str] | None = None,
    ) -> list[tuple[int, str, float, Any]]:
        """One value (``name``, e.g. ``power_w``) of the readings taken in ``since <= ts <
        until``, in id order (which follows time), one page after ``after_id``: ``(id,
        device_id, ts, value)``, value None where a reading lacks it. SQLite picks the value out
        of the stored JSON, so a month of readings is not decoded in Python. Page on with the
        last id until a page is shorter than ``limit``."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a value name: {name!r}")
        path = f"$.{name}"
        sql = (
            "SELECT id, device_id, ts, CASE WHEN wire IS NULL THEN json_extract(data, ?) "
            "ELSE json_extract(CAST(wire AS TEXT), ?) END FROM readings "
            "WHERE id > ? AND ts >= ? AND ts < ?"
        )
        params: list[Any] = [path, path, int(after_id), float(since), float(until)]
        if devices is not None:
            sql += f" AND device_id IN ({','.join('?' * len(devices))})"
            params.extend(devices)
        sql += " ORDER BY id LIMIT ?"
        rows = await self._read(sql, [*params, int(limit)])
        return [(i, d, ts, v) for i, d, ts, v in rows]

    async def readings_mark_synced(self, ids: Sequence[int]) -> None:
        if not ids:
            return

        # PUBACKs come back in order, so the ids form few runs of consecutive ids: one ranged
        # UPDATE a run instead of hundreds of bound ids each.
        runs = _runs(ids)

        async def body(db: aiosqlite.Connection) -> None:
            await db.executemany("DELETE FROM readings_pending WHERE id BETWEEN ? AND ?", runs)

        await self._write(body)

    # ------------------------------------------------------------------ AuthStore

    async def load_cloud_list(self) -> tuple[int, list[Token]]:
        data = await self.kv_get(_CLOUD_LIST_KEY)
        if not isinstance(data, dict):
            return 0, []
        return int(data["version"]), [_token_from_json(t) for t in data["tokens"]]

    async def save_cloud_list(self, version: int, tokens: Sequence[Token]) -> None:
        await self.kv_put(
            _CLOUD_LIST_KEY,
            {"version": int(version), "tokens": [_token_to_json(t) for t in tokens]},
        )

    async def load_auth_cache(self) -> list[tuple[Token, float]]:
        rows = await self._read(
            "SELECT token, cached_at FROM auth_cache ORDER BY cached_at, token_id"
        )
        return [(_token_from_json(json.loads(t)), float(at)) for t, at in rows]

    async def cache_auth(self, token: Token, cached_at: float) -> None:
        text = json.dumps(_token_to_json(token), separators=(",", ":"))

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO auth_cache (token_id, token, cached_at) VALUES (?, ?, ?) "
                "ON CONFLICT(token_id) DO UPDATE SET token=excluded.token, "
                "cached_at=excluded.cached_at",
                (token.id, text, float(cached_at)),
            )

        await self._durable_session_write(body, "caching an authorization")

    # ------------------------------------------------------------------ small state

    async def kv_get(self, key: str, default: Any = None) -> Any:
        rows = await self._read("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    async def kv_put(self, key: str, value: Any) -> None:
        """Store any JSON value under ``key`` (durably: used for cloud-pushed state)."""
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO kv (key, value, updated_ts) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value, "
                "updated_ts=excluded.updated_ts",
                (key, text, now),
            )

        await self._durable_session_write(body, f"saving {key}")

    async def remember_request_id(self, request_id: str) -> bool:
        """Record a command's request id; False when it was seen before (do not run it again)."""
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> bool:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO request_ids (request_id, seen_ts) VALUES (?, ?)",
                (request_id, now),
            )
            return cursor.rowcount == 1

        return await self._durable_session_write(body, "remembering a request id")

    async def request_reply(self, request_id: str) -> tuple[bool, dict[str, Any] | None]:
        """(seen, reply): whether a command's request id was remembered, and the reply stored
        for it (None while none was stored)."""
        rows = await self._read("SELECT reply FROM request_ids WHERE request_id = ?", (request_id,))
        if not rows:
            return False, None
        text = rows[0][0]
        try:
            reply = json.loads(text) if text is not None else None
        except ValueError:
            reply = None
        return True, reply if isinstance(reply, dict) else None

    async def save_request_reply(self, request_id: str, reply: dict[str, Any]) -> None:
        """Remember a request id with the reply sent for it (durably, before the reply goes)."""
        text = json.dumps(reply, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO request_ids (request_id, seen_ts, reply) VALUES (?, ?, ?) "
                "ON CONFLICT(request_id) DO UPDATE SET reply=excluded.reply",
                (request_id, now, text),
            )

        await self._durable_session_write(body, "remembering a command reply")

    # ------------------------------------------------------------------ queries for people

    async def finished_sessions(
        self,
        since: float | None = None,
        until: float | None = None,
        user: str | None = None,
        charger: str | None = None,
        unsynced_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Sealed records, exactly as stored (verifiable with gateway.records.record_hash), in
        ``seq`` order. ``since``/``until`` (Unix seconds) select by start time:
        since <= started_at < until."""
        rows = await self.finished_session_rows(since, until, user, charger, unsynced_only)
        return [row["record"] for row in rows]

    async def finished_session_rows(
        self,
        since: float | None = None,
        until: float | None = None,
        user: str | None = None,
        charger: str | None = None,
        unsynced_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Like finished_sessions, wrapped with local state: ``{"state": "finished",
        "synced_at": float | None, "finished_at": float, "record": {...}}``."""
        where, params = self._session_filter(since, until, user, charger, unsynced_only)
        rows = await self._read(
            f"SELECT record, synced_at, finished_ts FROM finished_sessions{where} ORDER BY "
            "site_id, seq",
            params,
        )
        return _finished_rows(rows)

    async def recent_finished_sessions(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recently finished sessions, newest first, wrapped like
        finished_session_rows."""
        rows = await self._read(
            "SELECT record, synced_at, finished_ts FROM finished_sessions "
            "ORDER BY finished_ts DESC, seq DESC LIMIT ?",
            (int(limit),),
        )
        return _finished_rows(rows)

    def _session_filter(
        self,
        since: float | None,
        until: float | None,
        user: str | None,
        charger: str | None,
        unsynced_only: bool,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("started_ts >= ?")
            params.append(float(since))
        if until is not None:
            clauses.append("started_ts < ?")
            params.append(float(until))
        if user is not None:
            clauses.append("user_id = ?")
            params.append(user)
        if charger is not None:
            clauses.append("charger_id = ?")
            params.append(charger)
        if unsynced_only:
            clauses.append("synced_at IS NULL")
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    async def open_sessions_rows(self) -> list[dict[str, Any]]:
        """One ``{"state": "open", "session_id", "charger_id", "updated_at", "data": {...}}``
        per open session (``data`` is what save_open_session stored)."""
        rows = await self._read(
            "SELECT session_id, charger_id, state, updated_ts FROM open_sessions ORDER BY "
            "session_id"
        )
        return [
            {
                "state": "open",
                "session_id": s,
                "charger_id": c,
                "updated_at": u,
                "data": json.loads(d),
            }
            for s, c, d, u in rows
        ]

    # ------------------------------------------------------------------ size and retention

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its WAL."""
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    async def prune(self) -> dict[str, int]:
        """Delete readings (and non-session messages, seen request ids) older than the retention;
        then, while the buffer is above its size cap, the oldest synced readings, then the oldest
        unsynced ones. Finished sessions and their outbox rows are never touched. Returns counts."""
        now = self._clock.time()
        cutoff = now - self.readings_retention_s

        async def by_age(db: aiosqlite.Connection) -> tuple[int, int]:
            # Ids follow time and readings have no time index (it cost every insert): walk from
            # the oldest id to the first recent reading and delete the old ones before it. A
            # reading stamped in the future (a clock set wrong, then fixed) does not hold this
            # up; old readings after a recent one (the clock stepped back) wait for a later prune.
            async with db.execute(
                "SELECT id FROM readings WHERE ts >= ? AND ts <= ? ORDER BY id LIMIT 1",
                (cutoff, now + _DAY_S),
            ) as cur:
                first_recent = await cur.fetchone()
            if first_recent is None:
                cur = await db.execute("DELETE FROM readings WHERE ts < ?", (cutoff,))
            else:
                cur = await db.execute(
                    "DELETE FROM readings WHERE id < ? AND ts < ?", (first_recent[0], cutoff)
                )
            readings = cur.rowcount
            cur = await db.execute(
                "DELETE FROM outbox WHERE stream != ? AND created_ts < ?", (SESSION_STREAM, cutoff)
            )
            messages = cur.rowcount
            # Request ids outlive the longest uplink.command_max_age (1 h) by far: the
            # retention is at least a day, so a replayed signed command is still recognised.
            await db.execute("DELETE FROM request_ids WHERE seen_ts < ?", (cutoff,))
            return readings, messages

        aged, messages = await self._write(by_age)
        if aged or messages:
            log.info("store_pruned_by_age", readings=aged, messages=messages)
        capped = await self._enforce_cap() if self.size_bytes() > self.max_size_bytes else 0
        if (aged or capped) and self._readings_blocked_at is not None:
            self._readings_blocked_at = -math.inf  # room was made: try again on the next batch
        return {"readings_by_age": aged, "messages_by_age": messages, "readings_by_size": capped}

    async def _enforce_cap(self) -> int:
        """Delete readings, oldest synced first, until the pages in use fit in 90% of the cap;
        then give the freed pages back to the file system."""
        target = int(self.max_size_bytes * 0.9)
        deleted_total = 0
        for _ in range(50):
            used = await self._used_bytes()
            if used <= target:
                break
            rows = await self._read("SELECT COUNT(*) FROM readings")
            count = int(rows[0][0]) if rows else 0
            if count == 0:
                log.warning(
                    "store_over_cap_without_readings",
                    used_bytes=used,
                    cap_bytes=self.max_size_bytes,
                )
                break
            # Over the cap, readings are nearly all of the file: deleting the excess share of
            # rows (at least 1%) converges in a round or two.
            share = max((used - target) / used, 0.01)
            deleted_total += await self._delete_oldest_readings(max(1, math.ceil(count * share)))
        await self._shrink_files()
        if deleted_total:
            log.warning(
                "store_pruned_by_size",
                readings=deleted_total,
                db_bytes=self.size_bytes(),
                cap_bytes=self.max_size_bytes,
            )
        return deleted_total

    async def _used_bytes(self) -> int:
        """Bytes of the database in pages holding data (free pages are reused before it grows)."""
        async with self._lock:
            db = self._conn()
            values = []
            for pragma in ("page_count", "freelist_count", "page_size"):
                async with db.execute(f"PRAGMA {pragma}") as cur:
                    row = await cur.fetchone()
                values.append(int(row[0]) if row else 0)
        pages, free, page_size = values
        return (pages - free) * page_size

    async def _delete_oldest_readings(self, n: int) -> int:
        async def body(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "DELETE FROM readings WHERE id IN (SELECT id FROM readings r WHERE NOT EXISTS "
                "(SELECT 1 FROM readings_pending p WHERE p.id = r.id) ORDER BY id LIMIT ?)",
                (n,),
            )
            deleted = cur.rowcount
            if deleted < n:
                cur = await db.execute(
                    "DELETE FROM readings WHERE id IN "
                    "(SELECT id FROM readings_pending ORDER BY id LIMIT ?)",
                    (n - deleted,),
                )
                deleted += cur.rowcount
            return deleted

        return await self._write(body)

    async def _shrink_files(self) -> None:
        """Give free pages back to the file system and truncate the WAL."""
        async with self._lock:
            db = self._conn()
            with contextlib.suppress(sqlite3.Error):
                # Through execute() incremental_vacuum frees a single page (the module steps the
                # statement once); executescript steps it to the end.
                await db.executescript("PRAGMA incremental_vacuum;")
                async with db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                    await cur.fetchall()

    async def _make_room(self) -> bool:
        """The disk is full and a session must be written: give up the reserve file and the
        oldest readings. True if anything was freed."""
        freed = False
        if self._reserve_path.exists():
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
                freed = True
                log.warning("store_reserve_released", path=str(self._reserve_path))
        if self._readings_blocked_at is None:
            # The space just given up is for sessions: readings stop until the reserve can be
            # taken again (add_readings checks). Without this the next readings batches ate it,
            # and the disk full after that had nothing left to free (found by the soak).
            self._readings_blocked_at = self._clock.monotonic()
            log.warning("readings_paused_for_sessions")
        async with self._lock:
            db = self._conn()
            try:
                # Move the WAL into the database (the released reserve makes room for that) and
                # restart it, so the next writes reuse the WAL file instead of growing it.
                async with db.execute("PRAGMA wal_checkpoint(RESTART)") as cur:
                    await cur.fetchall()
            except sqlite3.Error as exc:
                log.error("store_checkpoint_failed", error=str(exc))
        try:
            rows = await self._read("SELECT COUNT(*) FROM readings")
            count = int(rows[0][0]) if rows else 0
            if count:
                deleted = await self._delete_oldest_readings(max(1000, count // 10))
                freed = freed or deleted > 0
                log.warning("store_readings_freed_for_session", readings=deleted)
        except sqlite3.Error as exc:
            # Deleting needs WAL space too; with the reserve gone the retry may still succeed.
            log.error("store_make_room_failed", error=str(exc))
        return freed

    async def _retake_reserve(self) -> None:
        """Once space is back after the reserve was given up, take it again at once (tried at
        most once a second), so that the next full disk finds it: without it a second full disk
        soon after the first had nothing left to free and the session write failed."""
        if self._reserve_bytes <= 0 or self._reserve_path.exists():
            return
        now = self._clock.monotonic()
        if now < self._reserve_retry_at:
            return
        self._reserve_retry_at = now + 1.0
        fd = -1
        try:  # quietly: while the disk is still full this fails, and that is expected
            fd = os.open(self._reserve_path, os.O_RDWR | os.O_CREAT, 0o600)
            await asyncio.to_thread(os.posix_fallocate, fd, 0, self._reserve_bytes)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
            return
        finally:
            if fd >= 0:
                os.close(fd)
        log.info("store_reserve_retaken", path=str(self._reserve_path))

    def _ensure_reserve(self) -> bool:
        """Preallocate the reserve file (real blocks, not a sparse file). False if the disk has
        no room for it."""
        try:
            if (
                self._reserve_path.exists()
                and self._reserve_path.stat().st_size >= self._reserve_bytes
            ):
                return True
            fd = os.open(self._reserve_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._reserve_bytes)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
            if self._readings_blocked_at is None:  # while blocked this is expected: stay quiet
                log.warning(
                    "store_reserve_unavailable", path=str(self._reserve_path), error=str(exc)
                )
            return False
        return True
