"""Simulated chargers and meters: behaviour models that keep a :class:`RegisterImage` current.

Everything a device shows is derived from its profile: status registers from
``profile.simulate_states`` (encoded with the same codec the gateway decodes with), quantities
under their canonical names (``power_w``, ``energy_wh``, ``current_l1_a``, ...), the tag register
in the profile's text encoding, and control registers (enable, current limit, heartbeat) that
the gateway writes and that change what the device does.

Time: ``step(dt_s)`` advances *simulated* seconds (energy counters, charge time). The heartbeat
watchdog runs on real seconds (``dt_s / speed``) because the gateway that must feed it runs in
real time; with ``speed=60`` a 30 s device timeout still means 30 s of wall time.

Tags that do not fit the tag register are shown by their first characters (ascii: 2 per
register, ascii1: 1 per register) or first bytes (hex: KEBA shows 4 bytes = 8 hex digits of a
longer UID). A tag that is not hex shown on a hex register is shown as the hex of its latin-1
bytes. The truth log records both the presented tag and the tag as the gateway can read it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gateway.modbus.codec import CodecError, decode, encode
from gateway.modbus.types import DataType, RegisterSpec, Table
from gateway.model import ChargerStatus, Clock, SystemClock, Value
from gateway.profiles import Profile
from gateway.sim.quirks import quirks_for
from gateway.sim.registers import RegisterImage

__all__ = ["SimCharger", "SimEv", "SimMeter", "TruthLog", "fit_tag"]

log = structlog.get_logger(__name__)

VOLTAGE_V = 230.0
FREQUENCY_HZ = 50.0

# When a profile cannot show a status, show the nearest one it can.
_STATUS_FALLBACK: dict[ChargerStatus, tuple[ChargerStatus, ...]] = {
    ChargerStatus.AVAILABLE: (),
    ChargerStatus.PREPARING: (ChargerStatus.SUSPENDED_EV, ChargerStatus.SUSPENDED_EVSE),
    ChargerStatus.CHARGING: (),
    ChargerStatus.SUSPENDED_EV: (ChargerStatus.SUSPENDED_EVSE, ChargerStatus.PREPARING),
    ChargerStatus.SUSPENDED_EVSE: (ChargerStatus.SUSPENDED_EV, ChargerStatus.PREPARING),
    ChargerStatus.FINISHING: (ChargerStatus.SUSPENDED_EV, ChargerStatus.PREPARING),
    ChargerStatus.FAULTED: (ChargerStatus.UNAVAILABLE, ChargerStatus.AVAILABLE),
    ChargerStatus.UNAVAILABLE: (ChargerStatus.FAULTED, ChargerStatus.AVAILABLE),
}


def fit_tag(spec: RegisterSpec, tag: str) -> str:
    """The tag as a register of ``spec`` can show it (truncated to fit; see module doc)."""
    if spec.type is DataType.HEX:
        text = tag.strip()
        try:
            data = bytes.fromhex(text) if len(text) % 2 == 0 else bytes.fromhex("0" + text)
        except ValueError:
            data = text.encode("latin-1", "replace")
        return data[: spec.count * 2].hex().upper()
    if spec.type is DataType.ASCII1:
        return tag[: spec.count]
    return tag.encode("latin-1", "replace")[: spec.count * 2].decode("latin-1")


class TruthLog:
    """Appends one JSON object per line: every session the simulator produced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


@dataclass
class SimEv:
    """The car on a connector."""

    tag: str | None
    max_power_w: float
    energy_need_wh: float | None
    phases: int
    plugged_at: float
    started: bool = False  # authorised / told to charge
    paused: bool = False  # EV-side pause (suspended_ev)
    charged_wh: float = 0.0
    charge_time_s: float = 0.0
    counter_start_wh: float | None = None
    session_start_wh: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def satisfied(self) -> bool:
        return self.energy_need_wh is not None and self.charged_wh >= self.energy_need_wh


class _Device:
    """Shared plumbing: writing named values into the image through the profile's specs."""

    def __init__(
        self, profile: Profile, image: RegisterImage, *, device_id: str, seed: int | None
    ) -> None:
        self.profile = profile
        self.image = image
        self.device_id = device_id or profile.slug
        self.frozen = False
        self._rng = random.Random(seed)
        self._specs = {spec.name: spec for spec in profile.registers}
        self._warned: set[str] = set()
        self.quirks = quirks_for(profile.slug)
        image.undefined = dict(self.quirks.undefined)
        # Registers the device currently reports as "no value" (all bits set), e.g. Bender
        # 218/220 for a moment (evcc discussion #27736).
        self.unavailable: set[str] = set()

    def _put(
        self, spec: RegisterSpec, value: Value, *, merge: dict[int, int] | None = None
    ) -> None:
        try:
            words = encode(spec, value)
        except (CodecError, ValueError, OverflowError) as exc:
            if spec.name not in self._warned:
                self._warned.add(spec.name)
                log.warning(
                    "sim_value_not_encodable",
                    device=self.device_id,
                    register=spec.name,
                    value=value,
                    error=str(exc),
                )
            return
        if merge is not None and (spec.byte is not None or spec.mask is not None):
            # Several fields share one register (byte: high/low, masks): OR them together.
            for i, word in enumerate(words):
                merge[spec.address + i] = merge.get(spec.address + i, 0) | word
            words = [merge[spec.address + i] for i in range(len(words))]
        self.image.set(spec.table, spec.address, words)

    def _set(self, name: str, value: Value) -> None:
        spec = self._specs.get(name)
        if spec is not None:
            self._put(spec, value)

    def _show_unavailable(self) -> None:
        for name in self.unavailable:
            spec = self._specs.get(name)
            if spec is not None and not spec.type.is_text:
                self.image.set(spec.table, spec.address, [0xFFFF] * spec.count)

    def _readable(self, name: str, value: float) -> float:
        """What the gateway reads back for ``value`` in register ``name`` (its resolution)."""
        spec = self._specs.get(name)
        if spec is None:
            return value
        try:
            got = decode(spec, encode(spec, value))
        except (CodecError, ValueError):
            return value
        return float(got) if isinstance(got, int | float) else value

    def _write_identity(self) -> None:
        for name, value in self.profile.simulate_identity.items():
            if name == "identify" and self.profile.identify is not None:
                self._put(self.profile.identify.register, value)
            else:
                self._set(name, value)


class SimCharger(_Device):
    """A charger with one connector, driven by :meth:`step` and by gateway writes.

    Behaviour: no EV -> available; EV plugged, not started -> preparing; started but disabled,
    limit 0 (or below ``min_a``), or failsafe 0 -> suspended_evse; EV paused or satisfied ->
    suspended_ev; otherwise charging at ``min(ev max, limit_a * 230 V * phases)``. A rising
    enable write (off -> on) with an EV plugged starts it (the gateway authorised it).
    """

    def __init__(
        self,
        profile: Profile,
        image: RegisterImage,
        *,
        device_id: str = "",
        clock: Clock | None = None,
        speed: float = 1.0,
        truth: TruthLog | None = None,
        seed: int | None = None,
        initial_energy_wh: float | None = None,
        enforce_heartbeat: bool = True,
        max_current_a: float | None = None,
    ) -> None:
        super().__init__(profile, image, device_id=device_id, seed=seed)
        self.clock: Clock = clock or SystemClock()
        self.speed = speed
        self.truth = truth
        self.enforce_heartbeat = enforce_heartbeat
        self.energy_wh = (
            initial_energy_wh
            if initial_energy_wh is not None
            else float(self._rng.randint(100_000, 5_000_000))
        )
        self.session_energy_wh = 0.0
        self.ev: SimEv | None = None
        self.shown_tag: str | None = None
        self.enabled = True
        limit = profile.current_limit
        self.hw_max_a = max_current_a or (limit.max_a if limit else 32.0)
        self.min_a = limit.min_a if limit else 6.0
        self.limit_a: float = self.hw_max_a
        self.heartbeat_age_s = 0.0
        self.failsafe = False
        self.faulted = False
        self.power_w = 0.0
        self.status = ChargerStatus.AVAILABLE
        self.sessions: list[dict[str, Any]] = []  # finished sessions (same as the truth log)
        self.idle_s = 0.0  # simulated seconds without an EV (standby quirk)
        self.powered = True
        image.on_write = self._on_write
        self._write_identity()
        self._write_controls()
        self._refresh()

    # EV actions ---------------------------------------------------------------------------------
    def plug_in(
        self,
        tag: str | None = None,
        power_w: float = 11000.0,
        energy_need_wh: float | None = None,
        phases: int = 3,
    ) -> None:
        if self.ev is not None:
            raise RuntimeError(f"{self.device_id}: an EV is already plugged in")
        self.ev = SimEv(
            tag=None,
            max_power_w=float(power_w),
            energy_need_wh=energy_need_wh,
            phases=phases,
            plugged_at=self.clock.time(),
        )
        self.ev.counter_start_wh = self._readable("energy_wh", self.energy_wh)
        if self.profile.session_energy_resets == "plug":
            self.session_energy_wh = 0.0
        self.ev.session_start_wh = self.session_energy_wh
        self.idle_s = 0.0
        if self.powered:
            self.image.silent = False  # a car wakes a box from standby
        log.info("sim_ev_plugged", device=self.device_id, tag=tag, power_w=power_w)
        if tag is not None:
            self.present_tag(tag)
        self._refresh()

    def present_tag(self, tag: str) -> None:
        """An RFID card / key fob at the reader (or, without a tag register, an app start)."""
        spec = self._tag_spec()
        self.shown_tag = fit_tag(spec, tag) if spec is not None else None
        if self.ev is not None:
            self.ev.tag = tag
        log.info("sim_tag_presented", device=self.device_id, tag=tag, shown=self.shown_tag)
        self._refresh()

    def start_charging(self) -> None:
        if self.ev is None:
            raise RuntimeError(f"{self.device_id}: no EV plugged in")
        self.ev.started = True
        self._refresh()

    def suspend(self) -> None:
        if self.ev is not None:
            self.ev.paused = True
            self._refresh()

    def resume(self) -> None:
        if self.ev is not None:
            self.ev.paused = False
            self._refresh()

    def unplug(self) -> dict[str, Any] | None:
        ev = self.ev
        if ev is None:
            return None
        record = self._session_record(ev, self.clock.time())
        self.sessions.append(record)
        if self.truth is not None:
            self.truth.write(record)
        log.info("sim_ev_unplugged", device=self.device_id, energy_wh=record["energy_wh"])
        self.ev = None
        self.shown_tag = None
        self._refresh()
        return record

    def open_session_record(self) -> dict[str, Any] | None:
        """The session in progress as a truth record (``unplugged_at`` None)."""
        return None if self.ev is None else self._session_record(self.ev, None)

    def power_off(self) -> None:
        """A power cut: the device stops answering."""
        self.powered = False
        self.image.silent = True
        log.info("sim_power_off", device=self.device_id)

    def power_on(self) -> None:
        """Power is back: the device answers again with its volatile settings at their
        defaults (Heidelberg: standby allowed again)."""
        self.powered = True
        self.image.silent = False
        self.idle_s = 0.0
        q = self.quirks
        if q.standby_register is not None:
            self.image.set(Table.HOLDING, q.standby_register, [0])
        log.info("sim_power_on", device=self.device_id)

    @property
    def standby(self) -> bool:
        """In standby (silent until an EV is plugged in)."""
        return self.powered and self.image.silent

    # time -----------------------------------------------------------------------------------
    def step(self, dt_s: float) -> None:
        """Advance ``dt_s`` simulated seconds."""
        if self.profile.heartbeat is not None:
            self.heartbeat_age_s += dt_s / self.speed
            lost = (
                self.enforce_heartbeat and self.heartbeat_age_s > self.profile.heartbeat.timeout_s
            )
            if lost and not self.failsafe:
                log.warning(
                    "sim_heartbeat_lost",
                    device=self.device_id,
                    failsafe_current_a=self.profile.heartbeat.failsafe_current_a,
                )
            self.failsafe = lost
        q = self.quirks
        if q.standby_register is not None and self.powered:
            allowed = self.image.get(Table.HOLDING, q.standby_register)[0] != q.standby_off
            self.idle_s = self.idle_s + dt_s if self.ev is None else 0.0
            if allowed and self.ev is None and self.idle_s >= q.standby_after_s:
                if not self.image.silent:
                    log.info("sim_standby", device=self.device_id)
                self.image.silent = True
        self._update_power()
        if self.power_w > 0 and self.ev is not None:
            wh = self.power_w * dt_s / 3600.0
            if self.ev.energy_need_wh is not None:
                wh = min(wh, max(0.0, self.ev.energy_need_wh - self.ev.charged_wh))
            self.energy_wh += wh
            self.session_energy_wh += wh
            self.ev.charged_wh += wh
            self.ev.charge_time_s += dt_s
        self._refresh()

    # model ----------------------------------------------------------------------------------
    @property
    def effective_limit_a(self) -> float:
        limit = min(self.limit_a, self.hw_max_a)
        if self.failsafe and self.profile.heartbeat is not None:
            limit = min(limit, self.profile.heartbeat.failsafe_current_a)
        return limit if limit >= self.min_a else 0.0

    def _update_power(self) -> None:
        ev = self.ev
        status: ChargerStatus
        power = 0.0
        if self.faulted:
            status = ChargerStatus.FAULTED
        elif ev is None:
            status = ChargerStatus.AVAILABLE
        elif not ev.started:
            status = ChargerStatus.PREPARING
        elif not self.enabled or self.effective_limit_a <= 0:
            status = ChargerStatus.SUSPENDED_EVSE
        elif ev.paused or ev.satisfied:
            status = ChargerStatus.SUSPENDED_EV
        else:
            status = ChargerStatus.CHARGING
            power = min(ev.max_power_w, self.effective_limit_a * VOLTAGE_V * ev.phases)
        if status is not self.status:
            log.info("sim_charger_status", device=self.device_id, status=status.value)
        self.status = status
        self.power_w = power

    def _shown_status(self) -> ChargerStatus | None:
        states = self.profile.simulate_states
        if self.status in states:
            return self.status
        for alt in _STATUS_FALLBACK[self.status]:
            if alt in states:
                return alt
        return None

    def _refresh(self) -> None:
        self._update_power()
        if self.frozen:
            return
        shown = self._shown_status()
        if shown is not None:
            merge: dict[int, int] = {}
            for name, value in self.profile.simulate_states[shown].items():
                spec = self._specs.get(name)
                if spec is not None:
                    self._put(spec, value, merge=merge)
        if self.quirks.status_low_byte is not None:
            address, low = self.quirks.status_low_byte
            word = self.image.get(Table.HOLDING, address)[0]
            self.image.set(Table.HOLDING, address, [(word & 0xFF00) | low])
        ev = self.ev
        phases = ev.phases if ev is not None else 3
        current = self.power_w / (VOLTAGE_V * phases) if self.power_w else 0.0
        values: dict[str, Value] = {
            "power_w": self.power_w,
            "energy_wh": self.energy_wh,
            "session_energy_wh": self.session_energy_wh,
            "current_limit_a": self.effective_limit_a,
            "charge_time_s": ev.charge_time_s if ev is not None else 0.0,
            "frequency_hz": FREQUENCY_HZ,
            "power_factor": 1.0 if self.power_w else 0.0,
            "temperature_c": 25.0,
        }
        for i in (1, 2, 3):
            values[f"voltage_l{i}_v"] = VOLTAGE_V
            values[f"current_l{i}_a"] = current if i <= phases else 0.0
        for name, qty in values.items():
            self._set(name, qty)
        tag_spec = self._tag_spec()
        if tag_spec is not None:
            self._put_tag(tag_spec, self.shown_tag or "")
        self._show_unavailable()

    def _put_tag(self, spec: RegisterSpec, text: str) -> None:
        if not (self.quirks.tag_right_aligned and spec.type is DataType.ASCII):
            self._put(spec, text)
            return
        data = text.encode("latin-1", "replace")[: spec.count * 2].rjust(spec.count * 2, b"\0")
        words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
        self.image.set(spec.table, spec.address, words)

    def _tag_spec(self) -> RegisterSpec | None:
        if self.profile.tag is None:
            return None
        return self._specs.get(self.profile.tag.register)

    def _session_record(self, ev: SimEv, unplugged_at: float | None) -> dict[str, Any]:
        spec = self._tag_spec()
        tag_seen: str | None = None
        if spec is not None and ev.tag is not None:
            tag_seen = fit_tag(spec, ev.tag)
            if self.profile.tag is not None and self.profile.tag.upper:
                tag_seen = tag_seen.upper()
        record: dict[str, Any] = {
            "device": self.device_id,
            "tag": ev.tag,
            "tag_seen": tag_seen,
            "plugged_at": ev.plugged_at,
            "unplugged_at": unplugged_at,
            "energy_wh": round(ev.charged_wh, 3),
            "charge_time_s": round(ev.charge_time_s, 3),
        }
        if self.profile.has("energy_wh"):
            record["counter_start_wh"] = ev.counter_start_wh
            record["counter_end_wh"] = self._readable("energy_wh", self.energy_wh)
        if self.profile.has("session_energy_wh"):
            record["session_counter_wh"] = self._readable(
                "session_energy_wh", self.session_energy_wh
            )
        return record

    # gateway writes -------------------------------------------------------------------------
    def _write_controls(self) -> None:
        p = self.profile
        if p.enable is not None and p.enable.on is not None:
            self._put(p.enable.register, p.enable.on)
        if p.current_limit is not None:
            self._put(p.current_limit.control.register, p.current_limit.to_raw(self.limit_a))

    def _written(self, spec: RegisterSpec, table: Table, address: int, words: list[int]) -> Value:
        """The value of ``spec`` after a write of ``words`` at ``address``, or a sentinel object
        when the write does not touch it."""
        if spec.table is not table or address >= spec.end or address + len(words) <= spec.address:
            raise LookupError
        current = self.image.get(table, spec.address, spec.count)
        for i, word in enumerate(words):
            pos = address + i - spec.address
            if 0 <= pos < spec.count:
                current[pos] = word
        return decode(spec, current)

    def _on_write(self, table: Table, address: int, words: list[int]) -> None:
        p = self.profile
        touched: list[str] = []
        ignored = self.quirks.ignored_writes
        if table is Table.HOLDING and all(address + i in ignored for i in range(len(words))):
            log.info("sim_write_ignored", device=self.device_id, address=address, words=words)
            return
        if p.enable is not None:
            try:
                value = self._written(p.enable.register, table, address, words)
            except LookupError:
                pass
            else:
                on = value == p.enable.on if p.enable.on is not None else bool(value)
                if on and not self.enabled and self.ev is not None:
                    self.ev.started = True  # the gateway authorised the session
                self.enabled = on
                touched.append("enable")
        if p.current_limit is not None:
            try:
                value = self._written(p.current_limit.control.register, table, address, words)
            except LookupError:
                pass
            else:
                raw = float(value) if isinstance(value, int | float) else 0.0
                disable = p.current_limit.disable
                self.limit_a = (
                    0.0 if disable is not None and raw == disable else p.current_limit.to_amps(raw)
                )
                touched.append("current_limit")
                if p.heartbeat is not None and p.heartbeat.rewrites_current_limit:
                    touched.append("heartbeat")
        if p.heartbeat is not None and not p.heartbeat.rewrites_current_limit:
            try:
                self._written(p.heartbeat.control.register, table, address, words)
            except LookupError:
                pass
            else:
                touched.append("heartbeat")
        if "heartbeat" in touched:
            self.heartbeat_age_s = 0.0
            if self.failsafe:
                log.info("sim_heartbeat_restored", device=self.device_id)
            self.failsafe = False
        if touched:
            log.debug(
                "sim_control_write",
                device=self.device_id,
                controls=touched,
                enabled=self.enabled,
                limit_a=self.limit_a,
            )
            # The image stores the written words after this hook; refresh derived values now.
            self._refresh()


class SimMeter(_Device):
    """An energy meter. Wired to chargers, it measures their sum (plus ``base_load_w``) so a
    charger billed by an external meter sees consistent numbers."""

    def __init__(
        self,
        profile: Profile,
        image: RegisterImage,
        *,
        device_id: str = "",
        chargers: list[SimCharger] | tuple[SimCharger, ...] = (),
        base_load_w: float = 0.0,
        seed: int | None = None,
        initial_energy_wh: float | None = None,
    ) -> None:
        super().__init__(profile, image, device_id=device_id, seed=seed)
        self.chargers = list(chargers)
        self.base_load_w = base_load_w
        self.energy_wh = (
            initial_energy_wh
            if initial_energy_wh is not None
            else float(self._rng.randint(100_000, 2_000_000))  # f32 kWh meters keep 0.1 Wh steps
        )
        self.energy_export_wh = 0.0
        self.power_w = 0.0
        self.partial_base_wh = 0.0  # lifetime reading when the partial counter was reset
        self._charger_wh = {id(c): c.energy_wh for c in self.chargers}
        self._write_identity()
        self._refresh()

    def reset_partial(self) -> None:
        """Reset the resettable partial counter (Carlo Gavazzi PAR), as a user at the meter's
        keys or another master can."""
        self.partial_base_wh = self.energy_wh
        log.info("sim_partial_counter_reset", device=self.device_id)
        self._refresh()

    def wire(self, charger: SimCharger) -> None:
        self.chargers.append(charger)
        self._charger_wh[id(charger)] = charger.energy_wh

    def step(self, dt_s: float) -> None:
        """Advance ``dt_s`` simulated seconds (call after the chargers' own ``step``)."""
        for charger in self.chargers:
            before = self._charger_wh[id(charger)]
            self.energy_wh += charger.energy_wh - before
            self._charger_wh[id(charger)] = charger.energy_wh
        self.energy_wh += self.base_load_w * dt_s / 3600.0
        self._refresh()

    def _refresh(self) -> None:
        self.power_w = sum(c.power_w for c in self.chargers) + self.base_load_w
        if self.frozen:
            return
        per_phase = [self.base_load_w / 3] * 3
        for charger in self.chargers:
            phases = charger.ev.phases if charger.ev is not None else 3
            for i in range(phases):
                per_phase[i] += charger.power_w / phases
        values: dict[str, Value] = {
            "power_w": self.power_w,
            "energy_wh": self.energy_wh,
            "energy_export_wh": self.energy_export_wh,
            "frequency_hz": FREQUENCY_HZ,
            "power_factor": 1.0,
        }
        for i in (1, 2, 3):
            values[f"voltage_l{i}_v"] = VOLTAGE_V
            values[f"current_l{i}_a"] = per_phase[i - 1] / VOLTAGE_V
            values[f"power_l{i}_w"] = per_phase[i - 1]
            values[f"power_factor_l{i}"] = 1.0
        values["energy_total_wh"] = self.energy_wh + self.energy_export_wh
        values["apparent_power_va"] = self.power_w
        values["reactive_power_var"] = 0.0
        for name, value in values.items():
            self._set(name, value)
        partial = self.quirks.partial_energy
        if partial is not None:
            self._put(partial, self.energy_wh - self.partial_base_wh)
        self._show_unavailable()
