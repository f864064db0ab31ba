"""gateway/uplink/pahoport.py against a real mosquitto: what the cloud consumer relies on beneath
aiomqtt. An aiomqtt or paho-mqtt upgrade that moves any of it fails here, by name."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import pytest

from gateway.uplink.pahoport import manual_acks
from tests.support.mqtt_broker import MosquittoBroker


def _client(broker: MosquittoBroker, identifier: str, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", broker.port, identifier=identifier, timeout=5.0, **kw)


async def test_manual_acks_hold_the_puback_until_acked(mosquitto: MosquittoBroker) -> None:
    """Unacked, a QoS 1 message comes again when the persistent session resumes; acked, not."""

    def consumer() -> aiomqtt.Client:
        return _client(
            mosquitto,
            "pahoport-consumer",
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
        )

    async def first_message(client: aiomqtt.Client) -> aiomqtt.Message | None:
        try:
            async with asyncio.timeout(1.5):
                async for m in client.messages:
                    return m
        except TimeoutError:
            return None
        return None

    c = consumer()
    manual_acks(c)
    async with c:
        await c.subscribe("q/#", qos=1)
    async with _client(mosquitto, "pahoport-producer") as producer:
        await producer.publish("q/1", b"one", qos=1)
    c = consumer()
    manual_acks(c)
    async with c:
        m = await first_message(c)
        assert m is not None and m.payload == b"one"  # not acked: kept by the broker
    c = consumer()
    ack = manual_acks(c)
    async with c:
        m = await first_message(c)
        assert m is not None and m.payload == b"one"  # came again
        ack(m.mid, m.qos)
        await asyncio.sleep(0.2)  # let the PUBACK leave before disconnecting
    c = consumer()
    manual_acks(c)
    async with c:
        assert await first_message(c) is None


def test_an_aiomqtt_without_its_paho_client_is_refused_by_name() -> None:
    class Moved:
        pass

    with pytest.raises(RuntimeError, match=r"pahoport\.py needs updating"):
        manual_acks(Moved())  # type: ignore[arg-type]
