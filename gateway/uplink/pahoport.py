"""Every touch of aiomqtt's insides, in one place (aiomqtt 2.5 over paho-mqtt 2.2).

aiomqtt has no public way to do two things the gateway needs, so both reach the paho client it
keeps in its private ``_client``; and one of its private methods needs replacing on Python 3.11:

- Publishing without awaiting (``direct_publisher``): the drain keeps a window of QoS 1 publishes
  tracked by packet id. aiomqtt's awaited ``publish`` costs a future, a ``wait_for`` timer and a
  task per message, which kept a backlog drain at a fifth of what paho itself does.
- Acknowledging a received message only once it is stored (``manual_acks``): the consumer's
  PUBACK must not go out before its database has the record.
- Reading PUBACKs cheaply (``lean_pubacks``): paho decodes each into a fresh ``ReasonCode`` (two,
  in fact) and ``Properties``, 11 us a packet, the largest single cost of a backlog drain on the
  event loop's thread. The common PUBACK, a packet id and at most a reason code, is read here
  and handed to paho's own completion (``Client._do_on_publish``), so its bookkeeping stays
  paho's; anything longer (properties: a reason string, user properties) goes to paho's decoder.
- Not losing a cancellation, nor waiting on a dead connection (``Client``): every awaited aiomqtt
  call (connect, disconnect, publish, subscribe) goes through ``Client._wait_for``, which is
  ``asyncio.wait_for`` and knows nothing of the connection dropping. On Python
  3.11 ``wait_for`` drops a cancellation that lands in the loop turn its awaited result arrives
  in (CPython gh-86296, fixed by 3.12's rewrite): the cancelled task carries on as if nothing had
  happened. A gateway stopping while a SUBACK came in went on receiving forever, and its stop
  waited for it forever (the likely cause of a CI run that hung in the uplink tests). ``Client``
  times these calls with ``asyncio.timeout``, which lets a cancellation through, and is what
  every part of the gateway uses.

What the rest of the code then uses is paho's public API (``Client.publish`` and its
``MQTTMessageInfo``: ``rc``, ``mid``, ``is_published()``; ``Client.ack``; the VERSION2
``on_publish`` signature ``(client, userdata, mid, reason_code, properties)`` that aiomqtt
selects). tests/test_uplink_pahoport.py checks all of it against a real broker: an upgrade of
aiomqtt or paho that moves any of it fails there, by name, not in a drain at a site. Widening
the aiomqtt or paho-mqtt pin in pyproject.toml starts with that test.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "Client",
    "Forward",
    "OnPublish",
    "Publish",
    "corked_writes",
    "direct_publisher",
    "lean_pubacks",
    "manual_acks",
]

T = TypeVar("T")

OnPublish = Callable[[Any, Any, int, Any, Any], None]
"""paho's VERSION2 ``on_publish``: (client, userdata, mid, reason_code, properties)."""
Publish = Callable[..., paho.MQTTMessageInfo]
"""paho's ``Client.publish(topic, payload, qos, retain)``."""
Forward = Callable[..., None]
"""The callback aiomqtt installed (an ``OnPublish``; paho types it as either API version)."""


class Client(aiomqtt.Client):
    """aiomqtt's client with its timer replaced: a cancellation always reaches the caller, and
    a connection that drops ends every wait on it at once."""

    # aiomqtt passes ``timeout=`` by name
    async def _wait_for(self, fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
        if timeout is None:
            timeout = self.timeout
        dropped = self._disconnected
        try:
            # asyncio.timeout(None) never fires; math.inf is aiomqtt's "no timeout"
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                if fut is dropped or fut is self._connected:
                    return await fut
                return await _unless_dropped(fut, dropped)
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None


async def _unless_dropped(fut: Awaitable[T], dropped: asyncio.Future[None]) -> T:
    """``fut``'s result, or MqttError as soon as the connection is gone. aiomqtt fails only its
    message iteration when the broker hangs up; a subscribe or publish awaiting its
    acknowledgement waited out its whole timeout (10 s), and the uplink with it: mosquitto
    closes the connection right after refusing a publish (PUBACK 0x87)."""
    waiting = asyncio.ensure_future(fut)
    try:
        done, _ = await asyncio.wait((waiting, dropped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiting.done():
            waiting.cancel()  # cancelled, timed out or disconnected: as wait_for would
    if waiting in done:
        return waiting.result()
    cause = dropped.exception()
    raise aiomqtt.MqttError("Disconnected while waiting for the broker's answer") from cause


if not hasattr(aiomqtt.Client, "_wait_for"):  # pragma: no cover - an aiomqtt upgrade
    raise ImportError(
        "aiomqtt.Client no longer times its calls in _wait_for: "
        "gateway/uplink/pahoport.py needs updating for this aiomqtt version"
    )


def _paho(client: aiomqtt.Client) -> paho.Client:
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client):
        raise RuntimeError(
            "aiomqtt.Client no longer keeps its paho client in _client: "
            "gateway/uplink/pahoport.py needs updating for this aiomqtt version"
        )
    return inner


def direct_publisher(client: aiomqtt.Client, on_publish: OnPublish) -> tuple[Publish, Forward]:
    """Publish through the paho client under ``client`` and see every PUBACK first.

    ``on_publish`` replaces the paho callback aiomqtt installed; that callback is returned, and
    ``on_publish`` must pass it every packet id it did not send itself (aiomqtt's own awaited
    publishes: replies, auth requests). Returns paho's bound ``publish``: one call a message,
    nothing of ours in between."""
    inner = _paho(client)
    forward = inner.on_publish
    if forward is None:
        raise RuntimeError(
            "aiomqtt no longer sets paho's on_publish: awaited publishes would never complete; "
            "gateway/uplink/pahoport.py needs updating for this aiomqtt version"
        )
    inner.on_publish = on_publish
    return inner.publish, forward


def lean_pubacks(client: aiomqtt.Client) -> None:
    """Read the PUBACKs of the paho client under ``client`` without paho's per-packet objects.

    A PUBACK of 2 bytes (packet id: MQTT 3.1.1, or MQTT 5 success), 3 (and a reason code) or 4
    (and an empty property length) completes its publish through paho's ``_do_on_publish``, as
    paho's own handler does, with the reason code as a ``ReasonCode`` shared by every PUBACK
    that carries it and an empty ``Properties`` shared by all: ``on_publish`` callbacks must
    not change either (the drain's and aiomqtt's only read them). Every other packet (PUBCOMP,
    a PUBACK with properties, one paho would refuse as malformed, a reason code paho does not
    know) takes paho's own path. Call once per client, before or after connecting."""
    inner = _paho(client)
    handler = getattr(inner, "_handle_pubackcomp", None)
    complete = getattr(inner, "_do_on_publish", None)
    if handler is None or complete is None or not hasattr(inner, "_in_packet"):
        raise RuntimeError(
            "paho's client no longer completes PUBACKs in _handle_pubackcomp/_do_on_publish: "
            "gateway/uplink/pahoport.py needs updating for this paho-mqtt version"
        )
    v5 = inner.protocol == paho.MQTTv5
    mutex = inner._out_message_mutex
    no_properties = Properties(PacketTypes.PUBACK)
    reasons: dict[int, ReasonCode] = {}

    def handle(cmd: str) -> paho.MQTTErrorCode:
        packet = inner._in_packet["packet"]
        size = len(packet)
        if cmd != "PUBACK" or not (size == 2 or (v5 and (size == 3 or packet[3:] == b"\0"))):
            return handler(cmd)
        code = packet[2] if size > 2 else 0
        reason = reasons.get(code)
        if reason is None:
            try:
                reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
            except (KeyError, ValueError):
                return handler(cmd)  # paho answers an unknown code as it always has
            reasons[code] = reason
        mid = (packet[0] << 8) | packet[1]
        with mutex:
            if mid in inner._out_messages:
                return complete(mid, reason, no_properties)
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    # an instance attribute: paho's _packet_handle looks _handle_pubackcomp up on each packet
    inner._handle_pubackcomp = handle  # type: ignore[method-assign]


def manual_acks(client: aiomqtt.Client) -> Callable[[int, int], Any]:
    """Turn paho's automatic PUBACKs off for ``client`` (call before connecting); returns
    ``ack(mid, qos)`` to send one once the message is safe."""
    inner = _paho(client)
    inner.manual_ack_set(True)
    return inner.ack


def corked_writes(client: aiomqtt.Client) -> bool:
    """Let the packets paho writes in one go leave the host together (Linux's ``TCP_CORK``).

    aiomqtt calls paho's ``loop_write`` once the socket is writable; paho then sends each queued
    packet with a ``send`` of its own, and on a TCP socket each of those is a transmission (on
    loopback, the receiving side's work too). Corked, the sends only fill the socket buffer and
    the uncork at the end transmits them in full segments. Works under TLS as well (the cork is
    on the TCP socket under it). Returns False, and changes nothing, where the platform has no
    ``TCP_CORK`` or paho has no socket to cork (not connected yet, or a WebSocket transport);
    call once a connection is up (the socket is paho's, per connection)."""
    cork = getattr(socket, "TCP_CORK", None)
    inner = _paho(client)
    sock = inner.socket()
    if cork is None or not isinstance(sock, socket.socket):  # SSLSocket is one too
        return False
    write = inner.loop_write
    setsockopt = sock.setsockopt
    level = socket.IPPROTO_TCP

    def loop_write() -> paho.MQTTErrorCode:
        try:
            setsockopt(level, cork, 1)
        except OSError:
            return write()  # the socket is closing: paho reports it
        try:
            return write()
        finally:
            with contextlib.suppress(OSError):
                setsockopt(level, cork, 0)

    # an instance attribute: aiomqtt's writer callback looks loop_write up on each call
    inner.loop_write = loop_write  # type: ignore[method-assign]
    return True
