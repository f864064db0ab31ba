"""Site configuration: the models (``models``), their value types and checks (``values``), the
checks between keys (``checks``, ``devices``), and the loader with line-numbered errors and the
JSON Schema export (``load``). Validation runs on the shared layer, ``gateway.schema``.

The typed models are what the rest of the gateway sees. Field names follow CONTRACT section 3;
durations are seconds (``*_s``), sizes carry their unit.
"""

from gateway.billing.policy import BillingConfig
from gateway.config.load import (
    UNAUTHENTICATED_WARNING,
    check_config,
    config_json_schema,
    load_config,
    summarize,
)
from gateway.config.models import (
    AuthConfig,
    BusConfig,
    DeviceConfig,
    EndpointConfig,
    GatewayConfig,
    GridConfig,
    HomeAssistantConfig,
    OcppConfig,
    SiteConfig,
    StorageConfig,
    TlsConfig,
    UplinkConfig,
    UplinkReadingsConfig,
    WebConfig,
)
from gateway.config.values import (
    OCPP_DRIVER,
    Secret,
    is_loopback,
    serial_answer_timeout_s,
    split_listen,
)
from gateway.schema import format_duration, parse_duration

__all__ = [
    "OCPP_DRIVER",
    "UNAUTHENTICATED_WARNING",
    "AuthConfig",
    "BillingConfig",
    "BusConfig",
    "DeviceConfig",
    "EndpointConfig",
    "GatewayConfig",
    "GridConfig",
    "HomeAssistantConfig",
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
