"""Shared pieces of the uplink tests (no tests here): a recording cloud subscriber, a
CommandTarget with visible state, session records, delivery checks, the buffer's undelivered
readings as the uplink reads them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.errors import CommandError
from gateway.model import Token, from_rfc3339, new_session_id, rfc3339
from gateway.ports import UplinkStore
from gateway.records import UnsealedRecord
from gateway.uplink import pahoport
from gateway.uplink.schemas import validate

SITE = "depot-7"
PREFIX = "evgw"
ROOT = f"{PREFIX}/{SITE}"


@dataclass(frozen=True, slots=True)
class Pending:
    """An undelivered reading, decoded from its wire form."""

    id: int
    device_id: str
    ts: float
    values: dict[str, Any]
    wire: bytes


async def pending_readings(store: UplinkStore, limit: int, after_id: int = 0) -> list[Pending]:
    """The undelivered readings as the uplink reads them (``readings_fetch_wire``), decoded."""
    out = []
    for row_id, device_id, wire in await store.readings_fetch_wire(limit, after_id):
        values = json.loads(wire)
        ts = from_rfc3339(values.pop("ts"))
        out.append(Pending(row_id, device_id, ts, values, wire))
    return out


def schema_for(topic: str) -> str | None:
    rest = topic[len(ROOT) + 1 :]
    parts = rest.split("/")
    if rest == "gateway/status":
        return "gateway-status"
    if rest == "gateway/key":
        return "gateway-key"
    if parts[0] == "chargers" and parts[-1] == "status":
        return "charger-status"
    if rest == "sessions/started":
        return "session-started"
    if rest == "sessions/finished":
        return "session"
    if parts[0] == "readings":
        return "readings"
    if rest == "auth/request":
        return "auth-request"
    if rest == "grid/limit":
        return "grid-limit"
    if parts[0] == "commands" and len(parts) == 3 and parts[2] == "reply":
        return "command-reply"
    if rest == "auth/response/reply":
        return "command-reply"
    return None


def check_payload(topic: str, payload: bytes) -> list[str]:
    """Problems of a payload against its topic's schema."""
    name = schema_for(topic)
    if name is None:
        return []
    return [f"{topic}: {p}" for p in validate(name, json.loads(payload))]


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Recorder:
    """A cloud-side subscriber with a persistent session; reconnects on its own."""

    port: int
    client_id: str = "cloud-recorder"
    topic_filter: str = f"{ROOT}/#"
    messages: list[Received] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    client: aiomqtt.Client | None = None

    async def run(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with pahoport.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False,
                    properties=props,
                    timeout=5,
                ) as client:
                    await client.subscribe(self.topic_filter, qos=1)
                    self.client = client
                    self.connected.set()
                    async for m in client.messages:
                        payload = (
                            bytes(m.payload)
                            if isinstance(m.payload, bytes | bytearray)
                            else str(m.payload).encode()
                        )
                        self.messages.append(Received(m.topic.value, payload, bool(m.retain)))
                        self.problems += check_payload(m.topic.value, payload)
            except aiomqtt.MqttError:
                self.client = None
                self.connected.clear()
                await asyncio.sleep(0.1)

    def on(self, suffix: str) -> list[Received]:
        return [m for m in self.messages if m.topic == f"{ROOT}/{suffix}"]

    def sessions(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.on("sessions/finished")]

    def readings_count(self) -> int:
        return sum(len(m.json()["readings"]) for m in self.messages if "/readings/" in m.topic)

    async def publish(self, suffix: str, payload: bytes | str) -> None:
        assert self.client is not None
        await self.client.publish(f"{ROOT}/{suffix}", payload, qos=1)


STOP_WITHIN_S = 20.0


@contextlib.asynccontextmanager
async def running(coro: Any, name: str = "bg") -> Any:
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        # a task that swallows its cancellation fails the test by name, not by hanging it
        await asyncio.wait({task}, timeout=STOP_WITHIN_S)
        if not task.done():
            raise AssertionError(f"{name}: still running {STOP_WITHIN_S} s after its cancel")
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(predicate: Any, timeout_s: float, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def session_record(i: int, charger_id: str = "cp1", ts: float = 1_790_000_000.0) -> dict[str, Any]:
    start = ts + i * 60
    return {
        "schema": "evgw.session/1",
        "session_id": new_session_id(start),
        "charger_id": charger_id,
        "connector": 1,
        "user": {
            "id": f"user{i % 7}",
            "token": f"TAG{i % 7:04d}",
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
        "charging_periods": [
            {
                "start": rfc3339(start),
                "tariff_element": 0,
                "energy_wh": 500,
                "charging_s": 40,
                "idle_s": 10,
            }
        ],
        "cost": {
            "currency": "EUR",
            "excl_vat": "0.20",
            "vat": "0.04",
            "incl_vat": "0.24",
            "lines": [
                {
                    "type": "energy",
                    "quantity": "0.500",
                    "unit": "kWh",
                    "unit_price": "0.39",
                    "amount": "0.20",
                }
            ],
        },
        "flags": [],
    }


def unsealed_session(i: int, charger_id: str = "cp1") -> UnsealedRecord:
    """:func:`session_record` as the typed record a store of site ``SITE`` finishes."""
    return UnsealedRecord.from_dict({**session_record(i, charger_id), "site_id": SITE})


def check_delivery(
    sessions: Sequence[dict[str, Any]], expected_ids: Sequence[str]
) -> dict[str, int]:
    """At-least-once, duplicates only by session_id, first deliveries in seq order, none lost."""
    first: dict[str, dict[str, Any]] = {}
    order: list[int] = []
    for record in sessions:
        sid = record["session_id"]
        if sid in first:
            assert first[sid] == record, "a duplicate differs from the first delivery"
            continue
        first[sid] = record
        order.append(record["seq"])
    assert order == sorted(order), "first deliveries out of seq order"
    missing = set(expected_ids) - set(first)
    assert not missing, f"{len(missing)} sessions never delivered"
    assert order == list(range(order[0], order[0] + len(order))), "gap in seq"
    return {
        "sent": len(expected_ids),
        "received": len(sessions),
        "duplicated": len(sessions) - len(first),
        "lost": len(missing),
    }


class Target:
    """A CommandTarget with visible state; refuses unknown chargers like the real one would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.tokens: dict[str, Token] = {}
        self.tokens_version = 0
        self.tariffs_version = 0
        self.auth: list[tuple[str, str, str | None, float | None]] = []

    async def remote_start(self, charger_id: str, user: str, token: str | None) -> dict[str, Any]:
        if charger_id != "cp1":
            raise CommandError("unknown_charger", f"no charger {charger_id}")
        self.calls.append(("start", (charger_id, user, token)))
        return {"charger_id": charger_id, "accepted": True}

    async def remote_stop(self, charger_id: str | None, session_id: str | None) -> dict[str, Any]:
        self.calls.append(("stop", (charger_id, session_id)))
        return {"stopped": True}

    async def update_tokens(
        self, version: int, mode: str, tokens: Sequence[Token], remove: Sequence[str]
    ) -> dict[str, Any]:
        if version <= self.tokens_version:
            raise CommandError("stale_version", f"version {version} <= {self.tokens_version}")
        self.calls.append(("tokens", (version, mode)))
        if mode == "replace":
            self.tokens = {}
        for t in tokens:
            self.tokens[t.id] = t
        for r in remove:
            self.tokens.pop(r, None)
        self.tokens_version = version
        return {"version": version, "count": len(self.tokens)}

    async def update_tariffs(self, version: int, tariffs: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("tariffs", version))
        self.tariffs_version = version
        return {"version": version}

    async def auth_response(
        self, request_id: str, status: str, user: str | None, expires_at: float | None
    ) -> None:
        self.auth.append((request_id, status, user, expires_at))

    def snapshot(self) -> Any:
        return (list(self.calls), dict(self.tokens), self.tokens_version, self.tariffs_version)
