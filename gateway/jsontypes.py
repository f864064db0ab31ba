"""JSON field types shared by the MQTT payload models and the session record.

A key that may be absent but never ``null`` is typed ``X | SkipJsonSchema[None] = None``: the
model reads it as None, the generated JSON Schema does not accept ``null``. Numbers keep the int
or float they came as (``Number``, ``NonNegative``), so a record read into a model dumps to the
same canonical bytes and hashes the same.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

__all__ = [
    "DECIMAL",
    "HEX64",
    "SNAKE",
    "UTC_TIME",
    "DecimalText",
    "Hex64",
    "Ident",
    "NonNegative",
    "Number",
    "RecordSignature",
    "TokenTypeName",
    "UtcTime",
    "Version",
    "WireModel",
]

UTC_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$"
DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"
SNAKE = r"^[a-z][a-z0-9_]*$"
HEX64 = r"^[0-9a-f]{64}$"
MAX_SAFE_VERSION = 2**53  # a version number every JSON reader holds exactly

UtcTime = Annotated[str, Field(pattern=UTC_TIME)]
Ident = Annotated[str, Field(min_length=1, max_length=128)]
DecimalText = Annotated[str, Field(pattern=DECIMAL)]
Hex64 = Annotated[str, Field(pattern=HEX64)]
Version = Annotated[int, Field(ge=1, le=MAX_SAFE_VERSION)]
TokenTypeName = Literal["rfid", "keyfob", "app"]
# A JSON number as it came (int or float): the schema says "number", the model keeps the type.
Number = Annotated[int | float, WithJsonSchema({"type": "number"})]
NonNegative = Annotated[
    Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0)],
    WithJsonSchema({"type": "number", "minimum": 0}),
]


class WireModel(BaseModel):
    """A payload: unknown keys refused, strict JSON types, finite numbers, immutable."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, populate_by_name=True, allow_inf_nan=False
    )


class RecordSignature(WireModel):
    """Ed25519 over the ASCII hex of a hash (session records, key rotations)."""

    alg: Literal["ed25519"]
    key_id: Ident
    value: Annotated[str, Field(min_length=1)]
