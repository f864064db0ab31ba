"""Checking OCMF (Open Charge Metering Format) signed meter values against the meter's key.

An OCMF document is ``OCMF|{payload JSON}|{signature JSON}``. The signature section names the
algorithm (``SA``, default ``ECDSA-secp256r1-SHA256``), the encoding of ``SD`` (``SE``: hex,
the default, or base64) and carries the DER-encoded ECDSA signature (``SD``) over the payload
section's bytes exactly as they appear between the separators. The meter's public key is
published (e.g. on its type plate or in the charger's documentation) as hex of its DER
SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

__all__ = ["load_meter_key", "verify_document", "verify_records"]

DEFAULT_ALGORITHM = "ECDSA-secp256r1-SHA256"
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp256k1": ec.SECP256K1,
    "secp192r1": ec.SECP192R1,
    "brainpool256r1": ec.BrainpoolP256R1,
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"SHA256": hashes.SHA256, "SHA512": hashes.SHA512}


def load_meter_key(text: str) -> ec.EllipticCurvePublicKey:
    """A meter's public key from hex DER; ValueError with a reason when it is not one."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("not hexadecimal") from None
    try:
        key = load_der_public_key(raw)
    except (ValueError, TypeError):
        raise ValueError("not a DER public key (SubjectPublicKeyInfo)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic curve key (OCMF signs with ECDSA)")
    return key


def verify_document(document: str, key: ec.EllipticCurvePublicKey) -> str | None:
    """None when ``document`` is an OCMF document signed by ``key``; else the reason."""
    if not document.startswith("OCMF|"):
        return "not an OCMF document"
    body = document[len("OCMF|") :]
    payload, sep, signature_text = body.rpartition("|")
    if not sep:
        return "no signature section"
    try:
        signature = json.loads(signature_text)
    except ValueError:
        return "signature section is not JSON"
    if not isinstance(signature, dict) or not isinstance(signature.get("SD"), str):
        return "signature section without SD"
    algorithm = str(signature.get("SA") or DEFAULT_ALGORITHM)
    parts = algorithm.split("-")
    if len(parts) != 3 or parts[0] != "ECDSA" or parts[1] not in _CURVES or parts[2] not in _HASHES:
        return f"unsupported signature algorithm {algorithm[:40]!r}"
    if key.curve.name != _CURVES[parts[1]].name:
        return f"the meter key is on {key.curve.name}, the document says {parts[1]}"
    try:
        if signature.get("SE", "hex") == "base64":
            sd = base64.b64decode(signature["SD"], validate=True)
        else:
            sd = bytes.fromhex(signature["SD"])
    except (ValueError, binascii.Error):
        return "signature data is not valid hex/base64"
    try:
        key.verify(sd, payload.encode("utf-8"), ec.ECDSA(_HASHES[parts[2]]()))
    except InvalidSignature:
        return "signature does not match the meter's key"
    except ValueError:
        return "signature data is not a DER ECDSA signature"
    return None


def verify_records(
    records: Iterable[Mapping[str, Any]], keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> tuple[list[str], int]:
    """Check the signed meter values of every record whose charger has a configured key.
    Returns (problems, documents verified)."""
    problems: list[str] = []
    checked = 0
    for rec in records:
        key = keys.get(str(rec.get("charger_id")))
        docs = (rec.get("ocpp") or {}).get("signed_meter_values") or {}
        if key is None:
            continue
        if not docs:
            problems.append(
                f"seq {rec.get('seq')} (session {rec.get('session_id')}): "
                "no signed meter values, though the meter has a key"
            )
            continue
        for where in ("start", "stop"):
            if where not in docs:
                continue
            reason = verify_document(str(docs[where]), key)
            if reason is not None:
                problems.append(
                    f"seq {rec.get('seq')} (session {rec.get('session_id')}): signed {where} "
                    f"meter value: {reason}"
                )
            else:
                checked += 1
    return problems, checked
