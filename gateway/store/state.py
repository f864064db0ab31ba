"""The store's small state: the cloud's token list and the authorization cache (``AuthStore``
of gateway.ports), key-values, and the request ids of cloud commands with their replies
(``RequestLog``). Every write is durable (FULL sync), as cloud-pushed state must be.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import aiosqlite

from gateway.model import Token
from gateway.store.space import SpaceManaged

__all__ = ["SmallState"]

_CLOUD_LIST_KEY = "auth.cloud_list"


class SmallState(SpaceManaged):
    """Auth state, key-values and command request ids."""

    async def load_cloud_list(self) -> tuple[int, list[Token]]:
        data = await self.kv_get(_CLOUD_LIST_KEY)
        if not isinstance(data, dict):
            return 0, []
        return int(data["version"]), [Token.from_json(t) for t in data["tokens"]]

    async def save_cloud_list(self, version: int, tokens: Sequence[Token]) -> None:
        await self.kv_put(
            _CLOUD_LIST_KEY,
            {"version": int(version), "tokens": [t.to_json() for t in tokens]},
        )

    async def load_auth_cache(self) -> list[tuple[Token, float]]:
        rows = await self._read(
            "SELECT token, cached_at FROM auth_cache ORDER BY cached_at, token_id"
        )
        return [(Token.from_json(json.loads(t)), float(at)) for t, at in rows]

    async def cache_auth(self, token: Token, cached_at: float) -> None:
        text = json.dumps(token.to_json(), separators=(",", ":"))

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO auth_cache (token_id, token, cached_at) VALUES (?, ?, ?) "
                "ON CONFLICT(token_id) DO UPDATE SET token=excluded.token, "
                "cached_at=excluded.cached_at",
                (token.id, text, float(cached_at)),
            )

        await self._durable_write(body, "caching an authorization")

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

        await self._durable_write(body, f"saving {key}")

    async def remember_request_id(self, request_id: str) -> bool:
        """Record a command's request id; False when it was seen before (do not run it again)."""
        now = self._clock.time()

        async def body(db: aiosqlite.Connection) -> bool:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO request_ids (request_id, seen_ts) VALUES (?, ?)",
                (request_id, now),
            )
            return cursor.rowcount == 1

        return await self._durable_write(body, "remembering a request id")

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

        await self._durable_write(body, "remembering a command reply")
