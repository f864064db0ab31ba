"""The typed form of a device profile: what the engine, the simulators and the balancer read.

Profiles are validated and built by :mod:`gateway.profiles.build`; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.modbus.types import (
    RegisterSpec,
    current_step_a,
    current_to_raw,
    raw_to_current,
)
from gateway.model import ChargerStatus, DeviceKind, IecState

__all__ = [
    "CANONICAL_QUANTITIES",
    "KNOWN_FROM",
    "Condition",
    "ConnectionSpec",
    "ControlSpec",
    "CurrentLimitSpec",
    "HeartbeatSpec",
    "IdentifySpec",
    "OnConnectWrite",
    "Profile",
    "StateRule",
    "StateSpec",
    "TagSpec",
]

# Quantities the core understands, in the units their names carry. A profile's register named
# like one of these must deliver it in that unit after scaling.
CANONICAL_QUANTITIES: dict[str, str] = {
    "power_w": "W",
    "energy_wh": "Wh",  # cumulative import counter (lifetime)
    "energy_export_wh": "Wh",
    "session_energy_wh": "Wh",  # counter the device resets per session
    "voltage_l1_v": "V",
    "voltage_l2_v": "V",
    "voltage_l3_v": "V",
    "current_l1_a": "A",
    "current_l2_a": "A",
    "current_l3_a": "A",
    "frequency_hz": "Hz",
    "power_factor": "",
    "current_limit_a": "A",  # limit the device applies now
    "charge_time_s": "s",
    "soc_percent": "%",
    "temperature_c": "°C",
}


KNOWN_FROM = ("hardware", "code", "document")


@dataclass(frozen=True, slots=True)
class Condition:
    """One test of a raw (decoded, scaled) register value inside a state rule."""

    register: str
    equals: tuple[int | str, ...] | None = None  # value in this set
    min: float | None = None
    max: float | None = None
    bits_all: int | None = None
    bits_any: int | None = None

    def holds(self, value: object) -> bool:
        if value is None:
            return False
        if self.equals is not None and value not in self.equals:
            return False
        if (
            self.min is not None
            or self.max is not None
            or self.bits_all is not None
            or self.bits_any is not None
        ):
            if not isinstance(value, int | float) or isinstance(value, bool):
                return False
            if self.min is not None and value < self.min:
                return False
            if self.max is not None and value > self.max:
                return False
            if self.bits_all is not None and (int(value) & self.bits_all) != self.bits_all:
                return False
            if self.bits_any is not None and (int(value) & self.bits_any) == 0:
                return False
        return True


@dataclass(frozen=True, slots=True)
class StateRule:
    when: tuple[Condition, ...]
    iec: IecState
    status: ChargerStatus

    def holds(self, values: Mapping[str, object]) -> bool:
        return all(c.holds(values.get(c.register)) for c in self.when)


@dataclass(frozen=True, slots=True)
class StateSpec:
    """Device state codes -> IEC 61851 state and CONTRACT status; first matching rule wins."""

    rules: tuple[StateRule, ...]
    default_iec: IecState = IecState.E
    default_status: ChargerStatus = ChargerStatus.FAULTED

    def classify(self, values: Mapping[str, object]) -> tuple[IecState, ChargerStatus]:
        for rule in self.rules:
            if rule.holds(values):
                return rule.iec, rule.status
        return self.default_iec, self.default_status


@dataclass(frozen=True, slots=True)
class TagSpec:
    """Where the charger shows the identification tag (RFID UID / OCPP idTag) of the session."""

    register: str  # name of a text register in ``registers``
    empty: frozenset[str] = frozenset({""})  # values (normal form) that mean "no tag"
    upper: bool = True  # normalise to upper case (UIDs are compared case-insensitively)
    # Values (normal form) the charger shows that are not a card: a free-charging mode's
    # placeholder (Vestel VESTELFREEMODE). Such a session is unidentified, never a user.
    not_a_user: frozenset[str] = frozenset()
    # The charger shows a hex UID least significant byte first: reverse its bytes so the card
    # reads as on every other charger. No shipped profile is known to need it.
    reverse_bytes: bool = False
    # The charger shows only the first characters of a card's id (normal form; KEBA: 4 UID
    # bytes, 8 hex characters): the authoriser then matches a tag of exactly this length as
    # the unique prefix of one known token. None: the tag is the whole id, matched exactly.
    truncated_to: int | None = None


@dataclass(frozen=True, slots=True)
class ControlSpec:
    """A register (or coil) the gateway writes. ``function`` is 5, 6, 15 or 16."""

    register: RegisterSpec
    function: int
    on: int | float | None = None  # enable control: raw value meaning enabled
    off: int | float | None = None


@dataclass(frozen=True, slots=True)
class CurrentLimitSpec:
    """Current setpoint. ``unit`` is how the device counts: "A", "0.1A" or "mA" (float
    types carry amps as floats). ``disable`` is the raw value that stops charging."""

    control: ControlSpec
    unit: str
    min_a: float = 6.0
    max_a: float = 32.0
    disable: int | float | None = 0

    def to_raw(self, current_a: float) -> int | float:
        """Amperes in the device's own steps (A, 0.1 A, mA; float registers carry amps)."""
        return current_to_raw(current_a, self.unit, self.control.register.type)

    def to_amps(self, raw: float) -> float:
        return raw_to_current(raw, self.unit)

    @property
    def step_a(self) -> float:
        """Resolution of the limit register: limits are rounded down to it."""
        return current_step_a(self.unit, self.control.register.type)


@dataclass(frozen=True, slots=True)
class HeartbeatSpec:
    """A register the device needs rewritten more often than its timeout, or it falls back to
    its failsafe current (or stops)."""

    control: ControlSpec
    value: int | float
    period_s: float
    timeout_s: float
    failsafe_current_a: float = 0.0
    # Alfen: no separate alive register; the current limit itself must be rewritten (``control``
    # is then the current-limit control and ``value`` unused: write the last limit again).
    rewrites_current_limit: bool = False


@dataclass(frozen=True, slots=True)
class OnConnectWrite:
    """A value the engine writes after every (re)connect of the device, before it polls:
    settings the device forgets on a power cut or that keep it answering (Heidelberg HR 258 = 4
    disables standby, in which the box stops answering)."""

    control: ControlSpec
    value: int | float
    note: str = ""


@dataclass(frozen=True, slots=True)
class IdentifySpec:
    """What ``evgw scan`` reads to recognise the model; ``pattern`` is a regex that the decoded
    value (as text) must match, ``min``/``max`` a range for numbers."""

    register: RegisterSpec
    pattern: str | None = None
    min: float | None = None
    max: float | None = None
    unit: int | None = None  # station-level unit id to probe (Alfen 200)


@dataclass(frozen=True, slots=True)
class ConnectionSpec:
    transports: tuple[str, ...] = ("tcp",)  # tcp | rtu | rtu-over-tcp
    default_port: int = 502
    default_unit: int = 1
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    max_registers_per_read: int = 125
    single_value_reads: bool = False  # KEBA: never read across value boundaries
    inter_request_delay_s: float = 0.0  # Heidelberg: evcc waits 100 ms between requests
    max_gap: int = 8  # registers of unused space worth reading to save a request
    # The device answers exception 2 to a read that spans an address it does not define
    # (Vestel, Webasto NEXT): reads never cover unused registers (max_gap is forced to 0).
    rejects_gaps: bool = False

    @property
    def effective_max_gap(self) -> int:
        return 0 if self.rejects_gaps else self.max_gap

    # Other serial settings (baud rate, parity, stop bits) the model is said to leave the factory
    # with, where sources disagree: `evgw scan` tries them when the defaults find nothing.
    serial_alternatives: tuple[tuple[int, str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Profile:
    slug: str
    kind: DeviceKind
    manufacturer: str
    model: str
    description: str = ""
    sources: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()
    connection: ConnectionSpec = field(default_factory=ConnectionSpec)
    registers: tuple[RegisterSpec, ...] = ()
    state: StateSpec | None = None
    tag: TagSpec | None = None
    enable: ControlSpec | None = None
    current_limit: CurrentLimitSpec | None = None
    heartbeat: HeartbeatSpec | None = None
    phases: ControlSpec | None = None
    identify: IdentifySpec | None = None
    # How the gateway pauses charging: "enable" (the enable register or coil) or
    # "current_limit" (write the limit's ``disable`` value); None: it cannot pause.
    pause: str | None = None
    on_connect: tuple[OnConnectWrite, ...] = ()
    # Session energy counter semantics: "plug" resets on plug-in, "never" is not to be trusted.
    session_energy_resets: str = "plug"
    # Raw register values the simulator writes to show each status (see docs/profiles.md).
    simulate_states: dict[ChargerStatus, dict[str, int | float | str]] = field(default_factory=dict)
    simulate_identity: dict[str, int | float | str] = field(default_factory=dict)
    path: str = ""

    def register(self, name: str) -> RegisterSpec:
        for reg in self.registers:
            if reg.name == name:
                return reg
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(reg.name == name for reg in self.registers)

    @property
    def has_lifetime_energy(self) -> bool:
        return self.has("energy_wh")

    @property
    def pause_method(self) -> str | None:
        """``pause`` as written, else the enable control when there is one, else the current
        limit's disable value; None when the device cannot be paused."""
        if self.pause is not None:
            return self.pause
        if self.enable is not None:
            return "enable"
        if self.current_limit is not None and self.current_limit.disable is not None:
            return "current_limit"
        return None
