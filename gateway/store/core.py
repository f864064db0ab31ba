"""The store's core: one SQLite connection in WAL mode (through aiosqlite), opening with its
checks, migration and salvage, and the transactions every other part of the store runs in.

- Every write transaction runs in its own task behind a shield: a caller that is cancelled half
  way cannot leave a transaction half written; it either commits whole or rolls back.
- One asyncio lock orders all statements on the single connection, so a reader never sees
  another coroutine's uncommitted rows.
- Writes commit at ``synchronous=NORMAL`` unless they ask to be durable (``FULL``: the WAL is
  fsynced at the commit), as session transitions do (gateway/store/space.py).
- The uplink's reads run on a read-only connection of their own (``_read_now``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import aiosqlite
import structlog

from gateway.closing import AsyncClosing
from gateway.errors import StoreError
from gateway.model import Clock, SystemClock
from gateway.ports import Sealer
from gateway.records import UnsealedRecord
from gateway.store.failures import is_busy
from gateway.store.salvage import is_sqlite_file, move_aside, quick_check, salvage, secure_file
from gateway.store.schema import MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["DAY_S", "MB", "Body", "NowBody", "StoreCore"]

log = structlog.get_logger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound="StoreCore")
Body = Callable[[aiosqlite.Connection], Awaitable[T]]
NowBody = Callable[[sqlite3.Connection], T]
"""A transaction's body run on the event loop's thread (``StoreCore._write_now``)."""
_DEFAULT_AUTOCHECKPOINT_PAGES = 1000  # SQLite's own default
_PAGE_GUESS = 4096  # SQLite's default page size; the real one when the reserve asks for it

DAY_S = 86_400.0
MB = 1024 * 1024
_DEFAULT_RESERVE_BYTES = 4 * MB


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


class _Opening(Generic[S]):
    """What ``Store.open`` returns: await it for a Store, or use it as ``async with``."""

    __slots__ = ("_factory", "_store")

    def __init__(self, factory: Callable[[], Awaitable[S]]) -> None:
        self._factory = factory
        self._store: S | None = None

    def __await__(self) -> Generator[Any, None, S]:
        return self._factory().__await__()

    async def __aenter__(self) -> S:
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


@dataclass(frozen=True, slots=True)
class _Settings:
    """What ``StoreCore.open`` was given, defaults filled in."""

    site_id: str
    max_size_mb: float
    readings_retention_days: float
    sealer: Sealer
    clock: Clock
    reserve_bytes: int


class StoreCore(AsyncClosing):
    """The connection and its transactions; ``gateway.store.Store`` adds the tables' methods.
    Open with ``await Store.open(path, site_id=...)`` or ``async with Store.open(...) as store``."""

    def __init__(self, db: aiosqlite.Connection, path: Path, settings: _Settings) -> None:
        self._db: aiosqlite.Connection | None = db
        self.path = path
        self.site_id = settings.site_id
        self.max_size_bytes = int(settings.max_size_mb * MB)
        self.readings_retention_s = float(settings.readings_retention_days) * DAY_S
        self._sealer = settings.sealer
        self._clock = settings.clock
        self._reserve_path = path.with_name(path.name + ".reserve")
        self._reserve_bytes = settings.reserve_bytes
        self._lock = asyncio.Lock()
        # The uplink's reads run on a connection of their own (``_read_now``).
        self._sync_reader: sqlite3.Connection | None = None
        # Readings are written on the loop's thread, on a connection of their own
        # (``_write_now``).
        self._now_writer: sqlite3.Connection | None = None
        self._checkpoint_bytes = _DEFAULT_AUTOCHECKPOINT_PAGES * _PAGE_GUESS
        self._written_since_checkpoint = 0  # about: bytes appended to the WAL by _write_now
        self._inflight: set[asyncio.Task[Any]] = set()
        self._readings_blocked_at: float | None = None  # monotonic time readings stopped
        self._reserve_retry_at = 0.0  # monotonic time the given-up reserve is next retaken
        self._readings_dropped = 0  # since they stopped
        self.readings_dropped_total = 0
        self._rows_since_cap_check = 0

    @classmethod
    def for_site(cls, config: GatewayConfig, **kwargs: Any) -> _Opening[Self]:
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
    ) -> _Opening[Self]:
        """Open (creating and migrating as needed) the buffer at ``path``.

        ``reserve_bytes`` of disk are kept preallocated next to the database and given up when
        the disk fills, so a session can still be finished (0 disables the reserve; the default
        is 4 MiB, or none with ``create=False``). With ``create=False`` a missing file is a
        StoreError instead of a new buffer (for read-only tools such as ``evgw sessions``).
        """

        async def factory() -> Self:
            if reserve_bytes is None:
                reserve = _DEFAULT_RESERVE_BYTES if create else 0
            else:
                reserve = reserve_bytes
            settings = _Settings(
                site_id,
                max_size_mb,
                readings_retention_days,
                sealer or UnsealedRecord.sealed,
                clock or SystemClock(),
                reserve,
            )
            return await cls._open(Path(path), settings, create=create)

        return _Opening(factory)

    @classmethod
    async def _open(cls, path: Path, settings: _Settings, *, create: bool) -> Self:
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
        store = cls(db, path, settings)
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
            await db.execute(f"PRAGMA journal_size_limit={16 * MB}")
            if self._reserve_bytes > 0:
                # Keep the WAL below half the reserve: on a full disk, releasing the reserve
                # then always leaves room to checkpoint the WAL into the database file.
                async with db.execute("PRAGMA page_size") as cur:
                    row = await cur.fetchone()
                page_size = int(row[0]) if row else 4096
                pages = max(16, self._reserve_bytes // page_size // 2)
                await db.execute(f"PRAGMA wal_autocheckpoint={pages}")
                self._checkpoint_bytes = pages * page_size
            await self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: not a usable gateway buffer: {exc}") from exc
        if self._reserve_bytes > 0:
            await asyncio.to_thread(self._ensure_reserve)

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
        for conn in (self._sync_reader, self._now_writer):
            if conn is not None:
                conn.close()
        self._sync_reader = self._now_writer = None
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

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: the store is closed")
        return self._db

    async def _write(self, body: Body[T], *, durable: bool = False) -> T:
        """Run ``body`` in one write transaction, in its own shielded task so that a cancelled
        caller cannot cut it in half. ``durable`` commits with synchronous=FULL."""
        return await self._shielded(self._transaction(body, durable))

    async def _write_now(self, body: NowBody[T], *, nbytes: int) -> T:
        """Run ``body`` in one write transaction on the event loop's thread (shielded like
        ``_write``), for the one hot write: buffering readings, hundreds of times a second on a
        busy site. The same work on the connection's thread cost 1.2-1.4x as much CPU in the
        poll benchmark (bench/findings.md): every hop wakes a thread, and that thread's
        statements take turns with the busy loop for the GIL and with the chargers' simulator
        for the second core. Such a transaction appends ``nbytes`` or so to the WAL and never
        syncs (synchronous=NORMAL): what may block, the checkpoint's writes and fsync, runs on
        a worker thread, as does waiting for a write lock another process holds (a tool on the
        same file)."""
        return await self._shielded(self._transaction_now(body, nbytes))

    async def _shielded(self, transaction: Awaitable[T]) -> T:
        task = asyncio.ensure_future(transaction)
        task.set_name("store-transaction")
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

    async def _transaction_now(self, body: NowBody[T], nbytes: int) -> T:
        async with self._lock:
            conn = self._writer_now()
            try:
                result = _run_transaction(conn, body)  # busy_timeout 0: a held lock fails at once
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                result = await asyncio.to_thread(_run_transaction_waiting, conn, body)
            # What wal_autocheckpoint does at a commit, here on a worker thread and still under
            # the lock: the WAL stays as small as the main connection keeps it (below half the
            # disk-full reserve), which the next write waits for.
            self._written_since_checkpoint += nbytes + 4 * _PAGE_GUESS
            if self._written_since_checkpoint >= self._checkpoint_bytes:
                self._written_since_checkpoint = 0
                try:
                    await asyncio.to_thread(_checkpoint, conn)
                except sqlite3.Error as exc:  # as after an autocheckpoint: the next one retries
                    log.warning("store_checkpoint_failed", error=str(exc))
        return result

    def _writer_now(self) -> sqlite3.Connection:
        self._conn()  # refuse when closed
        if self._now_writer is None:
            # Its commits never checkpoint, which would block the loop on the disk:
            # ``_transaction_now`` does on a worker thread.
            pragmas = ("synchronous=NORMAL", "wal_autocheckpoint=0", "busy_timeout=0")
            self._now_writer = _connect(self.path, "writer", pragmas)
        return self._now_writer

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            return list(await self._conn().execute_fetchall(sql, params))  # one thread hop

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
            # a short busy timeout: this runs on the loop's thread (a WAL reader is rarely busy)
            self._sync_reader = _connect(self.path, "reader", ("busy_timeout=50", "query_only=ON"))
        try:
            return self._sync_reader.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise StoreError(f"{self.path}: reading for the uplink failed: {exc}") from exc
            return []


def _connect(path: Path, what: str, pragmas: Sequence[str]) -> sqlite3.Connection:
    """A plain connection beside aiosqlite's (autocommit: transactions are explicit)."""
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise StoreError(f"{path}: cannot open a {what}: {exc}") from exc
    return conn


def _checkpoint(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _run_transaction_waiting(conn: sqlite3.Connection, body: NowBody[T]) -> T:
    """``_run_transaction`` waiting up to 5 s for a write lock held elsewhere (on a worker
    thread); the connection's busy timeout goes back to 0 after."""
    conn.execute("PRAGMA busy_timeout=5000")
    try:
        return _run_transaction(conn, body)
    finally:
        conn.execute("PRAGMA busy_timeout=0")


def _run_transaction(conn: sqlite3.Connection, body: NowBody[T]) -> T:
    """``body`` between BEGIN IMMEDIATE and COMMIT, rolled back if anything fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return result
