"""The store's session tables: open sessions with their energy curve, and the sealed chain of
finished records (never deleted, never changed but for ``synced_at``).

A finished session, once ``finish_session`` returned, is never lost or changed (CONTRACT section
5): the sealed record and its outbox message are written in one transaction with
``synchronous=FULL``, which on a full disk makes room and retries (gateway/store/space.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict, Unpack

import aiosqlite

from gateway.errors import StoreError
from gateway.model import MeterPoint
from gateway.outgoing import SESSION_STREAM, SESSION_TOPIC
from gateway.records import GENESIS, SessionRecord, UnsealedRecord
from gateway.store.finished import INSERT_FINISHED, finished_row
from gateway.store.space import SpaceManaged

__all__ = ["SessionQuery", "SessionTables"]


class SessionQuery(TypedDict, total=False):
    """Which finished sessions to read; every key is optional. ``since``/``until`` (Unix
    seconds) select by start time: since <= started_at < until."""

    since: float | None
    until: float | None
    user: str | None
    charger: str | None
    unsynced_only: bool


def _session_filter(query: SessionQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    since, until = query.get("since"), query.get("until")
    user, charger = query.get("user"), query.get("charger")
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
    if query.get("unsynced_only"):
        clauses.append("synced_at IS NULL")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _finished_rows(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """(record, synced_at, finished_ts) rows wrapped with their local state."""
    return [
        {"state": "finished", "synced_at": synced, "finished_at": fin, "record": json.loads(rec)}
        for rec, synced, fin in rows
    ]


class SessionTables(SpaceManaged):
    """``SessionStore`` of gateway.ports, and the queries ``evgw sessions``, the report and the
    status page make."""

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

        await self._durable_write(body, "saving open session")

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

        await self._durable_write(body, "saving session point")

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

    async def finish_session(self, record: UnsealedRecord) -> SessionRecord:
        session_id = record.session_id
        if record.site_id != self.site_id:
            raise StoreError(
                f"session {session_id}: site_id {record.site_id!r} is not this store's "
                f"{self.site_id!r}"
            )
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> SessionRecord:
            async with db.execute(
                "SELECT record FROM finished_sessions WHERE session_id = ?", (session_id,)
            ) as cur:
                done = await cur.fetchone()
            if done is not None:
                return SessionRecord.from_dict(json.loads(done[0]))
            async with db.execute(
                "SELECT seq, hash FROM finished_sessions WHERE site_id = ? ORDER BY seq DESC "
                "LIMIT 1",
                (self.site_id,),
            ) as cur:
                last = await cur.fetchone()
            seq, prev_hash = (int(last[0]) + 1, str(last[1])) if last else (1, GENESIS)
            sealed = self._sealer(record, seq, prev_hash)
            if (sealed.session_id, sealed.seq, sealed.prev_hash) != (session_id, seq, prev_hash):
                raise StoreError(f"session {session_id}: the sealer changed the record's place")
            payload = sealed.canonical()
            cursor = await db.execute(
                "INSERT INTO outbox (stream, topic, payload, qos, retain, created_ts) VALUES (?, "
                "?, ?, 1, 0, ?)",
                (SESSION_STREAM, SESSION_TOPIC, payload, now),
            )
            await db.execute(
                "INSERT " + INSERT_FINISHED,
                finished_row(
                    self.site_id,
                    sealed.seq,
                    session_id,
                    sealed,
                    payload.decode(),
                    sealed.hash,
                    cursor.lastrowid,
                    now,
                ),
            )
            await db.execute("DELETE FROM open_sessions WHERE session_id = ?", (session_id,))
            await db.execute("DELETE FROM session_points WHERE session_id = ?", (session_id,))
            return sealed

        return await self._durable_write(body, f"finishing session {session_id}")

    async def finished_sessions(self, **query: Unpack[SessionQuery]) -> list[dict[str, Any]]:
        """Sealed records, exactly as stored (verifiable with gateway.records.record_hash), in
        ``seq`` order, selected by ``query`` (see :class:`SessionQuery`)."""
        rows = await self.finished_session_rows(**query)
        return [row["record"] for row in rows]

    async def finished_session_rows(self, **query: Unpack[SessionQuery]) -> list[dict[str, Any]]:
        """Like finished_sessions, wrapped with local state: ``{"state": "finished",
        "synced_at": float | None, "finished_at": float, "record": {...}}``."""
        where, params = _session_filter(query)
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
