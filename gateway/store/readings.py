"""The store's readings: buffered in their wire form (gateway/wire.py), read by the uplink page
by page, marked delivered by id ranges, and read back one value at a time for statistics.

While the disk is full a batch is dropped (logged once with counts, again when storing resumes);
readings never block a session write (gateway/store/space.py).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

import aiosqlite
import structlog

from gateway.errors import StoreError
from gateway.store.failures import is_disk_full, is_read_only
from gateway.store.space import SpaceManaged
from gateway.wire import encode_reading

__all__ = ["ReadingsTable"]

log = structlog.get_logger(__name__)

_READINGS_RETRY_S = 30.0  # while the disk is full, try storing readings again this often
_CAP_CHECK_ROWS = 5_000  # check the size cap after this many readings were added
# Readings go in this many rows a statement: what SQLite does once a statement (its reset and
# bindings, AUTOINCREMENT's read and write of sqlite_sequence) is then not paid once a reading.
# CPU in the write transaction: 3.3 -> 2.5 us a reading of 17 values. A fixed size keeps one
# prepared statement in the cache; the rest of a batch goes in one row a statement.
_ROWS_A_STATEMENT = 50
_INSERT_ONE = "INSERT INTO readings (device_id, ts, data, wire) VALUES (?, ?, '', ?)"
_INSERT_MANY = "INSERT INTO readings (device_id, ts, data, wire) VALUES " + ",".join(
    ["(?, ?, '', ?)"] * _ROWS_A_STATEMENT
)


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


class ReadingsTable(SpaceManaged):
    """The readings part of ``SessionStore`` and ``UplinkStore`` (gateway.ports)."""

    async def add_readings(self, rows: Sequence[tuple[str, float, Mapping[str, Any]]]) -> None:
        """Buffer readings in one transaction. While the disk is full they are dropped (logged
        once with counts, again when storing resumes); they never block session writes."""
        await self.add_wire_readings(
            [(dev, ts, encode_reading(ts, values)) for dev, ts, values in rows]
        )

    async def add_wire_readings(self, rows: Sequence[tuple[str, float, bytes]]) -> None:
        """``add_readings`` for readings already in their wire form (``encode_reading``): the
        gateway encodes each sample as it arrives, while its values are still in the CPU's
        cache (a batch encoded 500 samples later cost twice the CPU in the poll benchmark)."""
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
        params = [(dev, float(ts), wire) for dev, ts, wire in rows]

        whole = len(params) - len(params) % _ROWS_A_STATEMENT
        groups = [
            tuple(chain.from_iterable(params[i : i + _ROWS_A_STATEMENT]))
            for i in range(0, whole, _ROWS_A_STATEMENT)
        ]

        def body(conn: sqlite3.Connection) -> None:
            # Rows keep their order (ids ascending) within and across the statements.
            if groups:
                conn.executemany(_INSERT_MANY, groups)
            if whole < len(params):
                conn.executemany(_INSERT_ONE, params[whole:])
            # One writer at a time (BEGIN IMMEDIATE): the newest ids are the rows just added.
            conn.execute(
                "INSERT INTO readings_pending (id) SELECT id FROM readings ORDER BY id DESC "
                "LIMIT ?",
                (len(params),),
            )

        try:
            await self._write_now(body, nbytes=sum(len(p[2]) for p in params) + 64 * len(params))
        except sqlite3.Error as exc:
            # A read-only file system (the kernel's answer to a failing card) is treated like
            # a full disk: readings give way, and are tried again later.
            if not (is_disk_full(exc) or is_read_only(exc)):
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
        # Written before schema version 2, with only the decoded values: encode them now.
        old = await self._read(
            "SELECT r.id, r.device_id, r.ts, r.data, r.wire FROM readings_pending p "
            "JOIN readings r ON r.id = p.id WHERE p.id > ? ORDER BY p.id LIMIT ?",
            (int(after_id), int(limit)),
        )
        return [
            (i, d, wire if wire is not None else encode_reading(ts, json.loads(data)))
            for i, d, ts, data, wire in old
        ]

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
