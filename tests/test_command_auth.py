"""Commands only from the cloud: signed, fresh, once (issue 11 item 4).

Every test runs the real MqttUplink against a mosquitto started by the test, with the real SQLite
buffer; the cloud is a second MQTT client publishing signed (or forged) messages. Auth responses
go to the real Authorizer."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs
from test_uplink_mqtt import make_uplink, uplink_config

from gateway.auth import Authorizer
from gateway.config import AuthConfig
from gateway.model import AuthStatus, SystemClock
from gateway.store import Store
from gateway.uplink.envelope import sign_message
from gateway.uplink.mqtt import MqttUplink
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import ROOT, SITE, Recorder, Target, running, wait_until

MAX_AGE_S = 60.0


@pytest.fixture
def cloud_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_public(key: Ed25519PrivateKey, path: Path) -> str:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return str(path)


class AuthTarget(Target):
    """Commands recorded as Target does; auth responses go to a real Authorizer."""

    authorizer: Authorizer | None = None

    async def auth_response(
        self, request_id: str, status: str, user: str | None, expires_at: float | None
    ) -> None:
        assert self.authorizer is not None
        await self.authorizer.auth_response(request_id, status, user, expires_at)
        self.auth.append((request_id, status, user, expires_at))


def signed(key: Ed25519PrivateKey, suffix: str, payload: dict[str, Any], **kw: Any) -> bytes:
    return json.dumps(sign_message(f"{ROOT}/{suffix}", payload, key, **kw)).encode()


def reply(rec: Recorder, suffix: str, request_id: str) -> dict[str, Any] | None:
    for m in rec.on(f"{suffix}/reply"):
        body = m.json()
        if body.get("request_id") == request_id:
            return body  # type: ignore[no-any-return]
    return None


def replies(rec: Recorder, suffix: str, request_id: str) -> list[dict[str, Any]]:
    return [m.json() for m in rec.on(f"{suffix}/reply") if m.json()["request_id"] == request_id]


async def answer(rec: Recorder, suffix: str, payload: bytes, request_id: str) -> dict[str, Any]:
    before = len(replies(rec, suffix, request_id))
    await rec.publish(suffix, payload)
    await wait_until(
        lambda: len(replies(rec, suffix, request_id)) > before, 10, f"reply to {request_id}"
    )
    return replies(rec, suffix, request_id)[-1]


def signed_uplink(
    broker: MosquittoBroker, store: Store, target: Target, key_file: str, **kw: Any
) -> MqttUplink:
    cfg = uplink_config(broker.url, command_key=key_file, command_max_age_s=MAX_AGE_S, **kw)
    return make_uplink(cfg, store, target)


async def online(rec: Recorder, uplink: MqttUplink) -> None:
    await rec.connected.wait()
    await wait_until(lambda: uplink.online, 10, "uplink online")
    await asyncio.sleep(0.3)  # the gateway's subscriptions are in place


START = {"charger_id": "cp1", "user": "carol"}


def forged_starts(key: Ed25519PrivateKey) -> dict[str, tuple[bytes, str]]:
    """Start commands that must be refused: request id -> (payload, error code)."""
    now = time.time()
    topic = f"{ROOT}/commands/start"

    def body(rid: str, **kw: Any) -> dict[str, Any]:
        return sign_message(kw.pop("topic", topic), {"request_id": rid, **START}, key, **kw)

    no_time = body("no-issued-at")
    del no_time["issued_at"]
    tampered = body("tampered")
    tampered["user"] = "mallory"
    cases: dict[str, tuple[Any, str]] = {
        "unsigned": ({"request_id": "unsigned", **START}, "unsigned"),
        "no-issued-at": (no_time, "unsigned"),
        "other-key": (
            sign_message(topic, {"request_id": "other-key", **START}, Ed25519PrivateKey.generate()),
            "bad_signature",
        ),
        "tampered": (tampered, "bad_signature"),
        "other-site": (body("other-site", topic="evgw/other-site/commands/start"), "bad_signature"),
        "other-command": (body("other-command", topic=f"{ROOT}/commands/stop"), "bad_signature"),
        "stale": (body("stale", issued_at=now - MAX_AGE_S - 5), "stale"),
        "future": (body("future", issued_at=now + 300), "stale"),
    }
    # a valid signature of another message, without key_id: the value itself is checked
    sig = dict(body("x")["signature"])
    del sig["key_id"]
    cases["no-key-id"] = ({**body("no-key-id"), "signature": sig}, "bad_signature")
    return {rid: (json.dumps(p).encode(), code) for rid, (p, code) in cases.items()}


async def test_signed_start_applies_and_unsigned_badly_signed_or_stale_ones_are_refused(
    mosquitto: MosquittoBroker, tmp_path: Path, cloud_key: Ed25519PrivateKey
) -> None:
    key_file = write_public(cloud_key, tmp_path / "cloud.pub.pem")
    target = Target()
    rec = Recorder(mosquitto.port)
    codes: dict[str, str] = {}
    expected: dict[str, str] = {}
    async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
        uplink = signed_uplink(mosquitto, store, target, key_file)
        with capture_logs() as logs:
            async with running(rec.run()), running(uplink.run()):
                await online(rec, uplink)
                for rid, (payload, code) in forged_starts(cloud_key).items():
                    got = await answer(rec, "commands/start", payload, rid)
                    assert got["ok"] is False, (rid, got)
                    codes[rid], expected[rid] = got["error"]["code"], code
                assert target.calls == []
                good = signed(cloud_key, "commands/start", {"request_id": "good", **START})
                ok = await answer(rec, "commands/start", good, "good")
    assert codes == expected
    assert ok == {
        "request_id": "good",
        "ok": True,
        "result": {"charger_id": "cp1", "accepted": True},
    }
    assert target.calls == [("start", ("cp1", "carol", None))]
    assert rec.problems == []
    assert any(e["event"] == "commands_authenticated" for e in logs)
    assert not any(e["event"] == "commands_unauthenticated" for e in logs)


async def test_without_a_command_key_an_unsigned_start_applies_and_a_warning_says_so(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    target = Target()
    rec = Recorder(mosquitto.port)
    async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
        uplink = make_uplink(uplink_config(mosquitto.url), store, target)
        with capture_logs() as logs:
            async with running(rec.run()), running(uplink.run()):
                await online(rec, uplink)
                cmd = json.dumps({"request_id": "u1", **START}).encode()
                first = await answer(rec, "commands/start", cmd, "u1")
                again = await answer(rec, "commands/start", cmd, "u1")
    assert first["ok"] is True and again == first  # as before: the first answer, applied once
    assert target.calls == [("start", ("cp1", "carol", None))]
    warning = [e for e in logs if e["event"] == "commands_unauthenticated"]
    assert len(warning) == 1 and warning[0]["log_level"] == "warning"
    assert "uplink.command_key" in warning[0]["hint"]


async def test_replayed_signed_command_is_refused_also_after_a_gateway_restart(
    mosquitto: MosquittoBroker, tmp_path: Path, cloud_key: Ed25519PrivateKey
) -> None:
    key_file = write_public(cloud_key, tmp_path / "cloud.pub.pem")
    target = Target()
    rec = Recorder(mosquitto.port)
    start = signed(cloud_key, "commands/start", {"request_id": "r1", **START})
    # refused by the charger (unknown), then replayed: must not run later either
    busy = signed(cloud_key, "commands/start", {"request_id": "r2", **START, "charger_id": "cp9"})
    async with running(rec.run()):
        async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
            uplink = signed_uplink(mosquitto, store, target, key_file)
            async with running(uplink.run()):
                await online(rec, uplink)
                assert (await answer(rec, "commands/start", start, "r1"))["ok"] is True
                again = await answer(rec, "commands/start", start, "r1")
                refused = await answer(rec, "commands/start", busy, "r2")
                replayed = await answer(rec, "commands/start", busy, "r2")
        assert again["ok"] is False and again["error"]["code"] == "replayed"
        assert "first one was applied" in again["error"]["message"]
        assert refused["error"]["code"] == "unknown_charger"
        assert replayed["error"]["code"] == "replayed"
        assert "first one was refused (unknown_charger)" in replayed["error"]["message"]
        # the gateway restarts: a new process would open the same buffer
        async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
            uplink = signed_uplink(mosquitto, store, target, key_file)
            async with running(uplink.run()):
                await online(rec, uplink)
                after = await answer(rec, "commands/start", start, "r1")
                fresh = signed(cloud_key, "commands/start", {"request_id": "r3", **START})
                assert (await answer(rec, "commands/start", fresh, "r3"))["ok"] is True
    assert after["ok"] is False and after["error"]["code"] == "replayed"
    assert target.calls == [("start", ("cp1", "carol", None))] * 2  # r1 and r3, once each
    assert rec.problems == []


@pytest.mark.parametrize(("protocol", "with_key"), [("5", True), ("3.1.1", False)])
async def test_retained_commands_are_ignored(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    cloud_key: Ed25519PrivateKey,
    protocol: str,
    with_key: bool,
) -> None:
    key_file = write_public(cloud_key, tmp_path / "cloud.pub.pem")
    target = Target()
    rec = Recorder(mosquitto.port)

    def command(rid: str) -> bytes:
        body = {"request_id": rid, **START}
        if with_key:
            return signed(cloud_key, "commands/start", body)
        return json.dumps(body).encode()

    async with running(rec.run()):
        await rec.connected.wait()
        assert rec.client is not None
        # left on the broker before the gateway connects: delivered with the retain flag
        await rec.client.publish(f"{ROOT}/commands/start", command("kept"), qos=1, retain=True)
        async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
            cfg = uplink_config(mosquitto.url, protocol=protocol)
            if with_key:
                cfg = uplink_config(
                    mosquitto.url, protocol=protocol, command_key=key_file, command_max_age_s=60.0
                )
            uplink = make_uplink(cfg, store, target)
            with capture_logs() as logs:
                async with running(uplink.run()):
                    await online(rec, uplink)
                    # a live command after it is answered: the retained one was seen first
                    live = await answer(rec, "commands/start", command("live"), "live")
    assert live["ok"] is True
    assert reply(rec, "commands/start", "kept") is None
    assert target.calls == [("start", ("cp1", "carol", None))]
    assert [e["topic"] for e in logs if e["event"] == "command_retained_ignored"] == [
        f"{ROOT}/commands/start"
    ]


async def auth_setup(store: Store, uplink: MqttUplink, target: AuthTarget) -> Authorizer:
    authorizer = Authorizer(
        AuthConfig(offline_policy="deny", request_timeout_s=20.0), store, uplink, SystemClock()
    )
    await authorizer.load()
    target.authorizer = authorizer
    return authorizer


async def pending_request(rec: Recorder, n: int) -> str:
    await wait_until(lambda: len(rec.on("auth/request")) >= n, 10, "auth request")
    return str(rec.on("auth/request")[n - 1].json()["request_id"])


@pytest.mark.parametrize("with_key", [True, False])
async def test_auth_response_only_for_an_issued_request_and_only_once(
    mosquitto: MosquittoBroker, tmp_path: Path, cloud_key: Ed25519PrivateKey, with_key: bool
) -> None:
    key_file = write_public(cloud_key, tmp_path / "cloud.pub.pem")
    target = AuthTarget()
    rec = Recorder(mosquitto.port)

    def response(rid: str, status: str, user: str | None) -> bytes:
        body = {"request_id": rid, "status": status, "user": user, "expires_at": None}
        if with_key:
            return signed(cloud_key, "auth/response", body)
        return json.dumps(body).encode()

    async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
        uplink = (
            signed_uplink(mosquitto, store, target, key_file)
            if with_key
            else make_uplink(uplink_config(mosquitto.url), store, target)
        )
        authorizer = await auth_setup(store, uplink, target)
        async with running(rec.run()), running(uplink.run()):
            await online(rec, uplink)
            # an answer nobody asked for: refused, and it teaches the gateway nothing
            never = await answer(
                rec,
                "auth/response",
                response("never-issued", "accepted", "mallory"),
                "never-issued",
            )
            decision = asyncio.create_task(authorizer.authorize("04AABBCCDD", "rfid", "cp1"))
            rid = await pending_request(rec, 1)
            if with_key:  # unsigned, and signed by another key: refused, the request still waits
                forged = json.dumps(
                    {"request_id": rid, "status": "accepted", "user": "mallory", "expires_at": None}
                ).encode()
                assert (await answer(rec, "auth/response", forged, rid))["error"]["code"] == (
                    "unsigned"
                )
                other = json.dumps(
                    sign_message(
                        f"{ROOT}/auth/response",
                        {"request_id": rid, "status": "accepted", "user": "mallory"},
                        Ed25519PrivateKey.generate(),
                    )
                ).encode()
                assert (await answer(rec, "auth/response", other, rid))["error"]["code"] == (
                    "bad_signature"
                )
                assert not decision.done()
            first = await answer(rec, "auth/response", response(rid, "accepted", "dave"), rid)
            result = await asyncio.wait_for(decision, 10)
            second = await answer(rec, "auth/response", response(rid, "blocked", None), rid)
    assert never["ok"] is False and never["error"]["code"] == "unmatched"
    assert first == {"request_id": rid, "ok": True, "result": {"status": "accepted"}}
    assert (result.status, result.user) == (AuthStatus.ACCEPTED, "dave")
    assert second["ok"] is False
    assert second["error"]["code"] == ("replayed" if with_key else "unmatched")
    # the cached answer is the first one; the forged user never got in
    entry = authorizer.known("04AABBCCDD")
    assert entry is not None and entry[0].user == "dave"
    assert entry[0].status is AuthStatus.ACCEPTED
    assert authorizer.known("never-issued") is None
    assert [a[0] for a in target.auth] == [rid]
    assert rec.problems == []


async def test_replay_refused_after_the_gateway_process_is_killed_and_restarted(
    mosquitto: MosquittoBroker, tmp_path: Path, cloud_key: Ed25519PrivateKey
) -> None:
    """`evgw run` as a process with uplink.command_key; SIGKILL, start again, replay."""
    import os
    import signal
    import subprocess
    import sys

    from tests.support.mqtt_broker import free_port

    write_public(cloud_key, tmp_path / "cloud.pub.pem")
    (tmp_path / "site.yaml").write_text(
        f"site: {{id: {SITE}, timezone: UTC}}\n"
        "storage: {path: ./buffer.db}\n"
        f'uplink: {{url: "mqtt://127.0.0.1:{mosquitto.port}", client_id: evgw-replay, '
        "keepalive: 5s, command_key: cloud.pub.pem, command_max_age: 2m}\n"
        "devices:\n"
        f"  - {{id: cp1, driver: keba-p30, host: 127.0.0.1, port: {free_port()}, unit: 255}}\n"
    )
    log = tmp_path / "gateway.log"

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "--log-json", "run", "-c", "site.yaml"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def onlines() -> int:
        return sum(1 for m in rec.on("gateway/status") if m.json()["state"] == "online")

    rec = Recorder(mosquitto.port)
    start = signed(cloud_key, "commands/start", {"request_id": "p1", **START})
    gateway = spawn()
    try:
        async with running(rec.run()):
            await rec.connected.wait()
            await wait_until(lambda: onlines() >= 1, 30, "gateway online")
            await asyncio.sleep(0.5)
            first = await answer(rec, "commands/start", start, "p1")
            gateway.send_signal(signal.SIGKILL)
            await asyncio.to_thread(gateway.wait, 10)
            gateway = spawn()
            await wait_until(lambda: onlines() >= 2, 30, "gateway online again")
            await asyncio.sleep(0.5)
            again = await answer(rec, "commands/start", start, "p1")
            fresh = signed(cloud_key, "commands/start", {"request_id": "p2", **START})
            other = await answer(rec, "commands/start", fresh, "p2")
    finally:
        gateway.send_signal(signal.SIGTERM)
        await asyncio.to_thread(gateway.wait, 10)
    outcome = "applied" if first["ok"] else f"refused ({first['error']['code']})"
    assert again["ok"] is False and again["error"]["code"] == "replayed", again
    assert f"the first one was {outcome}" in again["error"]["message"]
    assert other.get("error", {}).get("code") != "replayed"
    lines = log.read_text().splitlines()
    events = [json.loads(line).get("event") for line in lines if line.startswith("{")]
    assert events.count("commands_authenticated") == 2
