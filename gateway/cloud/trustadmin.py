"""``evgw trust``: the operator's commands on the consumer's trust store and quarantine.

``add`` trusts a key for a site (and releases what was held for want of it), ``list`` shows
every key with its status, ``revoke`` stops trusting a key (records it signs are quarantined
from then on; records stored before stay, and are counted), ``quarantine`` lists what is held,
``dismiss`` closes held messages the operator has looked into (they stay in the table, never
billed, and no longer fail ``evgw verify --db``).
A running consumer picks a change up within ``KEY_RELOAD_S`` seconds.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.billing.signing import key_id
from gateway.billing.verify import load_key_file
from gateway.cloud.cloudstore import open_cloud_store
from gateway.cloud.consumer import KEY_RELOAD_S, SessionConsumer
from gateway.cloud.trust import public_pem
from gateway.errors import UsageError
from gateway.safeout import printable

__all__ = ["KEY_RELOAD_S", "add_key", "dismiss_held", "list_keys", "list_quarantine", "revoke_key"]


class TrustUsageError(UsageError):
    """A bad argument to ``evgw trust``."""


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _show(
    as_json: bool,
    objects: list[dict[str, Any]],
    header: tuple[str, ...],
    rows: list[tuple[str, ...]],
    empty: str,
) -> int:
    """Print the listing as JSON objects, or as a table (every cell made printable)."""
    if as_json:
        print(json.dumps(objects, indent=2, ensure_ascii=False))
        return 0
    if not rows:
        print(empty)
        return 0
    table = [header, *(tuple(printable(c) for c in r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def add_key(db_url: str, site: str, key_file: Path, note: str | None) -> int:
    """``evgw trust add``."""
    public = await asyncio.to_thread(load_key_file, key_file)
    kid = key_id(public)
    async with open_cloud_store(db_url, create=False) as store:
        before = {k.key_id: k for k in await store.key_rows(site)}
        if kid in before and before[kid].status == "active":
            print(f"site {site}: key {kid} is trusted already")
            return 0
        if kid in before:
            await store.set_key_status(site, kid, "active", note or "trusted again by the operator")
        else:
            await store.put_site_key(
                site, kid, "ed25519", public_pem(public), source="operator", note=note
            )
        consumer = SessionConsumer(store)
        await consumer.reload_keys()
        await consumer.recheck(site)  # releases the site's records signed by a trusted key
    print(f"site {site}: key {kid} trusted; {consumer.stats.released} held record(s) released")
    return 0


async def revoke_key(db_url: str, site: str, kid: str, reason: str | None) -> int:
    """``evgw trust revoke``."""
    async with open_cloud_store(db_url, create=False) as store:
        known = {k.key_id: k for k in await store.key_rows(site)}
        if kid not in known:
            raise TrustUsageError(f"site {site} has no key {kid} (`evgw trust list`)")
        await store.set_key_status(site, kid, "revoked", reason or "revoked by the operator")
        signed = sum(
            1
            for s in await store.sessions(site)
            if (s.record.get("signature") or {}).get("key_id") == kid
        )
    print(
        f"site {site}: key {kid} revoked; records it signs are quarantined from now on "
        f"({signed} stored record(s) signed by it stay stored)"
    )
    return 0


async def list_keys(db_url: str, site: str | None, as_json: bool) -> int:
    """``evgw trust list``."""
    async with open_cloud_store(db_url, create=False) as store:
        keys = await store.key_rows(site)
    return _show(
        as_json,
        [
            {
                "site_id": k.site_id,
                "key_id": k.key_id,
                "status": k.status,
                "source": k.source,
                "since": _when(k.received_at),
                "note": k.note,
                "public_key_pem": k.public_key_pem,
            }
            for k in keys
        ],
        ("site", "key_id", "status", "source", "since", "note"),
        [
            (k.site_id, k.key_id, k.status, k.source, _when(k.received_at), k.note or "")
            for k in keys
        ],
        "(no keys)",
    )


async def list_quarantine(db_url: str, site: str | None, as_json: bool, released: bool) -> int:
    """``evgw trust quarantine``."""
    async with open_cloud_store(db_url, create=False) as store:
        held = await store.quarantined(site, released=released)
    return _show(
        as_json,
        [
            {
                "kind": q.kind,
                "reason": q.reason,
                "topic": q.topic,
                "site_id": q.site_id,
                "session_id": q.session_id,
                "seq": q.seq,
                "user_id": q.user_id,
                "received_at": _when(q.received_at),
                "qid": q.qid,
                "released_at": None if q.released_at is None else _when(q.released_at),
                "resolution": q.resolution,
                "payload": q.payload,
            }
            for q in held
        ],
        ("qid", "received", "kind", "site", "user", "reason"),
        [
            (
                q.qid,
                _when(q.received_at) + (f" ({q.resolution})" if q.released_at is not None else ""),
                q.kind,
                q.site_id or "-",
                q.user_id or "-",
                q.reason,
            )
            for q in held
        ],
        "(nothing quarantined)",
    )


async def dismiss_held(
    db_url: str, qids: list[str], every: bool, site: str | None, note: str | None
) -> int:
    """``evgw trust dismiss``."""
    if not note:
        raise TrustUsageError("trust dismiss needs --note (why the messages are closed)")
    if not qids and not every:
        raise TrustUsageError("trust dismiss needs quarantine ids or --all")
    async with open_cloud_store(db_url, create=False) as store:
        held = {q.qid: q for q in await store.quarantined(site)}
        chosen = list(held) if every else qids
        unknown = [q for q in chosen if q not in held]
        if unknown:
            raise TrustUsageError(f"not held: {', '.join(printable(q) for q in unknown)}")
        for qid in chosen:
            await store.release(qid, f"dismissed: {note}")
    print(f"{len(chosen)} quarantined message(s) dismissed (kept, never billed)")
    return 0
