"""gateway/uplink/link.py against a real mosquitto (and a fault proxy in front of it): paho's
client on its own network thread, with everything it reports handed to the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import pytest

from gateway.uplink.link import Link, LinkError, LinkOptions
from tests.support.mqtt_broker import HOST, FaultProxy, MosquittoBroker, free_port
from tests.support.uplink import wait_until


def _options(port: int, client_id: str, **kw: object) -> LinkOptions:
    base: dict[str, object] = {
        "host": HOST,
        "port": port,
        "client_id": client_id,
        "v5": True,
        "keepalive_s": 30,
        "connect_timeout_s": 5.0,
        "max_inflight": 200,
    }
    base.update(kw)
    return LinkOptions(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _listener(port: int, topic: str) -> AsyncIterator[list[tuple[str, bytes, bool]]]:
    """Every message on ``topic`` another Link receives, as it arrives."""
    got: list[tuple[str, bytes, bool]] = []
    async with Link(_options(port, f"listener-{topic.replace('/', '-')}")) as sub:
        sub.on_message = lambda t, p, r: got.append((t, p, r))
        assert await sub.subscribe(topic, 1, wait_s=5.0) == [1]
        yield got


async def test_pubacks_come_back_in_batches_on_the_loop_and_messages_arrive_in_order(
    mosquitto: MosquittoBroker,
) -> None:
    loop_thread = threading.current_thread()
    acked: list[int] = []
    calls: list[threading.Thread] = []

    def on_acked(mids: list[int]) -> None:
        calls.append(threading.current_thread())
        acked.extend(mids)

    async with _listener(mosquitto.port, "t/burst/#") as got:
        async with Link(_options(mosquitto.port, "burst")) as link:
            link.on_acked = on_acked
            sent = [
                link.publish_nowait(f"t/burst/{i % 3}", b"%d" % i, 1, False) for i in range(500)
            ]
            assert len(set(sent)) == 500
            await wait_until(lambda: len(acked) == 500, 10.0)
            # an awaited publish beside them is answered to its waiter, not to on_acked
            await link.publish("t/burst/x", b"awaited", 1, wait_s=5.0)
        await wait_until(lambda: len(got) == 501, 10.0)
    assert sorted(acked) == sorted(sent)  # every PUBACK once, none of the awaited one
    assert set(calls) == {loop_thread}  # on the event loop's thread, never paho's
    assert len(calls) < 500  # handed over in batches
    assert [p for _, p, _ in got[:500]] == [b"%d" % i for i in range(500)]
    assert got[-1] == ("t/burst/x", b"awaited", False)


async def test_qos0_is_reported_once_written(mosquitto: MosquittoBroker) -> None:
    acked: list[int] = []
    async with (
        _listener(mosquitto.port, "t/q0") as got,
        Link(_options(mosquitto.port, "q0")) as link,
    ):
        link.on_acked = acked.extend
        mid = link.publish_nowait("t/q0", b"zero", 0, False)
        await wait_until(lambda: acked == [mid], 5.0)
        await wait_until(lambda: got == [("t/q0", b"zero", False)], 5.0)


async def test_a_retained_message_arrives_retained_on_subscribe(mosquitto: MosquittoBroker) -> None:
    async with Link(_options(mosquitto.port, "keeper")) as link:
        await link.publish("t/kept", b"last", 1, True, wait_s=5.0)
    async with _listener(mosquitto.port, "t/kept") as got:
        await wait_until(lambda: got == [("t/kept", b"last", True)], 5.0)


async def test_nobody_listening_is_a_link_error() -> None:
    with pytest.raises(LinkError, match="ConnectionRefusedError"):
        async with Link(_options(free_port(), "nobody")):
            pass


async def test_a_server_that_never_answers_connect_times_out() -> None:
    """A TCP server that accepts and says nothing (as a 3.1.1-only broker may do to an MQTT 5
    CONNECT): a LinkError naming the timeout, which the uplink takes as its cue to switch."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(LinkError, match="timed out"):
            async with Link(_options(port, "silent", connect_timeout_s=1.0)):
                pass
        assert time.monotonic() - started < 5.0
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_dropped_connection_ends_wait_closed_and_fails_waiters(
    mosquitto: MosquittoBroker, fault_proxy: FaultProxy
) -> None:
    async with Link(_options(fault_proxy.port, "dropped")) as link:
        fault_proxy.stall()
        publish = asyncio.create_task(link.publish("t/lost", b"x", 1, wait_s=30.0))
        closed = asyncio.create_task(link.wait_closed())
        await asyncio.sleep(0.2)
        fault_proxy.drop_all()
        with pytest.raises(LinkError):
            await asyncio.wait_for(closed, 5.0)
        with pytest.raises(LinkError):
            await asyncio.wait_for(publish, 5.0)
        with pytest.raises(LinkError):
            link.publish_nowait("t/lost", b"y", 1, False)


async def test_closing_a_stalled_link_does_not_hang(
    mosquitto: MosquittoBroker, fault_proxy: FaultProxy
) -> None:
    """The DISCONNECT cannot get through a dead link: close() shuts the socket down after its
    grace instead of waiting for the keepalive."""
    link = Link(_options(fault_proxy.port, "stalled"))
    await link.connect()
    fault_proxy.stall()
    for _ in range(40):  # 20 MB: more than the socket buffers on the way hold
        link.publish_nowait("t/stalled", b"x" * 500_000, 1, False)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await asyncio.wait_for(link.close(), 10.0)
    assert time.monotonic() - started < 5.0
    fault_proxy.stall(False)
