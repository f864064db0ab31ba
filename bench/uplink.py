"""Scenario 8, uplink bytes a day: what the readings cost a site on a cellular plan.

A 10-charger site polled once a second (the default ``poll_interval``), 17 values a reading (the
benchmark profile), values changing every second. The readings go through the uplink's own code
at its live cadence (the buffer is flushed and drained once a second): at full resolution
(``uplink.readings.interval: 0``: one message per charger a second, spliced by
``reading_batches``) and with the defaults (``LeanReadings`` + ``aggregate_batches``). Bytes are
MQTT 5 PUBLISH packets as sent at the default readings QoS 0 (fixed header, topic, properties
length, payload); TCP/IP and TLS framing come on top and are estimated separately.

Baseline: full resolution in the same run. A quick run simulates an hour and scales it to a day.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Result, Size
from bench.ingest import sample_values
from gateway.config import UplinkReadingsConfig
from gateway.uplink.drain import aggregate_batches, reading_batches
from gateway.uplink.lean import LeanReadings
from gateway.uplink.topics import Topics
from gateway.wire import encode_reading

CHARGERS = 10
DAY_S = 86_400
TARGET_MB_DAY = 25.0
# IPv4 + TCP with timestamps (52) + a TLS 1.3 record (5 header + 1 type + 16 tag) per message
FRAMING_B = 52 + 22


def publish_bytes(topic: str, payload: bytes, qos: int = 0) -> int:
    """Size of an MQTT 5 PUBLISH packet without properties."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + len(payload)
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2**21 else 4
    return 1 + varint + remaining


def _values(base: dict[str, Any], second: int, k: int) -> dict[str, Any]:
    out = dict(base)
    out["power_w"] = round(7000 + 400 * ((second * 7 + k) % 11) / 11, 1)
    out["current_l1_a"] = round(out["power_w"] / 230, 2)
    out["energy_wh"] = 1_000_000 * k + second * 2
    out["charge_time_s"] = second
    return out


def simulate(seconds: int, readings: UplinkReadingsConfig) -> dict[str, float]:
    topics = Topics("evgw", "depot-7")
    base = sample_values()
    t0 = 1_790_006_400.0  # midnight UTC
    lean = LeanReadings(readings.interval_s, readings.mode) if readings.interval_s > 0 else None
    total = messages = row_id = 0
    for second in range(seconds):
        now = t0 + second
        rows = []
        for k in range(CHARGERS):
            row_id += 1
            rows.append((row_id, f"cp{k + 1}", encode_reading(now, _values(base, second, k))))
        if lean is None:
            batches = reading_batches(rows)
        else:
            batches = aggregate_batches(lean.add_wire(rows) + lean.due(now + 1))
        for device_id, payload, _ids in batches:
            total += publish_bytes(topics.readings(device_id), payload)
            messages += 1
    scale = DAY_S / seconds
    return {
        "mqtt_mb_day": total * scale / 1e6,
        "messages_day": messages * scale,
        "framed_mb_day": (total + messages * FRAMING_B) * scale / 1e6,
    }


async def run(size: Size) -> Result:
    seconds = size.pick(3600, DAY_S)
    defaults = UplinkReadingsConfig()
    result = Result(
        "uplink",
        f"8. Uplink bytes a day ({CHARGERS} chargers, 1 s polls, 17 values; "
        f"{seconds // 3600} h simulated)",
    )
    t = time.perf_counter()
    lean = simulate(seconds, defaults)
    full = simulate(seconds, UplinkReadingsConfig(interval_s=0))
    took = time.perf_counter() - t
    result.add(
        f"defaults ({defaults.interval_s:g} s, {defaults.mode}): MQTT bytes",
        lean["mqtt_mb_day"],
        "MB/day",
        at_most=TARGET_MB_DAY,
    )
    result.add("defaults: messages", lean["messages_day"], "1/day")
    result.add("defaults: with TCP/IP + TLS framing", lean["framed_mb_day"], "MB/day")
    result.add("full resolution: MQTT bytes", full["mqtt_mb_day"], "MB/day")
    result.add("full resolution: messages", full["messages_day"], "1/day")
    result.add("full resolution: with TCP/IP + TLS framing", full["framed_mb_day"], "MB/day")
    for mode in ("mean", "min_max"):
        other = simulate(min(seconds, 3600), UplinkReadingsConfig(interval_s=60, mode=mode))
        result.add(f"60 s, {mode}: MQTT bytes", other["mqtt_mb_day"], "MB/day")
    result.add("ratio defaults/full resolution", lean["mqtt_mb_day"] / full["mqtt_mb_day"], "")
    result.notes.append(
        "Computed through the uplink's own batching and folding code at its live cadence "
        f"(took {took:.1f} s), not on the wire; readings at QoS 0 (the default). Framing "
        f"estimate: {FRAMING_B} bytes a message for IPv4+TCP (timestamps) and a TLS 1.3 record; "
        "broker ACK segments and keepalive pings (a few KB a day) are not counted. "
        "tests/test_uplink_lean.py checks the folded messages against a real mosquitto."
    )
    return result
