"""The signed-command envelope: the documented bytes, the verifier's refusals, the cloud's
signing tool (``evgw sign-command``) feeding a handler that requires signatures."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import CommandError, GatewayError
from gateway.model import from_rfc3339
from gateway.uplink.commands import CommandHandler
from gateway.uplink.envelope import (
    CommandVerifier,
    load_command_key,
    load_signing_key,
    sign_message,
)
from gateway.uplink.schemas import validate
from gateway.uplink.topics import COMMAND_NAMES, Topics
from tests.support.uplink import Target

TOPICS = Topics("evgw", "depot-7")
NOW = 1_796_000_000.0


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


def test_signature_covers_the_documented_bytes() -> None:
    """README: Ed25519 over b"evgw.command/1" LF topic LF canonical JSON without signature."""
    key = Ed25519PrivateKey.generate()
    topic = TOPICS.command("start")
    body = {"user": "zoë", "request_id": "r1", "charger_id": "cp1"}
    out = sign_message(topic, body, key, now=NOW)
    assert out["issued_at"] == "2026-11-30T00:53:20.000Z"
    assert validate("command-start", out) == []
    unsigned = {k: v for k, v in out.items() if k != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    message = b"evgw.command/1\n" + topic.encode() + b"\n" + canonical.encode("utf-8")
    key.public_key().verify(base64.b64decode(out["signature"]["value"]), message)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert out["signature"]["key_id"] == hashlib.sha256(raw).hexdigest()[:16]
    assert out["signature"]["alg"] == "ed25519"


@pytest.mark.parametrize(
    ("issued_at", "ok"),
    [(NOW, True), (NOW - 60, True), (NOW - 60.5, False), (NOW + 30, True), (NOW + 31, False)],
)
def test_age_bounds(issued_at: float, ok: bool) -> None:
    key = Ed25519PrivateKey.generate()
    verifier = CommandVerifier(key.public_key(), 60.0, Clock())
    topic = TOPICS.command("stop")
    msg = sign_message(topic, {"request_id": "r", "charger_id": "cp1"}, key, issued_at=issued_at)
    if ok:
        assert verifier.check(topic, msg) == from_rfc3339(msg["issued_at"])
    else:
        with pytest.raises(CommandError) as err:
            verifier.check(topic, msg)
        assert err.value.code == "stale"
        assert "gateway clock 2026-11-30T00:53:20.000Z" in err.value.message


def _write_keys(tmp_path: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private = tmp_path / "cloud.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "cloud.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def _evgw(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
async def test_sign_command_tool_output_is_accepted_once(tmp_path: Path) -> None:
    private, public = _write_keys(tmp_path)
    topic = TOPICS.command("start")
    done = _evgw(
        "sign-command",
        "--key",
        str(private),
        "--topic",
        topic,
        "-",
        stdin='{"request_id": "cli-1", "charger_id": "cp1", "user": "carol"}',
    )
    assert done.returncode == 0, done.stderr
    payload = done.stdout.strip().encode()
    target = Target()
    # the tool signs with the real time
    verifier = CommandVerifier(load_command_key(str(public)), 300.0, Clock(time.time()))
    handler = CommandHandler(TOPICS, target, verifier=verifier)
    first = await handler.handle(topic, payload)
    second = await handler.handle(topic, payload)
    assert first is not None and first.payload["ok"] is True
    assert second is not None and second.payload["error"]["code"] == "replayed"
    assert target.calls == [("start", ("cp1", "carol", None))]
    # signed for start, published on stop: refused
    stop = await handler.handle(TOPICS.command("stop"), payload)
    assert stop is not None and stop.payload["ok"] is False


@pytest.mark.e2e
def test_sign_command_tool_new_key_and_errors(tmp_path: Path) -> None:
    key = tmp_path / "new" / "cloud.pem"
    topic = TOPICS.auth_response
    body = '{"request_id": "a1", "status": "accepted", "user": "dave"}'
    done = _evgw(
        "sign-command", "--key", str(key), "--new-key", "--topic", topic,
        "--issued-at", "2026-12-02T10:00:00Z", body,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (key.stat().st_mode & 0o777) == 0o600
    public = load_command_key(str(key.with_name("cloud.pem.pub.pem")))
    out = json.loads(done.stdout)
    assert out["issued_at"] == "2026-12-02T10:00:00.000Z"
    verifier = CommandVerifier(public, 60.0, Clock(from_rfc3339(out["issued_at"]) + 1))
    verifier.check(topic, out)
    private, _ = _write_keys(tmp_path)
    for args, message in [
        (("--topic", "evgw/depot-7/gateway/status", "{}"), "is no command topic"),
        (("--topic", topic, "[1]"), "must be a JSON object"),
        (("--topic", topic, "{x"), "not JSON"),
        (("--topic", topic, '{"request_id": "a"}'), "not a valid auth-response"),
        (("--topic", topic, "--issued-at", "2026-12-02T10:00:00", body), "no RFC 3339 time"),
    ]:
        done = _evgw("sign-command", "--key", str(private), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
    done = _evgw("sign-command", "--key", str(tmp_path / "none.pem"), "--topic", topic, body)
    assert done.returncode != 0 and "cannot read" in done.stderr


def test_key_loaders_say_what_is_wrong(tmp_path: Path) -> None:
    private, public = _write_keys(tmp_path)
    with pytest.raises(GatewayError, match="holds a private key"):
        load_command_key(str(private))
    with pytest.raises(GatewayError, match="not an unencrypted PEM private key"):
        load_signing_key(public)
    assert load_signing_key(private).public_key() is not None


MINIMAL_COMMANDS = {
    "start": {"request_id": "r1", "charger_id": "cp1", "user": "carol"},
    "stop": {"request_id": "r1", "charger_id": "cp1"},
    "tokens": {"request_id": "r1", "version": 1, "mode": "replace", "tokens": []},
    "tariffs": {"request_id": "r1", "version": 1, "tariffs": {}},
    "limit": {"request_id": "r1", "scope": "site", "clear": True},
    "availability": {"request_id": "r1", "charger_id": "cp9", "available": False},
    "reset": {"request_id": "r1", "charger_id": "cp9", "type": "soft"},
}


@pytest.mark.parametrize("name", sorted(COMMAND_NAMES))
def test_every_command_schema_takes_the_signed_envelope(name: str) -> None:
    """A command added later (limit, availability, reset) must accept issued_at and signature,
    or a site with uplink.command_key could never be sent it."""
    payload = MINIMAL_COMMANDS[name]
    assert validate(f"command-{name}", payload) == []
    topic = Topics("evgw", "site-1").command(name)
    signed = sign_message(topic, payload, Ed25519PrivateKey.generate())
    assert validate(f"command-{name}", signed) == []
