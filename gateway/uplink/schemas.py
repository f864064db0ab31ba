"""JSON Schemas (draft 2020-12) of every MQTT payload: generated from the models, and validation.

The models in :mod:`gateway.uplink.payloads` are the source; :func:`generate` turns one into its
JSON Schema, and ``python -m gateway.uplink.schemas`` writes them all to ``schemas/*.json``, the
files checked in for cloud developers (a test keeps them equal to the generation). Payloads are
validated by ``jsonschema``'s Draft 2020-12 validator against those files (a number must also be
finite); its errors are told as ``$.path: problem``, one line each.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
from jsonschema import Draft202012Validator, TypeChecker, ValidationError, validators
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from gateway.uplink.payloads import PAYLOAD_MODELS

__all__ = [
    "SCHEMA_NAMES",
    "generate",
    "load_schema",
    "model_problems",
    "validate",
    "write_schemas",
]

SCHEMA_NAMES = tuple(sorted(PAYLOAD_MODELS))
DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://evgw.dev/schemas/"


class _WireSchema(GenerateJsonSchema):
    """pydantic's generation without what the wire form does not say: no per-field titles, no
    defaults (an absent key is absent, not a value)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])


def generate(name: str) -> dict[str, Any]:
    """The JSON Schema of the named payload, from its model."""
    if name not in PAYLOAD_MODELS:
        raise KeyError(f"no payload schema named {name!r}")
    body = PAYLOAD_MODELS[name].model_json_schema(by_alias=True, schema_generator=_WireSchema)
    return {"$schema": DIALECT, "$id": f"{BASE_ID}{name}.json", **body}


def schema_text(name: str) -> str:
    """The file ``schemas/{name}.json`` as it is checked in."""
    return json.dumps(generate(name), indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every payload schema into ``directory``; the paths written."""
    written = []
    for name in SCHEMA_NAMES:
        path = directory / f"{name}.json"
        path.write_text(schema_text(name), encoding="utf-8")
        written.append(path)
    return written


@functools.cache
def _text(name: str) -> str:
    if name not in SCHEMA_NAMES:
        raise KeyError(f"no payload schema named {name!r}")
    return resources.files("gateway.uplink").joinpath("schemas", f"{name}.json").read_text("utf-8")


def load_schema(name: str) -> dict[str, Any]:
    """A fresh copy of the named schema (``session``, ``command-start``, ...)."""
    result: dict[str, Any] = json.loads(_text(name))
    return result


def _finite_number(checker: TypeChecker, instance: Any) -> bool:
    return Draft202012Validator.TYPE_CHECKER.is_type(instance, "number") and math.isfinite(instance)


# Python's json reads NaN and Infinity, which JSON has not: no number of ours is either.
_Validator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("number", _finite_number),
)


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    validator: Draft202012Validator = _Validator(json.loads(_text(name)))
    return validator


def validate(name: str, payload: Any) -> list[str]:
    """Problems of ``payload`` against the named schema (``path: message``); [] when valid."""
    errors = list(_validator(name).iter_errors(payload))
    # A value outside an enum or const gets that one line (it names the values allowed), not
    # also the type those values have.
    listed = {tuple(e.absolute_path) for e in errors if e.validator in ("enum", "const")}
    lines = (
        line
        for error in errors
        if error.validator != "type" or tuple(error.absolute_path) not in listed
        for line in _lines(error)
    )
    return list(dict.fromkeys(lines))  # a key missing is one error per key, each naming all


def model_problems(exc: pydantic.ValidationError) -> list[str]:
    """A model's refusal of a payload its schema accepts (an integer written 1.0) in the same
    form as :func:`validate`'s problems."""
    return [f"{_json_path(e['loc'])}: {e['msg']}" for e in exc.errors()]


# -- errors as lines ---------------------------------------------------------------------------


def _json_path(parts: Iterable[str | int]) -> str:
    """``$.a[0].b``: where in a payload a problem is."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


# JSON's names for a payload's values; the first that holds wins (a boolean is an int too).
_JSON_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),
    ((int, float), "number"),
    (str, "string"),
    (list, "array"),
)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf
    return next((word for kind, word in _JSON_KINDS if isinstance(value, kind)), "object")


def _kinds(error: ValidationError) -> list[str]:
    kinds: Any = error.validator_value
    return list(kinds) if isinstance(kinds, list) else [str(kinds)]


def _lines(error: ValidationError) -> list[str]:
    path, keyword = _json_path(error.absolute_path), error.validator
    limit: Any = error.validator_value
    value: Any = error.instance
    if keyword == "type":
        return [f"{path}: expected {' or '.join(_kinds(error))}, got {_describe(value)}"]
    if keyword == "const":
        return [f"{path}: must be {json.dumps(limit)}"]
    if keyword == "enum":
        return [f"{path}: must be one of {', '.join(json.dumps(v) for v in limit)}"]
    if keyword == "required":
        return [f"{path}: missing required key {key!r}" for key in limit if key not in value]
    if keyword == "additionalProperties":
        schema: Any = error.schema
        known = schema.get("properties", {})
        return [f"{path}: unexpected key {key!r}" for key in value if key not in known]
    if keyword in ("anyOf", "oneOf"):
        return _alternatives(error)
    wording = {
        "minLength": "shorter than {} characters",
        "maxLength": "longer than {} characters",
        "pattern": "does not match {}",
        "minimum": "less than {}",
        "maximum": "greater than {}",
        "minItems": "fewer than {} items",
        "maxItems": "more than {} items",
    }.get(str(keyword))
    if wording is not None:
        return [f"{path}: {wording.format(limit)}"]
    if keyword == "false":
        return [f"{path}: not allowed"]
    return [f"{path}: {error.message}"]


def _alternatives(error: ValidationError) -> list[str]:
    """anyOf/oneOf: the problems of the form that was meant: not one whose type does not even
    match (when none does, one line names the types expected), and the closest one (fewest
    problems) when that is clear; otherwise the first problem of each form."""
    path = _json_path(error.absolute_path)
    if error.validator == "oneOf" and not error.context:
        return [f"{path}: matches more than one form"]
    by_form: dict[str | int, list[ValidationError]] = {}
    for sub in error.context or ():
        by_form.setdefault(sub.relative_schema_path[0], []).append(sub)
    forms = list(by_form.values())
    meant = [f for f in forms if not any(_type_miss(e) for e in f)]
    if not meant and forms:
        kinds = [k for f in forms for e in f if e.validator == "type" for k in _kinds(e)]
        return [
            f"{path}: expected {' or '.join(dict.fromkeys(kinds))}, got {_describe(error.instance)}"
        ]
    fewest = min(len(f) for f in meant)
    closest = [f for f in meant if len(f) == fewest]
    if len(closest) == 1:
        return [line for sub in closest[0] for line in _lines(sub)]
    return [f"{path}: matches none of the allowed forms ({'; '.join(_first(meant))})"]


def _type_miss(sub: ValidationError) -> bool:
    return sub.validator == "type" and not sub.relative_path


def _first(forms: Iterable[list[ValidationError]]) -> list[str]:
    return [_lines(f[0])[0] for f in forms if f]


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.uplink.schemas [DIR]``: regenerate the checked-in schema files."""
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else Path(__file__).with_name("schemas")
    for path in write_schemas(directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
