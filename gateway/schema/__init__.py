"""One validation layer for every YAML file the gateway reads (config, profiles, tariffs,
simulator scenarios), on pydantic v2.

- ``Model``: the base (strict, unknown keys refused, frozen, empty sections = absent).
- Types: ``Duration`` (the one duration syntax), ``Range``, ``Text``, ``Choice``, ``AsTuple``.
- ``validate_doc`` / ``validate_value`` / ``load_and_validate``: a document or value as a model,
  every problem added to the document as ``FILE:LINE:COL: path: message``.
- ``Problems`` / ``fail``: checks between keys inside model validators, with positions.
- ``json_schema``: the JSON Schema of a model.
"""

from gateway.schema.jsonschema import json_schema
from gateway.schema.model import (
    STRICT,
    Model,
    Problems,
    container_fields,
    fields_of,
    to_spec,
    unwrap,
)
from gateway.schema.types import (
    DURATION_PATTERN,
    AsTuple,
    Check,
    Choice,
    Duration,
    Range,
    Text,
    describe,
    fail,
    format_duration,
    parse_duration,
    suggest,
)
from gateway.schema.validate import (
    adapter,
    file_view,
    load_and_validate,
    problems_of,
    validate_doc,
    validate_parts,
    validate_value,
)

__all__ = [
    "DURATION_PATTERN",
    "STRICT",
    "AsTuple",
    "Check",
    "Choice",
    "Duration",
    "Model",
    "Problems",
    "Range",
    "Text",
    "adapter",
    "container_fields",
    "describe",
    "fail",
    "fields_of",
    "file_view",
    "format_duration",
    "json_schema",
    "load_and_validate",
    "parse_duration",
    "problems_of",
    "suggest",
    "to_spec",
    "unwrap",
    "validate_doc",
    "validate_parts",
    "validate_value",
]
