"""Store-and-forward MQTT uplink (aiomqtt 2.5 over paho-mqtt 2.2).

The SQLite outbox is the only source of truth. One connection at a time, each with a fresh
``aiomqtt.Client``: paho keeps unacknowledged publishes in memory and resends its whole queue
when the same client reconnects (paho #492), which would duplicate what we resend from the
outbox anyway. So a dropped connection abandons its in-flight publishes; they stay unacked in
the store and go out again, in order, on the next connection (at-least-once; consumers
deduplicate finished sessions by ``session_id``).

Draining: a bounded window of QoS 1 publishes tracked by packet id. The drain hands each message
to paho (the client under aiomqtt) and goes on; paho's PUBACK callback takes the packet id out of
the window and queues the rows' ids, which a group-commit task acknowledges to the store in
batches, only after their PUBACK. No future or task per message: aiomqtt's awaited ``publish``
costs a future, a ``wait_for`` timer and a task of ours per message, which kept a backlog drain at
a fifth of what paho itself does. A watchdog drops the connection when the oldest publish waits
longer than the publish timeout. Readings batches are fetched by a prefetch task while the
previous batch is being published. Each round publishes changed charger statuses and the
status/event/auth streams first, then a share of finished sessions (id order = seq order) and a
batch of readings, so live status never waits behind a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import __version__
from gateway.config import UplinkConfig
from gateway.errors import UplinkError
from gateway.model import Clock, SystemClock, rfc3339
from gateway.ports import CommandTarget, UplinkStore
from gateway.uplink.commands import MAX_COMMAND_BYTES, CommandHandler, Reply
from gateway.uplink.envelope import CommandVerifier, load_command_key
from gateway.uplink.lean import Aggregate, LeanReadings
from gateway.uplink.topics import Topics
from gateway.wire import encode_reading, readings_batch

__all__ = ["PRIORITY_STREAMS", "MqttUplink", "UplinkStats"]

log = structlog.get_logger(__name__)

ACK_RETRY_S = 1.0  # while the disk is full, try writing the delivery marks again this often

PRIORITY_STREAMS = ("status", "event", "auth")
INBOX_SIZE = 1000  # commands waiting for the worker; beyond it they are answered ``busy``
BUSY_REPLIES_SIZE = 100_000
# Room for a command over its limit (it gets a `too_large` reply); anything larger is dropped
# by the broker.
MAX_PACKET_BYTES = 4 * MAX_COMMAND_BYTES
SESSION_STREAM = "session"
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})  # v3.1.1 CONNACK 1, MQTT 5 reason 0x84
_MAX_INFLIGHT_BYTES = 4 * 1024 * 1024
_BATCHES_PER_FETCH = 2  # readings batches read from the store at once while draining
_MAX_FETCH_ROWS = 5000


@dataclass(slots=True)
class UplinkStats:
    """Counters since start (for tests, the live view and figures)."""

    connects: int = 0
    disconnects: int = 0
    published: dict[str, int] = field(default_factory=dict)  # messages PUBACKed, per stream
    acked_rows: int = 0  # outbox rows acknowledged to the store
    synced_readings: int = 0
    abandoned: int = 0  # publishes in flight when a connection dropped
    commands: int = 0
    commands_busy: int = 0  # found the queue full and were answered ``busy``
    commands_dropped: int = 0  # found even the busy replies full (never seen in tests)
    protocol: str = "5"
    last_puback_monotonic: float | None = None  # clock.monotonic() of the latest PUBACK


_ACK = 0  # outbox rows: acknowledged (deleted) on PUBACK
_SYNC = 1  # readings rows: marked synced on PUBACK


class _Inflight:
    """Publishes awaiting PUBACK, by packet id: at most ``limit`` of them and ``max_bytes`` of
    payload (one message may exceed it alone)."""

    __slots__ = ("_low", "_room", "bytes", "entries", "limit", "max_bytes")

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.limit = max(1, limit)
        self.max_bytes = max_bytes
        self.bytes = 0
        # mid -> (sent at (loop time), size, stream, _ACK/_SYNC/None, row ids, qos); insertion
        # order is send order, so the first entry is the oldest
        self.entries: dict[int, tuple[float, int, str, int | None, Sequence[int], int]] = {}
        self._room = asyncio.Event()
        self._low = self.limit - max(1, self.limit // 10)

    def full(self, size: int) -> bool:
        n = len(self.entries)
        return n >= self.limit or (n > 0 and self.bytes + size > self.max_bytes)

    async def wait_room(self, size: int) -> None:
        """Once full, wait until a tenth of the window is free again: the drain then sends a
        few messages a wake-up instead of one a PUBACK."""
        while len(self.entries) > self._low or self.full(size):
            self._room.clear()
            await self._room.wait()

    def add(
        self,
        mid: int,
        now: float,
        size: int,
        stream: str,
        kind: int | None,
        ids: Sequence[int],
        qos: int,
    ) -> None:
        self.entries[mid] = (now, size, stream, kind, ids, qos)
        self.bytes += size

    def pop(self, mid: int) -> tuple[float, int, str, int | None, Sequence[int], int] | None:
        entry = self.entries.pop(mid, None)
        if entry is not None:
            self.bytes -= entry[1]
            if len(self.entries) <= self._low:
                self._room.set()
        return entry

    def oldest(self) -> float | None:
        for entry in self.entries.values():
            return entry[0]
        return None

    @property
    def count(self) -> int:
        return len(self.entries)


class MqttUplink:
    """The gateway's MQTT client: reconnect loop, outbox drain, live statuses, commands.

    ``run()`` runs until cancelled; on cancellation it publishes ``offline`` (retained) and
    disconnects cleanly (the will covers every other way of going away).
    """

    def __init__(
        self,
        config: UplinkConfig,
        site_id: str,
        store: UplinkStore,
        commands: CommandTarget,
        clock: Clock | None = None,
        version: str = __version__,
        *,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        safety_poll_s: float = 1.5,
        publish_timeout_s: float | None = None,
        connect_timeout_s: float = 10.0,
        inbox_size: int = INBOX_SIZE,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock or SystemClock()
        self._version = version
        self.topics = Topics(config.topic_prefix, site_id)
        verifier = None
        if config.command_key is not None:
            verifier = CommandVerifier(
                load_command_key(config.command_key), config.command_max_age_s, self._clock
            )
        self._handler = CommandHandler(self.topics, commands, store, verifier=verifier)
        self._backoff = (backoff_min_s, backoff_max_s)
        self._safety_poll_s = safety_poll_s
        self._publish_timeout_s = publish_timeout_s or max(30.0, 4 * config.keepalive_s)
        self._connect_timeout_s = connect_timeout_s
        self._connect_phase = False  # True until the broker's CONNACK arrives
        self._wake = asyncio.Event()
        self._readings_wake = asyncio.Event()
        self._outbox_pending = True
        self._acked: list[int] = []
        self._synced: list[int] = []
        self._ack_ready = asyncio.Event()
        self._acks_waiting = False  # the disk is full: PUBACKed rows wait to be marked
        self._statuses: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._retained: dict[str, bytes] = {}  # full topic -> payload, kept and re-published
        self._dirty_retained: set[str] = set()
        self._key_payload: bytes | None = None
        self._client: aiomqtt.Client | None = None
        self._online = False
        self._protocol = (
            aiomqtt.ProtocolVersion.V311
            if config.protocol == "3.1.1"
            else aiomqtt.ProtocolVersion.V5
        )
        self._inbox: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue(maxsize=inbox_size)
        # ``busy`` replies are ~120 bytes each: a deep queue costs little and loses nothing.
        self._busy_replies: asyncio.Queue[Reply] = asyncio.Queue(maxsize=BUSY_REPLIES_SIZE)
        self._inflight: _Inflight | None = None
        self.stats = UplinkStats(protocol="3.1.1" if config.protocol == "3.1.1" else "5")

    # -- what the rest of the gateway calls -------------------------------------------------

    @property
    def online(self) -> bool:
        return self._online

    def notify(self) -> None:
        """New rows in the outbox or readings: wake the drain."""
        self._outbox_pending = True
        self._readings_wake.set()
        self._wake.set()

    def publish_status(self, device_id: str, payload: dict[str, Any]) -> None:
        """Latest status of a charger, published retained now (if online) and again after each
        reconnect. Kept in memory only: the next poll renews it after a restart."""
        body = dict(payload)
        body.setdefault("ts", rfc3339(self._clock.time()))
        self.topics.charger_status(device_id)  # refuse a device id that is no topic level
        self._statuses[device_id] = _encode(body)
        self._dirty.add(device_id)
        self._wake.set()

    publish_status_now = publish_status

    def publish_retained(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        """A retained message on ``topic`` (a full topic, maybe outside ``P/S``), published now
        (if online) and again after each reconnect; the latest per topic wins. An empty payload
        deletes the broker's retained message. Kept in memory only, like charger statuses."""
        self._retained[topic] = payload if isinstance(payload, bytes) else _encode(payload)
        self._dirty_retained.add(topic)
        self._wake.set()

    def set_public_key(self, payload: dict[str, Any]) -> None:
        """The retained ``gateway/key`` message (published on every connect)."""
        self._key_payload = _encode(payload)
        self._wake.set()

    async def send_auth_request(
        self, request_id: str, token: str, token_type: str, charger_id: str
    ) -> None:
        """gateway.ports.AuthRequester: publish directly; raises UplinkError when offline."""
        client = self._client
        if client is None or not self._online:
            raise UplinkError("uplink offline: auth request not sent")
        payload = {
            "request_id": request_id,
            "token": token,
            "token_type": token_type,
            "charger_id": charger_id,
        }
        try:
            await client.publish(
                self.topics.auth_request, _encode(payload), qos=1, timeout=self._publish_timeout_s
            )
        except aiomqtt.MqttError as exc:
            raise UplinkError(f"auth request not sent: {exc}") from exc

    # -- the loops ----------------------------------------------------------------------------

    async def run(self) -> None:
        if self._handler.authenticated:
            log.info("commands_authenticated", max_age_s=self._config.command_max_age_s)
        else:
            log.warning(
                "commands_unauthenticated",
                hint="uplink.command_key is not set: anyone who can publish on "
                f"{self.topics.commands_filter} or {self.topics.auth_response} can start "
                "charging or answer auth requests (see docs/security.md)",
            )
        _warn_weak_transport(self._config)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._command_worker(), name="uplink-commands")
            tg.create_task(self._connection_loop(), name="uplink-connection")

    async def _connection_loop(self) -> None:
        failures = 0
        last_error = ""
        while True:
            started = self._clock.monotonic()
            try:
                await self._connection()
                error = "closed"
            except MqttConnectError as exc:
                error = f"connect refused: {exc}"
                code = getattr(exc.rc, "value", exc.rc)
                if (
                    code in _UNSUPPORTED_PROTOCOL
                    and self._protocol is aiomqtt.ProtocolVersion.V5
                    and self._config.protocol == "auto"
                ):
                    log.warning("mqtt_v5_refused_falling_back_to_v311")
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    self.stats.protocol = "3.1.1"
                    continue
            except aiomqtt.MqttError as exc:
                error = str(exc) or type(exc).__name__
                if (
                    self._connect_phase
                    and "timed out" in error.lower()
                    and self._config.protocol == "auto"
                ):
                    # Some 3.1.1-only brokers (amqtt) neither answer nor close an MQTT 5
                    # CONNECT they cannot parse: after a silent connect, try the other version.
                    self._protocol = (
                        aiomqtt.ProtocolVersion.V311
                        if self._protocol is aiomqtt.ProtocolVersion.V5
                        else aiomqtt.ProtocolVersion.V5
                    )
                    self.stats.protocol = (
                        "5" if self._protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"
                    )
                    log.info("mqtt_connect_silent_switching_protocol", protocol=self.stats.protocol)
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # e.g. the store failed: keep the uplink alive, retry later
                log.exception("uplink_connection_failed")
                error = f"{type(exc).__name__}: {exc}"
            if self._clock.monotonic() - started > 60:
                failures = 0  # it was up for a while: start backing off from the bottom again
            failures += 1
            delay = _backoff_delay(failures, *self._backoff)
            # first occurrence of an error at WARNING, repeats at DEBUG
            level = log.debug if error == last_error else log.warning
            level("mqtt_disconnected", error=error, retry_in_s=round(delay, 2), attempt=failures)
            last_error = error
            await asyncio.sleep(delay)

    def _make_client(self, tls: ssl.SSLContext | None) -> aiomqtt.Client:
        cfg = self._config
        v5 = self._protocol is aiomqtt.ProtocolVersion.V5
        properties: Properties | None = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = int(min(cfg.session_expiry_s, 0xFFFFFFFF))
            # The broker must not send us anything larger than a command can be: a 10 MB
            # publish on a command topic is then dropped by the broker, never read into memory
            # here (MQTT 5 CONNECT property Maximum Packet Size: the server discards larger ones).
            properties.MaximumPacketSize = MAX_PACKET_BYTES
        offline = {"state": "offline", "version": self._version}
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.reveal() if cfg.password is not None else None,
            identifier=cfg.client_id,
            protocol=self._protocol,
            will=aiomqtt.Will(self.topics.gateway_status, _encode(offline), qos=1, retain=True),
            clean_session=None if v5 else False,
            clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=max(1, int(cfg.keepalive_s)),
            timeout=self._connect_timeout_s,
            properties=properties,
            tls_context=tls,
            max_inflight_messages=max(1, cfg.inflight_window) + 16,  # + replies, auth requests
            logger=_PAHO_LOGGER,
        )

    async def _tls_context(self) -> ssl.SSLContext | None:
        if self._config.scheme != "mqtts":
            return None
        return await asyncio.to_thread(_build_tls_context, self._config)

    async def _connection(self) -> None:
        client = self._make_client(await self._tls_context())
        inflight = _Inflight(self._config.inflight_window, _MAX_INFLIGHT_BYTES)
        self._connect_phase = True
        async with client:
            self._connect_phase = False
            self._client = client
            self._inflight = inflight
            self._online = True
            self.stats.connects += 1
            log.info(
                "mqtt_connected",
                host=self._config.host,
                port=self._config.port,
                protocol=self.stats.protocol,
            )
            paho_client = client._client  # the drain publishes through paho (module docstring)
            # aiomqtt's own callback: wakes its awaited publishes (replies, auth requests)
            forward: Callable[..., None] | None = paho_client.on_publish

            def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
                entry = inflight.pop(mid)
                if entry is None:
                    if forward is not None:
                        forward(c, userdata, mid, reason, props)
                else:
                    self._delivered(entry[2], entry[3], entry[4], entry[5])

            paho_client.on_publish = on_publish
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._receive(client), name="uplink-receive")
                    tg.create_task(self._send_busy_replies(client), name="uplink-busy-replies")
                    tg.create_task(self._acker(), name="uplink-acker")
                    tg.create_task(self._watchdog(inflight), name="uplink-watchdog")
                    batches: asyncio.Queue[list[tuple[int, str, bytes]]] = asyncio.Queue(
                        maxsize=_BATCHES_PER_FETCH
                    )
                    tg.create_task(self._prefetch(batches), name="uplink-prefetch")
                    tg.create_task(
                        self._drain(client, paho_client, inflight, batches), name="uplink-drain"
                    )
            except BaseExceptionGroup as group:
                self._online = False
                self.stats.disconnects += 1
                self.stats.abandoned += inflight.count  # their rows stay unacked
                await self._flush_acks()
                raise _first_mqtt_error(group) from None
            except asyncio.CancelledError:
                self._online = False
                self.stats.abandoned += inflight.count
                await self._flush_acks()
                await self._say_goodbye(client)
                raise
            finally:
                self._online = False
                self._client = None
                self._inflight = None

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        offline = {"state": "offline", "version": self._version, "ts": rfc3339(self._clock.time())}
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                self.topics.gateway_status, _encode(offline), qos=1, retain=True, timeout=2.0
            )

    async def _receive(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.commands_filter, qos=1)
        await client.subscribe(self.topics.auth_response, qos=1)
        async for message in client.messages:  # raises MqttError when the connection drops
            payload = message.payload
            if isinstance(payload, str):
                payload = payload.encode()
            elif not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            topic, data, retained = message.topic.value, bytes(payload), bool(message.retain)
            try:
                self._inbox.put_nowait((topic, data, retained))
            except asyncio.QueueFull:
                self._refuse_busy(topic, data, retained)

    def _refuse_busy(self, topic: str, payload: bytes, retained: bool) -> None:
        """The inbox is full: answer ``busy`` rather than drop the command without a word. The
        replies go out from their own bounded queue, so receiving never waits on a publish."""
        self.stats.commands_busy += 1
        reply = self._handler.busy(topic, payload, retained=retained)
        if reply is None:
            return
        try:
            self._busy_replies.put_nowait(reply)
        except asyncio.QueueFull:
            self.stats.commands_dropped += 1
            if self.stats.commands_dropped == 1 or self.stats.commands_dropped % 1000 == 0:
                log.error(
                    "command_queue_full_dropped",
                    topic=topic,
                    dropped_total=self.stats.commands_dropped,
                )
            return
        if self.stats.commands_busy == 1 or self.stats.commands_busy % 1000 == 0:
            log.warning("command_queue_full_busy", topic=topic, busy_total=self.stats.commands_busy)

    async def _send_busy_replies(self, client: aiomqtt.Client) -> None:
        while True:
            reply = await self._busy_replies.get()
            await client.publish(reply.topic, reply.encode(), qos=1, timeout=10.0)

    async def _command_worker(self) -> None:
        """Commands run outside the connection's task group: a dropped link never cancels a
        command half-way; its reply is sent if the uplink is back by then."""
        while True:
            topic, payload, retained = await self._inbox.get()
            reply = await self._handler.handle(topic, payload, retained=retained)
            self.stats.commands += 1
            if reply is None:
                continue
            client = self._client
            if client is None or not self._online:
                log.warning("command_reply_dropped_offline", topic=reply.topic)
                continue
            try:
                await client.publish(reply.topic, reply.encode(), qos=1, timeout=10.0)
            except aiomqtt.MqttError as exc:
                log.warning("command_reply_failed", topic=reply.topic, error=str(exc))

    # -- draining -------------------------------------------------------------------------------

    async def _drain(
        self,
        client: aiomqtt.Client,
        paho_client: Any,
        inflight: _Inflight,
        batches: asyncio.Queue[list[tuple[int, str, bytes]]],
    ) -> None:
        cfg = self._config
        online = {"state": "online", "version": self._version, "ts": rfc3339(self._clock.time())}
        await client.publish(self.topics.gateway_status, _encode(online), qos=1, retain=True)
        if self._key_payload is not None:
            await client.publish(self.topics.gateway_key, self._key_payload, qos=1, retain=True)
        self._dirty.update(self._statuses)
        self._dirty_retained.update(self._retained)
        cursors = dict.fromkeys((*PRIORITY_STREAMS, SESSION_STREAM), 0)
        share = max(1, inflight.limit // 2)
        self._outbox_pending = True
        loop = asyncio.get_running_loop()
        outbox_due = loop.time()
        streams = [
            *((stream, inflight.limit) for stream in PRIORITY_STREAMS),
            (SESSION_STREAM, share),
        ]
        more: set[str] = set()  # streams whose last page was full
        lean = (
            LeanReadings(cfg.readings.interval_s, cfg.readings.mode)
            if cfg.readings.interval_s > 0
            else None
        )

        async def send(
            stream: str,
            topic: str,
            payload: bytes,
            qos: int,
            retain: bool,
            kind: int | None,
            ids: Sequence[int],
        ) -> None:
            size = len(payload)
            if inflight.full(size):
                await inflight.wait_room(size)
            info = paho_client.publish(topic, payload, qos, retain)
            if info.rc != MQTT_ERR_SUCCESS:
                raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
            if info.is_published():  # QoS 0 already written
                self._delivered(stream, kind, ids, qos)
            else:
                inflight.add(info.mid, loop.time(), size, stream, kind, ids, qos)

        while True:
            self._wake.clear()
            sent = 0
            for device_id in list(self._dirty):
                self._dirty.discard(device_id)
                await send(
                    "charger_status",
                    self.topics.charger_status(device_id),
                    self._statuses[device_id],
                    1,
                    True,
                    None,
                    (),
                )
                sent += 1
            for topic in list(self._dirty_retained):
                self._dirty_retained.discard(topic)
                await send("retained", topic, self._retained[topic], 1, True, None, ())
                sent += 1
            if self._outbox_pending or more or loop.time() >= outbox_due:
                # Outbox rows come with a notify(); while a backlog drains, a stream is asked
                # again only if its last page was full, after a notify, or after a safety
                # interval, not every round.
                everything = self._outbox_pending or loop.time() >= outbox_due
                self._outbox_pending = False
                if everything:
                    outbox_due = loop.time() + self._safety_poll_s
                asked, more = more, set()
                for stream, limit in streams:
                    if not everything and stream not in asked:
                        continue
                    n = await self._drain_stream(send, stream, cursors, limit)
                    if n >= limit:
                        more.add(stream)
                    sent += n
            messages: list[tuple[str, bytes, list[int]]] = []
            if not batches.empty():
                rows = batches.get_nowait()
                if lean is None:
                    messages = _reading_batches(rows)
                else:
                    messages = _aggregate_batches(lean.add_wire(rows))
            if lean is not None and lean.held:
                messages += _aggregate_batches(lean.due(self._clock.time()))
            if messages:
                for device_id, payload, ids in messages:
                    await send(
                        "readings",
                        self.topics.readings(device_id),
                        payload,
                        cfg.readings_qos,
                        False,
                        _SYNC,
                        ids,
                    )
                    sent += 1
            if sent:
                # the drain awaits only when the window is full: let the pollers and the
                # session logic run between rounds
                await asyncio.sleep(0)
                continue
            # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own, which
            # could swallow a cancellation arriving just as the timeout fired.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._safety_poll_s):
                    await self._wake.wait()
            if not self._wake.is_set():
                self._outbox_pending = True  # the safety poll: look again anyway

    async def _prefetch(self, batches: asyncio.Queue[list[tuple[int, str, bytes]]]) -> None:
        """Reads the next readings while the drain publishes the previous ones: a few batches a
        read (each thread hop costs more than the rows), queued one batch at a time."""
        cursor = 0
        batch = self._config.readings_batch
        fetch = max(batch, min(batch * _BATCHES_PER_FETCH, _MAX_FETCH_ROWS))
        while True:
            self._readings_wake.clear()
            rows = await self._store.readings_fetch_wire(fetch, cursor)
            if rows:
                cursor = rows[-1][0]
                for i in range(0, len(rows), batch):
                    await batches.put(rows[i : i + batch])
                    self._wake.set()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._safety_poll_s):
                    await self._readings_wake.wait()

    async def _watchdog(self, inflight: _Inflight) -> None:
        """Drops the connection when a publish has waited longer than the publish timeout for
        its PUBACK (a stalled broker or link); its rows go out again on the next one."""
        loop = asyncio.get_running_loop()
        timeout_s = self._publish_timeout_s
        while True:
            oldest = inflight.oldest()
            now = loop.time()
            if oldest is not None and now - oldest >= timeout_s:
                raise aiomqtt.MqttError(f"no PUBACK within {timeout_s:g} s")
            await asyncio.sleep(timeout_s if oldest is None else oldest + timeout_s - now)

    async def _drain_stream(
        self, send: Any, stream: str, cursors: dict[str, int], limit: int
    ) -> int:
        rows = await self._store.outbox_fetch(stream, limit, cursors[stream])
        for row in rows:
            cursors[stream] = row.id
            await send(
                stream,
                self.topics.full(row.topic),
                row.payload,
                row.qos,
                row.retain,
                _ACK,
                (row.id,),
            )
        return len(rows)

    def _delivered(self, stream: str, kind: int | None, ids: Sequence[int], qos: int) -> None:
        """A publish was acknowledged (QoS 1) or written (QoS 0): queue its rows' ids for the
        group commit."""
        published = self.stats.published
        published[stream] = published.get(stream, 0) + 1
        if qos > 0:
            self.stats.last_puback_monotonic = self._clock.monotonic()
        if kind == _ACK:
            self._acked.extend(ids)
        elif kind == _SYNC:
            self._synced.extend(ids)
        else:
            return
        self._ack_ready.set()

    async def _acker(self) -> None:
        """Group commit: whatever PUBACKs arrived while the previous write ran go in one write."""
        while True:
            await self._ack_ready.wait()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        self._ack_ready.clear()
        acked, self._acked = self._acked, []
        synced, self._synced = self._synced, []
        if not (acked or synced):
            return
        try:
            # shielded: a dropped connection cancels the acker, never a write half-way
            await asyncio.shield(self._write_acks(acked, synced))
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
            # A full disk: delivery goes on and the marks wait here until there is room
            # (marking a row twice changes nothing). Raising tore the connection down at every
            # PUBACK and resent everything in flight (found by the fault matrix).
            self._acked[:0] = acked
            self._synced[:0] = synced
            if not self._acks_waiting:
                log.warning("uplink_acks_waiting_disk_full", rows=len(acked) + len(synced))
            self._acks_waiting = True
            await asyncio.sleep(ACK_RETRY_S)
            self._ack_ready.set()
            return
        if self._acks_waiting:
            log.info("uplink_acks_written_again")
            self._acks_waiting = False

    async def _write_acks(self, acked: list[int], synced: list[int]) -> None:
        if acked:
            await self._store.outbox_ack(acked)
            self.stats.acked_rows += len(acked)
        if synced:
            await self._store.readings_mark_synced(synced)
            self.stats.synced_readings += len(synced)


# -- helpers --------------------------------------------------------------------------------------

_PAHO_LOGGER = logging.getLogger("gateway.uplink.paho")


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _reading_batches(rows: Sequence[tuple[int, str, bytes]]) -> list[tuple[str, bytes, list[int]]]:
    """One ``evgw.readings/1`` message per device from (id, device_id, wire form) rows, readings
    in id order: the stored wire texts spliced together, nothing decoded or re-encoded."""
    wires: dict[str, list[bytes]] = {}
    ids: dict[str, list[int]] = {}
    for row_id, device_id, wire in rows:
        if (group := wires.get(device_id)) is None:
            wires[device_id] = [wire]
            ids[device_id] = [row_id]
        else:
            group.append(wire)
            ids[device_id].append(row_id)
    return [(dev, readings_batch(dev, group), ids[dev]) for dev, group in wires.items()]


def _aggregate_batches(aggregates: Sequence[Aggregate]) -> list[tuple[str, bytes, list[int]]]:
    """One ``evgw.readings/1`` message per device from folded readings (``uplink.readings``);
    each carries the ids of every buffered reading it stands for."""
    wires: dict[str, list[bytes]] = {}
    ids: dict[str, list[int]] = {}
    for agg in aggregates:
        wires.setdefault(agg.device_id, []).append(encode_reading(agg.ts, agg.values))
        ids.setdefault(agg.device_id, []).extend(agg.ids)
    return [(dev, readings_batch(dev, group), ids[dev]) for dev, group in wires.items()]


def _disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL, or ENOSPC surfacing as an I/O error (as the store tells them apart)."""
    text = str(exc).lower()
    return "disk is full" in text or "disk i/o error" in text


def _backoff_delay(attempt: int, low_s: float, high_s: float) -> float:
    """Capped exponential backoff with full jitter over the upper half."""
    ceiling = min(high_s, low_s * (2 ** min(attempt - 1, 30)))
    return random.uniform(ceiling / 2, ceiling)


def _first_mqtt_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The reason a connection's task group ended: an MqttError if there is one."""
    for exc in _leaves(group):
        if isinstance(exc, aiomqtt.MqttError):
            return exc
    for exc in _leaves(group):
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return aiomqtt.MqttError("connection task group ended")


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


def _warn_weak_transport(cfg: UplinkConfig) -> None:
    """Loud warnings for settings that hand the link to anyone on the path: they are allowed
    (a test bench, a broker on the same box) but never silent."""
    if cfg.tls is not None and cfg.tls.insecure:
        log.warning(
            "uplink_tls_insecure",
            host=cfg.host,
            hint="uplink.tls.insecure is set: the broker's certificate is NOT checked, so anyone "
            "on the path can pose as the broker and read the password and every record",
        )
    if cfg.password is not None and cfg.scheme != "mqtts":
        log.warning(
            "uplink_password_in_clear",
            host=cfg.host,
            port=cfg.port,
            hint="a broker password over plain mqtt:// crosses the network unencrypted: "
            "use mqtts://",
        )


def _build_tls_context(cfg: UplinkConfig) -> ssl.SSLContext:
    tls = cfg.tls
    ctx = ssl.create_default_context(cafile=tls.ca_file if tls else None)
    if tls is not None and tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls is not None and tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
