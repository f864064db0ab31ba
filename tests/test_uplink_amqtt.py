"""The uplink against the demo's embedded broker (amqtt: pure Python, MQTT 3.1.1 only).

amqtt neither answers nor closes an MQTT 5 CONNECT that carries a will: the uplink must notice
the silent connect and switch to 3.1.1 instead of waiting forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from gateway.config import UplinkConfig
from gateway.demo import embedded_broker
from gateway.store import Store
from gateway.uplink import pahoport
from gateway.uplink.mqtt import MqttUplink
from tests.support.mqtt_broker import free_port
from tests.support.uplink import Target, running, wait_until

pytestmark = pytest.mark.e2e  # a real broker, if in-process


async def test_uplink_switches_to_v311_when_an_mqtt5_connect_goes_unanswered(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with (
        embedded_broker(port),
        Store.open(tmp_path / "buffer.db", site_id="s1") as store,
    ):
        await store.enqueue("event", "sessions/started", b'{"x":1}')
        uplink = MqttUplink(
            UplinkConfig(url=f"mqtt://127.0.0.1:{port}", client_id="evgw-s1", topic_prefix="t"),
            "s1",
            store,
            Target(),
            connect_timeout_s=1.0,
            backoff_min_s=0.05,
            backoff_max_s=0.1,
        )
        async with pahoport.Client(
            "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311, identifier="cloud"
        ) as cloud:
            await cloud.subscribe("t/s1/#", qos=1)
            async with running(uplink.run(), "uplink"):
                await wait_until(lambda: uplink.online, 10.0, "uplink online over 3.1.1")
                assert uplink.stats.protocol == "3.1.1"
                got: list[str] = []
                async with asyncio.timeout(10):
                    async for message in cloud.messages:
                        got.append(message.topic.value)
                        if message.topic.value == "t/s1/sessions/started":
                            break
                assert "t/s1/gateway/status" in got
        assert (await store.outbox_backlog()).get("event", 0) == 0
