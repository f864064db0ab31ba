"""``evgw verify``: is a series of finished session records complete, unchanged and signed?

``verify_records`` is pure: it names every record whose content no longer matches its hash, every
bad or missing signature, every hole in a site's ``seq``/``prev_hash`` chain, records out of
order and duplicates. ``run_verify`` reads the records from a file (JSON lines or a JSON array),
the consumer's store or the gateway's own buffer and prints one line per problem.

On the consumer's store (``--db``) it also fails (exit 1) while anything is held in quarantine
(a conflicting duplicate included), and the chain must start at seq 1: a store that bills
must hold every record of a site. A store that does not exist is a usage error (exit 2) and is
not created.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.billing.signing import history_path, load_public_key, verify_signature
from gateway.errors import GatewayError
from gateway.records import GENESIS, canonical_json, record_hash
from gateway.safeout import printable

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["VerifyResult", "load_key_file", "read_records", "run_verify", "verify_records"]

Keys = Ed25519PublicKey | Mapping[str, Ed25519PublicKey] | None


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    problems: list[str]
    checked: int
    signatures_checked: int = 0
    sites: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ok:
            return f"{len(self.problems)} problem(s) in {self.checked} records"
        if self.checked and self.signatures_checked == self.checked:
            sig = "signatures valid"
        elif self.signatures_checked:
            sig = f"{self.signatures_checked} signatures valid, others not checked (no key)"
        else:
            sig = "signatures not checked (no public key)"
        return f"{self.checked} records OK, chain intact, {sig}"


def _label(rec: dict[str, Any]) -> str:
    return f"seq {rec.get('seq')} (session {rec.get('session_id')})"


def _seq(rec: dict[str, Any]) -> int | None:
    seq = rec.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def verify_records(
    records: list[dict[str, Any]], public_key: Keys = None, *, complete: bool = False
) -> VerifyResult:
    """Check records in the order given. ``public_key``: one key for every record, or a
    ``{key_id: key}`` map (records signed by other keys are reported), or None (signatures not
    checked). ``complete``: the records must start at seq 1 (a whole buffer, not an extract)."""
    problems: list[str] = []
    by_site: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if not isinstance(rec, dict):
            problems.append(f"not a session record: {json.dumps(rec)[:80]}")
            continue
        by_site.setdefault(str(rec.get("site_id")), []).append(rec)
    prefix_sites = len(by_site) > 1
    signed = 0
    for site, recs in by_site.items():
        site_problems, site_signed = _verify_site(recs, public_key, complete)
        signed += site_signed
        problems.extend(f"site {site}: {p}" if prefix_sites else p for p in site_problems)
    return VerifyResult(
        ok=not problems,
        problems=problems,
        checked=len(records),
        signatures_checked=signed,
        sites=sorted(by_site),
    )


def _verify_site(recs: list[dict[str, Any]], keys: Keys, complete: bool) -> tuple[list[str], int]:
    problems: list[str] = []
    signed = 0
    # 1. each record on its own: hash, signature
    for rec in recs:
        stated = rec.get("hash")
        if not isinstance(stated, str):
            problems.append(f"{_label(rec)}: has no hash")
        elif record_hash(rec) != stated:
            problems.append(f"{_label(rec)}: hash does not match its content")
        if _seq(rec) is None:
            problems.append(f"{_label(rec)}: seq is not an integer")
        if keys is None:
            continue
        sig = rec.get("signature")
        if sig is None:
            problems.append(f"{_label(rec)}: not signed")
            continue
        key = keys if isinstance(keys, Ed25519PublicKey) else None
        if key is None and isinstance(keys, Mapping):
            kid = sig.get("key_id") if isinstance(sig, dict) else None
            key = keys.get(str(kid))
            if key is None:  # a key the store never learnt: counted as not checked
                continue
        assert key is not None
        if isinstance(stated, str) and verify_signature(key, stated, sig):
            signed += 1
        else:
            problems.append(f"{_label(rec)}: signature does not verify")

    # 2. duplicates (same session_id twice) and seq reuse
    first_by_id: dict[str, dict[str, Any]] = {}
    by_seq: dict[int, dict[str, Any]] = {}
    unique: list[dict[str, Any]] = []
    for rec in recs:
        sid = str(rec.get("session_id"))
        seen = first_by_id.get(sid)
        if seen is not None:
            if canonical_json(seen) == canonical_json(rec):
                problems.append(f"{_label(rec)}: duplicate (the same record appears twice)")
            else:
                problems.append(
                    f"{_label(rec)}: session {sid} appears twice with different content"
                )
            continue
        first_by_id[sid] = rec
        seq = _seq(rec)
        if seq is None:
            continue
        other = by_seq.get(seq)
        if other is not None:
            problems.append(
                f"seq {seq} used by two records (sessions {other.get('session_id')} and {sid})"
            )
            continue
        by_seq[seq] = rec
        unique.append(rec)

    # 3. order as given: seq must increase
    last: dict[str, Any] | None = None
    for rec in unique:
        seq = _seq(rec)
        if last is not None and seq is not None and seq < (_seq(last) or 0):
            problems.append(
                f"{_label(rec)}: out of order (comes after seq {last.get('seq')}; "
                "the chain links are right in seq order)"
            )
        if last is None or (seq or 0) > (_seq(last) or 0):
            last = rec

    # 4. the chain in seq order: no holes, each prev_hash the hash of the one before
    chain = sorted(unique, key=lambda r: _seq(r) or 0)
    if chain:
        head = chain[0]
        head_seq = _seq(head) or 0
        if head_seq == 1 and head.get("prev_hash") != GENESIS:
            problems.append(f"{_label(head)}: the first record's prev_hash is not the genesis hash")
        elif complete and head_seq > 1:
            problems.append(f"missing record(s) before seq {head_seq}")
    for before, after in itertools.pairwise(chain):
        a, b = _seq(before) or 0, _seq(after) or 0
        if b > a + 1:
            problems.append(f"missing record(s) between seq {a} and seq {b}")
        elif after.get("prev_hash") != before.get("hash"):
            problems.append(
                f"{_label(after)}: prev_hash does not match the hash of seq {a} "
                "(a record was changed and re-hashed, or replaced)"
            )
    return problems, signed


# ---------------------------------------------------------------------------------- inputs


def read_records(text: str, source: str = "input") -> list[dict[str, Any]]:
    """Records from a JSON array or JSON lines (blank lines ignored)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GatewayError(f"{source}: not a JSON array: {exc}") from None
        if not all(isinstance(item, dict) for item in data):
            raise GatewayError(f"{source}: the array holds something other than records")
        return list(data)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GatewayError(f"{source}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(item, dict):
            raise GatewayError(f"{source}:{number}: not a JSON object")
        records.append(item)
    return records


def load_key_file(path: Path) -> Ed25519PublicKey:
    """A public key from a file: PEM public key, 64 hex characters, or the gateway's private key
    file (``evgw-signing.key``), whose public half is used."""
    try:
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayError(f"cannot read key {path}: {exc}") from None
    if "PRIVATE KEY" in text:
        try:
            private = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except ValueError:
            raise GatewayError(f"{path}: not a PEM private key") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise GatewayError(f"{path}: not an Ed25519 key")
        return private.public_key()
    try:
        return load_public_key(text)
    except ValueError:
        raise GatewayError(f"{path}: not a public key (PEM or 64 hex characters)") from None


_LISTED = 20  # quarantined messages named one by one; the rest are counted


async def _records_from_db(
    db_url: str, site: str | None
) -> tuple[list[dict[str, Any]], dict[str, Ed25519PublicKey], list[str]]:
    """The stored records, the keys to check them with, and the store's own problems: the
    messages held in quarantine (a conflicting duplicate among them, until dismissed)."""
    from gateway.cloud.cloudstore import open_cloud_store

    async with open_cloud_store(db_url, create=False) as store:
        stored = await store.sessions(site)
        known = await store.site_keys()
        held = await store.quarantined(site)
    problems: list[str] = []
    if held:
        problems.append(f"{len(held)} record(s) quarantined, never billed:")
        problems.extend(
            f"  quarantined ({q.kind}): site {q.site_id}: {q.reason}" for q in held[:_LISTED]
        )
        if len(held) > _LISTED:
            problems.append(f"  ... and {len(held) - _LISTED} more (`evgw trust quarantine`)")
    keys: dict[str, Ed25519PublicKey] = {}
    for (key_site, kid), pem in known.items():
        if site is None or key_site == site:
            try:
                keys[kid] = load_public_key(pem)
            except (GatewayError, ValueError):
                continue
    return [s.record for s in stored], keys, problems


def buffer_keys(key_path: Path) -> dict[str, Ed25519PublicKey] | None:
    """{key_id: key} of a gateway's signing key and of the keys it replaced; None without."""
    if not key_path.exists():
        return None
    current = load_key_file(key_path)
    from gateway.billing.signing import key_id

    keys = {key_id(current): current}
    try:
        history = json.loads(history_path(key_path).read_text("utf-8"))
    except FileNotFoundError:
        return keys
    except (OSError, ValueError) as exc:
        raise GatewayError(f"cannot read {history_path(key_path)}: {exc}") from None
    for old in history.get("previous_keys", []) if isinstance(history, dict) else []:
        try:
            keys[str(old["key_id"])] = load_public_key(str(old["public_key_pem"]))
        except (GatewayError, ValueError, KeyError, TypeError):
            raise GatewayError(f"{history_path(key_path)}: unreadable previous key") from None
    return keys


async def _records_from_buffer(
    config: GatewayConfig, site: str | None
) -> tuple[list[dict[str, Any]], dict[str, Ed25519PublicKey] | None]:
    from gateway.store import Store

    async with Store.for_site(config, create=False) as store:
        records = await store.finished_sessions()
    if site is not None:
        records = [r for r in records if r.get("site_id") == site]
    key_path = Path(config.storage.path).with_name("evgw-signing.key")
    return records, await asyncio.to_thread(buffer_keys, key_path)


async def run_verify(
    file: Path | None = None,
    db_url: str | None = None,
    config: GatewayConfig | None = None,
    key: Path | None = None,
    site: str | None = None,
) -> int:
    """``evgw verify``: 0 when every record checks out, 1 (one line per problem) otherwise."""
    keys: Keys = None
    complete = False
    store_problems: list[str] = []
    if file is not None:
        try:
            text = await asyncio.to_thread(Path(file).read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GatewayError(f"cannot read {file}: {exc}") from None
        records = read_records(text, str(file))
        if site is not None:
            records = [r for r in records if r.get("site_id") == site]
    elif db_url is not None:
        records, site_keys, store_problems = await _records_from_db(db_url, site)
        keys = site_keys or None
        complete = True  # the store bills: it must hold every record from seq 1
    elif config is not None:
        records, keys = await _records_from_buffer(config, site)
        complete = True  # the gateway keeps every finished session
    else:
        raise GatewayError("verify needs --file, --db or --config")
    if key is not None:
        keys = await asyncio.to_thread(load_key_file, Path(key))
    result = verify_records(records, keys, complete=complete)
    meter_keys = (
        {d.id: d.meter_public_key for d in config.devices if d.meter_public_key}
        if (config is not None)
        else {}
    )
    signed_note = ""
    if meter_keys:  # OCPP chargers with an OCMF-signing meter: check their signed values too
        from gateway.ocpp.ocmf import load_meter_key
        from gateway.ocpp.ocmf import verify_records as verify_signed

        loaded = {d: load_meter_key(k) for d, k in meter_keys.items()}
        signed_problems, signed_ok = verify_signed(records, loaded)
        result.problems.extend(signed_problems)
        result.ok = result.ok and not signed_problems
        signed_note = f"; {signed_ok} signed meter value(s) valid"
    out = sys.stdout
    for problem in [*result.problems, *store_problems]:
        out.write(printable(problem) + "\n")
    if store_problems and result.ok:
        out.write(f"{result.summary()}{signed_note}; but the store has problems (above)\n")
        return 1
    out.write(result.summary() + signed_note + "\n")
    return 0 if result.ok else 1
