"""Identify devices: probe unit ids on a TCP endpoint or a serial line with each profile's
``identify`` register (``evgw scan``), and write the config snippet for what answered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import DeviceError
from gateway.modbus.bus import ModbusBus, SerialBus, TcpBus
from gateway.modbus.codec import CodecError, decode
from gateway.model import Value
from gateway.profiles import Profile

__all__ = ["ScanMatch", "ScanResult", "converter_hint", "parse_units", "scan"]


@dataclass(frozen=True, slots=True)
class ScanMatch:
    unit: int  # unit id to put in the config
    slug: str
    value: Value  # what the identify register said
    baudrate: int | None = None
    parity: str | None = None
    stopbits: int | None = None
    alternative: bool = False  # found at a disputed factory setting, not the profile's default


@dataclass(slots=True)
class ScanResult:
    endpoint: str
    tcp: tuple[str, int] | None = None
    serial: str | None = None
    matches: list[ScanMatch] = field(default_factory=list)
    probed: int = 0  # requests sent
    errors: list[str] = field(default_factory=list)  # line settings that could not be opened

    def config_snippet(self) -> str:
        """YAML to paste into a site config (CONTRACT section 3 keys)."""
        lines: list[str] = []
        if self.serial is not None:
            settings = sorted({(m.baudrate, m.parity, m.stopbits) for m in self.matches}, key=str)
            bus_ids: dict[tuple[Any, Any, Any], str] = {}
            if settings:
                lines.append("buses:")
            for i, (baud, parity, stopbits) in enumerate(settings, 1):
                bus_id = "rs485-1" if len(settings) == 1 else f"rs485-{i}"
                bus_ids[(baud, parity, stopbits)] = bus_id
                lines.append(
                    f"  - {{id: {bus_id}, type: rtu, port: {self.serial}, baudrate: {baud}, "
                    f"parity: {parity}, stopbits: {stopbits}}}"
                )
            if self.matches:
                lines.append("devices:")
            for m, others in self._one_per_unit():
                bus_id = bus_ids[(m.baudrate, m.parity, m.stopbits)]
                lines.append(
                    f"  - {{id: {m.slug}-{m.unit}, driver: {m.slug}, bus: {bus_id}, "
                    f"unit: {m.unit}}}" + _alternatives(others)
                )
        elif self.tcp is not None and self.matches:
            host, port = self.tcp
            lines.append("devices:")
            for m, others in self._one_per_unit():
                lines.append(
                    f"  - {{id: {m.slug}-{m.unit}, driver: {m.slug}, host: {host}, "
                    f"port: {port}, unit: {m.unit}}}" + _alternatives(others)
                )
        return "\n".join(lines) + ("\n" if lines else "")

    def _one_per_unit(self) -> list[tuple[ScanMatch, list[str]]]:
        """One device per unit id: a unit that several profiles recognise (SDM120 and SDM630
        share their identification register) is one device; the others are named as
        alternatives, since two devices on one unit would not pass check-config."""
        groups: dict[tuple[int, Any, Any, Any], list[ScanMatch]] = {}
        for m in self.matches:
            groups.setdefault((m.unit, m.baudrate, m.parity, m.stopbits), []).append(m)
        return [(ms[0], [m.slug for m in ms[1:]]) for ms in groups.values()]


def _alternatives(slugs: list[str]) -> str:
    return f"  # or: {', '.join(slugs)} (same identification)" if slugs else ""


def parse_units(text: str | None) -> list[int] | None:
    """ "1-10", "1,2,255", "1-3,200" -> sorted unit ids; None for None."""
    if text is None or not text.strip():
        return None
    units: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if lo > hi:
                raise ValueError(f"bad unit range {part!r}")
            units.update(range(lo, hi + 1))
        elif part:
            units.add(int(part))
    bad = [u for u in units if not 0 <= u <= 255]
    if bad:
        raise ValueError(f"unit ids out of 0..255: {bad}")
    return sorted(units)


# Exceptions a Modbus TCP gateway (converter) answers for a serial unit nobody answers as:
# 0x0A "gateway path unavailable", 0x0B "gateway target device failed to respond" (Modbus
# Application Protocol Specification V1.1b3, section 7, MODBUS Exception Codes).
_NOBODY_THERE = frozenset({0x0A, 0x0B})


def _identified(profile: Profile, value: Value) -> bool:
    ident = profile.identify
    assert ident is not None
    if value is None:
        return False
    if ident.pattern is not None and not re.search(ident.pattern, str(value)):
        return False
    if ident.min is not None or ident.max is not None:
        if isinstance(value, str):
            return False
        if ident.min is not None and value < ident.min:
            return False
        if ident.max is not None and value > ident.max:
            return False
    return not (isinstance(value, str) and value == "")


async def _probe(
    bus: ModbusBus,
    profiles: Sequence[Profile],
    units: Sequence[int],
    timeout_s: float,
    result: ScanResult,
) -> list[tuple[int, Profile, Value]]:
    """Try each profile's identify register on each unit. A unit that times out, or that a
    converter reports unreachable, is absent for this bus setting: the remaining profiles are
    not tried on it."""
    found: list[tuple[int, Profile, Value]] = []
    station_done: set[tuple[str, int]] = set()
    for unit in units:
        for profile in profiles:
            ident = profile.identify
            assert ident is not None
            probe_unit = ident.unit if ident.unit is not None else unit
            if ident.unit is not None:
                # A station-level identity: probe it once, report the profile's default unit.
                if (profile.slug, probe_unit) in station_done or unit != units[0]:
                    continue
                station_done.add((profile.slug, probe_unit))
            reg = ident.register
            result.probed += 1
            try:
                words = await bus.read(
                    probe_unit,
                    reg.table,
                    reg.address,
                    reg.count,
                    timeout_s,
                    gap_s=profile.connection.inter_request_delay_s,
                )
            except DeviceError as err:
                if ident.unit is None:
                    if err.reason == "connect_failed":
                        raise
                    if err.reason == "timeout" or err.exception_code in _NOBODY_THERE:
                        break  # nobody at this unit id
                continue
            try:
                value = decode(reg, words)
            except CodecError:
                continue
            if _identified(profile, value):
                report_unit = profile.connection.default_unit if ident.unit is not None else unit
                found.append((report_unit, profile, value))
    return found


async def scan(
    profiles: Mapping[str, Profile],
    *,
    tcp: str | None = None,
    serial: str | None = None,
    bauds: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
    timeout_s: float | None = None,
) -> ScanResult:
    """Probe unit ids on a TCP endpoint (``HOST[:PORT]``) or a serial line and name the
    profiles whose ``identify`` register matches.

    Without ``units``: on TCP the units the profiles name (default and identify units) and 1;
    on serial 1-247. Without ``bauds``, a serial line is tried at each serial setting
    (baud rate, parity, stop bits) that an RTU profile names, then a model not found at its
    defaults at its ``serial_alternatives``. Default timeout: 0.3 s a request on a serial line,
    1 s over TCP (a Modbus TCP gateway answers for a silent unit only after its own timeout; a
    late answer would land on the next probe).
    """
    candidates = [p for _, p in sorted(profiles.items()) if p.identify is not None]
    if (tcp is None) == (serial is None):
        raise ValueError("scan needs exactly one of tcp or serial")
    if tcp is not None:
        host, _, port_text = tcp.rpartition(":") if ":" in tcp else (tcp, "", "")
        port = int(port_text) if port_text else 502
        # Every profile: RTU-only devices often sit behind a Modbus TCP gateway.
        unit_list = (
            list(units) if units else sorted({1} | {p.connection.default_unit for p in candidates})
        )
        result = ScanResult(f"tcp://{host}:{port}", tcp=(host, port))
        tcp_timeout_s = 1.0 if timeout_s is None else timeout_s
        bus: ModbusBus = TcpBus(host, port, connect_timeout_s=max(tcp_timeout_s, 1.0))
        try:
            probed = await _probe(bus, candidates, unit_list, tcp_timeout_s, result)
            for unit, profile, value in probed:
                result.matches.append(ScanMatch(unit, profile.slug, value))
        finally:
            await bus.close()
        return result
    assert serial is not None
    rtu = [p for p in candidates if "rtu" in p.connection.transports]
    unit_list = list(units) if units else list(range(1, 248))
    result = ScanResult(f"serial://{serial}", serial=serial)
    settings: dict[tuple[int, str, int], list[Profile]] = {}
    for p in rtu:
        c = p.connection
        for baud in bauds or [c.baudrate]:
            settings.setdefault((baud, c.parity, c.stopbits), []).append(p)
    tried = len(settings)
    timeout_s = 0.3 if timeout_s is None else timeout_s
    await _scan_settings(serial, settings, unit_list, timeout_s, result)
    # Where sources disagree on a model's factory settings (SDM120 2400 or 9600 baud, SDM630
    # 8N1 or 8E1), a model the defaults did not find is tried at the others.
    found = {m.slug for m in result.matches}
    retry: dict[tuple[int, str, int], list[Profile]] = {}
    for p in rtu:
        if p.slug in found:
            continue
        c = p.connection
        done = {(b, c.parity, c.stopbits) for b in bauds or [c.baudrate]}
        for baud, parity, stopbits in c.serial_alternatives:
            for b in bauds or [baud]:
                if (b, parity, stopbits) not in done:
                    retry.setdefault((b, parity, stopbits), []).append(p)
    if retry:
        tried += len(retry)
        await _scan_settings(serial, retry, unit_list, timeout_s, result, alternative=True)
    if not result.matches and result.errors and len(result.errors) == tried:
        raise DeviceError(result.endpoint, "connect_failed", "; ".join(result.errors))
    return result


async def _scan_settings(
    serial: str,
    settings: Mapping[tuple[int, str, int], Sequence[Profile]],
    units: Sequence[int],
    timeout_s: float,
    result: ScanResult,
    *,
    alternative: bool = False,
) -> None:
    for (baud, parity, stopbits), group in sorted(settings.items()):
        bus = SerialBus(serial, baud, parity, stopbits)
        try:
            for unit, profile, value in await _probe(bus, group, units, timeout_s, result):
                result.matches.append(
                    ScanMatch(unit, profile.slug, value, baud, parity, stopbits, alternative)
                )
        except DeviceError as err:
            # One setting the port refuses must not end the scan of the others.
            result.errors.append(f"{baud} {parity}{stopbits}: {err.reason} ({err.detail})")
        finally:
            await bus.close()


def converter_hint(profiles: Mapping[str, Profile]) -> str:
    """After an empty TCP scan: a Modbus TCP gateway's serial side is set in the converter, not
    by us; name the settings the serial profiles ship with (disputed ones included)."""
    settings: set[tuple[int, str, int]] = set()
    for p in profiles.values():
        c = p.connection
        if "rtu" in c.transports and p.identify is not None:
            settings.add((c.baudrate, c.parity, c.stopbits))
            settings.update(c.serial_alternatives)
    listed = ", ".join(f"{b} 8{par}{stop}" for b, par, stop in sorted(settings))
    return (
        "  serial devices behind a Modbus TCP gateway answer only when the converter's serial "
        f"side matches theirs; factory settings of the serial profiles: {listed}"
    )
