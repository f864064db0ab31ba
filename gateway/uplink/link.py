"""One MQTT connection: paho-mqtt's client with its network loop on a thread of its own, and an
asyncio face for the uplink (gateway/uplink/mqtt.py, gateway/uplink/drain.py).

Why not aiomqtt here: aiomqtt drives paho from the event loop (socket readiness callbacks), so
paho's packet reading, PUBACK handling and socket writes share one thread with everything else
the gateway does, and a backlog drain waits on that thread between every read and write. Measured
on the same mosquitto and messages (2-core host, 20,000 QoS 1 publishes, window 50), paho driven
from asyncio that way managed 0.42-0.48 of paho's own threaded loop with nothing else running;
the same publishes from asyncio into a paho client whose loop runs on its own thread (this
module) reached 0.88-0.93. The issue of record is #14 (bench/findings.md has the figures).

Threads: paho's thread (``loop_start``) reads and writes the socket and calls back here; every
callback hands its result to the event loop with ``call_soon_threadsafe``, so nothing of ours
(futures, queues, the drain's window) is touched off the loop. PUBACKs arrive in batches: the
paho thread appends packet ids to a list and schedules one hand-over per batch, not one a PUBACK.
``Client.publish`` from the event loop is paho's thread-safe path: it queues the packet and wakes
paho's thread.

What this module uses of paho is its public API: ``Client(..., reconnect_on_failure=False)``,
``will_set``, ``username_pw_set``, ``tls_set_context``, ``connect``, ``loop_start``/
``loop_stop``, ``publish`` and ``MQTTMessageInfo.mid``/``rc``, ``subscribe``, ``disconnect``,
``socket`` and the VERSION2 callbacks. tests/test_uplink_link.py checks it against a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

__all__ = ["ConnectRefused", "Link", "LinkError", "LinkOptions"]

_CLOSE_GRACE_S = 2.0  # a clean DISCONNECT gets this long before the socket is shut down under it


class LinkError(Exception):
    """The connection failed, dropped or timed out (the uplink reconnects)."""


class ConnectRefused(LinkError):
    """The broker answered CONNECT with a failure reason code (``rc``: 3.1.1 CONNACK return
    codes as paho maps them to MQTT 5 reason codes, e.g. 132 unsupported protocol version)."""

    def __init__(self, rc: int, reason: str) -> None:
        super().__init__(f"connection refused by the broker: {reason} ({rc})")
        self.rc = rc


@dataclass(frozen=True, slots=True)
class LinkOptions:
    host: str
    port: int
    client_id: str
    v5: bool
    keepalive_s: int
    connect_timeout_s: float
    will: tuple[str, bytes, int, bool] | None = None  # topic, payload, qos, retain
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    connect_properties: Properties | None = None
    max_inflight: int = 20
    logger: logging.Logger | None = None


OnAcked = Callable[[list[int]], None]
OnMessage = Callable[[str, bytes, bool], None]


class Link:
    """``async with Link(options) as link:`` connects (raises ConnectRefused or LinkError) and
    disconnects cleanly on the way out. A fresh Link per connection: paho resends its in-memory
    queue when one client reconnects, and the uplink resends from its outbox instead."""

    def __init__(self, options: LinkOptions) -> None:
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = self._make_client(options)
        self._connack: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._awaited: dict[int, asyncio.Future[None]] = {}  # mid -> future (awaited publishes)
        self._subscribes: dict[int, asyncio.Future[list[int]]] = {}
        self._acks: list[int] = []  # filled by paho's thread, emptied on the loop
        self._acks_scheduled = False
        self._gone = False  # closed: callbacks from paho's thread are ignored
        self.on_acked: OnAcked | None = None  # PUBACKs (and QoS 0 writes) of publish_nowait
        self.on_message: OnMessage | None = None  # (topic, payload, retained) on the loop

    # -- connecting and closing -------------------------------------------------------------

    async def __aenter__(self) -> Link:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._closed = loop.create_future()
        o = self._options
        client = self._client
        timeout = o.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                # DNS, TCP and TLS in a worker thread; paho sends CONNECT there too
                await asyncio.to_thread(
                    client.connect,
                    o.host,
                    o.port,
                    o.keepalive_s,
                    clean_start=False if o.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                    properties=o.connect_properties,
                )
                client.loop_start()
                await asyncio.shield(self._connack)
        except TimeoutError:
            await self._stop()
            raise LinkError(f"connect timed out after {timeout:g} s") from None
        except ConnectRefused:
            await self._stop()
            raise
        except (OSError, ssl.SSLError, ValueError) as exc:
            await self._stop()
            raise LinkError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            await self._stop()
            raise

    async def close(self) -> None:
        """A clean DISCONNECT (the will is not published), then paho's thread is stopped; a link
        that does not get the DISCONNECT out in ``_CLOSE_GRACE_S`` is shut down under it."""
        if not self._gone and self._closed is not None and not self._closed.done():
            self._client.disconnect()
        await self._stop()

    async def _stop(self) -> None:
        self._gone = True
        self._fail_waiters(LinkError("connection closed"))
        # loop_stop joins paho's thread, which ends once the socket is closed (after the
        # DISCONNECT, or when the connection dropped); a stalled one is shut down under it
        stopping = asyncio.ensure_future(asyncio.to_thread(self._client.loop_stop))
        done, _ = await asyncio.wait({stopping}, timeout=_CLOSE_GRACE_S)
        if not done:
            self._shutdown()
        await stopping
        self._shutdown()

    def _shutdown(self) -> None:
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # an SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    async def wait_closed(self) -> None:
        """Returns never: raises LinkError once the connection has dropped."""
        assert self._closed is not None, "connect first"
        await asyncio.shield(self._closed)
        raise LinkError("connection closed")

    # -- publishing and subscribing -----------------------------------------------------------

    def publish_nowait(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        """Queue a publish for paho's thread; returns its packet id, which ``on_acked`` gets back
        once the broker acknowledged it (QoS 1) or it was written (QoS 0)."""
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish failed: {paho.error_string(info.rc)}")
        return info.mid

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *, wait_s: float
    ) -> None:
        """Publish and wait for the PUBACK (or the write, for QoS 0); raises LinkError after
        ``wait_s`` seconds or when the connection drops first."""
        assert self._loop is not None, "connect first"
        if self._gone:
            raise LinkError("connection closed")
        done = self._loop.create_future()
        mid = self.publish_nowait(topic, payload, qos, retain)
        self._awaited[mid] = done
        try:
            async with asyncio.timeout(wait_s):
                await done
        except TimeoutError:
            raise LinkError(f"publish on {topic} timed out after {wait_s:g} s") from None
        finally:
            self._awaited.pop(mid, None)

    async def subscribe(self, topic: str, qos: int, *, wait_s: float) -> list[int]:
        """Subscribe and wait for the SUBACK; returns its reason codes (>= 128 is a refusal)."""
        assert self._loop is not None, "connect first"
        done: asyncio.Future[list[int]] = self._loop.create_future()
        rc, mid = self._client.subscribe(topic, qos)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(f"subscribe failed: {paho.error_string(rc)}")
        self._subscribes[mid] = done
        try:
            async with asyncio.timeout(wait_s):
                return await done
        except TimeoutError:
            raise LinkError(f"subscribe to {topic} timed out after {wait_s:g} s") from None
        finally:
            self._subscribes.pop(mid, None)

    # -- paho's callbacks: on paho's thread, handed to the loop ---------------------------------

    def _make_client(self, o: LinkOptions) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            protocol=paho.MQTTv5 if o.v5 else paho.MQTTv311,
            clean_session=None if o.v5 else False,
            reconnect_on_failure=False,
        )
        client.connect_timeout = o.connect_timeout_s
        client.max_inflight_messages_set(max(1, o.max_inflight))
        client.max_queued_messages_set(0)
        if o.will is not None:
            topic, payload, qos, retain = o.will
            client.will_set(topic, payload, qos, retain)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls is not None:
            client.tls_set_context(o.tls)
        if o.logger is not None:
            client.enable_logger(o.logger)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or self._gone:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(callback, *args)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._call(self._connected, int(getattr(reason, "value", reason)), str(reason))

    def _connected(self, rc: int, reason: str) -> None:
        future = self._connack
        if future is None or future.done():
            return
        if rc == 0:
            future.set_result(None)
        else:
            future.set_exception(ConnectRefused(rc, reason))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._call(self._disconnected, str(reason))

    def _disconnected(self, reason: str) -> None:
        error = LinkError(f"disconnected: {reason}")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(error)
        if self._closed is not None and not self._closed.done():
            self._closed.set_exception(error)
            self._closed.exception()  # retrieved: nobody need be waiting for it
        self._fail_waiters(error)

    def _fail_waiters(self, error: LinkError) -> None:
        for waiters in (self._awaited, self._subscribes):
            for future in waiters.values():
                if not future.done():
                    future.set_exception(error)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # paho's thread, once a PUBACK: append, and schedule one hand-over per batch
        self._acks.append(mid)
        if not self._acks_scheduled:
            self._acks_scheduled = True
            self._call(self._hand_over_acks)

    def _hand_over_acks(self) -> None:
        self._acks_scheduled = False  # first: a PUBACK appended from here on schedules anew
        mids, self._acks = self._acks, []
        awaited = self._awaited
        if awaited:
            rest = []
            for mid in mids:
                future = awaited.get(mid)
                if future is None:
                    rest.append(mid)
                elif not future.done():
                    future.set_result(None)
            mids = rest
        if mids and self.on_acked is not None:
            self.on_acked(mids)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        codes = [int(getattr(r, "value", r)) for r in reasons]
        self._call(self._subscribed, mid, codes)

    def _subscribed(self, mid: int, codes: list[int]) -> None:
        future = self._subscribes.get(mid)
        if future is not None and not future.done():
            future.set_result(codes)

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return  # not UTF-8: no topic of ours (a broker does not deliver one)
        self._call(self._received, topic, bytes(message.payload), bool(message.retain))

    def _received(self, topic: str, payload: bytes, retained: bool) -> None:
        if self.on_message is not None:
            self.on_message(topic, payload, retained)
