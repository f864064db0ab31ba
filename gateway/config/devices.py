"""Checks between the keys of devices, buses and endpoints: addressing (host or bus, units,
transports a profile supports), defaults taken from the profile and the endpoint, meter
references and OCPP charge points."""

from __future__ import annotations

from typing import Any

from gateway.config.context import (
    Ctx,
    choices_hint,
    first_line,
    get,
    ids,
    keys_at,
    section_items,
    unknown,
)
from gateway.config.values import OCPP_DRIVER, serial_answer_timeout_s
from gateway.model import DeviceKind
from gateway.profiles import Profile
from gateway.schema import suggest
from gateway.yamlpos import PathT

__all__ = ["check_buses", "check_devices"]


def check_buses(ctx: Ctx, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    items = section_items(raw, "buses")
    first = ids(ctx, items, ("buses",), "bus")
    for i, bus in items:
        path: PathT = ("buses", i)
        present = keys_at(ctx, path)
        if bus.get("type") == "rtu":
            if "port" not in present:
                ctx.add(
                    (*path, "port"), "an rtu bus needs port (the serial device, e.g. /dev/ttyUSB0)"
                )
            ctx.misplaced(
                path,
                present,
                ("host", "tcp_port"),
                lambda name: f"{name} is for rtu-over-tcp buses; an rtu bus uses port",
            )
        elif bus.get("type") == "rtu-over-tcp":
            if "host" not in present:
                ctx.add((*path, "host"), "an rtu-over-tcp bus needs host (the serial server)")
            if "port" in present:
                ctx.add(
                    (*path, "port"),
                    "port is the serial device of an rtu bus; "
                    "an rtu-over-tcp bus uses host and tcp_port",
                    key=True,
                )
    return {ident: dict(raw["buses"][i]) for ident, i in first.items()}


_SERIAL_WAYS = (
    "a serial (RTU) device is reached in one of three ways: bus: of an rtu bus (an RS-485 port "
    "on this machine), bus: of an rtu-over-tcp bus (a transparent serial server), or "
    "host:/port:/unit: of a Modbus TCP gateway (protocol converter such as Waveshare, USR, "
    "Elfin, Moxa MGate: Modbus TCP in, RTU out)"
)
_THREE_WAYS = f"a Modbus TCP device is reached by host: (port:, unit:); {_SERIAL_WAYS}"


def _ways_for(profile: Profile) -> str:
    if "tcp" in profile.connection.transports:
        return "it is a Modbus TCP device: give it host: (port:, unit:), not bus:"
    return _SERIAL_WAYS


def _reachable(profile: Profile) -> set[str]:
    """How a profile's device can be reached. A serial (RTU) device also works through any
    transparent serial server (rtu-over-tcp) and through a Modbus TCP gateway ("tcp-gateway":
    MBAP in, RTU out), whatever its profile lists: both carry the same RTU requests."""
    out = set(profile.connection.transports)
    if "rtu" in out:
        out |= {"rtu-over-tcp", "tcp-gateway"}
    if "rtu-over-tcp" in out:
        out.add("tcp-gateway")
    return out


def _endpoint_timeout_s(endpoint: dict[str, Any] | None, serial: Profile | None) -> float | None:
    """Default answer timeout of a device at a Modbus TCP address: the endpoint's ``timeout``,
    else sized for the serial line behind (the endpoint's baud rate, else the profile's when
    ``serial`` is a serial profile reached through a gateway); None: the usual default."""
    if endpoint is not None and "timeout" in endpoint:
        return float(endpoint["timeout"])
    if endpoint is not None and "baudrate" in endpoint:
        return serial_answer_timeout_s(int(endpoint["baudrate"]))
    if serial is not None:
        return serial_answer_timeout_s(serial.connection.baudrate)
    return None


def _check_endpoints(
    ctx: Ctx, raw: dict[str, Any]
) -> dict[tuple[Any, Any], tuple[int, dict[str, Any]]]:
    """(host, port) -> (index, endpoint); reports duplicates."""
    out: dict[tuple[Any, Any], tuple[int, dict[str, Any]]] = {}
    for i, ep in section_items(raw, "endpoints"):
        if "host" not in ep:
            continue
        key = (ep["host"], ep.get("port", 502))
        if key in out:
            first = first_line(ctx, ("endpoints", out[key][0]))
            ctx.add(
                ("endpoints", i, "host"),
                f"duplicate endpoint {key[0]}:{key[1]} (first defined at line {first})",
            )
        else:
            out[key] = (i, ep)
    return out


def check_devices(
    ctx: Ctx,
    raw: dict[str, Any],
    buses: dict[str, dict[str, Any]],
    profiles: dict[str, Profile] | None,
) -> None:
    endpoints_at = _check_endpoints(ctx, raw)
    endpoints = {key: ep for key, (_, ep) in endpoints_at.items()}
    items = section_items(raw, "devices")
    first = ids(ctx, items, ("devices",), "device")
    kinds: dict[str, str] = {}  # device id -> "charger" | "meter"
    addresses: dict[tuple[Any, ...], str] = {}
    used_endpoints: set[tuple[Any, Any]] = set()
    charge_points: dict[tuple[str, int], int] = {}
    for i, dev in items:
        path: PathT = ("devices", i)
        present = keys_at(ctx, path)
        profile = None
        if dev.get("driver") == OCPP_DRIVER:
            if first.get(dev.get("id", "")) == i:
                kinds[dev["id"]] = str(DeviceKind.CHARGER)
            _check_ocpp_device(ctx, raw, path, dev, present, charge_points)
            if "tariff" in dev and isinstance(dev["tariff"], str):
                ctx.tariff_refs.append(((*path, "tariff"), dev["tariff"]))
            continue
        ctx.misplaced(
            path,
            present,
            ("charge_point_id", "meter_public_key"),
            lambda name: f"{name} is for OCPP chargers (driver: {OCPP_DRIVER})",
        )
        if profiles is not None and "driver" in dev:
            profile = profiles.get(dev["driver"])
            if profile is None:
                hint = suggest(dev["driver"], profiles) or " (evgw drivers lists them)"
                ctx.add((*path, "driver"), f"unknown driver '{dev['driver']}'{hint}")
            elif first.get(dev.get("id", "")) == i:
                kinds[dev["id"]] = str(profile.kind)
        if profile is not None:
            dev.setdefault("unit", profile.connection.default_unit)
            if "host" in present:
                dev.setdefault("port", profile.connection.default_port)
        is_tcp = "host" in present
        if "host" in present and "bus" in present:
            ctx.add(
                (*path, "bus"),
                "set either host (Modbus TCP) or bus (serial line), not both",
                key=True,
            )
            continue
        if not is_tcp and "bus" not in present:
            ctx.add(path, f"needs host or bus: {_THREE_WAYS}")
            continue
        unit = dev.get("unit", 1)
        transports = _reachable(profile) if profile is not None else None
        if is_tcp:
            transport = "tcp"
            behind_gateway = profile is not None and "tcp" not in profile.connection.transports
            if behind_gateway:
                transport = "tcp-gateway"
                if not 1 <= unit <= 247:
                    ctx.add(
                        (*path, "unit"),
                        f"must be between 1 and 247 for a serial device behind a Modbus TCP "
                        f"gateway (its RS-485 address), got {unit}",
                    )
            elif 248 <= unit <= 254:
                ctx.add((*path, "unit"), f"must be between 0 and 247, or 255, got {unit}")
            host, port = dev.get("host"), dev.get("port", 502)
            key: tuple[Any, ...] = ("tcp", host, port, unit)
            where = f"at {host}:{port}"
            used_endpoints.add((host, port))
            if "timeout" not in present and profile is not None:
                timeout_s = _endpoint_timeout_s(
                    endpoints.get((host, port)), profile if behind_gateway else None
                )
                if timeout_s is not None:
                    dev["timeout"] = timeout_s
        else:
            if "port" in present:
                ctx.add(
                    (*path, "port"),
                    "port is for Modbus TCP devices (with host); "
                    "a device on a bus is reached through the bus",
                    key=True,
                )
            bus_id = dev.get("bus")
            bus = buses.get(bus_id) if bus_id else None
            buses_known = "buses" not in keys_at(ctx, ()) or "buses" in raw
            if bus_id and bus is None and buses_known:
                ctx.add((*path, "bus"), unknown("bus", bus_id, buses, "buses"))
            transport = bus.get("type", "rtu") if bus else "rtu"
            if bus is not None and "timeout" in bus and "timeout" not in present:
                dev["timeout"] = bus["timeout"]  # the bus's answer timeout; a device's own wins
            if unit == 0:
                ctx.add(
                    (*path, "unit"),
                    "unit 0 is the broadcast address of a serial bus: no device answers it",
                )
            elif unit > 247:
                ctx.add((*path, "unit"), f"must be between 1 and 247 on a serial bus, got {unit}")
            key = ("bus", bus_id, unit)
            where = f"on bus '{bus_id}'"
        if profile is not None and transports is not None and transport not in transports:
            ctx.add(
                (*path, "host" if is_tcp else "bus"),
                f"driver {profile.slug} does not support "
                f"{'Modbus TCP' if transport == 'tcp-gateway' else transport} (it supports "
                f"{', '.join(profile.connection.transports)}): {_ways_for(profile)}",
            )
        if key[1] is not None and "id" in dev:
            other = addresses.setdefault(key, dev["id"])
            if other != dev["id"]:
                ctx.add((*path, "unit"), f"unit {unit} {where} is already used by device '{other}'")
        if profile is not None and profile.kind is DeviceKind.METER:
            meter = f"'{dev.get('id')}' is a meter ({profile.slug})"

            def only_chargers(name: str, meter: str = meter) -> str:
                return f"only chargers take {name}; {meter}"

            ctx.misplaced(path, present, ("meter", "tariff", "max_current_a"), only_chargers)
        is_meter = profile is not None and profile.kind is DeviceKind.METER
        if "tariff" in dev and not is_meter and isinstance(dev["tariff"], str):
            ctx.tariff_refs.append(((*path, "tariff"), dev["tariff"]))
    for (host, port), (i, _ep) in endpoints_at.items():
        if (host, port) not in used_endpoints:
            hosts = sorted({str(h) for h, _ in used_endpoints})
            ctx.add(
                ("endpoints", i),
                f"no device uses {host}:{port}: set host: {host} (and port: {port}) on the "
                f"devices behind it{choices_hint(str(host), hosts, 'device hosts')}",
            )
    for i, dev in items:
        if "meter" in dev and kinds.get(dev.get("id", "")) != "meter":
            _check_meter_ref(
                ctx, ("devices", i, "meter"), dev["meter"], first, kinds, own=dev.get("id")
            )
    grid = raw.get("grid")
    if isinstance(grid, dict) and "meter" in grid:
        _check_meter_ref(ctx, ("grid", "meter"), grid["meter"], first, kinds, own=None)


def _check_ocpp_device(
    ctx: Ctx,
    raw: dict[str, Any],
    path: PathT,
    dev: dict[str, Any],
    present: set[str],
    charge_points: dict[tuple[str, int], int],
) -> None:
    """An OCPP charge point: reached by its own websocket, so no Modbus address."""

    def why(name: str) -> str:
        reason = (
            "an OCPP charger is billed from its own meter values (meter: is not supported "
            "for OCPP chargers yet)"
            if name == "meter"
            else "an OCPP charger connects to the gateway's ocpp: server by itself"
        )
        return f"{name} is for Modbus devices: {reason}"

    modbus_keys = ("host", "port", "bus", "unit", "poll_interval", "timeout", "meter")
    ctx.misplaced(path, present, modbus_keys, why)
    if "meter_public_key" in dev:
        from gateway.ocpp.ocmf import load_meter_key  # here: it needs cryptography

        try:
            load_meter_key(dev["meter_public_key"])
        except ValueError as exc:
            ctx.add((*path, "meter_public_key"), f"not a meter public key: {exc}")
    cp_id = dev.get("charge_point_id")
    if cp_id is None:
        if "charge_point_id" not in present:
            ctx.add(path, "needs charge_point_id: the identity the charger connects with")
    elif (cp_id, dev.get("connector", 1)) in charge_points:
        other = get(ctx, ("devices", charge_points[(cp_id, dev.get("connector", 1))], "id"))
        ctx.add(
            (*path, "charge_point_id"),
            f"connector {dev.get('connector', 1)} of charge point '{cp_id}' is already device "
            f"'{other}' (a second connector needs connector: 2)",
        )
    else:
        charge_points[(cp_id, dev.get("connector", 1))] = path[1] if isinstance(path[1], int) else 0
    if "ocpp" not in keys_at(ctx, ()):
        ctx.add(
            (*path, "driver"),
            'an OCPP charger needs the ocpp: section (ocpp: {listen: "0.0.0.0:9000"})',
        )
    ocpp = raw.get("ocpp")
    if isinstance(ocpp, dict) and cp_id is not None and ocpp.get("security_profile", 0) >= 1:
        passwords = ocpp.get("passwords")
        if isinstance(passwords, dict) and cp_id not in passwords:
            ctx.add(
                (*path, "charge_point_id"),
                f"no password for '{cp_id}' in ocpp.passwords_file (security_profile "
                f"{ocpp.get('security_profile')} needs one per charge point)",
            )


def _check_meter_ref(
    ctx: Ctx,
    path: PathT,
    meter: str,
    devices: dict[str, int],
    kinds: dict[str, str],
    own: str | None,
) -> None:
    # With profiles loaded only real meters are offered; without them every device id.
    meters = [d for d in devices if kinds.get(d) == "meter"] if kinds else list(devices)
    if meter == own:
        ctx.add(path, "a charger cannot be its own meter")
    elif meter not in devices:
        ctx.add(
            path,
            unknown("meter device", meter, meters, "meters"),
        )
    elif kinds.get(meter) == "charger":
        driver = get(ctx, ("devices", devices[meter], "driver"))
        ctx.add(path, f"'{meter}' is a charger ({driver}), not a meter")
