"""Store-and-forward MQTT uplink (aiomqtt 2.5 over paho-mqtt 2.2): the connection and commands.

The SQLite outbox is the only source of truth for what must arrive (which messages go through it
and which do not: gateway/outgoing.py). One connection at a time, each with a fresh
``aiomqtt.Client``: paho keeps unacknowledged publishes in memory and resends its whole queue
when the same client reconnects (paho #492), which would duplicate what we resend from the
outbox anyway. So a dropped connection abandons its in-flight publishes; they stay unacked in
the store and go out again, in order, on the next connection (at-least-once; consumers
deduplicate finished sessions by ``session_id``). What a connection publishes is the drain's
business (gateway/uplink/drain.py); this module connects, reconnects with backoff, falls back
from MQTT 5 to 3.1.1, receives commands and sends their replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from typing import Any

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import __version__
from gateway.config import UplinkConfig
from gateway.errors import UplinkError
from gateway.model import Clock, SystemClock, rfc3339
from gateway.ports import CommandTarget, UplinkStore
from gateway.uplink import pahoport
from gateway.uplink.commands import MAX_COMMAND_BYTES, CommandHandler, Reply
from gateway.uplink.drain import Drain, Inflight, UplinkStats, encode
from gateway.uplink.envelope import CommandVerifier, load_command_key
from gateway.uplink.topics import Topics

__all__ = ["MAX_PACKET_BYTES", "MqttUplink", "backoff_delay"]

log = structlog.get_logger(__name__)

INBOX_SIZE = 1000  # commands waiting for the worker; beyond it they are answered ``busy``
BUSY_REPLIES_SIZE = 100_000
# Room for a command over its limit (it gets a `too_large` reply); anything larger is dropped
# by the broker.
MAX_PACKET_BYTES = 4 * MAX_COMMAND_BYTES
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})  # v3.1.1 CONNACK 1, MQTT 5 reason 0x84
_MAX_INFLIGHT_BYTES = 4 * 1024 * 1024


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
        publish_timeout_s = publish_timeout_s or max(30.0, 4 * config.keepalive_s)
        self._publish_timeout_s = publish_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._connect_phase = False  # True until the broker's CONNACK arrives
        self.stats = UplinkStats(protocol="3.1.1" if config.protocol == "3.1.1" else "5")
        self._drain = Drain(
            config,
            store,
            self.topics,
            self._clock,
            self.stats,
            version,
            safety_poll_s=safety_poll_s,
            publish_timeout_s=publish_timeout_s,
        )
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

    # -- what the rest of the gateway calls -------------------------------------------------

    @property
    def online(self) -> bool:
        return self._online

    def notify(self) -> None:
        """New rows in the outbox or readings: wake the drain."""
        self._drain.notify()

    def publish_status(self, device_id: str, payload: dict[str, Any]) -> None:
        """Latest status of a charger, published retained now (if online) and again after each
        reconnect. Kept in memory only: the next poll renews it after a restart."""
        body = dict(payload)
        body.setdefault("ts", rfc3339(self._clock.time()))
        self.topics.charger_status(device_id)  # refuse a device id that is no topic level
        self._drain.put_status(device_id, encode(body))

    def publish_retained(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        """A retained message on ``topic`` (a full topic, maybe outside ``P/S``), published now
        (if online) and again after each reconnect; the latest per topic wins. An empty payload
        deletes the broker's retained message. Kept in memory only, like charger statuses."""
        self._drain.put_retained(topic, payload if isinstance(payload, bytes) else encode(payload))

    def set_public_key(self, payload: dict[str, Any]) -> None:
        """The retained ``gateway/key`` message (published on every connect)."""
        self._drain.set_key(encode(payload))

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
                self.topics.auth_request, encode(payload), qos=1, timeout=self._publish_timeout_s
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
            delay = backoff_delay(failures, *self._backoff)
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
        return pahoport.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.reveal() if cfg.password is not None else None,
            identifier=cfg.client_id,
            protocol=self._protocol,
            will=aiomqtt.Will(self.topics.gateway_status, encode(offline), qos=1, retain=True),
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
        inflight = Inflight(self._config.inflight_window, _MAX_INFLIGHT_BYTES)
        self._connect_phase = True
        async with client:
            self._connect_phase = False
            self._client = client
            self._online = True
            self.stats.connects += 1
            log.info(
                "mqtt_connected",
                host=self._config.host,
                port=self._config.port,
                protocol=self.stats.protocol,
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._receive(client), name="uplink-receive")
                    tg.create_task(self._send_busy_replies(client), name="uplink-busy-replies")
                    tg.create_task(self._drain.run(client, inflight), name="uplink-drain")
            except BaseExceptionGroup as group:
                self._online = False
                self.stats.abandoned += inflight.count  # their rows stay unacked
                await self._drain.flush_acks()
                raise _first_mqtt_error(group) from None
            except asyncio.CancelledError:
                self._online = False
                self.stats.abandoned += inflight.count
                await self._drain.flush_acks()
                await self._say_goodbye(client)
                raise
            finally:
                self._online = False
                self._client = None

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        offline = {"state": "offline", "version": self._version, "ts": rfc3339(self._clock.time())}
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                self.topics.gateway_status, encode(offline), qos=1, retain=True, timeout=2.0
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


# -- helpers --------------------------------------------------------------------------------------

_PAHO_LOGGER = logging.getLogger("gateway.uplink.paho")


def backoff_delay(attempt: int, low_s: float, high_s: float) -> float:
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
