"""Room on the disk: the size cap, pruning by age, and the reserve that lets a session be
finished on a full disk.

Readings are the only thing that gives way: pruned by age, by the size cap (oldest synced first,
then oldest unsynced) and dropped while the disk is full. A reserve file of preallocated bytes
sits next to the database. A session write that hits SQLITE_FULL (``_durable_write``) deletes the
reserve and the oldest readings, and retries; readings then pause until the reserve can be taken
again (gateway/store/readings.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
from typing import TypeVar

import aiosqlite
import structlog

from gateway.errors import StoreError
from gateway.outgoing import SESSION_STREAM
from gateway.store.core import DAY_S, Body, StoreCore
from gateway.store.failures import is_disk_full

__all__ = ["SpaceManaged"]

log = structlog.get_logger(__name__)

T = TypeVar("T")


class SpaceManaged(StoreCore):
    """The store's space management, and the durable write that relies on it."""

    async def _durable_write(self, body: Body[T], what: str) -> T:
        """A session-side write: FULL sync, and when the disk is full, make room and retry."""
        for attempt in range(3):
            try:
                result = await self._write(body, durable=True)
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
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
                (cutoff, now + DAY_S),
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
