"""The gateway's Ed25519 signing key: made at first start, kept with 0600 permissions.

A record's ``signature`` is ``{"alg": "ed25519", "key_id": <first 16 hex of SHA-256 of the raw
public key>, "value": <base64 signature over the ASCII hex of the record's hash>}``. The public key
is published retained on ``P/S/gateway/key`` so consumers and ``evgw verify`` can check records.

``evgw rotate-key`` replaces the key: the new key goes to the same file, and
``evgw-signing.history.json`` next to it keeps the public halves of the keys it replaced (the
buffer's older records stay verifiable) and the rotation statement, signed by the previous key,
that the gateway publishes with its new key.

A **rotation statement** (``evgw.key-rotation/1``) travels inside the new ``P/S/gateway/key``
message, signed by the key it replaces: ``{"schema", "site_id", "key_id", "public_key",
"previous_key_id", "issued_at", "signature": {"alg", "key_id", "value"}}``, where ``public_key``
is the new key's 32 raw bytes as hex and the signature is Ed25519 by the previous key over the
canonical JSON of the statement without ``signature``. The gateway writes it
(``sign_rotation``), the consumer checks it (``check_rotation``); both halves live here so the
format has one owner.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import GatewayError
from gateway.model import rfc3339
from gateway.records import canonical_json

__all__ = [
    "ROTATION_SCHEMA",
    "Signer",
    "check_rotation",
    "history_path",
    "key_id",
    "load_public_key",
    "raw_hex",
    "rotate_key",
    "sign_rotation",
    "verify_signature",
]

ROTATION_SCHEMA = "evgw.key-rotation/1"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def history_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.stem + ".history.json")


def _read_history(key_path: Path) -> dict[str, Any]:
    try:
        data = json.loads(history_path(key_path).read_text("utf-8"))
    except FileNotFoundError:
        return {"previous_keys": [], "rotation": None}
    except (OSError, ValueError) as exc:
        raise GatewayError(f"cannot read {history_path(key_path)}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("previous_keys"), list):
        raise GatewayError(f"{history_path(key_path)}: not a key history")
    return data


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _private_pem(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Signer:
    __slots__ = ("_private", "key_id", "path", "previous_keys", "rotation")

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private
        self.path = path
        self.key_id = key_id(private.public_key())
        # the public halves of the keys this one replaced, and the statement that handed over
        self.previous_keys: list[dict[str, str]] = []
        self.rotation: dict[str, Any] | None = None
        if path is not None:
            history = _read_history(path)
            self.previous_keys = list(history["previous_keys"])
            rotation = history.get("rotation")
            if isinstance(rotation, dict) and rotation.get("key_id") == self.key_id:
                self.rotation = rotation

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Load the PEM key at ``path``; create it (mode 0600, atomically) when absent."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            private = Ed25519PrivateKey.generate()
            _write_atomic(path, _private_pem(private), 0o600)
            return cls(private, path)
        except OSError as exc:
            raise GatewayError(f"cannot read signing key {path}: {exc.strerror}") from None
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            raise GatewayError(f"signing key {path} is not a PEM private key") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise GatewayError(f"signing key {path} is not an Ed25519 key")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return cls(loaded, path)

    def sign(self, message: bytes) -> dict[str, str]:
        return {
            "alg": "ed25519",
            "key_id": self.key_id,
            "value": base64.b64encode(self._private.sign(message)).decode("ascii"),
        }

    def public_pem(self) -> str:
        return (
            self._private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def public_key_payload(self) -> dict[str, Any]:
        """Payload of the retained ``P/S/gateway/key`` message (with the rotation statement
        when this key replaced another)."""
        payload: dict[str, Any] = {
            "alg": "ed25519",
            "key_id": self.key_id,
            "public_key_pem": self.public_pem(),
        }
        if self.rotation is not None:
            payload["rotation"] = self.rotation
        return payload

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """{key_id: public key} of this key and every key it replaced."""
        keys = {self.key_id: self._private.public_key()}
        for old in self.previous_keys:
            try:
                keys[str(old["key_id"])] = load_public_key(str(old["public_key_pem"]))
            except (GatewayError, ValueError, KeyError):
                continue
        return keys


def rotate_key(path: Path, site_id: str, now: float | None = None) -> tuple[str, Signer]:
    """Replace the signing key at ``path`` with a new one; (the old key id, the new signer).

    The history (the old public key, the rotation statement signed by the old key) is written
    before the key itself, so a crash in between leaves the old key in place with a statement
    that names a key nobody has: harmless, and the next rotation overwrites it."""
    if not path.exists():
        raise GatewayError(f"{path}: no signing key to rotate (the gateway makes one at start)")
    old = Signer.load_or_create(path)
    new = Ed25519PrivateKey.generate()
    statement = sign_rotation(
        site_id, new.public_key(), old._private, time.time() if now is None else now
    )
    history = _read_history(path)
    history["previous_keys"] = [
        *history["previous_keys"],
        {"key_id": old.key_id, "public_key_pem": old.public_pem()},
    ]
    history["rotation"] = statement
    _write_atomic(history_path(path), json.dumps(history, indent=2).encode() + b"\n", 0o644)
    _write_atomic(path, _private_pem(new), 0o600)
    return old.key_id, Signer(new, path)


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key from PEM, or from 64 hex characters of the raw key."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise GatewayError("public key is not an Ed25519 key")
        return key
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except ValueError:
        raise GatewayError("public key is neither PEM nor 64 hex characters") from None


def verify_signature(public: Ed25519PublicKey, record_hash: str, signature: dict[str, Any]) -> bool:
    if not isinstance(signature, dict) or signature.get("alg") != "ed25519":
        return False
    try:
        public.verify(
            base64.b64decode(signature.get("value", ""), validate=True), record_hash.encode("ascii")
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def raw_hex(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _body(statement: Mapping[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in statement.items() if k != "signature"})


def sign_rotation(
    site_id: str, new: Ed25519PublicKey, previous: Ed25519PrivateKey, issued_at: float
) -> dict[str, Any]:
    """The statement by which ``previous`` hands the site over to ``new``."""
    old_id = key_id(previous.public_key())
    statement: dict[str, Any] = {
        "schema": ROTATION_SCHEMA,
        "site_id": site_id,
        "key_id": key_id(new),
        "public_key": raw_hex(new),
        "previous_key_id": old_id,
        "issued_at": rfc3339(issued_at),
    }
    value = base64.b64encode(previous.sign(_body(statement))).decode("ascii")
    statement["signature"] = {"alg": "ed25519", "key_id": old_id, "value": value}
    return statement


def check_rotation(
    statement: Any, site_id: str, new: Ed25519PublicKey, trusted: Mapping[str, Ed25519PublicKey]
) -> tuple[str | None, str]:
    """(the previous key id, "") when ``statement`` hands ``site_id`` to ``new`` with the
    signature of one of the ``trusted`` keys; (None, why not) otherwise."""
    if not isinstance(statement, dict) or statement.get("schema") != ROTATION_SCHEMA:
        return None, f"the rotation statement is not {ROTATION_SCHEMA}"
    if statement.get("site_id") != site_id:
        return None, f"the rotation statement is for site {statement.get('site_id')!r}"
    if statement.get("public_key") != raw_hex(new) or statement.get("key_id") != key_id(new):
        return None, "the rotation statement names another key"
    previous = statement.get("previous_key_id")
    signature = statement.get("signature")
    if not isinstance(signature, dict) or signature.get("alg") != "ed25519":
        return None, "the rotation statement has no ed25519 signature"
    if signature.get("key_id") != previous:
        return None, "the rotation statement is not signed by the key it replaces"
    old = trusted.get(str(previous))
    if old is None:
        return None, f"the rotation statement is signed by {previous!r}, not a trusted key"
    try:
        old.verify(base64.b64decode(str(signature.get("value")), validate=True), _body(statement))
    except (InvalidSignature, ValueError):
        return None, f"the rotation statement's signature by {previous} does not verify"
    return str(previous), ""
