"""The reference cloud consumer of finished session records: what it checks and files.

``gateway.cloud.subscriber`` runs it on the broker (``evgw consume``): it subscribes (QoS 1,
persistent session, fixed client id) to ``P/+/sessions/finished`` and ``P/+/gateway/key``, and
this module stores each session once. A message is acknowledged (PUBACK) only after
the store has it: paho's manual acks, so a consumer killed between receipt and commit gets the
message again from the broker instead of losing it. Delivery is at-least-once, so duplicates
are normal: an identical one is ignored, a different record under a known ``session_id`` is
kept out and flagged.

It bills only what it can trust. A record is stored only when it is JSON of the
``evgw.session/1`` schema with every field in range, its hash matches, and it is signed by a
trusted, unrevoked key of its site. Site keys come from ``--trust DIR`` or are trusted on first
use; a known site's key is replaced only by a rotation statement signed by the key it replaces
(see ``gateway.cloud.trust``) or by the operator (``evgw trust``). Anything else goes to the
``quarantine`` table with its raw payload and the reason, and is acknowledged: nothing a message
contains stops the consumer or blocks the messages behind it. Records held only because their
site's key was not known yet are checked again when it becomes known. Chain problems of trusted
records (gaps, a broken link, a seq used twice) go to ``chain_problems``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from gateway.billing.checks import out_of_range
from gateway.billing.signing import check_rotation, key_id, load_public_key, verify_signature
from gateway.cloud.cloudstore import CloudStore, Quarantined, SiteKey
from gateway.cloud.trust import TrustedKey
from gateway.errors import GatewayError
from gateway.model import from_rfc3339
from gateway.records import GENESIS, SessionRecord, canonical_json, record_hash
from gateway.uplink.schemas import model_problems, validate

__all__ = ["KEY_RELOAD_S", "RESERVED_SITES", "ConsumerStats", "SessionConsumer"]

log = structlog.get_logger(__name__)

_MAX_STORED_PAYLOAD = 1024 * 1024  # of a quarantined payload: records are a few kB
# Held only for want of a key: checked again when the site's keys change.
_WAITING_FOR_KEY = ("no_key", "unknown_key", "unknown_site")
_TRUSTED_SOURCES_UNDER_DIR = frozenset({"trust_dir", "rotation", "operator"})
KEY_RELOAD_S = 5.0  # how soon a running consumer sees `evgw trust add|revoke`


@dataclass(slots=True)
class ConsumerStats:
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    released: int = 0
    gaps: int = 0
    out_of_order: int = 0
    keys: int = 0
    connects: int = 0
    protocol: str = "5"


def _text(payload: bytes) -> str:
    """A payload as text any database holds (raw bytes a JSON parser would refuse included)."""
    text = payload[:_MAX_STORED_PAYLOAD].decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    if len(payload) > _MAX_STORED_PAYLOAD:
        text += f"\n[... {len(payload) - _MAX_STORED_PAYLOAD} more bytes not kept]"
    return text


# The service accounts of config/mosquitto/evgw.acl: never a site's name.
RESERVED_SITES = ("cloud", "billing", "homeassistant")


def _safe_str(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", "\ufffd")
    return text.encode("utf-8", errors="replace").decode("utf-8")


class SessionConsumer:
    """Checks and stores one message at a time (independent of MQTT, for tests and replays).

    ``trusted``: the keys of a trust directory (``--trust``): only the sites named there are
    accepted, and no key is trusted on first use. None: trust on first use.
    ``reserved_sites``: names of the broker's service accounts (``--reserved-site``): no key
    is trusted on first use for a site of that name (docs/security.md: mosquitto's patterns
    apply to those accounts too)."""

    def __init__(
        self,
        store: CloudStore,
        topic_prefix: str = "evgw",
        trusted: dict[str, list[TrustedKey]] | None = None,
        reserved_sites: Iterable[str] = RESERVED_SITES,
    ) -> None:
        self.store = store
        self.reserved_sites = frozenset(reserved_sites)
        self.prefix = topic_prefix.strip("/")
        self.trusted = trusted
        self.stats = ConsumerStats()
        self._keys: dict[str, list[SiteKey]] = {}
        self._public: dict[tuple[str, str], Ed25519PublicKey] = {}
        self._keys_loaded = -math.inf

    # -- keys ----------------------------------------------------------------------------------

    async def load_keys(self) -> None:
        """Read the trust store (after adding the trust directory's keys to it), then check
        again what was held for want of a key."""
        if self.trusted is not None:
            for site, keys in self.trusted.items():
                for k in keys:
                    added = await self.store.put_site_key(
                        site, k.key_id, "ed25519", k.public_key_pem, source="trust_dir"
                    )
                    if added:
                        log.info("site_key_from_trust_dir", site_id=site, key_id=k.key_id)
        await self.reload_keys()
        if self.trusted is not None:
            for site, keys in self.trusted.items():
                for k in keys:
                    if self._status(site, k.key_id) == "revoked":
                        log.warning(
                            "trust_dir_key_revoked",
                            site_id=site,
                            key_id=k.key_id,
                            message=f"site {site}: key {k.key_id} is in the trust directory "
                            "but revoked in the store: records it signs are quarantined",
                        )
        await self.recheck()

    async def reload_keys(self) -> None:
        self._keys_loaded = time.monotonic()
        self._keys = {}
        self._public = {}
        for row in await self.store.key_rows():
            self._keys.setdefault(row.site_id, []).append(row)
            try:
                self._public[(row.site_id, row.key_id)] = load_public_key(row.public_key_pem)
            except (GatewayError, ValueError):
                log.warning(
                    "consumer_stored_key_unreadable", site_id=row.site_id, key_id=row.key_id
                )

    def _status(self, site: str, kid: str) -> str | None:
        for row in self._keys.get(site, []):
            if row.key_id == kid:
                return row.status
        return None

    def _usable(self, site: str) -> dict[str, Ed25519PublicKey]:
        """The keys that may sign the site's records now: not revoked, and under a trust
        directory only those it named or that a trusted key or the operator handed over to."""
        out: dict[str, Ed25519PublicKey] = {}
        in_dir = set() if self.trusted is None else {k.key_id for k in self.trusted.get(site, [])}
        for row in self._keys.get(site, []):
            if row.status == "revoked":
                continue
            if self.trusted is not None:
                if row.source not in _TRUSTED_SOURCES_UNDER_DIR:
                    continue
                if row.source == "trust_dir" and row.key_id not in in_dir:
                    continue  # named by an earlier trust directory, not by this one
            public = self._public.get((site, row.key_id))
            if public is not None:
                out[row.key_id] = public
        return out

    async def recheck(self, site: str | None = None) -> int:
        """Check again the records held for want of a key (of one site); the number stored."""
        released = 0
        for held in await self.store.quarantined(site, _WAITING_FOR_KEY):
            if held.site_id is None:
                continue
            outcome = await self._handle_session(
                held.site_id, held.topic, held.payload.encode("utf-8"), held=held
            )
            if outcome in ("stored", "duplicate"):
                released += 1
        if released:
            log.info("quarantine_released", site_id=site, released=released)
        return released

    # -- messages --------------------------------------------------------------------------------

    def _split(self, topic: str) -> tuple[str, str] | None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        site, _, rest = topic[len(head) :].partition("/")
        return (site, rest) if site and rest else None

    async def report_open_gaps(self) -> None:
        for site in await self.store.site_ids():
            for first, last in await self.store.missing_seqs(site):
                log.warning(
                    "session_gap_open",
                    site_id=site,
                    missing=_span(first, last),
                    message=f"site {site}: missing seq {_span(first, last)}",
                )

    async def handle(self, topic: str, payload: bytes) -> str:
        """Process one message; the outcome: stored, duplicate, conflict, quarantined, key,
        ignored. Raises only when the store fails (the message is then not acknowledged)."""
        where = self._split(topic)
        if where is None:
            return "ignored"
        site, rest = where
        if time.monotonic() - self._keys_loaded > KEY_RELOAD_S:
            await self.reload_keys()  # the operator may have added or revoked a key
        if rest == "gateway/key":
            return await self._handle_key(site, topic, payload)
        if rest == "sessions/finished":
            return await self._handle_session(site, topic, payload)
        return "ignored"

    async def _quarantine(
        self,
        kind: str,
        reason: str,
        topic: str,
        payload: bytes,
        site: str | None,
        record: Any = None,
        held: Quarantined | None = None,
    ) -> str:
        if held is not None and held.reason == reason:
            return "quarantined"  # still held for the same reason
        rec = record if isinstance(record, dict) else {}
        user = rec.get("user")
        started: float | None = None
        try:
            started = (
                from_rfc3339(rec["started_at"]) if isinstance(rec.get("started_at"), str) else None
            )
        except (ValueError, OverflowError):
            started = None
        seq = rec.get("seq")
        seq_text = str(seq) if isinstance(seq, int) and not isinstance(seq, bool) else None
        added = await self.store.quarantine(
            kind=kind,
            reason=_safe_str(reason) or kind,
            topic=_safe_str(topic) or "",
            payload=_text(payload),
            site_id=_safe_str(site),
            session_id=_safe_str(rec.get("session_id")),
            seq=seq_text if seq_text is None or len(seq_text) <= 64 else seq_text[:64] + "...",
            user_id=_safe_str(user.get("id")) if isinstance(user, dict) else None,
            started_ts=started,
        )
        if held is not None:
            await self.store.release(held.qid, "superseded")  # held on, for the new reason
        if added:
            self.stats.quarantined += 1
            log.warning("record_quarantined", topic=topic, kind=kind, reason=reason)
        return "quarantined"

    async def _handle_key(self, site: str, topic: str, payload: bytes) -> str:
        if not payload:
            return "ignored"  # a cleared retained message
        try:
            return await self._check_key(site, topic, payload)
        except Exception as exc:
            if _store_failure(exc):
                raise
            log.exception("key_unprocessable", topic=topic)
            reason = f"key: cannot process: {type(exc).__name__}: {exc}"
            return await self._quarantine("key", reason, topic, payload, site)

    async def _check_key(self, site: str, topic: str, payload: bytes) -> str:
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return await self._quarantine("key", f"key: not JSON: {exc}", topic, payload, site)
        errors = validate("gateway-key", data) if isinstance(data, dict) else ["not an object"]
        if errors:
            reason = "key: schema: " + "; ".join(errors[:3])
            return await self._quarantine("key", reason, topic, payload, site)
        try:
            public = load_public_key(data["public_key_pem"])
        except (GatewayError, ValueError) as exc:
            reason = f"key: unusable public key: {exc}"
            return await self._quarantine("key", reason, topic, payload, site)
        kid = key_id(public)
        if kid != data["key_id"]:
            reason = f"key: key_id {data['key_id']} does not belong to the key ({kid})"
            return await self._quarantine("key", reason, topic, payload, site)
        status = self._status(site, kid)
        if status == "revoked":
            reason = f"key: site {site}: key {kid} is revoked"
            return await self._refuse_key(site, kid, reason, topic, payload)
        if status is not None:
            return "key"  # known already (the retained message again)
        usable = self._usable(site)
        if not usable:
            if self.trusted is not None:
                reason = f"key: site {site} is not in the trust directory"
                if site in self.trusted:
                    reason = f"key: site {site}: every key of the trust directory is revoked"
                return await self._refuse_key(site, kid, reason, topic, payload)
            if self._keys.get(site):
                reason = (
                    f"key: site {site}: every known key is revoked; a new key needs "
                    "`evgw trust add`"
                )
                return await self._refuse_key(site, kid, reason, topic, payload)
            if site in self.reserved_sites:
                reason = (
                    f"key: site {site}: the name of a broker account (--reserved-site) is never "
                    "trusted on first use; `evgw trust add` if it really is a site"
                )
                return await self._refuse_key(site, kid, reason, topic, payload)
            await self.store.put_site_key(
                site, kid, data["alg"], data["public_key_pem"], source="first_use"
            )
            self.stats.keys += 1
            log.warning(
                "site_key_trusted_on_first_use",
                site_id=site,
                key_id=kid,
                message=f"site {site}: key {kid} trusted on first use",
            )
        else:
            previous, why = check_rotation(data.get("rotation"), site, public, usable)
            if previous is None:
                known = ", ".join(sorted(usable))
                detail = why if "rotation" in data else "it carries no rotation statement"
                reason = f"key: site {site} is signed by {known}; new key {kid} refused: {detail}"
                return await self._refuse_key(site, kid, reason, topic, payload)
            await self.store.put_site_key(
                site,
                kid,
                data["alg"],
                data["public_key_pem"],
                source="rotation",
                note=f"rotation statement signed by {previous}",
            )
            await self.store.set_key_status(site, previous, "retired", f"replaced by {kid}")
            self.stats.keys += 1
            log.info("site_key_rotated", site_id=site, key_id=kid, previous_key_id=previous)
        await self.reload_keys()
        await self.recheck(site)
        return "key"

    async def _refuse_key(
        self, site: str, kid: str, reason: str, topic: str, payload: bytes
    ) -> str:
        log.error("site_key_refused", site_id=site, key_id=kid, message=reason)
        return await self._quarantine("key", reason, topic, payload, site)

    def _trust(self, site: str, record: SessionRecord) -> tuple[str, str] | None:
        """(kind, reason) when the record is not signed by a key trusted for its site."""
        label = _label(record)
        usable = self._usable(site)
        sig = record.signature
        kid = sig.key_id if sig is not None else None
        if kid is not None and self._status(site, kid) == "revoked":
            return "revoked_key", f"{label}: signed with key {kid}, which is revoked"
        if not usable:
            if self.trusted is not None:
                if site not in self.trusted and not self._keys.get(site):
                    return "unknown_site", f"{label}: site {site} is not in the trust directory"
                if site not in self.trusted:
                    reason = f"{label}: site {site} is not in the trust directory (its keys in "
                    return "unknown_site", reason + "the store are not trusted under --trust)"
                return "revoked_key", f"{label}: every key of site {site} is revoked"
            if self._keys.get(site):
                return "revoked_key", f"{label}: every key of site {site} is revoked"
            return "no_key", f"{label}: no key of site {site} is known yet"
        if sig is None or kid is None:
            return "unsigned", f"{label}: not signed"
        public = usable.get(kid)
        if public is None:
            known = ", ".join(sorted(usable))
            return (
                "unknown_key",
                f"{label}: signed with key {kid}, not a key of site {site} ({known})",
            )
        if not verify_signature(public, record.hash, sig.model_dump()):
            return "bad_signature", f"{label}: signature by key {kid} does not verify"
        return None

    async def _handle_session(
        self, site: str, topic: str, payload: bytes, held: Quarantined | None = None
    ) -> str:
        try:
            return await self._check_and_store(site, topic, payload, held)
        except Exception as exc:
            if _store_failure(exc):
                raise
            # a record no check foresaw must not block the subscription: keep it, go on
            log.exception("record_unprocessable", topic=topic)
            reason = f"cannot process: {type(exc).__name__}: {exc}"
            return await self._quarantine("schema", reason, topic, payload, site, held=held)

    async def _check_and_store(
        self, site: str, topic: str, payload: bytes, held: Quarantined | None
    ) -> str:
        def keep(kind: str, reason: str, record: Any = None) -> Any:
            return self._quarantine(kind, reason, topic, payload, site, record, held)

        try:
            text = payload.decode("utf-8")
            record = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return await keep("schema", f"not JSON: {exc}")
        if not isinstance(record, dict):
            return await keep("schema", "not a JSON object")
        errors = validate("session", record)
        if errors:
            more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
            return await keep("schema", "schema: " + "; ".join(errors[:3]) + more, record)
        try:
            rec = SessionRecord.from_dict(record)
        except ValidationError as exc:  # what JSON Schema lets pass and the model not: 1.0 as seq
            return await keep("schema", "schema: " + "; ".join(model_problems(exc)[:3]), record)
        label = _label(rec)
        problem = out_of_range(record)
        if problem is not None:
            return await keep("range", f"{label}: {problem}", record)
        if rec.site_id != site:
            reason = f"{label}: site_id {rec.site_id!r} is not the topic's site"
            return await keep("site_mismatch", reason, record)
        if record_hash(record) != rec.hash:
            return await keep("hash", f"{label}: hash does not match its content", record)
        distrust = self._trust(site, rec)
        if distrust is not None:
            return await keep(*distrust, record)

        sid, seq = rec.session_id, rec.seq
        existing = await self.store.get_session(sid)
        if existing is not None:
            if canonical_json(existing.record) == rec.canonical():
                self.stats.duplicates += 1
                log.debug("session_duplicate", site_id=site, seq=seq, session_id=sid)
                if held is not None:
                    await self.store.release(held.qid)
                return "duplicate"
            detail = f"site {site}: {label}: session delivered again with different content"
            log.error("session_conflicting_duplicate", site_id=site, seq=seq, session_id=sid)
            await self.store.add_problem(site, "conflict", detail, seq, sid)
            await keep(
                "conflict", f"{label}: session delivered again with different content", record
            )
            return "conflict"

        await self._check_chain(site, rec, label)
        stored = await self.store.insert_session(rec, text, signature_ok=True)
        if held is not None:
            await self.store.release(held.qid)
            self.stats.released += 1
        if stored:
            self.stats.stored += 1
            log.info("session_stored", site_id=site, seq=seq, session_id=sid)
            return "stored"
        self.stats.duplicates += 1  # another consumer of the group stored it meanwhile
        return "duplicate"

    async def _check_chain(self, site: str, record: SessionRecord, label: str) -> None:
        seq = record.seq
        sid = record.session_id
        top = await self.store.max_seq(site)
        if top is None:
            if seq > 1:
                await self._gap(site, 1, seq - 1, seq, sid)
        elif seq > top + 1:
            await self._gap(site, top + 1, seq - 1, seq, sid)
        elif seq < top:
            self.stats.out_of_order += 1
            log.warning(
                "session_out_of_order",
                site_id=site,
                seq=seq,
                session_id=sid,
                after_seq=top,
                message=f"site {site}: seq {seq} arrived after seq {top}",
            )
        for other in await self.store.session_at(site, seq):
            await self._chain_problem(
                site,
                "seq_conflict",
                f"site {site}: {label}: seq already used by session {other.session_id}",
                seq,
                sid,
            )
        if seq == 1 and record.prev_hash != GENESIS:
            await self._chain_problem(
                site, "chain_break", f"site {site}: {label}: prev_hash is not genesis", seq, sid
            )
        for before in await self.store.session_at(site, seq - 1):
            if before.hash != record.prev_hash:
                await self._chain_problem(
                    site,
                    "chain_break",
                    f"site {site}: {label}: prev_hash does not match the hash of seq {seq - 1}",
                    seq,
                    sid,
                )
        for after in await self.store.session_at(site, seq + 1):
            if after.prev_hash != record.hash:
                await self._chain_problem(
                    site,
                    "chain_break",
                    f"site {site}: seq {seq + 1} (session {after.session_id}): prev_hash does "
                    f"not match the hash of seq {seq}",
                    seq + 1,
                    after.session_id,
                )

    async def _gap(self, site: str, first: int, last: int, seq: int, sid: str) -> None:
        self.stats.gaps += 1
        detail = f"site {site}: missing seq {_span(first, last)}"
        log.warning(
            "session_gap",
            site_id=site,
            missing=_span(first, last),
            seq=seq,
            session_id=sid,
            message=detail,
        )
        await self.store.add_problem(site, "gap", detail, seq, sid)

    async def _chain_problem(self, site: str, kind: str, detail: str, seq: int, sid: str) -> None:
        log.error("session_chain_problem", site_id=site, kind=kind, seq=seq, message=detail)
        await self.store.add_problem(site, kind, detail, seq, sid)


def _store_failure(exc: BaseException) -> bool:
    """An exception of the store (the database is down, the disk full): the message must stay
    unacknowledged. Anything else a message causes is the message's problem, a value the
    database refuses (DataError: SQLSTATE class 22) included."""
    if any(cls.__name__ == "DataError" for cls in type(exc).__mro__):
        return False
    if isinstance(exc, sqlite3.Error | OSError):
        return True
    return any(cls.__module__.split(".")[0] == "psycopg" for cls in type(exc).__mro__)


def _label(record: SessionRecord) -> str:
    return f"seq {record.seq} (session {record.session_id})"


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}..{last}"
