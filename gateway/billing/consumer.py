"""``evgw consume``: the reference cloud consumer of finished session records.

It subscribes (QoS 1, persistent session, fixed client id) to ``P/+/sessions/finished`` and
``P/+/gateway/key`` and stores each session once. A message is acknowledged (PUBACK) only after
the store has it: paho's manual acks, so a consumer killed between receipt and commit gets the
message again from the broker instead of losing it. Delivery is at-least-once, so duplicates
are normal: an identical one is ignored, a different record under a known ``session_id`` is
kept out and flagged.

Every record is checked before it is stored: JSON, the ``evgw.session/1`` schema, its hash,
its signature when the site's public key is known (records that arrived before the key are
checked when it arrives), and its place in the site's ``seq``/``prev_hash`` chain. Invalid
records go to the ``rejects`` table with the reason; chain problems (gaps, a broken link, a seq
used twice) to ``chain_problems``; nothing a message contains stops the consumer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.billing.cloudstore import CloudStore, open_cloud_store
from gateway.billing.signing import key_id, load_public_key, verify_signature
from gateway.errors import GatewayError
from gateway.records import GENESIS, canonical_json, record_hash
from gateway.redact import redact_url
from gateway.uplink.schemas import validate

__all__ = [
    "BrokerAddress",
    "BrokerUrlError",
    "ConsumerStats",
    "SessionConsumer",
    "parse_broker_url",
    "run_consumer",
]

log = structlog.get_logger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue for a week of consumer downtime
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})  # v3.1.1 CONNACK 1, MQTT 5 reason 0x84
_MAX_STORED_PAYLOAD = 64 * 1024  # of a rejected payload, enough to see what it was


@dataclass(slots=True)
class ConsumerStats:
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rejected: int = 0
    gaps: int = 0
    out_of_order: int = 0
    chain_breaks: int = 0
    keys: int = 0
    connects: int = 0
    protocol: str = "5"


class SessionConsumer:
    """Checks and stores one message at a time (independent of MQTT, for tests and replays)."""

    def __init__(self, store: CloudStore, topic_prefix: str = "evgw") -> None:
        self.store = store
        self.prefix = topic_prefix.strip("/")
        self.stats = ConsumerStats()
        self._keys: dict[tuple[str, str], Ed25519PublicKey] = {}

    async def load_keys(self) -> None:
        for (site, kid), pem in (await self.store.site_keys()).items():
            try:
                self._keys[(site, kid)] = load_public_key(pem)
            except (GatewayError, ValueError):
                log.warning("consumer_stored_key_unreadable", site_id=site, key_id=kid)

    async def report_open_gaps(self) -> None:
        for site in await self.store.site_ids():
            for first, last in await self.store.missing_seqs(site):
                log.warning(
                    "session_gap_open",
                    site_id=site,
                    missing=_span(first, last),
                    message=f"site {site}: missing seq {_span(first, last)}",
                )

    def _split(self, topic: str) -> tuple[str, str] | None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        site, _, rest = topic[len(head) :].partition("/")
        return (site, rest) if site and rest else None

    async def handle(self, topic: str, payload: bytes) -> str:
        """Process one message; the outcome: stored, duplicate, conflict, rejected, key,
        ignored. Raises only when the store fails (the message is then not acknowledged)."""
        where = self._split(topic)
        if where is None:
            return "ignored"
        site, rest = where
        if rest == "gateway/key":
            return await self._handle_key(site, topic, payload)
        if rest == "sessions/finished":
            return await self._handle_session(site, topic, payload)
        return "ignored"

    async def _reject(self, topic: str, payload: bytes, reason: str, **fields: Any) -> str:
        self.stats.rejected += 1
        log.warning("session_rejected", topic=topic, reason=reason, **fields)
        text = payload[:_MAX_STORED_PAYLOAD].decode("utf-8", errors="replace")
        await self.store.add_reject(topic, text, reason)
        return "rejected"

    async def _handle_key(self, site: str, topic: str, payload: bytes) -> str:
        if not payload:
            return "ignored"  # a cleared retained message
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return await self._reject(topic, payload, f"not JSON: {exc}")
        errors = validate("gateway-key", data)
        if errors:
            return await self._reject(topic, payload, "schema: " + "; ".join(errors[:3]))
        try:
            public = load_public_key(data["public_key_pem"])
        except (GatewayError, ValueError) as exc:
            return await self._reject(topic, payload, f"unusable public key: {exc}")
        kid = key_id(public)
        if kid != data["key_id"]:
            return await self._reject(
                topic, payload, f"key_id {data['key_id']} does not belong to the key ({kid})"
            )
        self._keys[(site, kid)] = public
        if await self.store.put_site_key(site, kid, data["alg"], data["public_key_pem"]):
            self.stats.keys += 1
            log.info("site_key_learnt", site_id=site, key_id=kid)
        await self._check_late_signatures(site, kid, public)
        return "key"

    async def _check_late_signatures(self, site: str, kid: str, public: Ed25519PublicKey) -> None:
        for stored in await self.store.unchecked_sessions(site):
            rec = stored.record
            sig = rec.get("signature")
            if not isinstance(sig, dict) or sig.get("key_id") != kid:
                continue
            ok = verify_signature(public, stored.hash, sig)
            await self.store.set_signature_ok(stored.session_id, ok)
            if not ok:
                detail = f"site {site}: seq {stored.seq} (session {stored.session_id}): "
                detail += "signature does not verify"
                log.error("session_bad_signature", site_id=site, seq=stored.seq, detail=detail)
                await self.store.add_problem(
                    site, "bad_signature", detail, stored.seq, stored.session_id
                )

    async def _handle_session(self, site: str, topic: str, payload: bytes) -> str:
        try:
            text = payload.decode("utf-8")
            record = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return await self._reject(topic, payload, f"not JSON: {exc}")
        if not isinstance(record, dict):
            return await self._reject(topic, payload, "not a JSON object")
        errors = validate("session", record)
        if errors:
            more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
            return await self._reject(
                topic, payload, "schema: " + "; ".join(errors[:3]) + more, site_id=site
            )
        sid, seq = record["session_id"], record["seq"]
        label = f"seq {seq} (session {sid})"
        if record["site_id"] != site:
            return await self._reject(
                topic, payload, f"{label}: site_id {record['site_id']!r} is not the topic's site"
            )
        if record_hash(record) != record["hash"]:
            return await self._reject(
                topic, payload, f"{label}: hash does not match its content", site_id=site
            )
        signature_ok = self._signature(site, record)
        if signature_ok is False:
            return await self._reject(
                topic, payload, f"{label}: signature does not verify", site_id=site
            )

        existing = await self.store.get_session(sid)
        if existing is not None:
            if canonical_json(existing.record) == canonical_json(record):
                self.stats.duplicates += 1
                log.debug("session_duplicate", site_id=site, seq=seq, session_id=sid)
                return "duplicate"
            self.stats.conflicts += 1
            detail = f"site {site}: {label}: session delivered again with different content"
            log.error("session_conflicting_duplicate", site_id=site, seq=seq, session_id=sid)
            await self.store.add_problem(site, "conflict", detail, seq, sid)
            await self.store.add_reject(topic, text[:_MAX_STORED_PAYLOAD], detail)
            return "conflict"

        await self._check_chain(site, record, label)
        if await self.store.insert_session(record, text, signature_ok=signature_ok):
            self.stats.stored += 1
            log.info("session_stored", site_id=site, seq=seq, session_id=sid)
            return "stored"
        self.stats.duplicates += 1  # another consumer of the group stored it meanwhile
        return "duplicate"

    def _signature(self, site: str, record: dict[str, Any]) -> bool | None:
        """True/False when a known key checks it; None when no key of the site is known yet.
        An unsigned record from a site whose key is known counts as a bad signature."""
        sig = record.get("signature")
        if sig is None:
            return False if any(s == site for s, _ in self._keys) else None
        public = self._keys.get((site, str(sig.get("key_id"))))
        if public is None:
            return None
        return verify_signature(public, record["hash"], sig)

    async def _check_chain(self, site: str, record: dict[str, Any], label: str) -> None:
        seq: int = record["seq"]
        sid = record["session_id"]
        top = await self.store.max_seq(site)
        if top is None:
            if seq > 1:
                await self._gap(site, 1, seq - 1, seq, sid)
        elif seq > top + 1:
            await self._gap(site, top + 1, seq - 1, seq, sid)
        elif seq < top:
            self.stats.out_of_order += 1
            log.warning(
                "session_out_of_order",
                site_id=site,
                seq=seq,
                session_id=sid,
                after_seq=top,
                message=f"site {site}: seq {seq} arrived after seq {top}",
            )
        for other in await self.store.session_at(site, seq):
            await self._chain_problem(
                site,
                "seq_conflict",
                f"site {site}: {label}: seq already used by session {other.session_id}",
                seq,
                sid,
            )
        if seq == 1 and record["prev_hash"] != GENESIS:
            await self._chain_problem(
                site, "chain_break", f"site {site}: {label}: prev_hash is not genesis", seq, sid
            )
        for before in await self.store.session_at(site, seq - 1):
            if before.hash != record["prev_hash"]:
                await self._chain_problem(
                    site,
                    "chain_break",
                    f"site {site}: {label}: prev_hash does not match the hash of seq {seq - 1}",
                    seq,
                    sid,
                )
        for after in await self.store.session_at(site, seq + 1):
            if after.prev_hash != record["hash"]:
                await self._chain_problem(
                    site,
                    "chain_break",
                    f"site {site}: seq {seq + 1} (session {after.session_id}): prev_hash does "
                    f"not match the hash of seq {seq}",
                    seq + 1,
                    after.session_id,
                )

    async def _gap(self, site: str, first: int, last: int, seq: int, sid: str) -> None:
        self.stats.gaps += 1
        detail = f"site {site}: missing seq {_span(first, last)}"
        log.warning(
            "session_gap",
            site_id=site,
            missing=_span(first, last),
            seq=seq,
            session_id=sid,
            message=detail,
        )
        await self.store.add_problem(site, "gap", detail, seq, sid)

    async def _chain_problem(self, site: str, kind: str, detail: str, seq: int, sid: str) -> None:
        self.stats.chain_breaks += 1
        log.error("session_chain_problem", site_id=site, kind=kind, seq=seq, message=detail)
        await self.store.add_problem(site, kind, detail, seq, sid)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"


# ---------------------------------------------------------------------------------- MQTT


class BrokerUrlError(GatewayError):
    exit_code = 2  # a usage error


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
    client = aiomqtt.Client(
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
    paho = client._client
    paho.manual_ack_set(True)
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
            paho.ack(message.mid, message.qos)


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
    password: str | None = None,
) -> int:
    """Consume until cancelled (SIGINT/SIGTERM) or for ``duration_s``; 0 on a clean stop.
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
    async with open_cloud_store(db_url) as store:
        consumer = SessionConsumer(store, topic_prefix)
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
            rejected=consumer.stats.rejected,
            gaps=consumer.stats.gaps,
        )
    return 0
