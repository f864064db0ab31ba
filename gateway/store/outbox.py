"""The store's outbox: messages waiting for the broker, deleted when it acknowledges them.

Which classes of message go through it (finished sessions, session starts) and which do not is
written down in gateway/outgoing.py.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import aiosqlite

from gateway.ports import OutboxRow
from gateway.store.space import SpaceManaged

__all__ = ["OutboxTable"]

_CHUNK = 500  # ids per IN (...) list: below SQLite's default variable limit everywhere


def _chunks(ids: Sequence[int]) -> Generator[list[int], None, None]:
    for i in range(0, len(ids), _CHUNK):
        yield [int(x) for x in ids[i : i + _CHUNK]]


class OutboxTable(SpaceManaged):
    """The outbox part of ``SessionStore`` and ``UplinkStore`` (gateway.ports)."""

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

        return await self._durable_write(body, f"queueing {stream} message")

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
