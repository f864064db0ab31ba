"""Who may sign a site's records: key rotation statements and the consumer's trust directory.

A site's key is replaced in one of two ways only:

- a **rotation statement** (``evgw.key-rotation/1``) inside the new ``P/S/gateway/key`` message,
  signed by the key it replaces: ``{"schema", "site_id", "key_id", "public_key",
  "previous_key_id", "issued_at", "signature": {"alg", "key_id", "value"}}``, where
  ``public_key`` is the new key's 32 raw bytes as hex and the signature is Ed25519 by the
  previous key over the canonical JSON of the statement without ``signature``
  (``evgw rotate-key`` writes one);
- an operator's command on the consumer's store (``evgw trust add|revoke``).

``--trust DIR`` names the trusted keys up front: ``DIR/<site_id>.pem`` holds one or more PEM
public keys (or lines of 64 hex characters) of that site.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.billing.signing import key_id, load_public_key
from gateway.errors import GatewayError
from gateway.model import rfc3339
from gateway.records import canonical_json

__all__ = [
    "ROTATION_SCHEMA",
    "TrustDirError",
    "TrustedKey",
    "check_rotation",
    "load_trust_dir",
    "public_pem",
    "raw_hex",
    "sign_rotation",
]

ROTATION_SCHEMA = "evgw.key-rotation/1"
_SITE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.S)
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$", re.M)


class TrustDirError(GatewayError):
    """The trust directory cannot be used as it is: a usage error."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class TrustedKey:
    site_id: str
    key_id: str
    public_key_pem: str


def raw_hex(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


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


def load_trust_dir(directory: Path) -> dict[str, list[TrustedKey]]:
    """{site_id: its keys} from ``DIR/<site_id>.pem`` files; every problem is a TrustDirError."""
    if not directory.is_dir():
        raise TrustDirError(f"--trust {directory}: not a directory")
    result: dict[str, list[TrustedKey]] = {}
    for path in sorted(directory.glob("*.pem")):
        site = path.stem
        if not _SITE_ID.fullmatch(site):
            raise TrustDirError(f"{path}: the file name must be <site id>.pem")
        try:
            text = path.read_text("ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustDirError(f"{path}: cannot read: {exc}") from None
        keys: list[TrustedKey] = []
        for block in [*_PEM_BLOCK.findall(text), *_HEX_KEY.findall(text)]:
            try:
                public = load_public_key(block)
            except (GatewayError, ValueError) as exc:
                raise TrustDirError(f"{path}: not an Ed25519 public key: {exc}") from None
            keys.append(TrustedKey(site, key_id(public), public_pem(public)))
        if not keys:
            raise TrustDirError(f"{path}: no public key in it (PEM or 64 hex characters)")
        result[site] = keys
    if not result:
        raise TrustDirError(f"--trust {directory}: no <site id>.pem files in it")
    return result
