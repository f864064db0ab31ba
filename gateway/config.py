"""Site configuration: typed form, schema, loader with line-numbered errors, JSON Schema export.

The typed dataclasses below are what the rest of the gateway sees. Field names follow CONTRACT
section 3; durations are seconds (``*_s``), sizes carry their unit.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import math
import os
import re
import zoneinfo
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, ConfigProblem, GatewayError
from gateway.model import AuthStatus, DeviceKind, Token, TokenType
from gateway.profiles import Profile, load_profiles
from gateway.tags import normalise_tag
from gateway.yamlpos import PathT, YamlDoc, load_yaml

__all__ = [
    "UNAUTHENTICATED_WARNING",
    "AuthConfig",
    "BillingConfig",
    "BusConfig",
    "DeviceConfig",
    "EndpointConfig",
    "GatewayConfig",
    "GridConfig",
    "OcppConfig",
    "Secret",
    "SiteConfig",
    "StorageConfig",
    "TlsConfig",
    "UplinkConfig",
    "UplinkReadingsConfig",
    "WebConfig",
    "check_config",
    "config_json_schema",
    "format_duration",
    "is_loopback",
    "load_config",
    "parse_duration",
    "serial_answer_timeout_s",
    "split_listen",
    "summarize",
]


class Secret(str):
    """A string that never shows itself in repr, logs or error messages."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"

    def reveal(self) -> str:
        return str.__str__(self)


@dataclass(frozen=True, slots=True)
class SiteConfig:
    id: str
    timezone: str = "UTC"
    name: str = ""


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: str
    max_size_mb: int = 512
    readings_retention_days: int = 30


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip server certificate verification: only when asked explicitly


@dataclass(frozen=True, slots=True)
class UplinkReadingsConfig:
    """What the cloud gets of the readings (the local buffer keeps every one): one reading per
    device and ``interval_s`` folded by ``mode`` (last | mean | min_max); 0 sends each one."""

    interval_s: float = 60.0
    mode: str = "last"


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    url: str  # mqtt://host[:port] or mqtts://host[:port]
    client_id: str
    topic_prefix: str = "evgw"
    username: str | None = None
    password: Secret | None = None
    tls: TlsConfig | None = None
    keepalive_s: float = 30.0
    session_expiry_s: float = 7 * 24 * 3600.0
    inflight_window: int = 50
    readings_qos: int = 0
    readings_batch: int = 500
    protocol: str = "auto"  # auto | 5 | 3.1.1
    command_key: str | None = None  # the cloud's Ed25519 public key (PEM file): signed commands
    command_max_age_s: float = 300.0  # a signed command older than this is refused
    readings: UplinkReadingsConfig = UplinkReadingsConfig()

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def host(self) -> str:
        rest = self.url.split("://", 1)[1].rstrip("/")
        return rest.rsplit(":", 1)[0] if ":" in rest else rest

    @property
    def port(self) -> int:
        rest = self.url.split("://", 1)[1].rstrip("/")
        if ":" in rest:
            return int(rest.rsplit(":", 1)[1])
        return 8883 if self.scheme == "mqtts" else 1883


@dataclass(frozen=True, slots=True)
class BusConfig:
    """A serial line (``rtu``) or a serial server reached over TCP (``rtu-over-tcp``)."""

    id: str
    type: str  # rtu | rtu-over-tcp
    port: str | None = None  # serial device path, for rtu
    host: str | None = None  # for rtu-over-tcp
    tcp_port: int = 502  # for rtu-over-tcp
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    timeout_s: float = 1.0


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """Settings of one Modbus TCP address that devices share, typically a Modbus TCP gateway
    (protocol converter: MBAP in, RTU out) with an RS-485 line behind it."""

    host: str
    port: int = 502
    baudrate: int | None = None  # of the serial line behind; sizes the default answer timeout
    inter_request_delay_s: float = 0.0  # silence after each answer before the next request
    timeout_s: float | None = None  # answer timeout of the devices behind it (default: sized)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    id: str
    driver: str
    host: str | None = None  # Modbus TCP
    port: int = 502
    bus: str | None = None  # RTU (or RTU over TCP) via a bus
    unit: int = 1
    poll_interval_s: float = 1.0
    timeout_s: float = 1.0
    meter: str | None = None  # billing sub-meter for a charger
    tariff: str | None = None
    connector: int = 1
    max_current_a: float | None = None  # site wiring limit for this charger
    charge_point_id: str | None = None  # driver ocpp: the identity in ws://HOST:PORT/{id}
    meter_public_key: str | None = None  # driver ocpp: hex DER key of its OCMF-signing meter


@dataclass(frozen=True, slots=True)
class AuthConfig:
    offline_policy: str = "allow_known"  # allow_known | allow_all | deny
    tokens: tuple[Token, ...] = ()
    request_timeout_s: float = 5.0
    cache_ttl_s: float = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class BillingConfig:
    """Which tariff prices a session: the user's group, else the charger's, else ``default``."""

    default_tariff: str | None = None
    groups: dict[str, str] = field(default_factory=dict)  # user group -> tariff id


@dataclass(frozen=True, slots=True)
class GridConfig:
    """Site grid limit: the sum of charger currents per phase stays below this."""

    max_current_a: float | None = None
    meter: str | None = None  # site meter measuring the whole connection
    # Lower limits the grid can set (gateway/gridlimit.py): validated mappings.
    schedule: tuple[dict[str, Any], ...] = ()
    signal: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class HomeAssistantConfig:
    """Home Assistant MQTT discovery (gateway/homeassistant.py); off unless enabled."""

    enabled: bool = False
    prefix: str = "homeassistant"  # Home Assistant's discovery prefix
    broker: str = "cloud"  # cloud: the uplink's broker; local: the broker at url
    url: str | None = None
    client_id: str | None = None
    username: str | None = None
    password: Secret | None = None
    interval_s: float = 5.0  # a charger's state is sent at most this often (status at once)

    @property
    def host(self) -> str:
        rest = (self.url or "").split("://", 1)[-1].rstrip("/")
        return rest.rsplit(":", 1)[0] if ":" in rest else rest

    @property
    def port(self) -> int:
        rest = (self.url or "").split("://", 1)[-1].rstrip("/")
        return int(rest.rsplit(":", 1)[1]) if ":" in rest else 1883


OCPP_DRIVER = "ocpp"  # a device with this driver is an OCPP-J charge point, not a Modbus profile


@dataclass(frozen=True, slots=True)
class OcppConfig:
    """The OCPP-J server OCPP chargers connect to (``ws://HOST:PORT/{charge_point_id}``).

    ``security_profile``: 0 none, 1 HTTP basic auth, 2 TLS with basic auth (OCPP 1.6 security
    whitepaper profiles). ``passwords`` maps a charge point id to its basic auth password.
    """

    listen: str = "0.0.0.0:9000"
    security_profile: int = 0
    passwords: dict[str, Secret] = field(default_factory=dict)
    cert_file: str | None = None
    key_file: str | None = None
    heartbeat_interval_s: float = 300.0
    call_timeout_s: float = 30.0

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The status page, API and metrics (gateway.web): off unless ``web:`` is set."""

    listen: str = "127.0.0.1:8080"  # HOST:PORT ([v6addr]:PORT)
    users_file: str | None = None  # name:scrypt-hash lines; required beyond localhost

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def local_only(self) -> bool:
        return is_loopback(self.host)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    site: SiteConfig
    storage: StorageConfig
    uplink: UplinkConfig | None = None
    buses: tuple[BusConfig, ...] = ()
    endpoints: tuple[EndpointConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    tariffs: dict[str, dict[str, Any]] = field(default_factory=dict)  # validated raw tariff data
    billing: BillingConfig = field(default_factory=BillingConfig)
    grid: GridConfig | None = None
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    ocpp: OcppConfig | None = None
    web: WebConfig | None = None
    drivers_path: str | None = None
    log_level: str = "info"
    source: str = ""  # file the config was loaded from

    @property
    def modbus_devices(self) -> tuple[DeviceConfig, ...]:
        """The devices the Modbus engine polls (every device but OCPP charge points)."""
        return tuple(d for d in self.devices if d.driver != OCPP_DRIVER)

    def device(self, device_id: str) -> DeviceConfig:
        for dev in self.devices:
            if dev.id == device_id:
                return dev
        raise KeyError(device_id)

    def bus(self, bus_id: str) -> BusConfig:
        for bus in self.buses:
            if bus.id == bus_id:
                return bus
        raise KeyError(bus_id)

    def endpoint(self, host: str, port: int) -> EndpointConfig | None:
        """The ``endpoints:`` entry of a Modbus TCP address, None when it has none."""
        for ep in self.endpoints:
            if ep.host == host and ep.port == port:
                return ep
        return None


# A serial line's worst request: FC03/04 of 125 registers answers 255 bytes, the request is 8;
# 11 bits a character (start, 8 data, parity or a second stop, stop).
_SERIAL_ROUND_TRIP_BYTES = 8 + 255
# Device turnaround (up to ~60 ms), the converter's own processing and the LAN.
_SERIAL_SLACK_S = 0.5


def serial_answer_timeout_s(baudrate: int) -> float:
    """Answer timeout for a device on a serial line of ``baudrate`` reached through a Modbus TCP
    gateway: the longest request and answer on the wire plus slack, never below the usual 1 s.
    9600 baud: 1 s; 2400 baud: 1.7 s; 1200 baud: 2.9 s."""
    wire_s = _SERIAL_ROUND_TRIP_BYTES * 11 / baudrate
    return max(1.0, round(wire_s + _SERIAL_SLACK_S, 1))


# =============================================================================================
# Loading and validation
#
# One schema table (``CONFIG_SCHEMA`` below) describes every key: its type, range, enum,
# whether it is required, its default and a description. The same table validates a file
# (collecting every problem with its line and column) and renders the JSON Schema for editors.
# Checks between keys (references, duplicates, addressing) run after the table, on the
# validated values, and report into the same list; nothing is ever clamped.
# =============================================================================================

_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()
_INVALID: Any = type("_Invalid", (), {"__repr__": lambda self: "<invalid>"})()

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
DURATION_PATTERN = r"^(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+$|^[0-9]+(?:\.[0-9]+)?$"


def parse_duration(value: str | float | int) -> float:
    """``"500ms"``, ``"1s"``, ``"2m"``, ``"1h"``, ``"1d"``, ``"1h30m"`` or a number of seconds ->
    seconds. Raises ``ValueError`` with a message fit for a person."""
    if isinstance(value, bool):
        raise ValueError(
            f"invalid duration {value!r}: expected a number of seconds or e.g. 500ms, 2m"
        )
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            seconds = sum(
                float(num) * _DURATION_UNITS[unit] for num, unit in _DURATION_PART_RE.findall(text)
            )
        else:
            raise ValueError(
                f"invalid duration {value!r}: use a number of seconds or a number with a unit "
                "(ms, s, m, h, d), e.g. 500ms or 2m"
            )
    else:
        raise ValueError(
            "invalid duration: expected a number of seconds or e.g. 500ms, 2m, "
            f"got {_describe(value)}"
        )
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: not a finite number")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest usual spelling: 0.1 -> ``100ms``, 120 -> ``2m``, 7200 -> ``2h``,
    1.5 -> ``1.5s``."""
    if seconds != 0 and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _describe(value: Any, *, secret: bool = False) -> str:
    """How a wrong value is shown in a message; secrets only by their kind."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "a boolean" if secret else ("true" if value else "false")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, datetime):
        return "a timestamp"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, int | float):
        return "a number" if secret else repr(value)
    if isinstance(value, str):
        if secret:
            return "a string"
        return repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    return type(value).__name__


def _suggest(word: object, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class _Ctx:
    doc: YamlDoc
    base_dir: Path
    # (path, tariff id) of every charger naming a tariff, checked with the tariffs
    tariff_refs: list[tuple[PathT, str]] = field(default_factory=list)

    def add(self, path: PathT, message: str, *, key: bool = False) -> None:
        self.doc.add(path, message, key=key)


class _Node:
    """One entry of the schema table."""

    what = "a value"  # for "expected ..." messages
    json_type: str | None = None

    def __init__(
        self,
        *,
        description: str = "",
        required: bool = False,
        default: Any = _MISSING,
        attr: str | None = None,
        secret: bool = False,
    ) -> None:
        self.description = description
        self.required = required
        self.default = default
        self.attr = attr  # dataclass field name; None: same as the key; "": not a field
        self.secret = secret

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        raise NotImplementedError

    def build(self, value: Any) -> Any:
        return value

    def type_error(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        ctx.add(path, f"expected {self.what}, got {_describe(value, secret=self.secret)}")
        return _INVALID

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.json_type:
            out["type"] = self.json_type
        if self.description:
            out["description"] = self.description
        if (
            self.default is not _MISSING
            and self.default is not None
            and not isinstance(self.default, tuple | dict)
        ):
            out["default"] = self.default
        return out


class _Str(_Node):
    what = "a string"
    json_type = "string"

    def __init__(
        self,
        *,
        pattern: str | None = None,
        hint: str = "",
        min_len: int = 1,
        max_len: int | None = None,
        check: Callable[[str], str | None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.pattern = re.compile(pattern) if pattern else None
        self.hint = hint
        self.min_len = min_len
        self.max_len = max_len
        self.check = check

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            ctx.add(path, "expected a string, got a number: quote the value")
            return _INVALID
        if not isinstance(value, str):
            return self.type_error(ctx, path, value)
        shown = "" if self.secret else f", got {_describe(value)}"
        if len(value) < self.min_len:
            ctx.add(path, "must not be empty")
            return _INVALID
        if self.max_len is not None and len(value) > self.max_len:
            ctx.add(path, f"must be at most {self.max_len} characters, got {len(value)}")
            return _INVALID
        if self.pattern is not None and not self.pattern.fullmatch(value):
            ctx.add(path, f"must be {self.hint or 'like ' + self.pattern.pattern}{shown}")
            return _INVALID
        if self.check is not None:
            message = self.check(value)
            if message:
                ctx.add(path, message)
                return _INVALID
        return value

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        if self.min_len:
            out["minLength"] = self.min_len
        if self.max_len is not None:
            out["maxLength"] = self.max_len
        if self.pattern is not None:
            out["pattern"] = f"^(?:{self.pattern.pattern})$"
        return out


class _Path(_Str):
    """A file system path; relative paths are relative to the config file's directory."""

    def __init__(self, *, must_be: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.must_be = must_be  # None | "file" (readable) | "dir"

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        text = super().validate(ctx, path, value)
        if text is _INVALID:
            return _INVALID
        resolved = (ctx.base_dir / Path(text).expanduser()).resolve()
        if self.must_be == "file":
            try:
                with resolved.open("rb"):
                    pass
            except OSError as exc:
                ctx.add(path, f"cannot read {resolved}: {exc.strerror}")
                return _INVALID
        elif self.must_be == "dir" and not resolved.is_dir():
            what = "not a directory" if resolved.exists() else "directory not found"
            ctx.add(path, f"{what}: {resolved}")
            return _INVALID
        return str(resolved)


class _Int(_Node):
    what = "an integer"
    json_type = "integer"

    def __init__(self, *, min: int | None = None, max: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.min = min
        self.max = max

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            return self.type_error(ctx, path, value)
        if not _in_range(ctx, path, value, self.min, self.max):
            return _INVALID
        return value

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        if self.min is not None:
            out["minimum"] = self.min
        if self.max is not None:
            out["maximum"] = self.max
        return out


def _in_range(
    ctx: _Ctx,
    path: PathT,
    value: float,
    lo: float | None,
    hi: float | None,
    show: Callable[[float], str] = str,
) -> bool:
    if lo is not None and hi is not None and not lo <= value <= hi:
        ctx.add(path, f"must be between {show(lo)} and {show(hi)}, got {show(value)}")
        return False
    if lo is not None and value < lo:
        ctx.add(path, f"must be at least {show(lo)}, got {show(value)}")
        return False
    if hi is not None and value > hi:
        ctx.add(path, f"must be at most {show(hi)}, got {show(value)}")
        return False
    return True


class _Num(_Node):
    what = "a number"
    json_type = "number"

    def __init__(self, *, min: float | None = None, max: float | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.min = min
        self.max = max

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return self.type_error(ctx, path, value)
        if not math.isfinite(value):
            ctx.add(path, f"must be a finite number, got {value}")
            return _INVALID
        if not _in_range(ctx, path, value, self.min, self.max, lambda v: f"{v:g}"):
            return _INVALID
        return float(value)

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        if self.min is not None:
            out["minimum"] = self.min
        if self.max is not None:
            out["maximum"] = self.max
        return out


class _Bool(_Node):
    what = "true or false"
    json_type = "boolean"

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if not isinstance(value, bool):
            return self.type_error(ctx, path, value)
        return value


class _Enum(_Node):
    def __init__(
        self, values: Sequence[str | int], *, convert: Callable[[Any], Any] | None = None, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.values = tuple(values)
        self.convert = convert

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        ok = any(type(value) is type(v) and value == v for v in self.values)
        if not ok:
            choices = ", ".join(str(v) for v in self.values)
            ctx.add(path, f"must be one of {choices}; got {_describe(value)}")
            return _INVALID
        return value

    def build(self, value: Any) -> Any:
        return self.convert(value) if self.convert else value

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        out["enum"] = list(self.values)
        return out


class _Duration(_Node):
    what = "a duration"

    def __init__(self, *, min: float | None = None, max: float | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.min = min
        self.max = max

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            ctx.add(path, str(exc))
            return _INVALID
        if not _in_range(ctx, path, seconds, self.min, self.max, format_duration):
            return _INVALID
        return seconds

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        number: dict[str, Any] = {"type": "number"}
        if self.min is not None:
            number["minimum"] = self.min
        if self.max is not None:
            number["maximum"] = self.max
        out["anyOf"] = [number, {"type": "string", "pattern": DURATION_PATTERN}]
        if "default" in out:
            out["default"] = format_duration(out["default"])
        return out


_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class _Timestamp(_Node):
    what = 'an RFC 3339 timestamp with a time zone like "2026-12-31T23:59:59Z"'
    json_type = "string"

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if isinstance(value, datetime):  # YAML reads unquoted timestamps itself
            if value.tzinfo is None:
                ctx.add(path, f"expected {self.what}, got one without a time zone")
                return _INVALID
            return value.timestamp()
        if not isinstance(value, str) or not _RFC3339_RE.fullmatch(value):
            return self.type_error(ctx, path, value)
        try:
            return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            ctx.add(path, f"invalid timestamp {value!r}: {exc}")
            return _INVALID

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        out["format"] = "date-time"
        return out


class _AnyMapping(_Node):
    """A mapping validated elsewhere (tariffs: ``gateway.billing.tariff.parse_tariff``)."""

    what = "a mapping"
    json_type = "object"

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if not isinstance(value, dict):
            return self.type_error(ctx, path, value)
        return value


class _Obj(_Node):
    what = "a mapping"
    json_type = "object"

    def __init__(
        self,
        fields: dict[str, _Node],
        *,
        target: type | None = None,
        build_when_absent: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.fields = fields
        self.target = target
        self.build_when_absent = build_when_absent

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if not isinstance(value, dict):
            return self.type_error(ctx, path, value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            node = self.fields.get(key) if isinstance(key, str) else None
            if node is None:
                ctx.add((*path, key), f"unknown key '{key}'{_suggest(key, self.fields)}", key=True)
                continue
            if item is None and _empty_ok(node):
                # `devices:` with nothing under it (all entries commented out) means none
                if not (isinstance(node, _Obj) and node.default is None):
                    out[key] = [] if isinstance(node, _List) else {}
                continue
            checked = node.validate(ctx, (*path, key), item)
            if checked is not _INVALID:
                out[key] = checked
        for key, node in self.fields.items():
            if node.required and key not in value:
                ctx.add((*path, key), f"missing required key '{key}'")
        return out

    def build(self, value: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for key, node in self.fields.items():
            attr = key if node.attr is None else node.attr
            if not attr:
                continue
            if key in value:
                kwargs[attr] = node.build(value[key])
            elif node.default is not _MISSING:
                default = copy.copy(node.default)
                if isinstance(node, _Enum) and default is not None:
                    default = node.build(default)  # enum defaults get the same type as values
                kwargs[attr] = default
            elif isinstance(node, _Obj) and node.build_when_absent:
                kwargs[attr] = node.build({})
        return self.target(**kwargs) if self.target else kwargs

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        out["properties"] = {key: _nullable(node) for key, node in self.fields.items()}
        required = [key for key, node in self.fields.items() if node.required]
        if required:
            out["required"] = required
        out["additionalProperties"] = False
        return out


def _empty_ok(node: _Node) -> bool:
    """Optional sections may be left empty (YAML null): the same as leaving them out."""
    return isinstance(node, _Obj | _List | _Map) and not node.required


def _nullable(node: _Node) -> dict[str, Any]:
    out = node.schema()
    if _empty_ok(node):
        out["type"] = [out["type"], "null"]
    return out


class _List(_Node):
    what = "a list"
    json_type = "array"

    def __init__(self, item: _Node, **kw: Any) -> None:
        super().__init__(**kw)
        self.item = item

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if not isinstance(value, list):
            return self.type_error(ctx, path, value)
        # Positions are kept (invalid items as _INVALID) so later checks can name the index.
        return [self.item.validate(ctx, (*path, i), item) for i, item in enumerate(value)]

    def build(self, value: list[Any]) -> Any:
        return tuple(self.item.build(v) for v in value)

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        out["items"] = self.item.schema()
        return out


class _Map(_Node):
    """A mapping of free keys (ids) to values of one kind."""

    what = "a mapping"
    json_type = "object"

    def __init__(self, value: _Node, *, key_pattern: str, key_hint: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.value = value
        self.key_pattern = re.compile(key_pattern)
        self.key_hint = key_hint

    def validate(self, ctx: _Ctx, path: PathT, value: Any) -> Any:
        if not isinstance(value, dict):
            return self.type_error(ctx, path, value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not self.key_pattern.fullmatch(key):
                ctx.add((*path, key), f"key must be {self.key_hint}, got {key!r}", key=True)
                continue
            checked = self.value.validate(ctx, (*path, key), item)
            if checked is not _INVALID:
                out[key] = checked
        return out

    def build(self, value: dict[str, Any]) -> Any:
        return {k: self.value.build(v) for k, v in value.items()}

    def schema(self) -> dict[str, Any]:
        out = super().schema()
        out["propertyNames"] = {"pattern": f"^(?:{self.key_pattern.pattern})$"}
        out["additionalProperties"] = self.value.schema()
        return out


# --- value checks used by the table ------------------------------------------------------

_ID_RE = r"[A-Za-z0-9_-]{1,64}"
# OCPP identities end up in a URL path and as the basic auth user name (no ':' there).
_CP_ID_RE = r"[A-Za-z0-9_.*-]{1,48}"
_CP_ID_HINT = "1 to 48 characters of A-Z a-z 0-9 _ . * -"
_ID_HINT = "1 to 64 characters of A-Z a-z 0-9 _ -"
_URL_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>[0-9]+))?/?"
)
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)


def _check_timezone(name: str) -> str | None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        hint = _suggest(name, _zones()) or " (use an IANA name like Europe/Berlin)"
        return f"unknown time zone {name!r}{hint}"
    return None


def _zones() -> set[str]:
    try:
        return zoneinfo.available_timezones()
    except OSError:  # pragma: no cover - no tz database to list
        return set()


def _check_url(url: str) -> str | None:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme and scheme not in ("mqtt", "mqtts"):
        return f"unsupported scheme '{scheme}': use mqtt:// or mqtts://"
    if "@" in url:  # never echo it: it may hold a password
        return "credentials do not belong in the url: use username and password_file"
    m = _URL_RE.fullmatch(url)
    if not scheme or m is None:
        return f"expected mqtt://host[:port] or mqtts://host[:port], got {url!r}"
    if m["port"] is not None and not 1 <= int(m["port"]) <= 65535:
        return f"port must be between 1 and 65535, got {int(m['port'])}"
    return None


def _check_topic_prefix(prefix: str) -> str | None:
    if "+" in prefix or "#" in prefix:
        return f"must not contain the MQTT wildcards + or #, got {prefix!r}"
    if prefix.startswith("/") or prefix.endswith("/"):
        return f"must not start or end with /, got {prefix!r}"
    if prefix.startswith("$"):
        return f"must not start with $ (reserved for broker topics), got {prefix!r}"
    if "\0" in prefix or "//" in prefix:
        return f"must not contain empty topic levels, got {prefix!r}"
    return None


def split_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6ADDR]:PORT"`` -> (host, port); ValueError when malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([A-Za-z0-9._-]*):([0-9]{1,5})", listen)
    if m is None:
        raise ValueError(f"expected HOST:PORT (IPv6 as [ADDR]:PORT), got {listen!r}")
    host = m[1] if m[1] is not None else m[3]
    port = int(m[2] if m[2] is not None else m[4])
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1 to 65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``: localhost, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_listen(listen: str) -> str | None:
    try:
        split_listen(listen)
    except ValueError as exc:
        return str(exc)
    return None


def _check_host(host: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9._:-]+", host) or "://" in host:
        return f"expected a host name or IP address, got {host!r}"
    return None


_ENV_REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*\}"


# --- the schema table --------------------------------------------------------------------

_TLS = _Obj(
    {
        "ca_file": _Path(
            must_be="file",
            description="CA certificates (PEM) to verify the broker; default: the system's",
        ),
        "cert_file": _Path(
            must_be="file", description="client certificate (PEM) for mutual TLS; needs key_file"
        ),
        "key_file": _Path(must_be="file", description="private key (PEM) of cert_file"),
        "insecure": _Bool(
            default=False, description="skip verifying the broker's certificate (tests only)"
        ),
    },
    target=TlsConfig,
    description="TLS settings for mqtts://",
)

_UPLINK = _Obj(
    {
        "url": _Str(
            required=True,
            check=_check_url,
            description="broker: mqtt://host[:port] or mqtts://host[:port]",
        ),
        "client_id": _Str(
            max_len=128,
            description="MQTT client id; default: evgw-<site id>",
            pattern=r"[^\s]+",
            hint="without spaces",
        ),
        "topic_prefix": _Str(
            default="evgw", check=_check_topic_prefix, description="first topic level(s)"
        ),
        "username": _Str(description="MQTT user name"),
        "password_file": _Path(attr="", description="file holding the MQTT password (one line)"),
        "password": _Str(
            pattern=_ENV_REF,
            hint='an environment variable reference like "${MQTT_PASSWORD}" '
            "(a literal password belongs in password_file)",
            secret=True,
            description='"${ENV_VAR}": the MQTT password from the environment',
        ),
        "tls": _TLS,
        "keepalive": _Duration(
            attr="keepalive_s", default=30.0, min=5.0, max=65535.0, description="MQTT keepalive"
        ),
        "session_expiry": _Duration(
            attr="session_expiry_s",
            default=7 * 24 * 3600.0,
            min=0.0,
            max=float(2**32 - 1),
            description="MQTT 5 session expiry: how long the broker keeps the session offline",
        ),
        "inflight_window": _Int(
            default=50,
            min=1,
            max=1000,
            description="QoS 1 messages awaiting PUBACK at once (20-100 is fastest)",
        ),
        "protocol": _Enum(
            ("auto", "5", "3.1.1"),
            default="auto",
            description="MQTT version: auto tries 5 and falls back to 3.1.1",
        ),
        "readings_qos": _Enum((0, 1), default=0, description="QoS of readings batches"),
        "readings_batch": _Int(
            default=500, min=1, max=10000, description="readings per message at most"
        ),
        "readings": _Obj(
            {
                "interval": _Duration(
                    attr="interval_s",
                    default=60.0,
                    min=0.0,
                    max=86400.0,
                    description="one reading per device and interval to the cloud "
                    "(0: every reading); the local buffer keeps every reading",
                ),
                "mode": _Enum(
                    ("last", "mean", "min_max"),
                    default="last",
                    description="last reading of the interval, numbers averaged, or the last "
                    "reading with <name>_min and <name>_max",
                ),
            },
            target=UplinkReadingsConfig,
            build_when_absent=True,
            description="readings sent to the cloud (default: one a minute per device, "
            "~6.5 MB a day for 10 chargers)",
        ),
        "command_key": _Path(
            must_be="file",
            description="the cloud's Ed25519 public key (PEM): commands and auth responses "
            "must then be signed with it, fresh and not replayed (docs/security.md)",
        ),
        "command_max_age": _Duration(
            attr="command_max_age_s",
            default=300.0,
            min=5.0,
            max=3600.0,
            description="signed commands and auth responses older than this (by their "
            "issued_at) are refused; needs a synchronised clock",
        ),
    },
    target=UplinkConfig,
    default=None,
    description="MQTT uplink; without it the gateway only buffers locally",
)

_BUS = _Obj(
    {
        "id": _Str(
            required=True, pattern=_ID_RE, hint=_ID_HINT, description="name devices use in bus:"
        ),
        "type": _Enum(
            ("rtu", "rtu-over-tcp"),
            required=True,
            description="serial line, or serial server over TCP",
        ),
        "port": _Str(description="serial device path (rtu), e.g. /dev/ttyUSB0"),
        "host": _Str(check=_check_host, description="serial server address (rtu-over-tcp)"),
        "tcp_port": _Int(
            default=502, min=1, max=65535, description="serial server TCP port (rtu-over-tcp)"
        ),
        "baudrate": _Enum(BAUDRATES, default=9600, description="bits per second"),
        "parity": _Enum(("N", "E", "O"), default="N", description="N none, E even, O odd"),
        "stopbits": _Enum((1, 2), default=1),
        "bytesize": _Enum((7, 8), default=8),
        "timeout": _Duration(
            attr="timeout_s", default=1.0, min=0.01, max=60.0, description="answer timeout"
        ),
    },
    target=BusConfig,
)

_ENDPOINT = _Obj(
    {
        "host": _Str(
            required=True,
            check=_check_host,
            description="the Modbus TCP address devices use in host: (e.g. a Modbus TCP gateway)",
        ),
        "port": _Int(default=502, min=1, max=65535, description="its TCP port"),
        "baudrate": _Enum(
            BAUDRATES,
            default=None,
            description="baud rate of the serial line behind a Modbus TCP gateway; sizes the "
            "default answer timeout of its devices",
        ),
        "inter_request_delay": _Duration(
            attr="inter_request_delay_s",
            default=0.0,
            min=0.0,
            max=10.0,
            description="silence after each answer before the next request (slow converters)",
        ),
        "timeout": _Duration(
            attr="timeout_s",
            default=None,
            min=0.01,
            max=60.0,
            description="answer timeout of the devices behind it (a device's own timeout wins); "
            "default: sized for the serial line (baudrate, else the profile's)",
        ),
    },
    target=EndpointConfig,
)

_DEVICE = _Obj(
    {
        "id": _Str(
            required=True,
            pattern=_ID_RE,
            hint=_ID_HINT,
            description="device id in topics and records",
        ),
        "driver": _Str(
            required=True,
            pattern=r"[a-z0-9-]+",
            hint="a profile slug like abb-terra-ac",
            description="profile slug (evgw drivers)",
        ),
        "host": _Str(
            check=_check_host,
            description="Modbus TCP address: the device's own, or the Modbus TCP gateway a "
            "serial device sits behind (not with bus)",
        ),
        "port": _Int(
            min=1, max=65535, description="Modbus TCP port; default: the profile's (usually 502)"
        ),
        "bus": _Str(
            pattern=_ID_RE, hint=_ID_HINT, description="id of the bus (RTU devices; not with host)"
        ),
        "unit": _Int(
            min=0,
            max=255,
            description="Modbus unit id: 1..247 on a bus or behind a Modbus TCP gateway, "
            "0..247 or 255 for a Modbus TCP device; default: the profile's",
        ),
        "poll_interval": _Duration(
            attr="poll_interval_s",
            default=1.0,
            min=0.1,
            max=3600.0,
            description="how often to read the device",
        ),
        "timeout": _Duration(
            attr="timeout_s",
            default=1.0,
            min=0.01,
            max=60.0,
            description="answer timeout; behind a Modbus TCP gateway the default is the "
            "endpoint's, or sized for the serial line",
        ),
        "meter": _Str(
            pattern=_ID_RE,
            hint=_ID_HINT,
            description="chargers: id of the meter device whose counter bills this charger",
        ),
        "tariff": _Str(
            pattern=_ID_RE,
            hint=_ID_HINT,
            description="chargers: tariff id of sessions on this charger",
        ),
        "connector": _Int(
            default=1, min=1, max=16, description="chargers: connector number in records"
        ),
        "max_current_a": _Num(
            min=6.0, max=1000.0, description="chargers: site wiring limit per phase"
        ),
        "charge_point_id": _Str(
            pattern=_CP_ID_RE,
            hint=_CP_ID_HINT,
            description="driver ocpp: the charge point identity it connects with "
            "(ws://HOST:PORT/{charge_point_id})",
        ),
        "meter_public_key": _Str(
            pattern=r"[0-9A-Fa-f]{40,1000}",
            hint="the hex of the meter's DER public key",
            description="driver ocpp: public key of the meter signing its values (OCMF); "
            "evgw verify checks the signed start and stop values with it",
        ),
    },
    target=DeviceConfig,
)

_OCPP = _Obj(
    {
        "listen": _Str(
            default="0.0.0.0:9000",
            check=_check_listen,
            description="address the OCPP-J server listens on (HOST:PORT)",
        ),
        "security_profile": _Enum(
            (0, 1, 2),
            default=0,
            description="0 none, 1 HTTP basic auth, 2 TLS with basic auth",
        ),
        "passwords_file": _Path(
            attr="",
            must_be="file",
            description="basic auth passwords, one 'CHARGE_POINT_ID:PASSWORD' per line "
            "(profiles 1 and 2); never logged",
        ),
        "cert_file": _Path(must_be="file", description="server certificate (PEM), profile 2"),
        "key_file": _Path(must_be="file", description="its private key (PEM), profile 2"),
        "heartbeat_interval": _Duration(
            attr="heartbeat_interval_s",
            default=300.0,
            min=10.0,
            max=86400.0,
            description="Heartbeat interval given to charge points in BootNotification",
        ),
        "call_timeout": _Duration(
            attr="call_timeout_s",
            default=30.0,
            min=1.0,
            max=600.0,
            description="wait this long for a charge point's answer to a call",
        ),
    },
    target=OcppConfig,
    default=None,
    description="OCPP-J 1.6 server for chargers with driver: ocpp",
)

_TOKEN = _Obj(
    {
        "id": _Str(
            max_len=64,
            pattern=r"[^\s]+",
            hint="without spaces",
            required=True,
            description="RFID UID, fob or app token (quote it)",
        ),
        "type": _Enum(tuple(t.value for t in TokenType), convert=TokenType, required=True),
        "user": _Str(max_len=128, required=True, description="user id in records and bills"),
        "status": _Enum(
            tuple(s.value for s in AuthStatus if s is not AuthStatus.UNKNOWN),
            convert=AuthStatus,
            default=AuthStatus.ACCEPTED.value,
        ),
        "expires_at": _Timestamp(description="RFC 3339; after it the token counts as expired"),
        "group": _Str(pattern=_ID_RE, hint=_ID_HINT, description="user group for billing.groups"),
    },
    target=Token,
)

_AUTH = _Obj(
    {
        "offline_policy": _Enum(
            ("allow_known", "allow_all", "deny"),
            default="allow_known",
            description="unknown tokens while the cloud is unreachable",
        ),
        "request_timeout": _Duration(
            attr="request_timeout_s",
            default=5.0,
            min=0.1,
            max=300.0,
            description="wait for the cloud's auth answer",
        ),
        "cache_ttl": _Duration(
            attr="cache_ttl_s", default=30 * 24 * 3600.0, min=0.0, description="keep cloud answers"
        ),
        "tokens": _List(_TOKEN, default=(), description="local authorization list"),
    },
    target=AuthConfig,
    build_when_absent=True,
)

_BILLING = _Obj(
    {
        "default_tariff": _Str(
            pattern=_ID_RE,
            hint=_ID_HINT,
            description="tariff when neither group nor charger names one",
        ),
        "groups": _Map(
            _Str(pattern=_ID_RE, hint=_ID_HINT),
            key_pattern=_ID_RE,
            key_hint=_ID_HINT,
            default={},
            description="user group -> tariff id (wins over the charger's tariff)",
        ),
    },
    target=BillingConfig,
    build_when_absent=True,
)

_HHMM_RE = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]|24:00"
_LIMIT_FIELDS: dict[str, _Node] = {
    "max_current_a": _Num(min=0.0, max=10000.0, description="per phase (A); or max_power_w"),
    "max_power_w": _Num(
        min=0.0, max=10_000_000.0, description="whole site (W), as current at 230 V on 3 phases"
    ),
    "reason": _Str(max_len=200, description="logged and published with the limit"),
}
_GRID_SCHEDULE_RULE = _Obj(
    {
        "days": _List(
            _Enum(("mon", "tue", "wed", "thu", "fri", "sat", "sun")),
            description="weekdays the rule starts on (default: every day)",
        ),
        "start": _Str(
            required=True, pattern=_HHMM_RE, hint="HH:MM (local time)", description="HH:MM"
        ),
        "end": _Str(
            required=True,
            pattern=_HHMM_RE,
            hint="HH:MM (local time)",
            description="HH:MM; at or before start: runs past midnight",
        ),
        **_LIMIT_FIELDS,
    },
)
_GRID_SIGNAL = _Obj(
    {
        "host": _Str(check=_check_host, description="Modbus TCP address of the I/O module"),
        "port": _Int(default=502, min=1, max=65535),
        "bus": _Str(pattern=_ID_RE, hint=_ID_HINT, description="or the RS-485 bus it is on"),
        "unit": _Int(default=1, min=0, max=255, description="Modbus unit id of the I/O module"),
        "table": _Enum(
            ("discrete", "coil", "input", "holding"),
            default="discrete",
            description="where the relay's input is: discrete input (FC02), coil (FC01), "
            "input register (FC04) or holding register (FC03)",
        ),
        "address": _Int(required=True, min=0, max=65535, description="0-based address"),
        "active": _Int(default=1, min=0, max=65535, description="the value that means: reduce now"),
        "poll_interval": _Duration(default=2.0, min=0.1, max=600.0),
        "timeout": _Duration(default=1.0, min=0.01, max=60.0),
        "when_offline": _Enum(
            ("limit", "ignore"),
            default="limit",
            description="the module does not answer: apply the reduced limit, or ignore it",
        ),
        **_LIMIT_FIELDS,
    },
    default=None,
)

_GRID = _Obj(
    {
        "max_current_a": _Num(min=6.0, max=10000.0, description="site connection limit per phase"),
        "meter": _Str(
            pattern=_ID_RE,
            hint=_ID_HINT,
            description="id of the meter measuring the whole connection",
        ),
        "schedule": _List(
            _GRID_SCHEDULE_RULE,
            default=(),
            description="lower site limits by weekday and time of day (site time zone)",
        ),
        "signal": _GRID_SIGNAL,
    },
    target=GridConfig,
    default=None,
)

_HOMEASSISTANT = _Obj(
    {
        "enabled": _Bool(default=False, description="publish Home Assistant MQTT discovery"),
        "prefix": _Str(
            default="homeassistant",
            check=_check_topic_prefix,
            description="Home Assistant's discovery prefix",
        ),
        "broker": _Enum(
            ("cloud", "local"),
            default="cloud",
            description="cloud: the uplink's broker; local: a broker on the site LAN (url)",
        ),
        "url": _Str(check=_check_url, description="broker: local: mqtt://host[:port]"),
        "client_id": _Str(
            max_len=128,
            pattern=r"[^\s]+",
            hint="without spaces",
            description="default: evgw-ha-<site>",
        ),
        "username": _Str(description="MQTT user name on the local broker"),
        "password_file": _Path(attr="", description="file holding that password (one line)"),
        "password": _Str(
            pattern=_ENV_REF,
            hint='an environment variable reference like "${HA_MQTT_PASSWORD}"',
            secret=True,
            description='"${ENV_VAR}": the local broker password from the environment',
        ),
        "interval": _Duration(
            attr="interval_s",
            default=5.0,
            min=1.0,
            max=3600.0,
            description="send a charger's power and energy at most this often",
        ),
    },
    target=HomeAssistantConfig,
    build_when_absent=True,
)

_WEB = _Obj(
    {
        "listen": _Str(
            default="127.0.0.1:8080",
            check=_check_listen,
            description="HOST:PORT of the status page, API and /metrics; beyond localhost "
            "only with users_file",
        ),
        "users_file": _Path(
            must_be="file",
            default=None,
            description="NAME:scrypt-hash lines (evgw web-user add FILE NAME); "
            "with it every request needs HTTP basic auth",
        ),
    },
    target=WebConfig,
    default=None,
    description="live status page, JSON API, server-sent events and Prometheus metrics",
)

CONFIG_SCHEMA = _Obj(
    {
        "site": _Obj(
            {
                "id": _Str(
                    required=True,
                    pattern=_ID_RE,
                    hint=_ID_HINT,
                    description="site id in topics and records",
                ),
                "timezone": _Str(
                    default="UTC",
                    check=_check_timezone,
                    description="IANA zone for tariffs and reports",
                ),
                "name": _Str(default="", min_len=0, description="human name"),
            },
            target=SiteConfig,
            required=True,
        ),
        "storage": _Obj(
            {
                "path": _Path(
                    required=True, description="SQLite buffer file (relative to this file)"
                ),
                "max_size_mb": _Int(
                    default=512, min=1, max=1_000_000, description="readings are pruned above this"
                ),
                "readings_retention_days": _Int(
                    default=30, min=1, max=3650, description="keep readings this long"
                ),
            },
            target=StorageConfig,
            required=True,
        ),
        "uplink": _UPLINK,
        "buses": _List(_BUS, default=(), description="serial lines; TCP devices need none"),
        "endpoints": _List(
            _ENDPOINT,
            default=(),
            description="optional settings of Modbus TCP addresses that devices share "
            "(Modbus TCP gateways): inter-request delay, timeout, serial baud rate",
        ),
        "devices": _List(_DEVICE, default=(), description="chargers and meters"),
        "auth": _AUTH,
        "tariffs": _Map(
            _AnyMapping(
                description="OCPI-style tariff: currency, vat_percent, elements (docs: billing)"
            ),
            key_pattern=_ID_RE,
            key_hint=_ID_HINT,
            default={},
            description="tariff id -> tariff",
        ),
        "billing": _BILLING,
        "grid": _GRID,
        "homeassistant": _HOMEASSISTANT,
        "ocpp": _OCPP,
        "web": _WEB,
        "drivers_path": _Path(
            must_be="dir",
            default=None,
            description="directory of site profiles (override shipped ones)",
        ),
        "log_level": _Enum(("debug", "info", "warning", "error"), default="info"),
    },
    target=GatewayConfig,
    description="ev-site-gateway site configuration",
)


def config_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config file, for editors. Checks between keys
    (references, duplicates, host XOR bus) are only in ``load_config``."""
    schema = CONFIG_SCHEMA.schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/ev-site-gateway/ev-site-gateway/config/schema.json",
        "title": "ev-site-gateway site configuration",
        **schema,
    }


# --- checks between keys -----------------------------------------------------------------


def _choices_hint(name: str, choices: Iterable[str], plural: str) -> str:
    names = sorted(choices)
    suggestion = _suggest(name, names)
    if suggestion:
        return suggestion
    if not names:
        return f" (no {plural} are defined)"
    if len(names) <= 12:
        return f" (defined {plural}: {', '.join(names)})"
    return ""


def _unknown(kind: str, name: str, choices: Iterable[str], plural: str) -> str:
    return f"unknown {kind} '{name}'{_choices_hint(name, choices, plural)}"


def _first_line(ctx: _Ctx, path: PathT) -> int:
    return ctx.doc.where(path)[0]


def _items(raw: dict[str, Any], section: str) -> list[tuple[int, dict[str, Any]]]:
    return [(i, item) for i, item in enumerate(raw.get(section) or []) if isinstance(item, dict)]


def _ids(
    ctx: _Ctx,
    items: list[tuple[int, dict[str, Any]]],
    section: PathT,
    kind: str,
    *,
    fold: bool = False,
) -> dict[str, int]:
    """id -> index of its first definition; reports later duplicates."""
    seen: dict[str, int] = {}
    for i, item in items:
        ident = item.get("id")
        if not isinstance(ident, str):
            continue
        # Token ids compare in the normal form tags read from chargers have (gateway.tags).
        key = (normalise_tag(ident) or ident) if fold else ident
        if key in seen:
            first = (*section, seen[key], "id")
            note = ""
            if fold and _get(ctx, first) != ident:
                note = (
                    "; token ids are compared in one normal form (case, hex separators, "
                    "NUL and spaces ignored)"
                )
            ctx.add(
                (*section, i, "id"),
                f"duplicate {kind} id '{ident}' "
                f"(first defined at line {_first_line(ctx, first)}{note})",
            )
        else:
            seen[key] = i
    return seen


def _get(ctx: _Ctx, path: PathT) -> Any:
    node = ctx.doc.data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _present(ctx: _Ctx, path: PathT) -> set[str]:
    node = _get(ctx, path)
    return {k for k in node if isinstance(k, str)} if isinstance(node, dict) else set()


def _load_profiles(ctx: _Ctx, raw: dict[str, Any]) -> dict[str, Profile] | None:
    if "drivers_path" in _present(ctx, ()) and "drivers_path" not in raw:
        return None  # already reported; every driver would look unknown
    try:
        profiles = load_profiles(raw.get("drivers_path"))
    except ConfigError as exc:
        ctx.doc.problems.extend(exc.problems)
        return None
    return profiles


def _resolve_secret(ctx: _Ctx, uplink: dict[str, Any], path: PathT = ("uplink",)) -> None:
    if "password_file" in uplink and "password" in uplink:
        ctx.add((*path, "password"), "set either password_file or password, not both", key=True)
        return
    secret: str | None = None
    where: PathT = path
    if "password_file" in uplink:
        where = (*path, "password_file")
        file = Path(uplink.pop("password_file"))
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            ctx.add(where, f"cannot read password file {file}: {exc.strerror}")
            return
        except UnicodeDecodeError:
            ctx.add(where, f"password file {file} is not UTF-8 text")
            return
        secret = text.rstrip("\r\n")
        if not secret:
            ctx.add(where, f"password file {file} is empty")
            return
    elif "password" in uplink:
        where = (*path, "password")
        var = uplink["password"][2:-1]
        value = os.environ.get(var)
        if value is None:
            ctx.add(where, f"environment variable {var} is not set")
            del uplink["password"]
            return
        if not value:
            ctx.add(where, f"environment variable {var} is empty")
            del uplink["password"]
            return
        secret = value
    if secret is not None:
        uplink["password"] = Secret(secret)
        if "username" not in uplink and "username" not in _present(ctx, path):
            ctx.add(where, "a password needs a username", key=True)


def _check_uplink(ctx: _Ctx, raw: dict[str, Any]) -> None:
    uplink = raw.get("uplink")
    if not isinstance(uplink, dict):
        return
    _resolve_secret(ctx, uplink)
    if "client_id" not in uplink and isinstance(raw.get("site"), dict) and "id" in raw["site"]:
        uplink["client_id"] = f"evgw-{raw['site']['id']}"
    key_file = uplink.get("command_key")
    if isinstance(key_file, str):
        from gateway.uplink.envelope import load_command_key

        try:
            load_command_key(key_file)
        except GatewayError as exc:
            ctx.add(("uplink", "command_key"), str(exc))
    elif "command_max_age" in uplink and "command_key" not in _present(ctx, ("uplink",)):
        ctx.add(
            ("uplink", "command_max_age"),
            "command_max_age needs command_key (unsigned commands carry no age)",
            key=True,
        )
    url = uplink.get("url", "")
    tls = uplink.get("tls")
    if isinstance(tls, dict):
        if url.startswith("mqtt://"):
            ctx.add(
                ("uplink", "tls"),
                "tls is set but the url is mqtt://: use mqtts:// for TLS",
                key=True,
            )
        if ("cert_file" in tls) != ("key_file" in tls):
            have, need = (
                ("cert_file", "key_file") if "cert_file" in tls else ("key_file", "cert_file")
            )
            ctx.add(("uplink", "tls", have), f"{have} needs {need}", key=True)


def _check_buses(ctx: _Ctx, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    items = _items(raw, "buses")
    first = _ids(ctx, items, ("buses",), "bus")
    for i, bus in items:
        path: PathT = ("buses", i)
        present = _present(ctx, path)
        if bus.get("type") == "rtu":
            if "port" not in present:
                ctx.add(
                    (*path, "port"), "an rtu bus needs port (the serial device, e.g. /dev/ttyUSB0)"
                )
            for key in sorted({"host", "tcp_port"} & present):
                ctx.add(
                    (*path, key), f"{key} is for rtu-over-tcp buses; an rtu bus uses port", key=True
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
    ctx: _Ctx, raw: dict[str, Any]
) -> dict[tuple[Any, Any], tuple[int, dict[str, Any]]]:
    """(host, port) -> (index, endpoint); reports duplicates."""
    out: dict[tuple[Any, Any], tuple[int, dict[str, Any]]] = {}
    for i, ep in _items(raw, "endpoints"):
        if "host" not in ep:
            continue
        key = (ep["host"], ep.get("port", 502))
        if key in out:
            first = _first_line(ctx, ("endpoints", out[key][0]))
            ctx.add(
                ("endpoints", i, "host"),
                f"duplicate endpoint {key[0]}:{key[1]} (first defined at line {first})",
            )
        else:
            out[key] = (i, ep)
    return out


def _check_devices(
    ctx: _Ctx,
    raw: dict[str, Any],
    buses: dict[str, dict[str, Any]],
    profiles: dict[str, Profile] | None,
) -> None:
    endpoints_at = _check_endpoints(ctx, raw)
    endpoints = {key: ep for key, (_, ep) in endpoints_at.items()}
    items = _items(raw, "devices")
    first = _ids(ctx, items, ("devices",), "device")
    kinds: dict[str, str] = {}  # device id -> "charger" | "meter"
    addresses: dict[tuple[Any, ...], str] = {}
    used_endpoints: set[tuple[Any, Any]] = set()
    charge_points: dict[tuple[str, int], int] = {}
    for i, dev in items:
        path: PathT = ("devices", i)
        present = _present(ctx, path)
        profile = None
        if dev.get("driver") == OCPP_DRIVER:
            if first.get(dev.get("id", "")) == i:
                kinds[dev["id"]] = str(DeviceKind.CHARGER)
            _check_ocpp_device(ctx, raw, path, dev, present, charge_points)
            if "tariff" in dev and isinstance(dev["tariff"], str):
                ctx.tariff_refs.append(((*path, "tariff"), dev["tariff"]))
            continue
        for key_name in ("charge_point_id", "meter_public_key"):
            if key_name in present:
                ctx.add(
                    (*path, key_name),
                    f"{key_name} is for OCPP chargers (driver: {OCPP_DRIVER})",
                    key=True,
                )
        if profiles is not None and "driver" in dev:
            profile = profiles.get(dev["driver"])
            if profile is None:
                hint = _suggest(dev["driver"], profiles) or " (evgw drivers lists them)"
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
            buses_known = "buses" not in _present(ctx, ()) or "buses" in raw
            if bus_id and bus is None and buses_known:
                ctx.add((*path, "bus"), _unknown("bus", bus_id, buses, "buses"))
            transport = bus.get("type", "rtu") if bus else "rtu"
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
            for key_name in ("meter", "tariff", "max_current_a"):
                if key_name in present:
                    ctx.add(
                        (*path, key_name),
                        f"only chargers take {key_name}; "
                        f"'{dev.get('id')}' is a meter ({profile.slug})",
                        key=True,
                    )
        is_meter = profile is not None and profile.kind is DeviceKind.METER
        if "tariff" in dev and not is_meter and isinstance(dev["tariff"], str):
            ctx.tariff_refs.append(((*path, "tariff"), dev["tariff"]))
    for (host, port), (i, _ep) in endpoints_at.items():
        if (host, port) not in used_endpoints:
            hosts = sorted({str(h) for h, _ in used_endpoints})
            ctx.add(
                ("endpoints", i),
                f"no device uses {host}:{port}: set host: {host} (and port: {port}) on the "
                f"devices behind it{_choices_hint(str(host), hosts, 'device hosts')}",
            )
    for i, dev in items:
        if "meter" in dev and kinds.get(dev.get("id", "")) != "meter":
            _check_meter_ref(
                ctx, ("devices", i, "meter"), dev["meter"], first, kinds, own=dev.get("id")
            )
    grid = raw.get("grid")
    if isinstance(grid, dict) and "meter" in grid:
        _check_meter_ref(ctx, ("grid", "meter"), grid["meter"], first, kinds, own=None)


def _check_homeassistant(ctx: _Ctx, raw: dict[str, Any]) -> None:
    ha = raw["homeassistant"]
    path: PathT = ("homeassistant",)
    local = ha.get("broker") == "local"
    for key in ("url", "client_id", "username", "password", "password_file"):
        if key in ha and not local:
            ctx.add((*path, key), f"{key} is for broker: local (cloud uses the uplink's)", key=True)
    if not ha.get("enabled"):
        return
    if local:
        if "url" not in ha and "url" not in _present(ctx, path):
            ctx.add(path, "broker: local needs url (mqtt://host[:port] of the site's broker)")
        elif str(ha.get("url", "")).startswith("mqtts://"):
            ctx.add((*path, "url"), "the local broker is reached with mqtt:// on the site LAN")
        _resolve_secret(ctx, ha, path)
    elif "uplink" not in raw and "uplink" not in _present(ctx, ()):
        ctx.add((*path, "broker"), "broker: cloud needs an uplink (or use broker: local)")


def _check_grid_limits(ctx: _Ctx, grid: dict[str, Any], buses: dict[str, dict[str, Any]]) -> None:
    """Limits the grid can set lower the connection's: without one they have nothing to lower."""
    present = _present(ctx, ("grid",))
    for key in ("schedule", "signal"):
        if key in present and grid.get(key) and "max_current_a" not in present:
            ctx.add(("grid", key), "needs grid.max_current_a (the limit it lowers)")
    limited: list[tuple[PathT, Any]] = [
        (("grid", "schedule", i), rule) for i, rule in enumerate(grid.get("schedule") or [])
    ]
    signal = grid.get("signal")
    if isinstance(signal, dict):
        limited.append((("grid", "signal"), signal))
        if ("host" in signal) == ("bus" in signal):
            ctx.add(("grid", "signal"), "needs host (Modbus TCP) or bus (RS-485), not both")
        elif "bus" in signal and signal["bus"] not in buses:
            ctx.add(("grid", "signal", "bus"), _unknown("bus", signal["bus"], buses, "buses"))
    for path, item in limited:
        if isinstance(item, dict) and ("max_current_a" in item) == ("max_power_w" in item):
            ctx.add(path, "needs max_current_a or max_power_w (one of them)")


def _check_ocpp_device(
    ctx: _Ctx,
    raw: dict[str, Any],
    path: PathT,
    dev: dict[str, Any],
    present: set[str],
    charge_points: dict[tuple[str, int], int],
) -> None:
    """An OCPP charge point: reached by its own websocket, so no Modbus address."""
    for key_name in ("host", "port", "bus", "unit", "poll_interval", "timeout", "meter"):
        if key_name in present:
            why = (
                "an OCPP charger is billed from its own meter values (meter: is not supported "
                "for OCPP chargers yet)"
                if key_name == "meter"
                else "an OCPP charger connects to the gateway's ocpp: server by itself"
            )
            ctx.add((*path, key_name), f"{key_name} is for Modbus devices: {why}", key=True)
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
        other = _get(ctx, ("devices", charge_points[(cp_id, dev.get("connector", 1))], "id"))
        ctx.add(
            (*path, "charge_point_id"),
            f"connector {dev.get('connector', 1)} of charge point '{cp_id}' is already device "
            f"'{other}' (a second connector needs connector: 2)",
        )
    else:
        charge_points[(cp_id, dev.get("connector", 1))] = path[1] if isinstance(path[1], int) else 0
    if "ocpp" not in _present(ctx, ()):
        ctx.add(
            (*path, "driver"),
            "an OCPP charger needs the ocpp: section (ocpp: {listen: \"0.0.0.0:9000\"})",
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


def _read_ocpp_passwords(ctx: _Ctx, file: Path) -> dict[str, Secret] | None:
    where: PathT = ("ocpp", "passwords_file")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        ctx.add(where, f"cannot read password file {file}: {exc.strerror}")
        return None
    except UnicodeDecodeError:
        ctx.add(where, f"password file {file} is not UTF-8 text")
        return None
    out: dict[str, Secret] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cp_id, sep, password = line.partition(":")
        cp_id = cp_id.strip()
        # The line number is the file's, never the password: messages must not show it.
        if not sep or not re.fullmatch(_CP_ID_RE, cp_id) or not password:
            ctx.add(where, f"{file} line {n}: expected CHARGE_POINT_ID:PASSWORD")
            continue
        if cp_id in out:
            ctx.add(where, f"{file} line {n}: charge point '{cp_id}' is listed twice")
            continue
        out[cp_id] = Secret(password)
    return out


def _check_ocpp(ctx: _Ctx, raw: dict[str, Any]) -> None:
    ocpp = raw.get("ocpp")
    if not isinstance(ocpp, dict):
        return
    path: PathT = ("ocpp",)
    profile = ocpp.get("security_profile", 0)
    present = _present(ctx, path)
    if "passwords_file" in ocpp:
        passwords = _read_ocpp_passwords(ctx, Path(ocpp.pop("passwords_file")))
        if passwords is not None:
            ocpp["passwords"] = passwords
    if profile >= 1 and "passwords_file" not in present:
        ctx.add(
            (*path, "security_profile"),
            f"security_profile {profile} (basic auth) needs passwords_file",
        )
    if profile == 2:
        for key_name in ("cert_file", "key_file"):
            if key_name not in present:
                ctx.add(
                    (*path, "security_profile"),
                    f"security_profile 2 (TLS) needs {key_name}",
                )
    elif profile < 2:
        for key_name in ("cert_file", "key_file"):
            if key_name in present:
                ctx.add(
                    (*path, key_name),
                    f"{key_name} is for security_profile 2 (TLS); this is {profile}",
                    key=True,
                )


def _check_meter_ref(
    ctx: _Ctx,
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
            _unknown("meter device", meter, meters, "meters"),
        )
    elif kinds.get(meter) == "charger":
        driver = _get(ctx, ("devices", devices[meter], "driver"))
        ctx.add(path, f"'{meter}' is a charger ({driver}), not a meter")


def _check_tariffs(ctx: _Ctx, raw: dict[str, Any]) -> None:
    """Through the same function as a ``tariffs`` push (gateway.billing.tariff)."""
    from gateway.billing.tariff import tariff_set_problems  # the tariff module imports this one

    tariffs = raw.get("tariffs") or {}
    if not isinstance(tariffs, dict):
        return
    billing = raw.get("billing") if isinstance(raw.get("billing"), dict) else {}
    # A section whose own checks failed is not there to refer to: say nothing about references.
    tariffs_known = "tariffs" not in _present(ctx, ()) or "tariffs" in raw
    default = (billing or {}).get("default_tariff")
    groups = (billing or {}).get("groups") or {}
    problems = tariff_set_problems(
        tariffs,
        default_tariff=default if isinstance(default, str) else None,
        groups={g: t for g, t in groups.items() if isinstance(t, str)},
        chargers=ctx.tariff_refs,
        unknown=lambda name, known: _unknown("tariff", name, known, "tariffs"),
    )
    for problem in problems:
        if problem.path[0] != "tariffs" and not tariffs_known:
            continue
        ctx.add(problem.path, problem.message, key=problem.key)


def _check_tokens(ctx: _Ctx, raw: dict[str, Any]) -> None:
    auth = raw.get("auth")
    if not isinstance(auth, dict):
        return
    items = [(i, t) for i, t in enumerate(auth.get("tokens") or []) if isinstance(t, dict)]
    _ids(ctx, items, ("auth", "tokens"), "token", fold=True)
    billing = raw.get("billing") if isinstance(raw.get("billing"), dict) else {}
    if "billing" in _present(ctx, ()) and "billing" not in raw:
        return
    groups = (billing or {}).get("groups") or {}
    for i, token in items:
        group = token.get("group")
        if group is not None and group not in groups:
            ctx.add(
                ("auth", "tokens", i, "group"),
                f"group '{group}' has no tariff in billing.groups"
                + _choices_hint(group, groups, "groups"),
            )


def _cross_check(ctx: _Ctx, raw: dict[str, Any]) -> None:
    profiles = _load_profiles(ctx, raw)
    _check_uplink(ctx, raw)
    _check_ocpp(ctx, raw)
    buses = _check_buses(ctx, raw)
    _check_devices(ctx, raw, buses, profiles)
    if isinstance(raw.get("grid"), dict):
        _check_grid_limits(ctx, raw["grid"], buses)
    if isinstance(raw.get("homeassistant"), dict):
        _check_homeassistant(ctx, raw)
    _check_tariffs(ctx, raw)
    _check_tokens(ctx, raw)
    _check_web(ctx, raw)


def _check_web(ctx: _Ctx, raw: dict[str, Any]) -> None:
    web = raw.get("web")
    if not isinstance(web, dict):
        return
    if "users_file" in web:
        from gateway.web.users import UsersFileError, load_users

        try:
            users = load_users(web["users_file"])
        except UsersFileError as exc:
            ctx.add(("web", "users_file"), str(exc))
            return
        if not users:
            ctx.add(
                ("web", "users_file"),
                f"no users in {web['users_file']}: add one with evgw web-user add FILE NAME",
            )
        return
    listen = web.get("listen")
    if listen is None and "listen" in _present(ctx, ("web",)):
        return  # invalid, already reported
    host, _ = split_listen(listen or "127.0.0.1:8080")
    if not is_loopback(host):
        where: PathT = ("web", "listen") if listen is not None else ("web",)
        shown = host or "every address"
        ctx.add(
            where,
            f"listening on {shown} (beyond localhost) needs authentication: set "
            "web.users_file (evgw web-user add FILE NAME creates it)",
        )


def load_config(path: str | Path) -> GatewayConfig:
    """Read, validate and resolve a site config. Raises ``ConfigError`` listing every problem
    (``FILE:LINE:COL: key.path: message``), sorted by position."""
    doc = load_yaml(path)
    if doc.data is None and not doc.problems:
        doc.problems.append(
            ConfigProblem(
                str(path),
                1,
                1,
                "",
                "the file is empty: expected a mapping with at least site and storage",
            )
        )
    if doc.data is None:
        raise ConfigError(doc.problems)
    ctx = _Ctx(doc, Path(path).absolute().parent)
    raw = CONFIG_SCHEMA.validate(ctx, (), doc.data)
    if raw is not _INVALID:
        _cross_check(ctx, raw)
    if doc.problems:
        raise ConfigError(doc.problems)
    config: GatewayConfig = CONFIG_SCHEMA.build(raw)
    if config.ocpp is not None and isinstance(raw.get("ocpp"), dict):
        # Read from passwords_file by _check_ocpp; not a key a config file may set itself.
        passwords = dict(raw["ocpp"].get("passwords") or {})
        config = replace(config, ocpp=replace(config.ocpp, passwords=passwords))
    return replace(config, source=str(path))


def check_config(path: str | Path) -> tuple[int, str]:
    """What ``evgw check-config`` prints: exit code 0 and a short summary of a valid file, or 2
    and every problem on its own line."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return exc.exit_code, "\n".join(str(p) for p in exc.problems)
    return 0, summarize(config)


UNAUTHENTICATED_WARNING = (
    "warning: uplink.command_key is not set: commands and auth responses are not "
    "authenticated; anyone who can publish on the broker can start charging for any user "
    "(docs/security.md)"
)


def summarize(config: GatewayConfig) -> str:
    site = config.site
    lines = [
        f"{config.source}: OK",
        f"site {site.id}"
        + (f" ({site.name})" if site.name else "")
        + f", timezone {site.timezone}",
    ]
    lines.append(f"storage {config.storage.path} (max {config.storage.max_size_mb} MB)")
    if config.uplink is None:
        lines.append("uplink: none (buffering only)")
    else:
        up = config.uplink
        auth = f", user {up.username}" if up.username else ""
        lines.append(f"uplink {up.url} as {up.client_id}, topic prefix {up.topic_prefix}{auth}")
        if up.command_key is not None:
            lines.append(
                f"commands: signed by {up.command_key}, "
                f"at most {format_duration(up.command_max_age_s)} old"
            )
        else:
            lines.append(UNAUTHENTICATED_WARNING)
    if config.ocpp is not None:
        oc = config.ocpp
        lines.append(
            f"ocpp server ws{'s' if oc.security_profile == 2 else ''}://{oc.listen}, "
            f"security profile {oc.security_profile}"
        )
    lines.append(f"{len(config.devices)} device(s) on {len(config.buses)} bus(es):")
    for dev in config.devices:
        if dev.driver == OCPP_DRIVER:
            tariff = f", tariff {dev.tariff}" if dev.tariff else ""
            lines.append(f"  {dev.id}: ocpp charge point {dev.charge_point_id}{tariff}")
            continue
        where = f"{dev.host}:{dev.port}" if dev.host else f"bus {dev.bus}"
        extra = "".join(
            f", {k} {v}" for k, v in (("meter", dev.meter), ("tariff", dev.tariff)) if v
        )
        lines.append(
            f"  {dev.id}: {dev.driver} at {where} unit {dev.unit}, "
            f"every {format_duration(dev.poll_interval_s)}, "
            f"timeout {format_duration(dev.timeout_s)}{extra}"
        )
    for ep in config.endpoints:
        users = [d.id for d in config.devices if d.host == ep.host and d.port == ep.port]
        line = f"endpoint {ep.host}:{ep.port} shared by {', '.join(users)}: one request at a time"
        if ep.inter_request_delay_s:
            line += f", {format_duration(ep.inter_request_delay_s)} between requests"
        if ep.baudrate:
            line += f", serial line {ep.baudrate} baud"
        lines.append(line)
    if config.web is not None:
        access = (
            f"basic auth, users in {config.web.users_file}"
            if config.web.users_file
            else "no login: localhost only"
        )
        lines.append(f"web: status page, API and /metrics on {config.web.listen} ({access})")
    grid = config.grid
    if grid is not None and grid.max_current_a is not None:
        lowered = [f"{len(grid.schedule)} schedule rule(s)"] if grid.schedule else []
        if grid.signal:
            where = grid.signal.get("host") or f"bus {grid.signal.get('bus')}"
            lowered.append(
                f"relay at {where} unit {grid.signal.get('unit', 1)} "
                f"{grid.signal.get('table', 'discrete')} {grid.signal['address']}"
            )
        lowered.append("the cloud's limit command")
        lines.append(
            f"grid limit {grid.max_current_a:g} A per phase"
            + (f" (meter {grid.meter})" if grid.meter else "")
            + f"; lowered by {', '.join(lowered)}"
        )
    ha = config.homeassistant
    if ha.enabled:
        broker = ha.url if ha.broker == "local" else "the uplink's broker"
        lines.append(f"Home Assistant discovery under {ha.prefix}/ on {broker}")
    lines.append(
        f"{len(config.auth.tokens)} token(s), offline policy {config.auth.offline_policy}; "
        f"tariffs: {', '.join(sorted(config.tariffs)) or 'none'}"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m gateway.config > config/schema.json
    print(json.dumps(config_json_schema(), indent=2))
