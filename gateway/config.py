"""Site configuration: typed form, schema, loader with line-numbered errors, JSON Schema export.

The typed dataclasses below are what the rest of the gateway sees. Field names follow CONTRACT
section 3; durations are seconds (``*_s``), sizes carry their unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.model import Token

__all__ = [
    "AuthConfig",
    "BillingConfig",
    "BusConfig",
    "DeviceConfig",
    "GatewayConfig",
    "GridConfig",
    "Secret",
    "SiteConfig",
    "StorageConfig",
    "TlsConfig",
    "UplinkConfig",
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


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    site: SiteConfig
    storage: StorageConfig
    uplink: UplinkConfig | None = None
    buses: tuple[BusConfig, ...] = ()
    devices: tuple[DeviceConfig, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    tariffs: dict[str, dict[str, Any]] = field(default_factory=dict)  # validated raw tariff data
    billing: BillingConfig = field(default_factory=BillingConfig)
    grid: GridConfig | None = None
    drivers_path: str | None = None
    log_level: str = "info"
    source: str = ""  # file the config was loaded from

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

