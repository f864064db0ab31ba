"""The gateway's Ed25519 signing key: made at first start, kept with 0600 permissions.

A record's ``signature`` is ``{"alg": "ed25519", "key_id": <first 16 hex of SHA-256 of the raw
public key>, "value": <base64 signature over the ASCII hex of the record's hash>}``. The public key
is published retained on ``P/S/gateway/key`` so consumers and ``evgw verify`` can check records.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import GatewayError

__all__ = ["Signer", "key_id", "load_public_key", "verify_signature"]


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    __slots__ = ("_private", "key_id", "path")

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private
        self.path = path
        self.key_id = key_id(private.public_key())

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Load the PEM key at ``path``; create it (mode 0600, atomically) when absent."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
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
        """Payload of the retained ``P/S/gateway/key`` message."""
        return {"alg": "ed25519", "key_id": self.key_id, "public_key_pem": self.public_pem()}


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
