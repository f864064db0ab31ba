"""JSON Schemas (draft 2020-12) of every MQTT payload, and a small validator.

The validator implements exactly the keywords our schemas use (listed in ``_KEYWORDS``); a
schema using any other keyword is refused when loaded, so nothing is silently ignored. It keeps
``jsonschema`` a test-only dependency: the test suite checks every schema with it (metaschema)
and cross-checks both validators on the same payloads.
"""

from __future__ import annotations

import functools
import json
import math
import re
from importlib import resources
from typing import Any

__all__ = ["SCHEMA_NAMES", "load_schema", "validate"]

SCHEMA_NAMES = (
    "auth-request",
    "auth-response",
    "charger-status",
    "command-availability",
    "command-limit",
    "command-reply",
    "command-reset",
    "command-start",
    "command-stop",
    "command-tariffs",
    "command-tokens",
    "gateway-key",
    "gateway-status",
    "grid-limit",
    "readings",
    "session",
    "session-started",
)

_KEYWORDS = frozenset(
    {
        "$schema",
        "$id",
        "title",
        "description",
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "anyOf",
        "oneOf",
    }
)


@functools.cache
def _load(name: str) -> str:
    if name not in SCHEMA_NAMES:
        raise KeyError(f"no payload schema named {name!r}")
    text = resources.files("gateway.uplink").joinpath("schemas", f"{name}.json").read_text("utf-8")
    _check_keywords(json.loads(text), name)
    return text


def load_schema(name: str) -> dict[str, Any]:
    """A fresh copy of the named schema (``session``, ``command-start``, ...)."""
    result: dict[str, Any] = json.loads(_load(name))
    return result


@functools.cache
def _compiled(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_load(name))
    return result


def validate(name: str, payload: Any) -> list[str]:
    """Problems of ``payload`` against the named schema (``path: message``); [] when valid."""
    errors: list[str] = []
    _validate(_compiled(name), payload, "$", errors)
    return errors


def _check_keywords(schema: Any, where: str) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: schema must be an object")
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"{where}: unsupported schema keywords {sorted(unknown)}")
    for key, sub in schema.get("properties", {}).items():
        _check_keywords(sub, f"{where}.properties.{key}")
    for key in ("items", "additionalProperties"):
        if key in schema:
            _check_keywords(schema[key], f"{where}.{key}")
    for key in ("anyOf", "oneOf"):
        for i, sub in enumerate(schema.get(key, ())):
            _check_keywords(sub, f"{where}.{key}[{i}]")


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    raise ValueError(f"unknown type {kind!r}")


def _equal(a: Any, b: Any) -> bool:
    # JSON equality: true is not 1
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _validate(schema: Any, value: Any, path: str, errors: list[str]) -> None:
    if schema is True:
        return
    if schema is False:
        errors.append(f"{path}: not allowed")
        return
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(k, value) for k in kinds):
            errors.append(f"{path}: expected {' or '.join(kinds)}, got {_describe(value)}")
            return
    if "const" in schema and not _equal(schema["const"], value):
        errors.append(f"{path}: must be {json.dumps(schema['const'])}")
    if "enum" in schema and not any(_equal(v, value) for v in schema["enum"]):
        errors.append(f"{path}: must be one of {', '.join(json.dumps(v) for v in schema['enum'])}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            errors.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: less than {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: greater than {schema['maximum']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                _validate(schema["items"], item, f"{path}[{i}]", errors)
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required key {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                _validate(props[key], item, f"{path}.{key}", errors)
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            else:
                _validate(extra, item, f"{path}.{key}", errors)
    if "anyOf" in schema:
        trials = [_trial(sub, value, path) for sub in schema["anyOf"]]
        if all(trials):
            errors.append(
                f"{path}: matches none of the allowed forms ({'; '.join(t[0] for t in trials)})"
            )
    if "oneOf" in schema:
        trials = [_trial(sub, value, path) for sub in schema["oneOf"]]
        matched = sum(1 for t in trials if not t)
        if matched == 0:
            best = min(trials, key=len)
            errors.extend(best)
        elif matched > 1:
            errors.append(f"{path}: matches more than one form")


def _trial(schema: Any, value: Any, path: str) -> list[str]:
    errors: list[str] = []
    _validate(schema, value, path, errors)
    return errors


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
