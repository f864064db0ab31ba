"""Scenario 4, backlog drain: finished sessions and readings buffered during an outage, then the
broker is back. Gateway: ``MqttUplink`` (aiomqtt, windowed QoS 1, acks group-committed to the
``Store``) until every row is acknowledged. Baseline: a raw paho-mqtt QoS 1 loop with a bounded
in-flight window publishing the same messages (built from the same rows beforehand) to the same
mosquitto. Meanwhile a charger status is published every 50 ms through the uplink and its
arrival timed by a subscriber."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import paho.mqtt.client as paho

from bench.common import HOST, Result, Size, mosquitto, percentile, tempdir
from bench.ingest import sample_values
from gateway.config import UplinkConfig, UplinkReadingsConfig
from gateway.errors import CommandError
from gateway.model import new_session_id, rfc3339
from gateway.ports import CommandTarget
from gateway.records import UnsealedRecord
from gateway.store import Store
from gateway.uplink.drain import reading_batches
from gateway.uplink.mqtt import MqttUplink
from gateway.uplink.topics import Topics

SITE = "bench"
PREFIX = "evgw"
WINDOW = 50
READINGS_BATCH = 500
DEVICES = 20
TARGET_RATIO = 0.7


class _NoCommands:
    """No commands arrive in this benchmark: every command refuses if one did, and an auth
    answer is ignored (``gateway.ports.CommandTarget`` by duck typing, hence the cast)."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def refuse(*args: object, **kwargs: object) -> None:
            if name != "auth_response":
                raise CommandError("unsupported", "benchmark")

        return refuse


def session(i: int) -> UnsealedRecord:
    start = 1_790_000_000.0 + i * 60
    return UnsealedRecord.from_dict(
        {
            "schema": "evgw.session/1",
            "session_id": new_session_id(start),
            "site_id": SITE,
            "charger_id": f"cp{i % DEVICES}",
            "connector": 1,
            "user": {
                "id": f"user{i % 7}",
                "token": "TAG0001",
                "token_type": "rfid",
                "auth": "local",
            },
            "started_at": rfc3339(start),
            "ended_at": rfc3339(start + 50),
            "charging_s": 40,
            "idle_s": 10,
            "meter_start_wh": 1000 * i,
            "meter_stop_wh": 1000 * i + 500,
            "energy_wh": 500,
            "max_power_w": 11000.0,
            "stop_reason": "ev_disconnected",
            "tariff_id": "standard",
            "tariff_version": "abc",
            "charging_periods": [],
            "cost": {
                "currency": "EUR",
                "excl_vat": "0.20",
                "vat": "0.04",
                "incl_vat": "0.24",
                "lines": [],
            },
            "flags": [],
        }
    )


async def fill(store: Store, sessions: int, readings: int) -> None:
    for i in range(sessions):
        await store.finish_session(session(i))
    values = sample_values()
    for i in range(0, readings, 5000):
        n = min(5000, readings - i)
        await store.add_readings(
            [(f"cp{(i + j) % DEVICES}", 1.79e9 + (i + j) * 0.1, values) for j in range(n)]
        )


async def messages(store: Store, topics: Topics) -> list[tuple[str, bytes]]:
    """What the uplink will send, built from the same rows (not timed)."""
    out: list[tuple[str, bytes]] = []
    after = 0
    while rows := await store.outbox_fetch("session", 1000, after):
        after = rows[-1].id
        out += [(topics.full(r.topic), r.payload) for r in rows]
    after = 0
    while rows2 := await store.readings_fetch_wire(READINGS_BATCH, after):
        after = rows2[-1][0]
        out += [(topics.readings(dev), body) for dev, body, _ in reading_batches(rows2)]
    return out


def raw_drain(port: int, msgs: list[tuple[str, bytes]]) -> float:
    """Seconds to publish ``msgs`` at QoS 1 with at most WINDOW awaiting PUBACK, over MQTT 5
    like the gateway (paho builds properties and reason codes per message in MQTT 5)."""
    window = threading.BoundedSemaphore(WINDOW)
    done = threading.Event()
    acked = [0]

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        window.release()
        acked[0] += 1
        if acked[0] == len(msgs):
            done.set()

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(HOST, port)
    client.loop_start()
    try:
        start = time.perf_counter()
        for topic, payload in msgs:
            window.acquire()
            client.publish(topic, payload, qos=1)
        if not done.wait(600):
            raise RuntimeError("raw paho drain did not finish")
        return time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()


class StatusWatch:
    """Subscribes to one charger's status topic; times each status from publish to arrival."""

    def __init__(self, port: int, topic: str) -> None:
        self.sent: dict[float, float] = {}
        self.latency_s: list[float] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-watch")
        self.client.on_message = self._on_message
        self.client.connect(HOST, port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        import json

        seq = json.loads(msg.payload).get("power_w")
        sent = self.sent.get(seq)
        if sent is not None:
            self.latency_s.append(time.monotonic() - sent)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def gateway_drain(port: int, store: Store, sessions: int, readings: int) -> dict[str, Any]:
    cfg = UplinkConfig(
        url=f"mqtt://{HOST}:{port}",
        client_id="bench-gw",
        topic_prefix=PREFIX,
        readings_qos=1,
        inflight_window=WINDOW,
        readings_batch=READINGS_BATCH,
        # every reading, so both sides send the same messages (scenario 8 covers folding)
        readings=UplinkReadingsConfig(interval_s=0),
    )
    commands = cast(CommandTarget, _NoCommands())
    uplink = MqttUplink(cfg, SITE, store, commands, backoff_min_s=0.1, backoff_max_s=1.0)
    watch = await asyncio.to_thread(StatusWatch, port, uplink.topics.charger_status("cp0"))
    await asyncio.sleep(0.2)  # the subscription is in place
    seq = 0
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(uplink.run(), name="uplink")
            start = time.perf_counter()
            while uplink.stats.acked_rows < sessions or uplink.stats.synced_readings < readings:
                seq += 1
                watch.sent[float(seq)] = time.monotonic()
                uplink.publish_status(
                    "cp0",
                    {"status": "charging", "online": True, "session_id": None, "power_w": seq},
                )
                await asyncio.sleep(0.05)
                if time.perf_counter() - start > 600:
                    raise RuntimeError("gateway drain did not finish in 600 s")
            elapsed = time.perf_counter() - start
            await asyncio.sleep(0.2)  # let the last statuses arrive
            task.cancel()
    finally:
        await asyncio.to_thread(watch.close)
    return {
        "seconds": elapsed,
        "status_sent": seq,
        "status_received": len(watch.latency_s),
        "status_p50_ms": percentile(watch.latency_s, 0.5) * 1000,
        "status_max_ms": max(watch.latency_s, default=float("nan")) * 1000,
    }


async def run(size: Size) -> Result:
    sessions = size.pick(500, 10_000)
    readings = size.pick(20_000, 1_000_000)
    result = Result(
        "drain", f"4. Backlog drain ({sessions:,} sessions + {readings:,} readings, QoS 1)"
    )
    with tempdir() as tmp:
        async with (
            mosquitto(tmp) as port,
            Store.open(tmp / "drain.db", site_id=SITE, reserve_bytes=0, max_size_mb=8192) as store,
        ):
            await fill(store, sessions, readings)
            msgs = await messages(store, Topics(PREFIX, SITE))
            # raw before and after the gateway: the machine is shared, and its load drifts
            cpu0 = time.process_time()
            raw_before = await asyncio.to_thread(raw_drain, port, msgs)
            cpu1 = time.process_time()
            gw = await gateway_drain(port, store, sessions, readings)
            cpu2 = time.process_time()
            raw_after = await asyncio.to_thread(raw_drain, port, msgs)
            cpu3 = time.process_time()
            raw_s = (raw_before + raw_after) / 2
            backlog = await store.outbox_backlog()
    n = len(msgs)
    result.add("messages", float(n), "")
    result.add("gateway drain time", gw["seconds"], "s")
    result.add("raw paho drain time (mean of before and after)", raw_s, "s")
    result.add("raw paho drain time before / after", raw_before / raw_after, "")
    result.add("gateway msg/s", n / gw["seconds"], "1/s")
    result.add("raw paho msg/s", n / raw_s, "1/s")
    result.add("ratio gateway/raw (throughput)", raw_s / gw["seconds"], "", at_least=TARGET_RATIO)
    # CPU of this process (all threads; mosquitto is another process): less noisy than time
    raw_cpu_us = ((cpu1 - cpu0) + (cpu3 - cpu2)) / 2 / n * 1e6
    gw_cpu_us = (cpu2 - cpu1) / n * 1e6
    result.add("gateway CPU a message (all threads)", gw_cpu_us, "us")
    result.add("raw paho CPU a message (both its threads)", raw_cpu_us, "us")
    result.add("CPU ratio gateway/raw", gw_cpu_us / raw_cpu_us, "")
    result.add("status latency p50 during drain", gw["status_p50_ms"], "ms")
    result.add("status latency max during drain", gw["status_max_ms"], "ms")
    result.add(
        "statuses received / sent",
        gw["status_received"] / max(gw["status_sent"], 1),
        "",
    )
    result.add("rows left unacked", float(sum(backlog.values())), "", at_most=0)
    result.notes.append(
        f"MQTT 5 and a window of {WINDOW} in flight on both sides; readings {READINGS_BATCH} "
        f"rows a fetch, one message per device ({DEVICES} devices) per fetch, as MqttUplink "
        "batches them. Retained "
        "statuses are latest-value: a status replaced before it went out is not expected, so "
        "'received / sent' below 1 is not a loss."
    )
    return result
