"""A token list larger than one command (64 KiB, ~1,050 tokens) pushed in versioned parts over a
real mosquitto into the real Authorizer and SQLite buffer: the list switches in one step when the
last part arrives, survives a restart half way, and refuses mixed or stale parts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from test_uplink_mqtt import uplink_config

from gateway.auth import Authorizer
from gateway.config import AuthConfig
from gateway.errors import CommandError
from gateway.model import SystemClock, Token, TokenType
from gateway.ports import TokenListPart
from gateway.store import Store
from gateway.tokenparts import TokenParts
from gateway.uplink.commands import MAX_COMMAND_BYTES
from gateway.uplink.mqtt import MqttUplink
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import Recorder, Target, running, wait_until


def _tokens(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"04{i:010X}", "type": "rfid", "user": f"user-{i:06d}"}
        for i in range(start, start + n)
    ]


class PartsTarget(Target):
    def __init__(self, parts: TokenParts) -> None:
        super().__init__()
        self.parts = parts

    async def update_token_part(self, part: TokenListPart) -> dict[str, Any]:
        return await self.parts.add(part)


async def _authorizer(store: Store) -> tuple[Authorizer, TokenParts]:
    auth = Authorizer(AuthConfig(), store, None, SystemClock())
    await auth.load()
    return auth, TokenParts(store, lambda: auth.cloud_version, auth.update_tokens)


def _command(
    version: int, index: int, count: int, tokens: list[dict[str, Any]], mode: str = "replace"
) -> bytes:
    return json.dumps(
        {
            "request_id": f"t{version}-{index}",
            "version": version,
            "mode": mode,
            "part": {"index": index, "count": count},
            "tokens": tokens,
        },
        separators=(",", ":"),
    ).encode()


async def test_twenty_thousand_tokens_in_parts_over_mqtt(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    total, per_part = 20_000, 1_000
    count = total // per_part
    tokens = _tokens(total)
    # One message could never carry them: the reason parts exist.
    assert len(_command(2, 1, 1, tokens)) > MAX_COMMAND_BYTES
    async with Store.open(tmp_path / "b.db", site_id="depot-7", reserve_bytes=0) as store:
        auth, parts = await _authorizer(store)
        await auth.update_tokens(1, "replace", [Token("OLD", TokenType.RFID, "old")], [])
        rec = Recorder(mosquitto.port)
        uplink = MqttUplink(
            uplink_config(mosquitto.url), "depot-7", store, PartsTarget(parts), backoff_min_s=0.1
        )
        async with running(rec.run()), running(uplink.run()):
            await rec.connected.wait()
            await wait_until(lambda: uplink.online, 5, "online")
            await asyncio.sleep(0.2)
            # Parts out of order; until the last one the old list stays in force.
            order = [*range(count, 0, -1)]
            for n, index in enumerate(order, start=1):
                chunk = tokens[(index - 1) * per_part : index * per_part]
                payload = _command(2, index, count, chunk)
                assert len(payload) <= MAX_COMMAND_BYTES
                await rec.publish("commands/tokens", payload)
                if n < count:
                    await wait_until(
                        lambda n=n: len(rec.on("commands/tokens/reply")) >= n, 10, "part reply"
                    )
                    assert auth.cloud_version == 1
            await wait_until(
                lambda: len(rec.on("commands/tokens/reply")) >= count, 60, "all replies"
            )
        replies = [m.json() for m in rec.on("commands/tokens/reply")]
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:2]
        assert replies[-1]["result"] == {
            "version": 2,
            "count": total,
            "parts": count,
            "complete": True,
        }
        assert auth.cloud_version == 2
    # Reopened: the switched list is what the buffer holds.
    async with Store.open(tmp_path / "b.db", site_id="depot-7", reserve_bytes=0) as store:
        version, saved = await store.load_cloud_list()
        assert version == 2 and len(saved) == total and "OLD" not in {t.id for t in saved}


async def test_parts_survive_a_restart_and_mixed_or_stale_parts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    async with Store.open(path, site_id="x", reserve_bytes=0) as store:
        auth, parts = await _authorizer(store)
        from gateway.uplink.commands import _token

        t = [_token(d) for d in _tokens(30)]
        assert (await parts.add(TokenListPart(5, "replace", 1, 3, t[:10], [])))["received"] == 1
        with pytest.raises(CommandError) as info:
            await parts.add(TokenListPart(5, "patch", 2, 3, t[10:20], []))
        assert info.value.code == "invalid"
        with pytest.raises(CommandError) as info:
            await parts.add(TokenListPart(4, "replace", 1, 1, t[:1], []))
        assert info.value.code == "stale_version"
        await parts.add(TokenListPart(5, "replace", 2, 3, t[10:20], []))
        assert auth.cloud_version == 0
    async with Store.open(path, site_id="x", reserve_bytes=0) as store:
        auth, parts = await _authorizer(store)
        result = await parts.add(TokenListPart(5, "replace", 3, 3, t[20:], []))
        assert result == {"version": 5, "count": 30, "parts": 3, "complete": True}
        assert auth.cloud_version == 5
        # A newer version starts over; an older one is stale now.
        await parts.add(TokenListPart(7, "patch", 1, 2, [], ["04" + "0" * 10]))
        with pytest.raises(CommandError) as info:
            await parts.add(TokenListPart(6, "patch", 1, 2, [], []))
        assert info.value.code == "stale_version"
        await parts.add(TokenListPart(7, "patch", 2, 2, [], []))
        assert auth.cloud_version == 7
        _, saved = await store.load_cloud_list()
        assert len(saved) == 29
