"""The consumer's trust directory: which keys may sign a site's records from the start.

``--trust DIR`` names the trusted keys up front: ``DIR/<site_id>.pem`` holds one or more PEM
public keys (or lines of 64 hex characters) of that site. Later keys arrive with a rotation
statement (``gateway.billing.signing.check_rotation``) or by an operator's command on the
consumer's store (``evgw trust add|revoke``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.billing.signing import key_id, load_public_key
from gateway.errors import GatewayError, UsageError

__all__ = ["TrustDirError", "TrustedKey", "load_trust_dir", "public_pem"]

_SITE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PEM_BLOCK = re.compile(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", re.S)
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$", re.M)


class TrustDirError(UsageError):
    """The trust directory cannot be used as it is: a usage error."""


@dataclass(frozen=True, slots=True)
class TrustedKey:
    site_id: str
    key_id: str
    public_key_pem: str


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


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
