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

from gateway.profiles import spec
from gateway.profiles.describe import describe_profile
from gateway.profiles.load import (
    SCHEMA_FILE,
    load_profile,
    load_profiles,
    profile_json_schema,
    shipped_drivers_dir,
)

# The typed form is the package's API as spec.__all__ lists it (the asyncio package re-exports
# its modules the same way): one list to keep, not three.
from gateway.profiles.spec import *  # noqa: F403

__all__ = [
    "SCHEMA_FILE",
    "describe_profile",
    "load_profile",
    "load_profiles",
    "profile_json_schema",
    "shipped_drivers_dir",
]
__all__ += spec.__all__
