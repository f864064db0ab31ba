"""Device profiles: the data that tells the generic Modbus engine how to talk to one device model.

A profile is a YAML file in ``drivers/`` (shipped in the wheel) or in a site's ``drivers_path``.
The format is documented in docs/profiles.md; this module holds its typed form and the loader.
Nothing here does I/O on a bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from gateway.model import ChargerStatus, DeviceKind, IecState

__all__ = [
    "CANONICAL_QUANTITIES",
    "Condition",
    "ConnectionSpec",
    "ControlSpec",
    "CurrentLimitSpec",
    "DataType",
    "HeartbeatSpec",
    "IdentifySpec",
    "Profile",
    "RegisterSpec",
    "StateRule",
    "StateSpec",
    "Table",
    "TagSpec",
    "WordOrder",
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


class Table(StrEnum):
    HOLDING = "holding"  # read FC03, write FC06/FC16
    INPUT = "input"  # read FC04
    COIL = "coil"  # read FC01, write FC05/FC15
    DISCRETE = "discrete"  # read FC02

    @property
    def read_function(self) -> int:
        return {"holding": 3, "input": 4, "coil": 1, "discrete": 2}[self.value]

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)


class DataType(StrEnum):
    U16 = "u16"
    I16 = "i16"
    U32 = "u32"
    I32 = "i32"
    U64 = "u64"
    I64 = "i64"
    F32 = "f32"
    F64 = "f64"
    ASCII = "ascii"  # two characters per register, high byte first, NUL/space padded
    ASCII1 = "ascii1"  # one character per register (UTF-16BE code unit)
    HEX = "hex"  # raw bytes shown as upper-case hex
    BOOL = "bool"  # one coil / discrete input

    @property
    def is_text(self) -> bool:
        return self in (DataType.ASCII, DataType.ASCII1, DataType.HEX)

    @property
    def fixed_count(self) -> int | None:
        """Registers one value occupies, or None where ``count`` says (text types)."""
        return _FIXED_COUNT.get(self)


_FIXED_COUNT = {
    DataType.U16: 1,
    DataType.I16: 1,
    DataType.U32: 2,
    DataType.I32: 2,
    DataType.U64: 4,
    DataType.I64: 4,
    DataType.F32: 2,
    DataType.F64: 4,
    DataType.BOOL: 1,
}


class WordOrder(StrEnum):
    ABCD = "ABCD"  # high word first (big-endian)
    CDAB = "CDAB"  # low word first


@dataclass(frozen=True, slots=True)
class RegisterSpec:
    """Where a value lives and how its raw words become a value in the named unit.

    ``value = raw * scale + offset`` for numbers; ``byte`` and ``mask`` are applied to the raw
    integer before scaling; raw values in ``sentinels`` (and NaN floats) mean "not available".
    """

    name: str
    table: Table
    address: int
    type: DataType
    count: int  # registers (or bits) occupied
    word_order: WordOrder = WordOrder.ABCD
    byte: str | None = None  # "high" | "low": take one byte of a u16
    mask: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    sentinels: frozenset[int] = frozenset()
    every_s: float | None = None  # poll less often than the device interval
    note: str = ""

    @property
    def end(self) -> int:
        return self.address + self.count


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
        if self.min is not None or self.max is not None or self.bits_all is not None or self.bits_any is not None:
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

    def holds(self, values: dict[str, object]) -> bool:
        return all(c.holds(values.get(c.register)) for c in self.when)


@dataclass(frozen=True, slots=True)
class StateSpec:
    """Device state codes -> IEC 61851 state and CONTRACT status; first matching rule wins."""

    rules: tuple[StateRule, ...]
    default_iec: IecState = IecState.E
    default_status: ChargerStatus = ChargerStatus.FAULTED

    def classify(self, values: dict[str, object]) -> tuple[IecState, ChargerStatus]:
        for rule in self.rules:
            if rule.holds(values):
                return rule.iec, rule.status
        return self.default_iec, self.default_status


@dataclass(frozen=True, slots=True)
class TagSpec:
    """Where the charger shows the identification tag (RFID UID / OCPP idTag) of the session."""

    register: str  # name of a text register in ``registers``
    empty: frozenset[str] = frozenset({""})  # values that mean "no tag"
    upper: bool = True  # normalise to upper case (UIDs are compared case-insensitively)


@dataclass(frozen=True, slots=True)
class ControlSpec:
    """A register (or coil) the gateway writes. ``function`` is 5, 6, 15 or 16."""

    register: RegisterSpec
    function: int
    on: int | float | None = None  # enable control: raw value meaning enabled
    off: int | float | None = None


@dataclass(frozen=True, slots=True)
class CurrentLimitSpec:
    """Current setpoint. ``unit`` is how the device counts: "A", "0.1A", "mA" or "W" (float
    types carry amps as floats). ``disable`` is the raw value that stops charging."""

    control: ControlSpec
    unit: str
    min_a: float = 6.0
    max_a: float = 32.0
    disable: int | float | None = 0


@dataclass(frozen=True, slots=True)
class HeartbeatSpec:
    """A register the device needs rewritten more often than its timeout, or it falls back to
    its failsafe current (or stops)."""

    control: ControlSpec
    value: int | float
    period_s: float
    timeout_s: float
    failsafe_current_a: float = 0.0


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
