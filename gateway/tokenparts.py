"""A token list too large for one command, pushed in numbered parts of one version.

Why: a command payload is capped at 64 KiB (``MAX_COMMAND_BYTES``, so one message can never hold
the gateway's memory hostage), which is ~1,050 tokens; the list itself may hold 100,000. The
cloud therefore sends ``{"version": V, "mode": M, "part": {"index": i, "count": n}, "tokens":
[...]}`` for i = 1..n. Each part is kept in the buffer as it arrives (a restart half way keeps
what came); the list switches to version V in one step when the last missing part arrives, and
not before: until then lookups use the previous version. Parts of an older version are dropped
when a newer one starts; a part of a version older than the one being assembled is
``stale_version``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.errors import CommandError
from gateway.model import Token
from gateway.ports import KeyValueStore, TokenListPart

__all__ = ["MAX_PARTS", "TokenParts"]

MAX_PARTS = 1000
_PENDING = "tokens.pending"
_PART = "tokens.part."


Apply = Callable[[int, str, Sequence[Token], Sequence[str]], Awaitable[dict[str, Any]]]


class TokenParts:
    """Collects the parts of one token-list version; ``apply`` gets the whole list once."""

    def __init__(
        self, store: KeyValueStore, current_version: Callable[[], int], apply: Apply
    ) -> None:
        self._store = store
        self._current = current_version
        self._apply = apply

    async def add(self, part: TokenListPart) -> dict[str, Any]:
        version, mode, index, count = part.version, part.mode, part.index, part.count
        if not 1 <= count <= MAX_PARTS or not 1 <= index <= count:
            raise CommandError(
                "invalid", f"part {index} of {count}: need 1 <= index <= count <= {MAX_PARTS}"
            )
        if version <= self._current():
            raise CommandError(
                "stale_version",
                f"token list version {version} is not newer than {self._current()}",
            )
        pending = await self._store.kv_get(_PENDING)
        if pending is not None and pending["version"] > version:
            raise CommandError(
                "stale_version",
                f"version {pending['version']} is being received; part of {version} ignored",
            )
        if pending is None or pending["version"] < version:
            pending = {"version": version, "mode": mode, "count": count, "received": []}
        elif pending["mode"] != mode or pending["count"] != count:
            raise CommandError(
                "invalid",
                f"version {version} is being received as {pending['count']} parts in mode "
                f"{pending['mode']}; this part says {count} in mode {mode}",
            )
        await self._store.kv_put(
            f"{_PART}{index}",
            {
                "version": version,
                "tokens": [t.to_json() for t in part.tokens],
                "remove": list(part.remove),
            },
        )
        received = sorted(set(pending["received"]) | {index})
        pending["received"] = received
        await self._store.kv_put(_PENDING, pending)
        if len(received) < count:
            return {"version": version, "part": index, "count": count, "received": len(received)}
        return await self._complete(pending)

    async def _complete(self, pending: dict[str, Any]) -> dict[str, Any]:
        version, count = pending["version"], pending["count"]
        tokens: list[Token] = []
        remove: list[str] = []
        for i in range(1, count + 1):
            part = await self._store.kv_get(f"{_PART}{i}")
            if part is None or part["version"] != version:
                # Overwritten by a later version's part of the same index: start again.
                pending["received"] = [j for j in pending["received"] if j != i]
                await self._store.kv_put(_PENDING, pending)
                raise CommandError("invalid", f"part {i} of version {version} is missing")
            tokens.extend(Token.from_json(d) for d in part["tokens"])
            remove.extend(part["remove"])
        result = await self._apply(version, pending["mode"], tokens, remove)
        await self._store.kv_put(_PENDING, None)
        for i in range(1, count + 1):
            await self._store.kv_put(f"{_PART}{i}", None)
        return {**result, "parts": count, "complete": True}
