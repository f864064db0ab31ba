"""Behaviour of real devices that their register maps do not show, per device model.

The simulated models (gateway.sim.devices) switch these on by profile slug, whatever the profile
file says, so a profile that ignores a quirk fails against the simulator as it would on the
hardware. Each entry names where the behaviour was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.modbus.types import DataType, RegisterSpec, Table, WordOrder

__all__ = ["QUIRKS", "Quirks", "quirks_for"]


def _span(a: int, b: int) -> frozenset[int]:
    return frozenset(range(a, b + 1))


@dataclass(frozen=True, slots=True)
class Quirks:
    # Addresses the device does not define: a read that touches one answers exception 2.
    undefined: dict[Table, frozenset[int]] = field(default_factory=dict)
    # The tag register holds its text right-aligned behind leading NUL bytes.
    tag_right_aligned: bool = False
    # Standby: with HR ``standby_register`` != ``standby_off`` and no EV, the device stops
    # answering after ``standby_after_s`` simulated seconds; plugging an EV in wakes it. A power
    # cut resets the register to 0 (standby allowed).
    standby_register: int | None = None
    standby_off: int = 4
    standby_after_s: float = 300.0
    # Holding addresses whose writes are accepted and stored but change nothing.
    ignored_writes: frozenset[int] = frozenset()
    # (holding address, low byte): a status register whose low byte is not NUL.
    status_low_byte: tuple[int, int] | None = None
    # A resettable partial import counter next to the lifetime one (Carlo Gavazzi PAR).
    partial_energy: RegisterSpec | None = None
    source: str = ""


_WEBASTO_NEXT_GAPS = (
    frozenset({1003, 1005, 1007, 1009, 1011, 1022, 1023, 1026, 1027, 1030, 1031, 1034, 1035})
    | _span(1013, 1019)
    | frozenset({1503, 1506, 1507, 1510, 1511})
    | _span(1610, 1619)
)

# Between the input registers OpenEMS WebastoImpl (Webasto Unite = Vestel EVC04) reads.
_VESTEL_GAPS = frozenset(
    {1003, 1005, 1009, 1011, 1013, 1015, 1017, 1019, 1022, 1023, 1026, 1027, 1030, 1031,
     1034, 1035, 1506, 1507, 1510, 1511}
)

QUIRKS: dict[str, Quirks] = {
    "vestel-evc04": Quirks(
        undefined={Table.INPUT: _VESTEL_GAPS},
        source="evcc charger/vestel.go: currents 1008/1010/1012 and voltages 1014/1016/1018 are "
        "'non-continuous uint16 registers' read one by one; OpenEMS webasto.unite WebastoImpl: "
        "'does not support reading Multiple Registers in one task with gaps' (its task list "
        "gives the defined addresses)",
    ),
    "webasto-next": Quirks(
        undefined={Table.HOLDING: _WEBASTO_NEXT_GAPS},
        tag_right_aligned=True,
        source="OpenEMS EvcsWebastoNextImpl ('Cannot read the gaps', one task per value); "
        "evcc charger/helper.go bytesAsString trims leading NULs of 1600",
    ),
    "bender-cc613": Quirks(
        tag_right_aligned=True,
        source="evcc charger/helper.go bytesAsString (TrimLeft NUL) used for 720",
    ),
    "phoenix-ev-eth": Quirks(
        tag_right_aligned=True,
        source="evcc charger/phoenix-ev-eth.go identify: bytesAsString of HR 606",
    ),
    "phoenix-ev-eth-wallbe": Quirks(
        tag_right_aligned=True,
        source="evcc charger/phoenix-ev-eth.go identify: bytesAsString of HR 606",
    ),
    "phoenix-charx": Quirks(
        tag_right_aligned=True,
        ignored_writes=frozenset({1300}),
        status_low_byte=(1299, 0x31),
        source="evcc PR #23178 (1300 read-only with release by OCPP: pause with 1301 = 0); "
        "evcc phoenix-charx.go Status reads b[0] (high byte) of 1299; low byte 0x31 is a "
        "simulator choice (the map leaves it undefined)",
    ),
    "heidelberg-ec": Quirks(
        standby_register=258,
        source="evcc charger/heidelberg-ec.go ('disable standby to prevent comm loss', "
        "HR 258 = 4); HeidelBridge HeidelbergWallbox.cpp (0 = standby allowed, 4 = off); "
        "the 300 s before standby is a simulator choice",
    ),
    "carlo-gavazzi-em24": Quirks(
        partial_energy=RegisterSpec(
            "energy_partial_wh", Table.INPUT, 0x42, DataType.I32, 2, WordOrder.CDAB, scale=100.0
        ),
        source="VenusOS dbus-modbus-client carlo_gavazzi EM24RTU (0x3E TOT); OpenEMS "
        "MeterCarloGavazziEm24Impl (300063 kWh(+) TOT); mbmd reads 0x42 (PAR)",
    ),
}

_NONE = Quirks()


def quirks_for(slug: str) -> Quirks:
    return QUIRKS.get(slug, _NONE)
