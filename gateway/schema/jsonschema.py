"""JSON Schema (draft 2020-12) of a model, for editors and for checking files in."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

__all__ = ["json_schema"]


class _Schema(GenerateJsonSchema):
    """Pydantic's generator, without the per-model "title" noise; optional sections accept
    YAML null (an empty section reads as absent)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        out = super().model_schema(schema)
        out.pop("title", None)
        return out


def json_schema(model: type[BaseModel], *, title: str, id: str) -> dict[str, Any]:
    """``model``'s JSON Schema with ``title`` and ``$id``; key order is stable, so the output
    can be checked in and compared."""
    body = model.model_json_schema(schema_generator=_Schema, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": id,
        "title": title,
        **body,
    }
