"""What the site looks like right now: a small in-memory view the app keeps up to date from
samples and session events, read by the demo's live view and by ``evgw run``'s status log."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.model import DeviceSample
from gateway.safeout import printable

__all__ = ["DeviceLive", "LiveState", "render_view"]


@dataclass(slots=True)
class DeviceLive:
    device_id: str
    kind: str
    online: bool = False
    status: str | None = None
    power_w: float | None = None
    energy_wh: float | None = None
    error: str | None = None
    session_id: str | None = None
    last_ts: float = 0.0


@dataclass(slots=True)
class LiveState:
    devices: dict[str, DeviceLive] = field(default_factory=dict)
    open_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=8))
    finished_count: int = 0
    backlog: dict[str, int] = field(default_factory=dict)
    uplink_online: bool | None = None
    # Called after each change with (kind, payload): "sample" and the sample, or a session
    # event and its payload (the web page's push and the metrics listen here).
    listeners: list[Callable[[str, Any], None]] = field(default_factory=list)

    def _changed(self, kind: str, payload: Any) -> None:
        for listener in self.listeners:
            listener(kind, payload)

    def on_sample(self, sample: DeviceSample, kind: str) -> None:
        dev = self.devices.get(sample.device_id)
        if dev is None:
            dev = self.devices[sample.device_id] = DeviceLive(sample.device_id, kind)
        dev.online = sample.online
        dev.error = sample.error
        dev.last_ts = sample.ts
        if sample.online:
            dev.status = sample.status.value if sample.status else None
            dev.power_w = sample.power_w
            dev.energy_wh = sample.energy_wh
        else:
            dev.status = "unavailable" if kind == "charger" else None
            dev.power_w = None
        self._changed("sample", sample)

    def on_session_event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "session_started":
            sid = payload["session_id"]
            self.open_sessions[sid] = dict(payload)
            dev = self.devices.get(payload["charger_id"])
            if dev:
                dev.session_id = sid
        elif kind == "session_updated":
            sid = payload["session_id"]
            if sid in self.open_sessions:
                self.open_sessions[sid].update(payload)
        elif kind == "session_finished":
            sid = payload["session_id"]
            self.open_sessions.pop(sid, None)
            dev = self.devices.get(payload.get("charger_id", ""))
            if dev and dev.session_id == sid:
                dev.session_id = None
            self.finished.appendleft(payload)
            self.finished_count += 1
        self._changed(kind, payload)


def _kw(power_w: float | None) -> str:
    return "    -   " if power_w is None else f"{power_w / 1000:6.2f} kW"


def _user(record: dict[str, Any]) -> str:
    """The user id as the terminal may show it (control characters escaped)."""
    user = record.get("user")
    if isinstance(user, dict):
        return printable(user.get("id") or "?")
    return printable(user or "?")


def render_view(state: LiveState, *, title: str = "evgw demo", width: int = 100) -> str:
    """A plain-text screen of the site (no curses: it must also read well in a log)."""
    lines = [title, "=" * min(width, 100)]
    lines.append(f"{'device':<10} {'kind':<8} {'status':<15} {'power':>10}  {'counter':>12}  note")
    for dev in sorted(state.devices.values(), key=lambda d: (d.kind != "charger", d.device_id)):
        counter = "-" if dev.energy_wh is None else f"{dev.energy_wh / 1000:9.3f} kWh"
        note = dev.error or ""
        if dev.session_id and dev.session_id in state.open_sessions:
            s = state.open_sessions[dev.session_id]
            kwh = s.get("energy_wh", 0) / 1000
            note = f"session {dev.session_id[:8]} user={_user(s)} {kwh:.3f} kWh"
        status = dev.status or ("online" if dev.online else "offline")
        power = _kw(dev.power_w)
        lines.append(
            f"{dev.device_id:<10} {dev.kind:<8} {status:<15} {power:>10}  {counter:>12}  {note}"
        )
    backlog = ", ".join(f"{k}={v}" for k, v in sorted(state.backlog.items())) or "empty"
    link = {None: "no uplink", True: "online", False: "OFFLINE"}[state.uplink_online]
    lines.append("")
    lines.append(
        f"uplink: {link}   outbox backlog: {backlog}   finished sessions: {state.finished_count}"
    )
    if state.finished:
        lines.append("")
        lines.append("last finished sessions:")
        for rec in state.finished:
            cost = rec.get("cost") or {}
            price = f"{cost.get('incl_vat', '-')} {cost.get('currency', '')}".strip()
            flags = ",".join(rec.get("flags", []))
            lines.append(
                f"  #{rec.get('seq', '?'):<4} {rec.get('charger_id', '?'):<6} {_user(rec):<10} "
                f"{rec.get('energy_wh', 0) / 1000:8.3f} kWh  {price:>12}  {flags}"
            )
    return "\n".join(lines)
