"""The command-line side of the Modbus room: ``evgw read`` (one decoded poll of a configured
device) and ``evgw scan`` (what answers where), their output and exit codes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from gateway.errors import DeviceError, UsageError
from gateway.modbus.bus import BusPool
from gateway.modbus.driver import DeviceDriver
from gateway.modbus.scan import converter_hint, parse_units, scan
from gateway.model import DeviceSample
from gateway.profiles import Profile

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

__all__ = ["EngineUsageError", "read_device_once", "run_read", "run_scan"]


async def read_device_once(
    config: GatewayConfig, device_id: str, profiles: Mapping[str, Profile]
) -> DeviceSample:
    """Poll one configured device once (``evgw read``). Raises KeyError for an unknown device or
    driver; device faults come back as an offline sample."""
    dev = config.device(device_id)
    profile = profiles[dev.driver]
    async with BusPool.from_config(config) as pool:
        return await DeviceDriver(dev, profile, pool.bus_for(dev)).poll()


async def run_read(config: GatewayConfig, device_id: str, *, as_json: bool = False) -> int:
    """``evgw read``: print one decoded poll; exit 1 when the device does not answer."""
    from gateway.profiles import load_profiles

    profiles = load_profiles(config.drivers_path)
    try:
        dev = config.device(device_id)
    except KeyError:
        raise _usage(f"no device {device_id!r} in the config") from None
    if dev.driver == "ocpp":
        raise _usage(
            f"device {device_id} is an OCPP charge point: it reports by itself to `evgw run` "
            "(its statuses and meter values are in the log and on the status topic)"
        )
    if dev.driver not in profiles:
        raise _usage(f"device {device_id}: no profile named {dev.driver!r}")
    sample = await read_device_once(config, device_id, profiles)
    if as_json:
        print(
            json.dumps(
                {
                    "device_id": sample.device_id,
                    "ts": sample.ts,
                    "online": sample.online,
                    "error": sample.error,
                    "iec": sample.iec.value if sample.iec else None,
                    "status": sample.status.value if sample.status else None,
                    "tag": sample.tag,
                    "values": dict(sample.values),
                },
                indent=2,
            )
        )
    else:
        state = "online" if sample.online else f"OFFLINE: {sample.error}"
        print(f"{sample.device_id} ({dev.driver}): {state}")
        if sample.status is not None:
            print(
                f"  status  {sample.status.value} (IEC {sample.iec.value if sample.iec else '?'})"
            )
        if sample.tag is not None:
            print(f"  tag     {sample.tag}")
        specs = {r.name: r for r in profiles[dev.driver].registers}
        for name, value in sample.values.items():
            unit = specs[name].unit if name in specs else ""
            print(f"  {name:<24} {value!s:>14} {unit}")
    return 0 if sample.online else 1


class EngineUsageError(UsageError):
    """A bad argument to ``evgw read`` / ``evgw scan`` (exit 2, one line)."""


def _usage(message: str) -> Exception:
    return EngineUsageError(message)


async def run_scan(
    *,
    tcp: str | None = None,
    serial: str | None = None,
    bauds: Sequence[int] | None = None,
    units: str | None = None,
    timeout_s: float | None = None,
    drivers_path: str | None = None,
) -> int:
    """``evgw scan``: print matches and a config snippet; exit 1 when nothing answered."""
    from gateway.profiles import load_profiles

    profiles = load_profiles(drivers_path)
    try:
        unit_list = parse_units(units)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    try:
        result = await scan(
            profiles, tcp=tcp, serial=serial, bauds=bauds, units=unit_list, timeout_s=timeout_s
        )
    except DeviceError as err:
        print(f"scan: cannot reach {err.device_id}: {err.reason} ({err.detail})")
        return 1
    for error in result.errors:
        print(f"scan {result.endpoint}: skipped {error}")
    if not result.matches:
        print(f"scan {result.endpoint}: no known device found ({result.probed} probes)")
        if result.tcp is not None:
            print(converter_hint(profiles))
        return 1
    print(f"scan {result.endpoint}: {len(result.matches)} device(s)")
    for m in result.matches:
        serial_note = f" @ {m.baudrate} {m.parity}{m.stopbits}" if m.baudrate else ""
        if m.alternative:
            serial_note += " (not the profile's default: keep these line settings)"
        print(f"  unit {m.unit:>3}  {m.slug:<24} {m.value!s}{serial_note}")
    print()
    print(result.config_snippet(), end="")
    return 0
