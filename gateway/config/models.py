"""The site config as models: one class per section, each key's type, range, default and
description written once. Field names follow CONTRACT section 3; durations are seconds (``*_s``,
read from the YAML key without the suffix), sizes carry their unit.

Checks between keys (references, duplicates, addressing) are in ``gateway.config.checks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import core_schema

from gateway.billing.policy import BillingConfig
from gateway.config.values import (
    BAUDRATES,
    CP_ID,
    HHMM_RE,
    ID,
    OCPP_DRIVER,
    FilePath,
    Host,
    Secret,
    SecretRef,
    Timestamp,
    check_listen,
    check_timezone,
    check_topic_prefix,
    check_url,
    is_loopback,
    split_listen,
)
from gateway.model import AuthStatus, Token, TokenType
from gateway.schema import AsTuple, Choice, Duration, Model, Range, Text

Port = Annotated[int, Range(1, 65535)]


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    """HOST and PORT of a checked ``scheme://host[:port]`` URL."""
    rest = url.split("://", 1)[-1].rstrip("/")
    if ":" in rest:
        host, port = rest.rsplit(":", 1)
        return host, int(port)
    return rest, default_port


class SiteConfig(Model):
    id: Annotated[str, ID] = Field(description="site id in topics and records")
    timezone: Annotated[str, Text(check=check_timezone)] = Field(
        default="UTC", description="IANA zone for tariffs and reports"
    )
    name: Annotated[str, Text(min_len=0)] = Field(default="", description="human name")


class StorageConfig(Model):
    path: Annotated[str, FilePath()] = Field(
        description="SQLite buffer file (relative to this file)"
    )
    max_size_mb: Annotated[int, Range(1, 1_000_000)] = Field(
        default=512, description="readings are pruned above this"
    )
    readings_retention_days: Annotated[int, Range(1, 3650)] = Field(
        default=30, description="keep readings this long"
    )


class TlsConfig(Model):
    """TLS settings for mqtts://"""

    ca_file: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None,
        description="CA certificates (PEM) to verify the broker; default: the system's",
    )
    cert_file: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None, description="client certificate (PEM) for mutual TLS; needs key_file"
    )
    key_file: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None, description="private key (PEM) of cert_file"
    )
    # skip server certificate verification: only when asked explicitly
    insecure: bool = Field(
        default=False, description="skip verifying the broker's certificate (tests only)"
    )


class UplinkReadingsConfig(Model):
    """What the cloud gets of the readings (the local buffer keeps every one): one reading per
    device and ``interval_s`` folded by ``mode`` (last | mean | min_max); 0 sends each one."""

    interval_s: Annotated[Duration, Range(0.0, 86400.0)] = Field(
        default=60.0,
        validation_alias="interval",
        description="one reading per device and interval to the cloud (0: every reading); the "
        "local buffer keeps every reading",
    )
    mode: Annotated[Literal["last", "mean", "min_max"], Choice("last", "mean", "min_max")] = Field(
        default="last",
        description="last reading of the interval, numbers averaged, or the last reading with "
        "<name>_min and <name>_max",
    )


_CLIENT_ID = Text(max_len=128, pattern=r"[^\s]+", hint="without spaces")


class UplinkConfig(Model):
    """MQTT uplink; without it the gateway only buffers locally"""

    url: Annotated[str, Text(check=check_url)] = Field(
        description="broker: mqtt://host[:port] or mqtts://host[:port]"
    )
    # required in the typed config; the loader fills it in (evgw-<site id>) when the file has none
    client_id: Annotated[str, _CLIENT_ID] = Field(
        default="", description="MQTT client id; default: evgw-<site id>"
    )
    topic_prefix: Annotated[str, Text(check=check_topic_prefix)] = Field(
        default="evgw", description="first topic level(s)"
    )
    username: Annotated[str, Text()] | None = Field(default=None, description="MQTT user name")
    password_file: Annotated[str, FilePath()] | None = Field(
        default=None, description="file holding the MQTT password (one line)"
    )
    password: Annotated[Secret, SecretRef("MQTT_PASSWORD")] | None = Field(
        default=None, description='"${ENV_VAR}": the MQTT password from the environment'
    )
    tls: TlsConfig | None = None
    keepalive_s: Annotated[Duration, Range(5.0, 65535.0)] = Field(
        default=30.0, validation_alias="keepalive", description="MQTT keepalive"
    )
    session_expiry_s: Annotated[Duration, Range(0.0, float(2**32 - 1))] = Field(
        default=7 * 24 * 3600.0,
        validation_alias="session_expiry",
        description="MQTT 5 session expiry: how long the broker keeps the session offline",
    )
    inflight_window: Annotated[int, Range(1, 1000)] = Field(
        default=50, description="QoS 1 messages awaiting PUBACK at once (20-100 is fastest)"
    )
    readings_qos: Annotated[Literal[0, 1], Choice(0, 1)] = Field(
        default=0, description="QoS of readings batches"
    )
    readings_batch: Annotated[int, Range(1, 10000)] = Field(
        default=500, description="readings per message at most"
    )
    protocol: Annotated[Literal["auto", "5", "3.1.1"], Choice("auto", "5", "3.1.1")] = Field(
        default="auto", description="MQTT version: auto tries 5 and falls back to 3.1.1"
    )
    command_key: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None,
        description="the cloud's Ed25519 public key (PEM): commands and auth responses must then "
        "be signed with it, fresh and not replayed (docs/security.md)",
    )
    command_max_age_s: Annotated[Duration, Range(5.0, 3600.0)] = Field(
        default=300.0,
        validation_alias="command_max_age",
        description="signed commands and auth responses older than this (by their issued_at) "
        "are refused; needs a synchronised clock",
    )
    readings: UplinkReadingsConfig = Field(
        default=UplinkReadingsConfig(),
        description="readings sent to the cloud (default: one a minute per device, ~6.5 MB a "
        "day for 10 chargers)",
    )

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def host(self) -> str:
        return _host_port(self.url, 0)[0]

    @property
    def port(self) -> int:
        return _host_port(self.url, 8883 if self.scheme == "mqtts" else 1883)[1]


Baudrate = Annotated[int, Choice(*BAUDRATES)]


class BusConfig(Model):
    """A serial line (``rtu``) or a serial server reached over TCP (``rtu-over-tcp``)."""

    id: Annotated[str, ID] = Field(description="name devices use in bus:")
    type: Annotated[Literal["rtu", "rtu-over-tcp"], Choice("rtu", "rtu-over-tcp")] = Field(
        description="serial line, or serial server over TCP"
    )
    port: Annotated[str, Text()] | None = Field(
        default=None, description="serial device path (rtu), e.g. /dev/ttyUSB0"
    )
    host: Annotated[str, Host] | None = Field(
        default=None, description="serial server address (rtu-over-tcp)"
    )
    tcp_port: Port = Field(default=502, description="serial server TCP port (rtu-over-tcp)")
    baudrate: Baudrate = Field(default=9600, description="bits per second")
    parity: Annotated[Literal["N", "E", "O"], Choice("N", "E", "O")] = Field(
        default="N", description="N none, E even, O odd"
    )
    stopbits: Annotated[Literal[1, 2], Choice(1, 2)] = 1
    bytesize: Annotated[Literal[7, 8], Choice(7, 8)] = 8
    timeout_s: Annotated[Duration, Range(0.01, 60.0)] = Field(
        default=1.0,
        validation_alias="timeout",
        description="answer timeout of the devices on it (a device's own timeout wins)",
    )


class EndpointConfig(Model):
    """Settings of one Modbus TCP address that devices share, typically a Modbus TCP gateway
    (protocol converter: MBAP in, RTU out) with an RS-485 line behind it."""

    host: Annotated[str, Host] = Field(
        description="the Modbus TCP address devices use in host: (e.g. a Modbus TCP gateway)"
    )
    port: Port = Field(default=502, description="its TCP port")
    baudrate: Baudrate | None = Field(
        default=None,
        description="baud rate of the serial line behind a Modbus TCP gateway; sizes the default "
        "answer timeout of its devices",
    )
    inter_request_delay_s: Annotated[Duration, Range(0.0, 10.0)] = Field(
        default=0.0,
        validation_alias="inter_request_delay",
        description="silence after each answer before the next request (slow converters)",
    )
    timeout_s: Annotated[Duration, Range(0.01, 60.0)] | None = Field(
        default=None,
        validation_alias="timeout",
        description="answer timeout of the devices behind it (a device's own timeout wins); "
        "default: sized for the serial line (baudrate, else the profile's)",
    )


class DeviceConfig(Model):
    id: Annotated[str, ID] = Field(description="device id in topics and records")
    driver: Annotated[str, Text(pattern=r"[a-z0-9-]+", hint="a profile slug like abb-terra-ac")] = (
        Field(description="profile slug (evgw drivers)")
    )
    host: Annotated[str, Host] | None = Field(
        default=None,
        description="Modbus TCP address: the device's own, or the Modbus TCP gateway a serial "
        "device sits behind (not with bus)",
    )
    port: Port = Field(
        default=502, description="Modbus TCP port; default: the profile's (usually 502)"
    )
    bus: Annotated[str, ID] | None = Field(
        default=None, description="id of the bus (RTU devices; not with host)"
    )
    unit: Annotated[int, Range(0, 255)] = Field(
        default=1,
        description="Modbus unit id: 1..247 on a bus or behind a Modbus TCP gateway, 0..247 or "
        "255 for a Modbus TCP device; default: the profile's",
    )
    poll_interval_s: Annotated[Duration, Range(0.1, 3600.0)] = Field(
        default=1.0, validation_alias="poll_interval", description="how often to read the device"
    )
    timeout_s: Annotated[Duration, Range(0.01, 60.0)] = Field(
        default=1.0,
        validation_alias="timeout",
        description="answer timeout; on a bus the default is the bus's, behind a Modbus TCP "
        "gateway the endpoint's, or sized for the serial line",
    )
    meter: Annotated[str, ID] | None = Field(
        default=None,
        description="chargers: id of the meter device whose counter bills this charger",
    )
    tariff: Annotated[str, ID] | None = Field(
        default=None, description="chargers: tariff id of sessions on this charger"
    )
    connector: Annotated[int, Range(1, 16)] = Field(
        default=1, description="chargers: connector number in records"
    )
    max_current_a: Annotated[float, Range(6.0, 1000.0)] | None = Field(
        default=None, description="chargers: site wiring limit per phase"
    )
    charge_point_id: Annotated[str, CP_ID] | None = Field(
        default=None,
        description="driver ocpp: the charge point identity it connects with "
        "(ws://HOST:PORT/{charge_point_id})",
    )
    meter_public_key: (
        Annotated[
            str,
            Text(pattern=r"[0-9A-Fa-f]{40,1000}", hint="the hex of the meter's DER public key"),
        ]
        | None
    ) = Field(
        default=None,
        description="driver ocpp: public key of the meter signing its values (OCMF); evgw verify "
        "checks the signed start and stop values with it",
    )


class _TokenEntry(Model):
    id: Annotated[str, Text(max_len=64, pattern=r"[^\s]+", hint="without spaces")] = Field(
        description="RFID UID, fob or app token (quote it)"
    )
    type: Annotated[TokenType, Choice.of(TokenType)]
    user: Annotated[str, Text(max_len=128)] = Field(description="user id in records and bills")
    status: Annotated[
        AuthStatus,
        Choice.of(AuthStatus, (s for s in AuthStatus if s is not AuthStatus.UNKNOWN)),
    ] = AuthStatus.ACCEPTED
    expires_at: Timestamp | None = Field(
        default=None, description="RFC 3339; after it the token counts as expired"
    )
    group: Annotated[str, ID] | None = Field(
        default=None, description="user group for billing.groups"
    )


class _ReadFrom:
    """A value read from a model's keys: the model checks the file's mapping (its problems at
    their positions; ``file_model`` lets ``validate_parts`` walk it), ``build`` makes the value
    the gateway uses. Code may pass a value of type ``built`` as it is."""

    def __init__(
        self, model: type[Model], build: Callable[[Any], Any], built: type | None = None
    ) -> None:
        self.file_model = model
        self.build = build
        self.built = built

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def read(value: Any, inner: core_schema.ValidatorFunctionWrapHandler) -> Any:
            if self.built is not None and isinstance(value, self.built):
                return value
            return self.build(inner(value))

        return core_schema.no_info_wrap_validator_function(
            read, handler.generate_schema(self.file_model)
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(schema)


# A token of the local list: a ``Token`` (gateway.model) read from a ``_TokenEntry``.
_AS_TOKEN = _ReadFrom(_TokenEntry, lambda entry: Token(**dict(entry)), Token)


class AuthConfig(Model):
    offline_policy: Annotated[
        Literal["allow_known", "allow_all", "deny"], Choice("allow_known", "allow_all", "deny")
    ] = Field(default="allow_known", description="unknown tokens while the cloud is unreachable")
    tokens: Annotated[tuple[Annotated[Token, _AS_TOKEN], ...], AsTuple] = Field(
        default=(), description="local authorization list"
    )
    request_timeout_s: Annotated[Duration, Range(0.1, 300.0)] = Field(
        default=5.0,
        validation_alias="request_timeout",
        description="wait for the cloud's auth answer",
    )
    cache_ttl_s: Annotated[Duration, Range(0.0)] = Field(
        default=30 * 24 * 3600.0, validation_alias="cache_ttl", description="keep cloud answers"
    )


class _Limit(Model):
    max_current_a: Annotated[float, Range(0.0, 10000.0)] | None = Field(
        default=None, description="per phase (A); or max_power_w"
    )
    max_power_w: Annotated[float, Range(0.0, 10_000_000.0)] | None = Field(
        default=None, description="whole site (W), as current at 230 V on 3 phases"
    )
    reason: Annotated[str, Text(max_len=200)] | None = Field(
        default=None, description="logged and published with the limit"
    )


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = Text(pattern=HHMM_RE, hint="HH:MM (local time)")


class _ScheduleRule(_Limit):
    days: Annotated[tuple[Annotated[str, Choice(*_DAYS)], ...], AsTuple] | None = Field(
        default=None, description="weekdays the rule starts on (default: every day)"
    )
    start: Annotated[str, _HHMM] = Field(description="HH:MM")
    end: Annotated[str, _HHMM] = Field(description="HH:MM; at or before start: runs past midnight")


class _Signal(_Limit):
    host: Annotated[str, Host] | None = Field(
        default=None, description="Modbus TCP address of the I/O module"
    )
    port: Port = 502
    bus: Annotated[str, ID] | None = Field(default=None, description="or the RS-485 bus it is on")
    unit: Annotated[int, Range(0, 255)] = Field(
        default=1, description="Modbus unit id of the I/O module"
    )
    table: Annotated[
        Literal["discrete", "coil", "input", "holding"],
        Choice("discrete", "coil", "input", "holding"),
    ] = Field(
        default="discrete",
        description="where the relay's input is: discrete input (FC02), coil (FC01), input "
        "register (FC04) or holding register (FC03)",
    )
    address: Annotated[int, Range(0, 65535)] = Field(description="0-based address")
    active: Annotated[int, Range(0, 65535)] = Field(
        default=1, description="the value that means: reduce now"
    )
    poll_interval: Annotated[Duration, Range(0.1, 600.0)] = 2.0
    timeout: Annotated[Duration, Range(0.01, 60.0)] = 1.0
    when_offline: Annotated[Literal["limit", "ignore"], Choice("limit", "ignore")] = Field(
        default="limit",
        description="the module does not answer: apply the reduced limit, or ignore it",
    )


def _set_keys(checked: Model) -> dict[str, Any]:
    """A grid limit kept as the mapping of the keys the file set (gateway/gridlimit.py reads
    them)."""
    return checked.model_dump(exclude_unset=True)


class GridConfig(Model):
    """Site grid limit: the sum of charger currents per phase stays below this."""

    max_current_a: Annotated[float, Range(6.0, 10000.0)] | None = Field(
        default=None, description="site connection limit per phase"
    )
    meter: Annotated[str, ID] | None = Field(
        default=None, description="id of the meter measuring the whole connection"
    )
    # Lower limits the grid can set (gateway/gridlimit.py): validated mappings.
    schedule: Annotated[
        tuple[Annotated[dict[str, Any], _ReadFrom(_ScheduleRule, _set_keys)], ...], AsTuple
    ] = Field(
        default=(), description="lower site limits by weekday and time of day (site time zone)"
    )
    signal: Annotated[dict[str, Any], _ReadFrom(_Signal, _set_keys)] | None = None


class _Listening(Model):
    """A server's section: ``listen`` is HOST:PORT (each section sets its own default)."""

    listen: str

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


class HomeAssistantConfig(Model):
    """Home Assistant MQTT discovery (gateway/homeassistant.py); off unless enabled."""

    enabled: bool = Field(default=False, description="publish Home Assistant MQTT discovery")
    prefix: Annotated[str, Text(check=check_topic_prefix)] = Field(
        default="homeassistant", description="Home Assistant's discovery prefix"
    )
    broker: Annotated[Literal["cloud", "local"], Choice("cloud", "local")] = Field(
        default="cloud",
        description="cloud: the uplink's broker; local: a broker on the site LAN (url)",
    )
    url: Annotated[str, Text(check=check_url)] | None = Field(
        default=None, description="broker: local: mqtt://host[:port]"
    )
    client_id: Annotated[str, _CLIENT_ID] | None = Field(
        default=None, description="default: evgw-ha-<site>"
    )
    username: Annotated[str, Text()] | None = Field(
        default=None, description="MQTT user name on the local broker"
    )
    password_file: Annotated[str, FilePath()] | None = Field(
        default=None, description="file holding that password (one line)"
    )
    password: Annotated[Secret, SecretRef("HA_MQTT_PASSWORD")] | None = Field(
        default=None, description='"${ENV_VAR}": the local broker password from the environment'
    )
    interval_s: Annotated[Duration, Range(1.0, 3600.0)] = Field(
        default=5.0,
        validation_alias="interval",
        description="send a charger's power and energy at most this often",
    )

    @property
    def host(self) -> str:
        return _host_port(self.url or "", 1883)[0]

    @property
    def port(self) -> int:
        return _host_port(self.url or "", 1883)[1]


class OcppConfig(_Listening):
    """The OCPP-J server OCPP chargers connect to (``ws://HOST:PORT/{charge_point_id}``).

    ``security_profile``: 0 none, 1 HTTP basic auth, 2 TLS with basic auth (OCPP 1.6 security
    whitepaper profiles). ``passwords`` maps a charge point id to its basic auth password, read
    by the loader from ``passwords_file`` (a file cannot set it itself).
    """

    listen: Annotated[str, Text(check=check_listen)] = Field(
        default="0.0.0.0:9000", description="address the OCPP-J server listens on (HOST:PORT)"
    )
    security_profile: Annotated[Literal[0, 1, 2], Choice(0, 1, 2)] = Field(
        default=0, description="0 none, 1 HTTP basic auth, 2 TLS with basic auth"
    )
    passwords_file: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None,
        description="basic auth passwords, one 'CHARGE_POINT_ID:PASSWORD' per line (profiles 1 "
        "and 2); never logged",
    )
    code_only = ("passwords",)
    passwords: SkipJsonSchema[dict[str, Secret]] = Field(default_factory=dict)
    cert_file: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None, description="server certificate (PEM), profile 2"
    )
    key_file: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None, description="its private key (PEM), profile 2"
    )
    heartbeat_interval_s: Annotated[Duration, Range(10.0, 86400.0)] = Field(
        default=300.0,
        validation_alias="heartbeat_interval",
        description="Heartbeat interval given to charge points in BootNotification",
    )
    call_timeout_s: Annotated[Duration, Range(1.0, 600.0)] = Field(
        default=30.0,
        validation_alias="call_timeout",
        description="wait this long for a charge point's answer to a call",
    )


class WebConfig(_Listening):
    """The status page, API and metrics (gateway.web): off unless ``web:`` is set."""

    listen: Annotated[str, Text(check=check_listen)] = Field(
        default="127.0.0.1:8080",
        description="HOST:PORT of the status page, API and /metrics; beyond localhost only with "
        "users_file",
    )
    users_file: Annotated[str, FilePath(must_be="file")] | None = Field(
        default=None,
        description="NAME:scrypt-hash lines (evgw web-user add FILE NAME); with it every "
        "request needs HTTP basic auth",
    )

    @property
    def local_only(self) -> bool:
        return is_loopback(self.host)


class _Named(Protocol):
    @property
    def id(self) -> str: ...


_NamedT = TypeVar("_NamedT", bound=_Named)


def _by_id(items: Iterable[_NamedT], wanted: str) -> _NamedT:
    """The entry whose ``id`` is ``wanted``; KeyError when there is none."""
    for item in items:
        if item.id == wanted:
            return item
    raise KeyError(wanted)


class GatewayConfig(Model):
    """ev-site-gateway site configuration"""

    site: SiteConfig
    storage: StorageConfig
    uplink: UplinkConfig | None = None
    buses: Annotated[tuple[BusConfig, ...], AsTuple] = Field(
        default=(), description="serial lines; TCP devices need none"
    )
    endpoints: Annotated[tuple[EndpointConfig, ...], AsTuple] = Field(
        default=(),
        description="optional settings of Modbus TCP addresses that devices share (Modbus TCP "
        "gateways): inter-request delay, timeout, serial baud rate",
    )
    devices: Annotated[tuple[DeviceConfig, ...], AsTuple] = Field(
        default=(), description="chargers and meters"
    )
    auth: AuthConfig = Field(default=AuthConfig())
    # validated raw tariff data (gateway.billing.tariff checks each one)
    tariffs: dict[Annotated[str, ID], dict[str, Any]] = Field(
        default_factory=dict, description="tariff id -> tariff"
    )
    billing: BillingConfig = Field(default=BillingConfig())
    grid: GridConfig | None = None
    homeassistant: HomeAssistantConfig = Field(default=HomeAssistantConfig())
    ocpp: OcppConfig | None = Field(
        default=None, description="OCPP-J 1.6 server for chargers with driver: ocpp"
    )
    web: WebConfig | None = Field(
        default=None,
        description="live status page, JSON API, server-sent events and Prometheus metrics",
    )
    drivers_path: Annotated[str, FilePath(must_be="dir")] | None = Field(
        default=None, description="directory of site profiles (override shipped ones)"
    )
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], Choice("debug", "info", "warning", "error")
    ] = "info"
    code_only = ("source",)
    source: SkipJsonSchema[str] = ""  # file the config was loaded from; set by the loader

    @property
    def modbus_devices(self) -> tuple[DeviceConfig, ...]:
        """The devices the Modbus engine polls (every device but OCPP charge points)."""
        return tuple(d for d in self.devices if d.driver != OCPP_DRIVER)

    def device(self, device_id: str) -> DeviceConfig:
        return _by_id(self.devices, device_id)

    def bus(self, bus_id: str) -> BusConfig:
        return _by_id(self.buses, bus_id)

    def endpoint(self, host: str, port: int) -> EndpointConfig | None:
        """The ``endpoints:`` entry of a Modbus TCP address, None when it has none."""
        for ep in self.endpoints:
            if ep.host == host and ep.port == port:
                return ep
        return None
