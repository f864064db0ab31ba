"""The backlog drain: what one connection publishes, and the window of publishes in flight.

A bounded window of QoS 1 publishes tracked by packet id. The drain hands each message to paho
(gateway/uplink/pahoport.py) and goes on; the PUBACK callback takes the packet id out of the
window and queues the rows' ids, which a group-commit task acknowledges to the store in batches,
only after their PUBACK. No future or task per message. A watchdog drops the connection when the
oldest publish waits longer than the publish timeout. Readings batches are fetched by a prefetch
task while the previous batch is being published.

Each round publishes the latest values that changed (charger statuses, other retained topics),
then the outbox streams in ``OUTBOX_STREAMS`` order (session starts, then a share of finished
sessions, in id order = seq order) and a batch of readings, so live status never waits behind a
backlog. Which message goes which way: gateway/outgoing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.client import MQTT_ERR_SUCCESS

from gateway.config import UplinkConfig
from gateway.model import Clock, rfc3339
from gateway.outgoing import OUTBOX_STREAMS, SESSION_STREAM
from gateway.ports import UplinkStore
from gateway.uplink.lean import Aggregate, LeanReadings
from gateway.uplink.pahoport import (
    Forward,
    Publish,
    corked_writes,
    direct_publisher,
    lean_pubacks,
)
from gateway.uplink.topics import Topics
from gateway.wire import encode_reading, readings_batch

__all__ = ["Drain", "Inflight", "UplinkStats", "aggregate_batches", "encode", "reading_batches"]

log = structlog.get_logger(__name__)

ACK_RETRY_S = 1.0  # while the disk is full, try writing the delivery marks again this often
BATCHES_PER_FETCH = 2  # readings batches read from the store at once while draining
_MAX_FETCH_ROWS = 5000


@dataclass(slots=True)
class UplinkStats:
    """Counters since start (for tests, the live view and figures)."""

    connects: int = 0
    published: dict[str, int] = field(default_factory=dict)  # messages PUBACKed, per stream
    acked_rows: int = 0  # outbox rows acknowledged to the store
    synced_readings: int = 0
    abandoned: int = 0  # publishes in flight when a connection dropped
    refused: int = 0  # PUBACKs with a failure reason (MQTT 5): the broker did not take them
    commands: int = 0
    commands_busy: int = 0  # found the queue full and were answered ``busy``
    commands_dropped: int = 0  # found even the busy replies full (never seen in tests)
    protocol: str = "5"
    last_puback_monotonic: float | None = None  # clock.monotonic() of the latest PUBACK


_ACK = 0  # outbox rows: acknowledged (deleted) on PUBACK
_SYNC = 1  # readings rows: marked synced on PUBACK


class Inflight:
    """Publishes awaiting PUBACK, by packet id: at most ``limit`` of them and ``max_bytes`` of
    payload (one message may exceed it alone)."""

    __slots__ = ("_room", "bytes", "entries", "limit", "max_bytes")

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.limit = max(1, limit)
        self.max_bytes = max_bytes
        self.bytes = 0
        # mid -> (sent at (loop time), size, stream, _ACK/_SYNC/None, row ids, qos); insertion
        # order is send order, so the first entry is the oldest
        self.entries: dict[int, tuple[float, int, str, int | None, Sequence[int], int]] = {}
        self._room = asyncio.Event()

    def full(self, size: int) -> bool:
        n = len(self.entries)
        return n >= self.limit or (n > 0 and self.bytes + size > self.max_bytes)

    async def wait_room(self, size: int) -> None:
        """Wait until a message of ``size`` bytes fits. Every PUBACK wakes the drain, which
        refills the slot at once: a steady stream both ways. Waiting for a tenth of the window
        to free up instead (a few messages a wake-up) stalled the drain 2-3 ms a wait: with
        nothing of ours to carry TCP's acknowledgements, the broker's small PUBACKs wait in its
        Nagle buffer for a delayed ACK (mosquitto leaves Nagle on unless ``set_tcp_nodelay``);
        a backlog then took 5 s instead of 3 (bench/findings.md)."""
        while self.full(size):
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
            self._room.set()
        return entry

    def oldest(self) -> float | None:
        for entry in self.entries.values():
            return entry[0]
        return None

    @property
    def count(self) -> int:
        return len(self.entries)


class Drain:
    """Publishes the latest values, the outbox and the readings over one connection at a time
    (``run``), and marks in the store what the broker acknowledged. Owned by ``MqttUplink``; it
    outlives connections (the latest values and the delivery marks carry over)."""

    def __init__(
        self,
        config: UplinkConfig,
        store: UplinkStore,
        topics: Topics,
        clock: Clock,
        stats: UplinkStats,
        version: str,
        *,
        safety_poll_s: float,
        publish_timeout_s: float,
    ) -> None:
        self._config = config
        self._store = store
        self.topics = topics
        self._clock = clock
        self.stats = stats
        self._version = version
        self._safety_poll_s = safety_poll_s
        self._publish_timeout_s = publish_timeout_s
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

    def notify(self) -> None:
        """New rows in the outbox or readings: wake the drain."""
        self._outbox_pending = True
        self._readings_wake.set()
        self._wake.set()

    def put_status(self, device_id: str, payload: bytes) -> None:
        """The latest status of a charger (published retained on its topic)."""
        self._statuses[device_id] = payload
        self._dirty.add(device_id)
        self._wake.set()

    def put_retained(self, topic: str, payload: bytes) -> None:
        """The latest retained message on a full topic."""
        self._retained[topic] = payload
        self._dirty_retained.add(topic)
        self._wake.set()

    def set_key(self, payload: bytes) -> None:
        """The retained ``gateway/key`` message (published on every connect)."""
        self._key_payload = payload
        self._wake.set()

    async def run(self, client: aiomqtt.Client, inflight: Inflight) -> None:
        """Drain over ``client`` until cancelled or the connection fails (the watchdog raises
        MqttError when a PUBACK is overdue). Publishes still in ``inflight`` at the end are
        abandoned: their rows stay unacknowledged in the store and go out again."""
        delivered = self._delivered
        forward: Forward | None = None
        refusal = _Refusal()

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            entry = inflight.pop(mid)
            if entry is None:
                if forward is not None:
                    forward(c, userdata, mid, reason, props)
            elif reason.is_failure:  # MQTT 5: the broker answered, but did not take it
                self._refused(refusal, entry[2], entry[3], entry[4], reason)
            else:
                delivered(entry[2], entry[3], entry[4], entry[5])

        publish, forward = direct_publisher(client, on_publish)
        lean_pubacks(client)
        corked_writes(client)
        batches: asyncio.Queue[list[tuple[int, str, bytes]]] = asyncio.Queue(
            maxsize=BATCHES_PER_FETCH
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._acker(), name="uplink-acker")
            tg.create_task(self._watchdog(inflight, refusal), name="uplink-watchdog")
            tg.create_task(self._prefetch(batches), name="uplink-prefetch")
            tg.create_task(self._drain(client, publish, inflight, batches), name="uplink-drain")

    async def _drain(
        self,
        client: aiomqtt.Client,
        publish: Publish,
        inflight: Inflight,
        batches: asyncio.Queue[list[tuple[int, str, bytes]]],
    ) -> None:
        cfg = self._config
        online = {"state": "online", "version": self._version, "ts": rfc3339(self._clock.time())}
        await client.publish(self.topics.gateway_status, encode(online), qos=1, retain=True)
        if self._key_payload is not None:
            await client.publish(self.topics.gateway_key, self._key_payload, qos=1, retain=True)
        self._dirty.update(self._statuses)
        self._dirty_retained.update(self._retained)
        cursors = dict.fromkeys(OUTBOX_STREAMS, 0)
        share = max(1, inflight.limit // 2)
        self._outbox_pending = True
        loop = asyncio.get_running_loop()
        outbox_due = loop.time()
        # a share of the window for finished sessions, so a backlog of them leaves room
        streams = [(s, share if s == SESSION_STREAM else inflight.limit) for s in OUTBOX_STREAMS]
        more: set[str] = set()  # streams whose last page was full
        readings_topics: dict[str, str] = {}  # device id -> topic (built and checked once)
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
            info = publish(topic, payload, qos, retain)
            if info.rc != MQTT_ERR_SUCCESS:
                raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
            if qos == 0 and info.is_published():  # QoS 0 already written
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
                    messages = reading_batches(rows)
                else:
                    messages = aggregate_batches(lean.add_wire(rows))
            if lean is not None and lean.held:
                messages += aggregate_batches(lean.due(self._clock.time()))
            if messages:
                for device_id, payload, ids in messages:
                    to = readings_topics.get(device_id)
                    if to is None:
                        to = readings_topics[device_id] = self.topics.readings(device_id)
                    await send(
                        "readings",
                        to,
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
        fetch = max(batch, min(batch * BATCHES_PER_FETCH, _MAX_FETCH_ROWS))
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

    async def _watchdog(self, inflight: Inflight, refusal: _Refusal) -> None:
        """Drops the connection when a publish has waited longer than the publish timeout for
        its PUBACK (a stalled broker or link), or the broker refused one that carries rows;
        their rows go out again on the next connection."""
        loop = asyncio.get_running_loop()
        timeout_s = self._publish_timeout_s
        while True:
            if refusal.error is not None:
                raise refusal.error
            oldest = inflight.oldest()
            now = loop.time()
            if oldest is not None and now - oldest >= timeout_s:
                raise aiomqtt.MqttError(f"no PUBACK within {timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(
                    timeout_s if oldest is None else oldest + timeout_s - now
                ):
                    await refusal.event.wait()

    def _refused(
        self, refusal: _Refusal, stream: str, kind: int | None, ids: Sequence[int], reason: Any
    ) -> None:
        """The broker refused a publish (an MQTT 5 PUBACK with a reason code of 0x80 or more:
        not authorized by its ACL, quota exceeded, topic or payload refused). Its rows are not
        marked delivered: a finished session the broker did not take is not sent, whatever
        the PUBACK says. A message that carries rows drops the connection, so they go out
        again, in order, on the next one (after the reconnect backoff, which grows while the
        broker goes on refusing); a latest value (a status) is only logged: the next change
        replaces it."""
        self.stats.refused += 1
        code = getattr(reason, "value", reason)
        if kind is None:
            level = log.debug if (stream, code) in refusal.logged else log.warning
            refusal.logged.add((stream, code))
            level("uplink_publish_refused", stream=stream, reason=str(reason), code=code)
            return
        if refusal.error is None:
            log.error(
                "uplink_publish_refused",
                stream=stream,
                reason=str(reason),
                code=code,
                rows=len(ids),
                hint="the rows stay buffered and go again on the next connection; "
                "check the broker's ACL and quotas for this site's account",
            )
            refusal.error = aiomqtt.MqttError(
                f"the broker refused a {stream} publish: {reason} (0x{code:02x})"
            )
            refusal.event.set()

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
            await self.flush_acks()

    async def flush_acks(self) -> None:
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


@dataclass(slots=True)
class _Refusal:
    """The first refused publish that carries rows, on one connection (``Drain._refused``), and
    the refused latest values already logged (again at DEBUG only)."""

    error: aiomqtt.MqttError | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    logged: set[tuple[str, int]] = field(default_factory=set)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def reading_batches(rows: Sequence[tuple[int, str, bytes]]) -> list[tuple[str, bytes, list[int]]]:
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


def aggregate_batches(aggregates: Sequence[Aggregate]) -> list[tuple[str, bytes, list[int]]]:
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
