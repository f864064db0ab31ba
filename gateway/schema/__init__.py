"""One validation layer for every YAML file the gateway reads (config, profiles, tariffs,
simulator scenarios), on pydantic v2.

- ``Model``: the base class (strict, unknown keys refused, frozen, empty sections = absent).
- Types: ``Duration`` (the one duration syntax), ``Range``, ``Text``, ``Choice``, ``AsTuple``.
- ``validate_doc`` / ``validate_value`` / ``load_and_validate``: a document or value as a model,
  every problem added to the document as ``FILE:LINE:COL: path: message``.
- ``Problems`` / ``fail``: checks between keys inside model validators, with positions.
- ``json_schema``: the JSON Schema of a model.
"""

from gateway.schema.jsonschema import json_schema
from gateway.schema.model import Model, Problems, container_fields, unwrap
from gateway.schema.types import (
    DURATION_PATTERN,
    AsTuple,
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
from gateway.schema.validate import load_and_validate, problems_of, validate_doc, validate_value

__all__ = [
    "DURATION_PATTERN",
    "AsTuple",
    "Choice",
    "Duration",
    "Model",
    "Problems",
    "Range",
    "Text",
    "container_fields",
    "describe",
    "fail",
    "format_duration",
    "json_schema",
    "load_and_validate",
    "parse_duration",
    "problems_of",
    "suggest",
    "unwrap",
    "validate_doc",
    "validate_value",
]
