"""Device profiles: the data that tells the generic Modbus engine how to talk to one device model.

A profile is a YAML file in ``drivers/`` (shipped in the wheel) or in a site's ``drivers_path``.
The format is documented in docs/profiles.md. Nothing here does I/O on a bus.

- ``spec``: the typed form (``Profile`` and its parts) the engine, simulators and balancer read;
- ``fields``: the file as written, one pydantic model per section (gateway.schema), from which
  the JSON Schema (``profile.schema.json``) is generated;
- ``build``: the rules between sections, from a checked file to a ``Profile``;
- ``load``: finding, reading and caching files; ``describe``: ``evgw drivers SLUG``.

Register tables, data types and ``RegisterSpec`` are Modbus vocabulary: gateway.modbus.types.
"""

from gateway.profiles.describe import describe_profile
from gateway.profiles.load import (
    SCHEMA_FILE,
    load_profile,
    load_profiles,
    profile_json_schema,
    shipped_drivers_dir,
)
from gateway.profiles.spec import (
    CANONICAL_QUANTITIES,
    KNOWN_FROM,
    Condition,
    ConnectionSpec,
    ControlSpec,
    CurrentLimitSpec,
    HeartbeatSpec,
    IdentifySpec,
    OnConnectWrite,
    Profile,
    StateRule,
    StateSpec,
    TagSpec,
)

__all__ = [
    "CANONICAL_QUANTITIES",
    "KNOWN_FROM",
    "SCHEMA_FILE",
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
    "describe_profile",
    "load_profile",
    "load_profiles",
    "profile_json_schema",
    "shipped_drivers_dir",
]
