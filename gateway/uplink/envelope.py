"""Signed cloud messages: commands and auth responses carrying ``issued_at`` and ``signature``.

The envelope (README, "Signed commands"; docs/security.md):

- ``issued_at``: RFC 3339 UTC time the cloud made the message (``2026-12-02T11:20:00.000Z``).
- ``signature``: ``{"alg": "ed25519", "key_id": <16 hex>, "value": <base64>}``, the same shape as a
  session record's signature. ``key_id`` is the first 16 hex digits of SHA-256 of the raw public
  key (``gateway.billing.signing.key_id``).
- The signed bytes are ``b"evgw.command/1\\n" + topic + b"\\n" + canonical JSON`` of the payload
  without ``signature`` (sorted keys, no white space, UTF-8, as ``gateway.records``). The topic
  (``P/S/commands/start``, ``P/S/auth/response``) is signed too, so a message signed for one site
  or one command cannot be replayed on another.

``sign_message`` is what a cloud calls (``evgw sign-command`` wraps it); ``CommandVerifier`` is
what the gateway runs before anything else looks at a message.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.billing.signing import key_id
from gateway.errors import CommandError, GatewayError
from gateway.model import Clock, from_rfc3339, rfc3339
from gateway.records import canonical_json

__all__ = [
    "FUTURE_SKEW_S",
    "SIGNATURE_CONTEXT",
    "CommandVerifier",
    "load_command_key",
    "load_signing_key",
    "schema_for_topic",
    "sign_message",
    "signed_bytes",
]

SIGNATURE_CONTEXT = b"evgw.command/1"
FUTURE_SKEW_S = 30.0
"""How far ``issued_at`` may lie ahead of the gateway's clock (the cloud's clock runs a little
fast) before the message is refused as coming from the future."""


def signed_bytes(topic: str, payload: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: context, topic and the payload without ``signature``."""
    body = {k: v for k, v in payload.items() if k != "signature"}
    return SIGNATURE_CONTEXT + b"\n" + topic.encode("utf-8") + b"\n" + canonical_json(body)


def sign_message(
    topic: str,
    payload: Mapping[str, Any],
    private_key: Ed25519PrivateKey,
    *,
    issued_at: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """``payload`` with ``issued_at`` (the argument if given, else the payload's own, else
    ``now`` or the current time) and a ``signature`` for ``topic``. Raises ValueError when the
    payload cannot be signed (NaN)."""
    out = {k: v for k, v in payload.items() if k != "signature"}
    if issued_at is not None:
        out["issued_at"] = rfc3339(issued_at)
    elif "issued_at" not in out:
        out["issued_at"] = rfc3339(time.time() if now is None else now)
    value = private_key.sign(signed_bytes(topic, out))
    out["signature"] = {
        "alg": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "value": base64.b64encode(value).decode("ascii"),
    }
    return out


class CommandVerifier:
    """Checks a decoded, schema-valid message: signed by the cloud's key, for this topic, issued
    at most ``max_age_s`` ago and at most ``FUTURE_SKEW_S`` ahead. Raises CommandError with
    code ``unsigned``, ``bad_signature`` or ``stale``; returns ``issued_at`` as Unix seconds."""

    __slots__ = ("_clock", "_public", "key_id", "max_age_s")

    def __init__(self, public_key: Ed25519PublicKey, max_age_s: float, clock: Clock) -> None:
        self._public = public_key
        self.key_id = key_id(public_key)
        self.max_age_s = max_age_s
        self._clock = clock

    def check(self, topic: str, data: Mapping[str, Any]) -> float:
        signature = data.get("signature")
        issued_text = data.get("issued_at")
        if signature is None:
            raise CommandError(
                "unsigned", "this gateway accepts only signed messages (signature is missing)"
            )
        if not isinstance(issued_text, str):
            raise CommandError("unsigned", "a signed message needs issued_at")
        if not isinstance(signature, Mapping) or signature.get("alg") != "ed25519":
            raise CommandError("bad_signature", "signature.alg must be ed25519")
        sig_key = signature.get("key_id")
        if sig_key is not None and sig_key != self.key_id:
            raise CommandError(
                "bad_signature",
                f"signed with key {sig_key!s:.32}, this gateway trusts key {self.key_id}",
            )
        try:
            raw = base64.b64decode(str(signature.get("value", "")), validate=True)
            self._public.verify(raw, signed_bytes(topic, data))
        except (InvalidSignature, binascii.Error, ValueError):
            raise CommandError(
                "bad_signature", "the signature does not match this message and topic"
            ) from None
        try:
            issued_at = from_rfc3339(issued_text)
        except ValueError:
            raise CommandError("invalid", f"issued_at {issued_text!r:.40} is no time") from None
        now = self._clock.time()
        age = now - issued_at
        if age > self.max_age_s:
            raise CommandError(
                "stale",
                f"issued_at {issued_text} is {age:.0f} s old, more than the {self.max_age_s:g} s "
                f"allowed (gateway clock {rfc3339(now)})",
            )
        if -age > FUTURE_SKEW_S:
            raise CommandError(
                "stale",
                f"issued_at {issued_text} is {-age:.0f} s in the future "
                f"(gateway clock {rfc3339(now)}): check both clocks",
            )
        return issued_at


def load_command_key(path: str) -> Ed25519PublicKey:
    """The cloud's public key from a PEM file (``uplink.command_key``). Raises GatewayError with
    a message for a person: unreadable, not PEM, a private key, not Ed25519."""
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GatewayError(f"cannot read {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise GatewayError(
            f"{path} holds a private key: give the gateway only the cloud's public key "
            "(openssl pkey -in cloud.pem -pubout)"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise GatewayError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise GatewayError(f"{path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    return key


def load_signing_key(path: str | Path, *, create: bool = False) -> Ed25519PrivateKey:
    """The cloud's Ed25519 private key (PEM, PKCS#8 as ``openssl genpkey -algorithm ed25519``
    writes it). With ``create`` a missing file is made (mode 0600) together with its public key
    next to it (``<path>.pub.pem``), the file a gateway's ``uplink.command_key`` names."""
    from cryptography.hazmat.primitives import serialization

    from gateway.billing.signing import Signer

    path = Path(path)
    if create and not path.exists():
        signer = Signer.load_or_create(path)
        path.with_name(path.name + ".pub.pem").write_text(signer.public_pem(), encoding="ascii")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GatewayError(f"cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise GatewayError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise GatewayError(f"{path} is not an Ed25519 key")
    return key


def schema_for_topic(topic: str) -> str | None:
    """The payload schema of a message the cloud sends on ``topic`` (None: not one)."""
    from gateway.uplink.topics import COMMAND_NAMES

    parts = topic.split("/")
    if len(parts) >= 4 and parts[-2:] == ["auth", "response"]:
        return "auth-response"
    if len(parts) >= 4 and parts[-2] == "commands" and parts[-1] in COMMAND_NAMES:
        return f"command-{parts[-1]}"
    return None
