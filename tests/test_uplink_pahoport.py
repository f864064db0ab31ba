"""gateway/uplink/pahoport.py against a real mosquitto: what the drain and the consumer rely on
beneath aiomqtt. An aiomqtt or paho-mqtt upgrade that moves any of it fails here, by name."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest

from gateway.uplink import pahoport
from gateway.uplink.pahoport import corked_writes, direct_publisher, lean_pubacks, manual_acks
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import wait_until


def _client(broker: MosquittoBroker, identifier: str, **kw: Any) -> aiomqtt.Client:
    return pahoport.Client("127.0.0.1", broker.port, identifier=identifier, timeout=5.0, **kw)


@contextlib.asynccontextmanager
async def _received(
    broker: MosquittoBroker, topics: str, qos: int
) -> AsyncIterator[list[tuple[str, bytes, int]]]:
    """(topic, payload, qos) of every message on ``topics``, as they arrive."""
    received: list[tuple[str, bytes, int]] = []
    async with _client(broker, f"pahoport-sub-{topics}") as sub:
        await sub.subscribe(topics, qos=qos)

        async def receive() -> None:
            async for m in sub.messages:
                assert isinstance(m.payload, bytes)
                received.append((m.topic.value, m.payload, m.qos))

        reader = asyncio.create_task(receive())
        try:
            yield received
        finally:
            reader.cancel()


async def test_direct_publish_reports_pubacks_and_keeps_aiomqtt_publishes_working(
    mosquitto: MosquittoBroker,
) -> None:
    acked: list[int] = []
    async with _received(mosquitto, "t/#", 1) as received:
        async with _client(mosquitto, "pahoport-pub") as pub:
            mine: set[int] = set()
            forwarded: list[int] = []

            def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
                if mid in mine:
                    acked.append(mid)
                else:
                    forwarded.append(mid)
                    forward(c, userdata, mid, reason, props)

            publish, forward = direct_publisher(pub, on_publish)
            infos = [publish(f"t/{i}", b"%d" % i, 1, False) for i in range(20)]
            assert all(info.rc == paho.MQTT_ERR_SUCCESS for info in infos)
            mine.update(info.mid for info in infos)
            await wait_until(lambda: len(acked) == 20, 5, "20 PUBACKs")
            assert sorted(acked) == sorted(mine) and all(info.is_published() for info in infos)
            # aiomqtt's own awaited publish still completes: its PUBACK is passed on
            await pub.publish("t/awaited", b"a", qos=1, timeout=5)
            assert len(forwarded) == 1
            qos0 = publish("t/qos0", b"z", 0, False)
            assert qos0.rc == paho.MQTT_ERR_SUCCESS
            await wait_until(qos0.is_published, 5, "the QoS 0 publish written")
        await wait_until(lambda: len(received) == 22, 5, "every message at the subscriber")
    assert [t for t, _, _ in received[:20]] == [f"t/{i}" for i in range(20)]
    assert received[20][0] == "t/awaited" and received[21] == ("t/qos0", b"z", 0)


@pytest.mark.skipif(sys.platform != "linux", reason="TCP_CORK is Linux's")
async def test_corked_writes_send_a_burst_corked_and_uncork_after(
    mosquitto: MosquittoBroker,
) -> None:
    async with (
        _received(mosquitto, "c/#", 0) as received,
        _client(mosquitto, "cork-pub") as pub,
    ):
        sock = pub._client.socket()  # the TCP socket under paho
        assert sock is not None
        corked_during: list[int] = []

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            # paho reports a QoS 0 publish from inside loop_write, once it is written
            corked_during.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))

        publish, _ = direct_publisher(pub, on_publish)
        assert corked_writes(pub) is True
        for i in range(30):
            publish(f"c/{i}", b"x" * 1000 + b"%d" % i, 0, False)
        await wait_until(lambda: len(corked_during) == 30, 5, "30 writes")
        assert corked_during == [1] * 30  # written while corked
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0  # and let go
        publish("c/last", b"last", 0, False)  # a lone message after a burst goes out
        await wait_until(lambda: received[-1:] == [("c/last", b"last", 0)], 5, "the last")
    assert [p for _, p, _ in received[:30]] == [b"x" * 1000 + b"%d" % i for i in range(30)]


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


async def test_a_cancellation_landing_with_the_puback_is_not_lost(
    mosquitto: MosquittoBroker,
) -> None:
    """The PUBACK of an awaited publish and a cancellation of its task in the same loop turn:
    the task ends cancelled. aiomqtt's own timer (asyncio.wait_for) returns the publish's result
    on Python 3.11 and the task carries on: a stopping uplink then never stops."""
    async with _client(mosquitto, "pahoport-cancel") as pub:
        task: asyncio.Task[None] | None = None
        publishing = asyncio.Event()

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            forward(c, userdata, mid, reason, props)  # aiomqtt's: the publish is confirmed
            assert task is not None
            task.cancel()  # ... and the stop arrives in the same turn

        _, forward = direct_publisher(pub, on_publish)

        async def publish_then_carry_on() -> None:
            publishing.set()
            await pub.publish("t/cancel", b"x", qos=1, timeout=5)
            await asyncio.sleep(3600)  # a lost cancellation would leave the task here

        task = asyncio.create_task(publish_then_carry_on())
        await publishing.wait()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done == {task}, "the cancellation was lost: the task went on after its publish"
        assert task.cancelled()


async def test_a_cancellation_landing_with_the_result_is_not_lost_on_any_timer() -> None:
    """The same race for every awaited call aiomqtt times (connect, disconnect, subscribe): a
    result and a cancellation in one turn end in CancelledError; a timeout is still MqttError."""
    client = pahoport.Client("127.0.0.1", 1, timeout=5.0)
    loop = asyncio.get_running_loop()
    for timeout in (None, 5.0, math.inf):
        fut: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(client._wait_for(fut, timeout=timeout))
        await asyncio.sleep(0)  # the task waits on fut
        fut.set_result(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    never: asyncio.Future[int] = loop.create_future()
    with pytest.raises(aiomqtt.MqttError, match="timed out"):
        await client._wait_for(never, timeout=0.05)
    assert never.cancelled()


# -- lean PUBACKs and dropped connections, against a scripted MQTT 5 broker -----------------------


def _puback(mid: bytes, rest: bytes = b"") -> bytes:
    return bytes([0x40, 2 + len(rest)]) + mid + rest


_REASON_STRING = b"\x1f\x00\x06denied"  # property 0x1F (reason string) "denied"
# PUBACK forms by topic: what MQTT 5 allows a broker to send (section 3.4.2)
_PUBACKS = {
    "p/id-only": lambda mid: _puback(mid),
    "p/success": lambda mid: _puback(mid, b"\x00"),
    "p/no-subscribers": lambda mid: _puback(mid, b"\x10"),
    "p/not-authorized": lambda mid: _puback(mid, b"\x87"),
    "p/quota-empty-props": lambda mid: _puback(mid, b"\x97\x00"),
    "p/with-reason-string": lambda mid: _puback(
        mid, b"\x87" + bytes([len(_REASON_STRING)]) + _REASON_STRING
    ),
}


@contextlib.asynccontextmanager
async def _scripted_broker(*, drop_on_subscribe: bool = False) -> AsyncIterator[int]:
    """An MQTT 5 broker of a few lines on a free port: CONNACK, a PUBACK of the form its topic
    names (``_PUBACKS``) to every QoS 1 PUBLISH, and with ``drop_on_subscribe`` a hang-up
    instead of a SUBACK."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def packet() -> tuple[int, bytes]:
            head = (await reader.readexactly(1))[0]
            length, shift = 0, 0
            while True:
                byte = (await reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    return head, await reader.readexactly(length)

        try:
            await packet()  # CONNECT
            writer.write(b"\x20\x03\x00\x00\x00")  # CONNACK: success, no properties
            while True:
                head, body = await packet()
                kind = head & 0xF0
                if kind == 0x30 and head & 0x06:  # PUBLISH, QoS 1
                    n = int.from_bytes(body[:2], "big")
                    writer.write(_PUBACKS[body[2 : 2 + n].decode()](body[2 + n : 4 + n]))
                elif kind == 0x80 and drop_on_subscribe:  # SUBSCRIBE
                    return
                elif kind == 0xC0:  # PINGREQ
                    writer.write(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    return
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def _pubacks_seen(
    port: int, lean: bool
) -> tuple[list[tuple[str, int, str, str]], list[Any], Any]:
    """(topic, reason value, reason name, properties) of each PUBACK, as on_publish got it; the
    properties objects themselves; the paho client."""
    client = pahoport.Client(
        "127.0.0.1", port, identifier="lean", protocol=aiomqtt.ProtocolVersion.V5, timeout=5.0
    )
    seen: list[tuple[str, int, str, str]] = []
    objects: list[Any] = []
    topics: dict[int, str] = {}
    async with client:

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            seen.append((topics[mid], reason.value, str(reason), str(props)))
            objects.append(props)

        publish, _ = direct_publisher(client, on_publish)
        if lean:
            lean_pubacks(client)
        for topic in _PUBACKS:
            info = publish(topic, b"x", 1, False)
            topics[info.mid] = topic
        await wait_until(lambda: len(seen) == len(_PUBACKS), 5, "every PUBACK")
        return seen, objects, client._client


async def test_lean_pubacks_hand_on_what_paho_would_for_every_puback_form() -> None:
    """Each form a broker may send, read by paho itself and by ``lean_pubacks``: the same
    packet id, reason code and properties reach on_publish, and paho's own bookkeeping (the
    message table, the in-flight count, each message's info) ends the same."""
    async with _scripted_broker() as port:
        stock, fresh, _ = await _pubacks_seen(port, lean=False)
        lean, shared, inner = await _pubacks_seen(port, lean=True)
    assert lean == stock
    # paho builds properties for every PUBACK; the lean path shares one empty set
    assert len({id(p) for p in fresh}) == 6
    assert len({id(p) for p in shared[:5]}) == 1 and shared[5] is not shared[0]
    assert [(t, v) for t, v, _, _ in lean] == [
        ("p/id-only", 0),
        ("p/success", 0),
        ("p/no-subscribers", 0x10),
        ("p/not-authorized", 0x87),
        ("p/quota-empty-props", 0x97),
        ("p/with-reason-string", 0x87),
    ]
    assert lean[-1][3] == "[ReasonString : denied]"  # handed to paho's own decoder
    assert inner._out_messages == {} and inner._inflight_messages == 0


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311])
async def test_lean_pubacks_against_mosquitto(
    mosquitto: MosquittoBroker, protocol: aiomqtt.ProtocolVersion
) -> None:
    """mosquitto's PUBACKs (MQTT 5: 2 bytes with a subscriber, reason 0x10 without one; MQTT
    3.1.1: 2 bytes) complete every publish, and aiomqtt's awaited publish still completes."""
    async with _received(mosquitto, "heard/#", 1) as received:
        async with _client(mosquitto, "lean-pub", protocol=protocol) as pub:
            reasons: dict[int, Any] = {}

            def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
                if mid in mine:
                    reasons[mid] = reason
                else:
                    forward(c, userdata, mid, reason, props)

            publish, forward = direct_publisher(pub, on_publish)
            lean_pubacks(pub)
            mine: set[int] = set()
            infos = [
                publish(f"{t}/{i}", b"x", 1, False) for i in range(10) for t in ("heard", "unheard")
            ]
            mine.update(info.mid for info in infos)
            await wait_until(lambda: len(reasons) == 20, 5, "20 PUBACKs")
            assert all(info.is_published() for info in infos)
            assert not any(r.is_failure for r in reasons.values())
            await pub.publish("heard/awaited", b"a", qos=1, timeout=5)
            inner = pub._client
            assert inner._out_messages == {} and inner._inflight_messages == 0
        await wait_until(lambda: len(received) == 11, 5, "the heard ones")


async def test_a_dropped_connection_ends_an_awaited_call_at_once() -> None:
    """The broker hangs up instead of answering a SUBSCRIBE: the subscribe fails as soon as the
    connection is gone, not when its 10 s timeout runs out (aiomqtt's own wait did)."""
    async with _scripted_broker(drop_on_subscribe=True) as port:
        client = pahoport.Client(
            "127.0.0.1", port, identifier="dropped", protocol=aiomqtt.ProtocolVersion.V5, timeout=10
        )
        loop = asyncio.get_running_loop()
        with contextlib.suppress(aiomqtt.MqttError):  # leaving a dead connection may say so
            async with client:
                start = loop.time()
                with pytest.raises(aiomqtt.MqttError, match="Disconnected while waiting"):
                    await client.subscribe("t/#", qos=1)
                assert loop.time() - start < 2
