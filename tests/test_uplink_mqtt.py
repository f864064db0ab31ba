"""MqttUplink against real mosquitto processes, the real SQLite Store, and a fault proxy.

Each test prints its delivery figures (run with -s to see them)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config import TlsConfig, UplinkConfig, UplinkReadingsConfig
from gateway.store import Store
from gateway.uplink.mqtt import MqttUplink
from tests.support.mqtt_broker import FaultProxy, MosquittoBroker, Pki
from tests.support.uplink import (
    PREFIX,
    SITE,
    Recorder,
    Target,
    check_delivery,
    running,
    unsealed_session,
    wait_until,
)


def uplink_config(url: str, **kw: object) -> UplinkConfig:
    base: dict[str, object] = {
        "url": url,
        "client_id": "evgw-test",
        "topic_prefix": PREFIX,
        "keepalive_s": 2.0,
        "readings_qos": 1,
        # every reading, as these delivery tests count them (tests/test_uplink_lean.py folds)
        "readings": UplinkReadingsConfig(interval_s=0),
    }
    base.update(kw)
    return UplinkConfig(**base)  # type: ignore[arg-type]


def make_uplink(cfg: UplinkConfig, store: Store, target: Target | None = None) -> MqttUplink:
    return MqttUplink(
        cfg,
        SITE,
        store,
        target or Target(),
        backoff_min_s=0.1,
        backoff_max_s=1.0,
        safety_poll_s=0.5,
    )


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with Store.open(tmp_path / "buffer.db", site_id=SITE, reserve_bytes=0) as s:
        yield s


async def backlog_empty(store: Store) -> bool:
    return sum((await store.outbox_backlog()).values()) == 0


async def produce(store: Store, uplink: MqttUplink, n: int, every_s: float, ids: list[str]) -> None:
    for i in range(n):
        record = await store.finish_session(unsealed_session(i))
        ids.append(record.session_id)
        await store.add_readings([("m1", time.time(), {"power_w": float(i), "energy_wh": i})] * 3)
        uplink.publish_status(
            "cp1",
            {
                "status": "charging" if i % 2 else "available",
                "online": True,
                "session_id": None,
                "power_w": float(i),
            },
        )
        uplink.notify()
        await asyncio.sleep(every_s)


def report(name: str, figures: dict[str, int], uplink: MqttUplink) -> None:
    print(
        f"\n{name}: {figures} connects={uplink.stats.connects} abandoned={uplink.stats.abandoned}"
    )


def final_status_ok(rec: Recorder, payload_power: float) -> None:
    statuses = rec.on("chargers/cp1/status")
    assert statuses and statuses[-1].json()["power_w"] == payload_power
    gw = rec.on("gateway/status")
    assert gw[-1].json()["state"] == "online"


async def test_long_backlog_drained_after_outage(mosquitto: MosquittoBroker, store: Store) -> None:
    """Broker down while 2000 sessions and 20000 readings pile up; then it comes back. The cloud
    side subscribed before the outage (persistent sessions, as a billing backend does): a
    recorder that subscribed only after the broker was back could be later than the gateway's
    first publishes on a loaded machine, and never saw them."""
    rec = Recorder(mosquitto.port)
    # The status is timed by a subscriber of its own: the recorder takes every message of the
    # backlog and validates each against its schema, so a status reaches it only after what the
    # broker queued for it before (its own pace, not the gateway's).
    status_rec = Recorder(
        mosquitto.port,
        client_id="status-watch",
        topic_filter=f"{PREFIX}/{SITE}/chargers/+/status",
    )
    async with running(rec.run()), running(status_rec.run(), "status-watch"):
        await rec.connected.wait()
        await status_rec.connected.wait()
    rec.connected.clear()  # (a cancelled run leaves it set)
    status_rec.connected.clear()
    await mosquitto.stop()  # graceful: the two sessions and their subscriptions are saved
    ids = [(await store.finish_session(unsealed_session(i))).session_id for i in range(2000)]
    now = time.time()
    await store.add_readings(
        [(f"m{i % 4}", now + i, {"power_w": i * 1.5, "energy_wh": i}) for i in range(20000)]
    )
    uplink = make_uplink(uplink_config(mosquitto.url, readings_batch=500), store)
    uplink.publish_status(
        "cp1", {"status": "available", "online": True, "session_id": None, "power_w": 0.0}
    )
    async with running(uplink.run()):
        await asyncio.sleep(1.0)
        assert not uplink.online
        await mosquitto.start()
        async with running(rec.run()), running(status_rec.run(), "status-watch"):
            await rec.connected.wait()
            await status_rec.connected.wait()
            await wait_until(lambda: uplink.online, 5, "connect")
            t0 = time.monotonic()
            await asyncio.sleep(0.05)
            # a live status during the drain must not wait behind the backlog
            uplink.publish_status(
                "cp1", {"status": "charging", "online": True, "session_id": None, "power_w": 7.0}
            )
            sent_at = time.monotonic()
            await wait_until(
                lambda: any(
                    m.json()["power_w"] == 7.0 for m in status_rec.on("chargers/cp1/status")
                ),
                5,
                "status",
            )
            status_latency = time.monotonic() - sent_at
            await wait_until(lambda: backlog_empty(store), 60, "drain")
            drain_s = time.monotonic() - t0
            # the broker has them all (PUBACKed); the recorder validates at its own pace
            await wait_until(
                lambda: len({r["session_id"] for r in rec.sessions()}) >= 2000, 60, "all sessions"
            )
            await wait_until(lambda: rec.readings_count() >= 20000, 60, "all readings")
            final_status_ok(rec, 7.0)
    figures = check_delivery(rec.sessions(), ids)
    print(
        f"\nbacklog drain: 2000 sessions + 20000 readings in {drain_s:.2f} s = "
        f"{2000 / drain_s:.0f} sessions/s + {20000 / drain_s:.0f} readings/s; "
        f"live status latency {status_latency * 1000:.0f} ms; {figures}"
    )
    assert rec.problems == []
    assert rec.readings_count() == 20000
    assert status_latency < 1.0


async def test_broker_killed_and_restarted_mid_stream(
    mosquitto: MosquittoBroker, store: Store
) -> None:
    rec = Recorder(mosquitto.port)
    uplink = make_uplink(uplink_config(mosquitto.url), store)
    ids: list[str] = []
    async with running(rec.run()), running(uplink.run()):
        await rec.connected.wait()
        async with running(produce(store, uplink, 300, 0.005, ids)) as producer:
            await wait_until(lambda: len(rec.sessions()) > 60, 10, "first sessions")
            mosquitto.kill()
            await asyncio.sleep(0.8)
            await mosquitto.start()
            await wait_until(
                lambda: len(rec.sessions()) > 160 and uplink.online, 15, "more sessions"
            )
            await mosquitto.stop()
            await asyncio.sleep(0.5)
            await mosquitto.start()
            await producer
        await wait_until(lambda: backlog_empty(store), 20, "drain")
        await wait_until(
            lambda: len({r["session_id"] for r in rec.sessions()}) >= 300, 10, "all sessions"
        )
        await asyncio.sleep(0.3)
    figures = check_delivery(rec.sessions(), ids)
    report("broker kill+restart", figures, uplink)
    assert uplink.stats.connects >= 3
    assert rec.problems == []


@pytest.mark.parametrize(
    "fault", ["drop", "reset", "stall", "throttle", pytest.param("refuse", marks=pytest.mark.slow)]
)
async def test_proxy_faults(
    mosquitto: MosquittoBroker, fault_proxy: FaultProxy, store: Store, fault: str
) -> None:
    rec = Recorder(mosquitto.port)
    # keepalive 1 s finds a dead link fast; under throttling a PINGRESP queues behind data
    keepalive_s = 5.0 if fault == "throttle" else 1.0
    uplink = make_uplink(uplink_config(fault_proxy.url, keepalive_s=keepalive_s), store)
    ids: list[str] = []
    async with running(rec.run()), running(uplink.run()):
        await rec.connected.wait()
        async with running(produce(store, uplink, 200, 0.01, ids)) as producer:
            await wait_until(lambda: len(rec.sessions()) > 40, 10, "first sessions")
            if fault == "drop":
                for _ in range(3):
                    fault_proxy.drop_all()
                    await asyncio.sleep(0.3)
            elif fault == "reset":
                for _ in range(3):
                    fault_proxy.reset_all()
                    await asyncio.sleep(0.3)
            elif fault == "stall":
                fault_proxy.stall(True)
                await wait_until(lambda: not uplink.online, 10, "stall detected")
                fault_proxy.stall(False)
                fault_proxy.drop_all()  # the stalled connection is dead to the client anyway
            elif fault == "throttle":
                fault_proxy.throttle(20_000)
                await asyncio.sleep(2.0)
                assert uplink.online  # slow is not dead
                fault_proxy.throttle(None)
            elif fault == "refuse":
                fault_proxy.refuse(True)
                fault_proxy.drop_all()
                await asyncio.sleep(1.5)
                assert not uplink.online
                fault_proxy.refuse(False)
            await producer
        await wait_until(lambda: backlog_empty(store), 30, "drain")
        await wait_until(
            lambda: len({r["session_id"] for r in rec.sessions()}) >= 200, 10, "all sessions"
        )
        await asyncio.sleep(0.3)
    figures = check_delivery(rec.sessions(), ids)
    report(f"proxy {fault}", figures, uplink)
    assert rec.problems == []
    # readings are at-least-once too (a batch in flight at a drop is sent again)
    assert rec.readings_count() >= 600
    powers = {
        r["power_w"] for m in rec.messages if "/readings/" in m.topic for r in m.json()["readings"]
    }
    assert powers == {float(i) for i in range(200)}
    if fault in ("drop", "reset", "stall", "refuse"):
        assert uplink.stats.connects >= 2


async def test_will_marks_gateway_offline_and_clean_stop_too(
    mosquitto: MosquittoBroker, fault_proxy: FaultProxy, store: Store
) -> None:
    rec = Recorder(mosquitto.port)
    uplink = make_uplink(uplink_config(fault_proxy.url, keepalive_s=1.0), store)
    uplink.set_public_key({"alg": "ed25519", "key_id": "k1", "public_key_pem": "-----BEGIN..."})
    async with running(rec.run()):
        await rec.connected.wait()
        async with running(uplink.run()):
            await wait_until(lambda: rec.on("gateway/status"), 5, "online")
            assert rec.on("gateway/status")[-1].json()["state"] == "online"
            assert rec.on("gateway/key")[-1].json()["key_id"] == "k1"
            fault_proxy.refuse(True)
            fault_proxy.reset_all()
            await wait_until(
                lambda: rec.on("gateway/status")[-1].json()["state"] == "offline", 5, "will"
            )
            fault_proxy.refuse(False)
            await wait_until(
                lambda: rec.on("gateway/status")[-1].json()["state"] == "online", 5, "back"
            )
        # cancelled: a clean stop says offline itself (the broker sends no will then)
        await wait_until(
            lambda: rec.on("gateway/status")[-1].json()["state"] == "offline", 5, "goodbye"
        )
        assert "ts" in rec.on("gateway/status")[-1].json()
    assert rec.problems == []


async def test_v5_refused_falls_back_to_v311(
    mosquitto: MosquittoBroker, fault_proxy: FaultProxy, store: Store
) -> None:
    fault_proxy.v311_only = True
    rec = Recorder(mosquitto.port)
    uplink = make_uplink(uplink_config(fault_proxy.url), store)
    record = await store.finish_session(unsealed_session(1))
    async with running(rec.run()):
        await rec.connected.wait()  # subscribed before the gateway can publish the session
        async with running(uplink.run()):
            await wait_until(lambda: rec.sessions(), 5, "session")
    assert uplink.stats.protocol == "3.1.1"
    assert rec.sessions()[0]["session_id"] == record.session_id


async def _tls_case(
    mosquitto_dir: Path, pki: Pki, tls: TlsConfig, store: Store, *, client_cert: bool = False
) -> tuple[bool, list]:
    broker = MosquittoBroker(mosquitto_dir, pki=pki, require_client_cert=client_cert)
    await broker.start()
    try:
        rec = Recorder(broker.port)
        uplink = make_uplink(uplink_config(broker.tls_url, tls=tls), store)
        await store.finish_session(unsealed_session(1))
        with capture_logs() as logs:
            async with running(rec.run()):
                await rec.connected.wait()  # subscribed before the gateway can publish
                async with running(uplink.run()):
                    try:
                        await wait_until(lambda: rec.sessions(), 3, "session over TLS")
                        delivered = True
                    except AssertionError:
                        delivered = False
        return delivered, logs
    finally:
        broker.kill()


@pytest.mark.e2e
async def test_tls_with_generated_ca(tmp_path: Path, test_pki: Pki, store: Store) -> None:
    delivered, _ = await _tls_case(
        tmp_path / "b1", test_pki, TlsConfig(ca_file=test_pki.ca_file), store
    )
    assert delivered


@pytest.mark.e2e
async def test_tls_wrong_ca_is_refused(tmp_path: Path, test_pki: Pki, store: Store) -> None:
    delivered, logs = await _tls_case(
        tmp_path / "b2", test_pki, TlsConfig(ca_file=test_pki.other_ca_file), store
    )
    assert not delivered
    errors = [e for e in logs if e["event"] == "mqtt_disconnected"]
    assert errors and "CERTIFICATE_VERIFY_FAILED" in errors[0]["error"]


@pytest.mark.e2e
async def test_tls_client_certificate(tmp_path: Path, test_pki: Pki, store: Store) -> None:
    tls = TlsConfig(
        ca_file=test_pki.ca_file, cert_file=test_pki.client_cert, key_file=test_pki.client_key
    )
    delivered, _ = await _tls_case(tmp_path / "b3", test_pki, tls, store, client_cert=True)
    assert delivered


@pytest.mark.e2e
async def test_tls_client_certificate_missing_is_refused(
    tmp_path: Path, test_pki: Pki, store: Store
) -> None:
    delivered, _ = await _tls_case(
        tmp_path / "b4", test_pki, TlsConfig(ca_file=test_pki.ca_file), store, client_cert=True
    )
    assert not delivered


async def test_commands_over_mqtt(mosquitto: MosquittoBroker, store: Store) -> None:
    target = Target()
    rec = Recorder(mosquitto.port)
    uplink = make_uplink(uplink_config(mosquitto.url), store, target)
    async with running(rec.run()), running(uplink.run()):
        await rec.connected.wait()
        await wait_until(lambda: uplink.online, 5, "online")
        await asyncio.sleep(0.2)  # subscriptions in place
        before = target.snapshot()
        await rec.publish("commands/start", b"{broken")
        await rec.publish(
            "commands/start", json.dumps({"request_id": "a1", "charger_id": 1, "user": "u"})
        )
        await rec.publish("commands/launch", json.dumps({"request_id": "a2"}))
        await rec.publish("commands/tokens", b"x" * 70_000)
        await wait_until(
            lambda: len([m for m in rec.messages if m.topic.endswith("/reply")]) >= 4,
            5,
            "error replies",
        )
        assert target.snapshot() == before
        cmd = json.dumps(
            {"request_id": "ok-1", "charger_id": "cp1", "user": "alice", "token": None}
        )
        await rec.publish("commands/start", cmd)
        await rec.publish("commands/start", cmd)
        await wait_until(lambda: len(rec.on("commands/start/reply")) >= 4, 5, "ok replies")
        await rec.publish(
            "auth/response",
            json.dumps({"request_id": "q", "status": "blocked", "user": None, "expires_at": None}),
        )
        await wait_until(lambda: target.auth, 5, "auth response")
        await uplink.send_auth_request("q2", "04AA", "rfid", "cp1")
        await wait_until(lambda: rec.on("auth/request"), 5, "auth request")
    replies = [
        m.json() for m in rec.messages if "/commands/" in m.topic and m.topic.endswith("/reply")
    ]
    assert [m.json()["ok"] for m in rec.on("auth/response/reply")] == [True]
    codes = sorted(r["error"]["code"] for r in replies if not r["ok"])
    assert codes == ["bad_json", "invalid", "too_large", "unknown_command"]
    oks = [r for r in replies if r["ok"]]
    assert len(oks) == 2 and oks[0] == oks[1]
    assert target.calls == [("start", ("cp1", "alice", None))]
    assert rec.on("commands/launch/reply")[0].json()["error"]["code"] == "unknown_command"
    assert rec.problems == []


async def test_auth_request_offline_raises(store: Store) -> None:
    from gateway.errors import UplinkError

    uplink = make_uplink(uplink_config("mqtt://127.0.0.1:1"), store)
    assert not uplink.online
    with pytest.raises(UplinkError):
        await uplink.send_auth_request("r", "t", "rfid", "cp1")


async def test_a_full_disk_while_marking_deliveries_keeps_the_connection(
    mosquitto: MosquittoBroker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while PUBACKs come in: the delivery marks cannot be written. Delivery goes
    on over the same connection and the marks are written once there is room. Found by the fault
    matrix (tests/reliability): the failed write ended the connection at every PUBACK, and
    everything in flight was sent again."""
    import sqlite3

    real_ack = store.outbox_ack
    full = {"on": True, "failed": 0}

    async def outbox_ack(ids: list[int]) -> None:
        if full["on"]:
            full["failed"] += 1
            raise sqlite3.OperationalError("database or disk is full")
        await real_ack(ids)

    monkeypatch.setattr(store, "outbox_ack", outbox_ack)
    rec = Recorder(mosquitto.port, client_id="cloud-disk-full")
    uplink = make_uplink(uplink_config(mosquitto.url), store)
    ids: list[str] = []
    async with running(rec.run()), running(uplink.run()):
        await rec.connected.wait()
        await wait_until(lambda: uplink.online, 5, "connect")
        await produce(store, uplink, 10, 0.05, ids)
        await wait_until(lambda: len({r["session_id"] for r in rec.sessions()}) >= 10, 10, "all")
        assert full["failed"] >= 1 and not await backlog_empty(store)
        full["on"] = False  # space is back
        await wait_until(lambda: backlog_empty(store), 10, "marks written")
        assert uplink.stats.connects == 1
    figures = check_delivery(rec.sessions(), ids)
    assert figures["duplicated"] == 0 and figures["lost"] == 0
