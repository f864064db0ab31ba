"""``evgw consume``: the consumer on the broker.

One MQTT connection at a time (QoS 1, persistent session, fixed client id), MQTT 5 with a fall
back to 3.1.1, reconnects with capped jittered backoff; every message goes to the
``SessionConsumer`` and is acknowledged (paho's manual acks) only once the store has it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.cloud.cloudstore import open_cloud_store
from gateway.cloud.consumer import RESERVED_SITES, SessionConsumer
from gateway.cloud.trust import load_trust_dir
from gateway.errors import UsageError
from gateway.redact import redact_url
from gateway.uplink import pahoport
from gateway.uplink.pahoport import manual_acks

__all__ = ["BrokerAddress", "BrokerUrlError", "parse_broker_url", "run_consumer", "subscriptions"]

log = structlog.get_logger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue for a week of consumer downtime
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})  # v3.1.1 CONNACK 1, MQTT 5 reason 0x84


class BrokerUrlError(UsageError):
    """A ``--broker`` URL the consumer cannot use."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (ports 1883 / 8883)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    shown = redact_url(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise BrokerUrlError(f"{shown!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise BrokerUrlError(f"{shown!r}: bad port") from None
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def _topic_level(value: str, what: str, *, multi: bool = False) -> None:
    """A site id, group or prefix goes into a topic filter: a wildcard or an empty level there
    makes the subscription invalid (the broker drops the connection, every retry)."""
    levels = value.split("/") if multi else [value]
    if (
        not value
        or any(not lv or "+" in lv or "#" in lv for lv in levels)
        or (not multi and "/" in value)
    ):
        raise BrokerUrlError(
            f"{what} {value!r}: must be a plain topic level (no '+', '#'"
            + (", '/'" if not multi else "")
            + " or empty level); leave --site out to consume every site"
        )
    if "\x00" in value:
        raise BrokerUrlError(f"{what} {value!r}: must not contain NUL")


def subscriptions(topic_prefix: str, sites: list[str] | None, group: str | None) -> list[str]:
    """The topic filters to subscribe; raises BrokerUrlError (a usage error) for a site, group
    or prefix that is no plain topic level."""
    _topic_level(topic_prefix.strip("/"), "--topic-prefix", multi=True)
    for site in sites or []:
        _topic_level(site, "--site")
    if group is not None:
        _topic_level(group, "--group")
    prefix = topic_prefix.strip("/")
    share = f"$share/{group}/" if group else ""
    topics: list[str] = []
    for site in sites or ["+"]:
        topics.append(f"{share}{prefix}/{site}/sessions/finished")
        # keys are retained: every member of a group needs them, so never shared
        topics.append(f"{prefix}/{site}/gateway/key")
    return topics


def _tls_context(address: BrokerAddress, ca_file: str | None) -> ssl.SSLContext | None:
    if not address.tls and ca_file is None:
        return None
    return ssl.create_default_context(cafile=ca_file)


async def _connection(
    consumer: SessionConsumer,
    address: BrokerAddress,
    topics: list[str],
    client_id: str,
    protocol: aiomqtt.ProtocolVersion,
    tls: ssl.SSLContext | None,
) -> None:
    v5 = protocol is aiomqtt.ProtocolVersion.V5
    properties: Properties | None = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
    client = pahoport.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=client_id,
        protocol=protocol,
        clean_session=None if v5 else False,
        # resume the broker's queue for us, also after a restart of ours (3.1.1: clean_session)
        clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
        keepalive=30,
        tls_context=tls,
    )
    # PUBACK only once the store has the message (aiomqtt has no switch for this; paho has)
    ack = manual_acks(client)
    async with client:
        consumer.stats.connects += 1
        for topic in topics:
            await client.subscribe(topic, qos=1)
        log.info(
            "consumer_connected",
            host=address.host,
            port=address.port,
            protocol=consumer.stats.protocol,
            topics=topics,
        )
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, str):
                data = payload.encode()
            elif isinstance(payload, bytes | bytearray):
                data = bytes(payload)
            else:
                data = b"" if payload is None else str(payload).encode()
            await consumer.handle(str(message.topic), data)
            ack(message.mid, message.qos)


async def _connection_loop(
    consumer: SessionConsumer,
    address: BrokerAddress,
    topics: list[str],
    client_id: str,
    ca_file: str | None,
) -> None:
    protocol = aiomqtt.ProtocolVersion.V5
    tls = await asyncio.to_thread(_tls_context, address, ca_file)
    failures = 0
    last_error = ""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await _connection(consumer, address, topics, client_id, protocol, tls)
            error = "closed"
        except MqttConnectError as exc:
            error = f"connect refused: {exc}"
            code = getattr(exc.rc, "value", exc.rc)
            if code in _UNSUPPORTED_PROTOCOL and protocol is aiomqtt.ProtocolVersion.V5:
                log.warning("mqtt_v5_refused_falling_back_to_v311")
                protocol = aiomqtt.ProtocolVersion.V311
                consumer.stats.protocol = "3.1.1"
                continue
        except aiomqtt.MqttError as exc:
            error = str(exc) or type(exc).__name__
        except Exception as exc:  # the store failed: the message stays unacked, retry later
            # One line, no traceback: a traceback's locals would show the broker password.
            log.error(
                "consumer_connection_failed", error=redact_url(f"{type(exc).__name__}: {exc}")
            )
            error = f"{type(exc).__name__}: {exc}"
        if loop.time() - started > 60:
            failures = 0
        failures += 1
        delay = min(30.0, 0.5 * 2 ** min(failures - 1, 6)) * random.uniform(0.8, 1.2)
        (log.debug if error == last_error else log.warning)(
            "consumer_disconnected", error=error, retry_in_s=round(delay, 2), attempt=failures
        )
        last_error = error
        await asyncio.sleep(delay)


async def run_consumer(
    broker: str,
    db_url: str,
    topic_prefix: str = "evgw",
    sites: list[str] | None = None,
    client_id: str = "evgw-consumer",
    group: str | None = None,
    ca_file: str | None = None,
    duration_s: float | None = None,
    trust_dir: Path | None = None,
    password: str | None = None,
    reserved_sites: Iterable[str] = RESERVED_SITES,
) -> int:
    """Consume until cancelled (SIGINT/SIGTERM) or for ``duration_s``; 0 on a clean stop.
    ``trust_dir``: trust only the keys in it (else trust each site's first key).
    ``password`` (from a file or the environment) overrides one in the broker URL."""
    address = parse_broker_url(broker)
    if password is not None:
        address = dataclasses.replace(address, password=password)
    if address.password and not address.tls:
        log.warning(
            "mqtt_password_in_clear",
            host=address.host,
            port=address.port,
            hint="the broker password crosses the network unencrypted: use mqtts://",
        )
    topics = subscriptions(topic_prefix, sites, group)
    trusted = None if trust_dir is None else await asyncio.to_thread(load_trust_dir, trust_dir)
    if trusted is None:
        log.warning(
            "consumer_trust_on_first_use",
            message="no --trust directory: the first key each site publishes is trusted",
        )
    async with open_cloud_store(db_url) as store:
        consumer = SessionConsumer(store, topic_prefix, trusted, reserved_sites)
        await consumer.load_keys()
        await consumer.report_open_gaps()
        try:
            async with asyncio.timeout(duration_s):
                await _connection_loop(consumer, address, topics, client_id, ca_file)
        except TimeoutError:
            pass
        log.info(
            "consumer_stopped",
            stored=consumer.stats.stored,
            duplicates=consumer.stats.duplicates,
            quarantined=consumer.stats.quarantined,
            gaps=consumer.stats.gaps,
        )
    return 0
