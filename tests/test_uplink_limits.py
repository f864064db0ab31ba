"""Bounded command intake against a real mosquitto: a burst larger than the queue is answered
``busy`` (nothing dropped without a word), and a 10 MB publish never reaches the gateway (MQTT 5
Maximum Packet Size) while the uplink stays up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from test_uplink_mqtt import make_uplink, uplink_config

from gateway.store import Store
from gateway.uplink.mqtt import MAX_PACKET_BYTES, MqttUplink
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import Recorder, Target, running, wait_until


class SlowTarget(Target):
    """Starts that take a while, as when the charger's Modbus line is busy."""

    async def remote_start(self, charger_id: str, user: str, token: str | None) -> dict[str, Any]:
        await asyncio.sleep(0.002)
        return await super().remote_start(charger_id, user, token)


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with Store.open(tmp_path / "buffer.db", site_id="depot-7", reserve_bytes=0) as s:
        yield s


async def test_burst_of_3000_commands_all_answered(
    mosquitto: MosquittoBroker, store: Store
) -> None:
    burst = 3000
    target = SlowTarget()
    rec = Recorder(mosquitto.port)
    # A queue of 100 instead of 1,000: the same overflow with a tenth of the commands to apply
    # (each one writes its reply to the SQLite buffer).
    uplink = MqttUplink(
        uplink_config(mosquitto.url), "depot-7", store, target, backoff_min_s=0.1, inbox_size=100
    )
    async with running(rec.run()), running(uplink.run()):
        await rec.connected.wait()
        await wait_until(lambda: uplink.online, 5, "online")
        await asyncio.sleep(0.2)  # subscriptions in place
        assert rec.client is not None
        # The burst comes from another process, as fast as mosquitto_pub can send it.
        lines = "".join(
            json.dumps({"request_id": f"b{i}", "charger_id": "cp1", "user": "u"}) + "\n"
            for i in range(burst)
        )
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(mosquitto.port),
            "-q",
            "1",
            "-t",
            "evgw/depot-7/commands/start",
            "-l",
            stdin=asyncio.subprocess.PIPE,
        )
        await pub.communicate(lines.encode())
        assert pub.returncode == 0
        await wait_until(
            lambda: len(rec.on("commands/start/reply")) >= burst, 60, "a reply to every command"
        )
    replies = [m.json() for m in rec.on("commands/start/reply")]
    ids = [r["request_id"] for r in replies]
    assert sorted(ids) == sorted(f"b{i}" for i in range(burst))  # each exactly once
    busy = [r for r in replies if not r["ok"]]
    assert busy and all(r["error"]["code"] == "busy" for r in busy)
    assert len(target.calls) == burst - len(busy)
    assert uplink.stats.commands_busy == len(busy)
    assert uplink.stats.commands_dropped == 0


async def test_10_mb_command_never_reaches_the_gateway(
    mosquitto: MosquittoBroker, store: Store
) -> None:
    target = Target()
    rec = Recorder(mosquitto.port)
    uplink = make_uplink(uplink_config(mosquitto.url), store, target)
    async with running(rec.run()), running(uplink.run()):
        await rec.connected.wait()
        await wait_until(lambda: uplink.online, 5, "online")
        await asyncio.sleep(0.2)
        connects = uplink.stats.connects
        await rec.publish("commands/tokens", b"[" * (10 * 1024 * 1024))
        await rec.publish("commands/tokens", b"x" * (MAX_PACKET_BYTES // 2))
        cmd = {"request_id": "after", "charger_id": "cp1", "user": "alice"}
        await rec.publish("commands/start", json.dumps(cmd))
        await wait_until(lambda: rec.on("commands/start/reply"), 10, "the next command's reply")
        await asyncio.sleep(0.3)
    # The broker dropped the 10 MB one for us; the half-size one is read and refused as too large.
    tokens = [m.json() for m in rec.on("commands/tokens/reply")]
    assert [r["error"]["code"] for r in tokens] == ["too_large"]
    assert rec.on("commands/start/reply")[0].json()["ok"] is True
    assert uplink.stats.connects == connects  # the link never dropped
    assert uplink.stats.commands == 2
