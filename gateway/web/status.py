"""What ``/api/status`` answers and the page shows: one JSON document of the whole site, built
from the running gateway's parts (live view, session manager, load manager, store, uplink).

Reads only; the gateway's parts never learn about the web. The document's shape is
``gateway/web/openapi.json`` (``Status``); a test validates real answers against it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from gateway.model import DeviceKind, rfc3339
from gateway.records import SessionRecord

if TYPE_CHECKING:
    from gateway.web.view import SiteView

__all__ = ["RECENT_SESSIONS", "build_status", "session_summary"]

RECENT_SESSIONS = 10


def _num(value: float | None, digits: int = 1) -> float | None:
    if value is None or isinstance(value, bool) or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _ts(value: float | None) -> str | None:
    return rfc3339(value) if value else None


def session_summary(record: SessionRecord, synced_at: float | None = None) -> dict[str, Any]:
    """A finished session record as the page lists it (the full record is in /api/sessions)."""
    cost = record.cost
    return {
        "session_id": record.session_id,
        "seq": record.seq,
        "charger_id": record.charger_id,
        "user": record.user.id,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "energy_wh": record.energy_wh,
        "cost": None
        if cost is None
        else {
            "currency": cost.currency,
            "excl_vat": cost.excl_vat,
            "vat": cost.vat,
            "incl_vat": cost.incl_vat,
        },
        "stop_reason": record.stop_reason,
        "flags": list(record.flags),
        "synced": synced_at is not None,
    }


def _cost(cost: dict[str, Any] | None) -> dict[str, Any] | None:
    if not cost:
        return None
    return {k: cost[k] for k in ("currency", "excl_vat", "vat", "incl_vat") if k in cost}


async def build_status(gw: SiteView, links: dict[str, str] | None = None) -> dict[str, Any]:
    """The site now, as the ``Status`` schema describes it."""
    now = gw.clock.time()
    load = gw.load
    decision = load.last if load is not None else None
    chargers = []
    for dev in gw.config.devices:
        if gw.device_kind(dev.id) is not DeviceKind.CHARGER:
            continue
        chargers.append(await _charger(gw, dev.id, dev.driver, decision, now))
    meters = []
    for dev in gw.config.devices:
        if gw.device_kind(dev.id) is DeviceKind.CHARGER:
            continue
        live = gw.live.devices.get(dev.id)
        meters.append(
            {
                "id": dev.id,
                "driver": dev.driver,
                "online": bool(live and live.online),
                "power_w": _num(live.power_w) if live else None,
                "energy_wh": _num(live.energy_wh, 0) if live else None,
                "last_seen": _ts(live.last_ts) if live else None,
                "error": live.error if live else None,
            }
        )
    recent = await gw.store.recent_finished_sessions(RECENT_SESSIONS)
    return {
        "schema": "evgw.status/1",
        "generated_at": rfc3339(now),
        "site": _site(gw, links or {}),
        "chargers": chargers,
        "meters": meters,
        "recent_sessions": [
            session_summary(SessionRecord.from_dict(r["record"]), r["synced_at"]) for r in recent
        ],
        "uplink": _uplink(gw),
        "buffer": await _buffer(gw),
    }


def _site(gw: SiteView, links: dict[str, str]) -> dict[str, Any]:
    cfg = gw.config
    grid: dict[str, Any] | None = None
    if gw.load is not None and cfg.grid is not None:
        settings = gw.load.balancer.settings
        d = gw.load.last
        in_force = gw.load.grid_limit  # gateway/gridlimit.py: None before the first decision
        grid = {
            "limit_a": round(in_force.site_a, 2) if in_force else settings.max_current_a,
            # connection (grid.max_current_a), schedule, signal (the grid operator's relay) or
            # cloud (a limit command)
            "limit_source": in_force.source if in_force else "connection",
            "limit_reason": in_force.reason if in_force else None,
            "limit_expires_at": (
                rfc3339(in_force.expires_at) if in_force and in_force.expires_at else None
            ),
            "connection_limit_a": settings.max_current_a,
            "meter": settings.grid_meter,
            "mode": d.mode if d else None,
            "grid_a": [round(a, 2) for a in d.grid_a] if d and d.grid_a else None,
            "available_a": [round(a, 2) for a in d.available_a] if d else None,
            "over_limit": bool(d and d.over_limit),
            "paused": list(d.paused) if d else [],
        }
    return {
        "id": cfg.site.id,
        "name": cfg.site.name,
        "timezone": cfg.site.timezone,
        "grid": grid,
        "links": dict(links),
    }


async def _charger(
    gw: SiteView, device_id: str, driver: str, decision: Any, now: float
) -> dict[str, Any]:
    live = gw.live.devices.get(device_id)
    load = gw.load
    if load is not None:
        code, why = load.balancer.explain(device_id, decision)
        applied = load.balancer.applied(device_id)
        target = decision.targets.get(device_id) if decision is not None else None
    else:
        code, why = "not_managed", "no site limit configured: the charger's own limit applies"
        applied = target = None
    session = gw.sessions.tracker.session_of(device_id)
    open_session = None
    if session is not None and session.ended_at is None:
        open_session = {
            "session_id": session.session_id,
            "user": session.user.get("id"),
            "started_at": rfc3339(session.started_at),
            "energy_wh": round(session.energy()),
            "charging_s": round(session.charging_s),
            "tariff_id": session.tariff_id,
            "cost": _cost(await gw.sessions.cost_so_far(session.session_id, now)),
            "flags": [str(f) for f in session.flags],
        }
    online = bool(live and live.online)
    return {
        "id": device_id,
        "driver": driver,
        "online": online,
        "status": (live.status if live else None) or ("unavailable" if live else "unknown"),
        "power_w": _num(live.power_w) if live and online else None,
        "energy_wh": _num(live.energy_wh, 0) if live and online else None,
        "last_seen": _ts(live.last_ts) if live else None,
        "error": live.error if live else None,
        "limit": {
            "current_a": applied,
            "target_a": target,
            "reason": code,
            "detail": why,
        },
        "session": open_session,
    }


def _uplink(gw: SiteView) -> dict[str, Any]:
    cfg = gw.config.uplink
    if cfg is None or gw.uplink is None:
        return {"configured": False, "connected": None, "broker": None}
    stats = gw.uplink.stats
    last = stats.last_puback_monotonic
    return {
        "configured": True,
        "connected": bool(gw.uplink.online),
        "broker": f"{cfg.scheme}://{cfg.host}:{cfg.port}",
        "protocol": stats.protocol,
        "connects": stats.connects,
        "last_puback_age_s": None if last is None else round(gw.clock.monotonic() - last, 1),
        "published": dict(stats.published),
    }


async def _buffer(gw: SiteView) -> dict[str, Any]:
    backlog = gw.live.backlog  # counted by the app once a second; counting here would repeat it
    return {
        "path": gw.config.storage.path,
        "size_bytes": gw.store.size_bytes(),
        "max_size_mb": gw.config.storage.max_size_mb,
        "backlog": dict(sorted(backlog.items())),
        "readings_blocked": bool(gw.store.readings_blocked),
    }
