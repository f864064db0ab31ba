"""Validate a YAML document with a model and word every error as ``FILE:LINE:COL: path: message``.

Every error pydantic finds is reported, not just the first; positions come from
``gateway.yamlpos``; wording is the gateway's own ("expected an integer, got 'x'", "unknown key
'adress' (did you mean 'address'?)", "must be between 1 and 125, got 200").
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.errors import ConfigProblem
from gateway.schema.model import PathT, unwrap
from gateway.schema.types import ERROR_TYPE, describe, suggest
from gateway.yamlpos import YamlDoc, load_yaml

__all__ = ["load_and_validate", "problems_of", "validate_doc", "validate_value"]

M = TypeVar("M", bound=BaseModel)

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}


def validate_value(
    model: type[M],
    data: Any,
    doc: YamlDoc,
    path: PathT = (),
    *,
    context: dict[str, Any] | None = None,
) -> M | None:
    """``data`` (found at ``path`` in ``doc``) as a ``model``; None after adding every problem
    to ``doc.problems``. ``context`` reaches validators as ``info.context``."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        doc.problems.extend(problems_of(exc, model, doc, path))
        return None


def validate_doc(
    model: type[M], doc: YamlDoc, *, context: dict[str, Any] | None = None
) -> M | None:
    """The whole document as a ``model``; None when it has problems (all in ``doc.problems``,
    including YAML syntax errors found while loading)."""
    if doc.problems:
        return None
    return validate_value(model, doc.data, doc, (), context=context)


def load_and_validate(
    model: type[M], path: str | Path, *, context: dict[str, Any] | None = None
) -> tuple[M | None, YamlDoc]:
    """Read ``path`` and validate it: (the model or None, the document with its problems)."""
    doc = load_yaml(path)
    return validate_doc(model, doc, context=context), doc


def problems_of(
    exc: ValidationError, model: type[BaseModel], doc: YamlDoc, path: PathT = ()
) -> list[ConfigProblem]:
    """Every error of ``exc`` as a positioned problem in today's wording."""
    out: list[ConfigProblem] = []
    for err in exc.errors(include_url=False):
        loc: PathT = tuple(err["loc"])
        key = False
        if loc and loc[-1] == "[key]":  # a mapping key failed its own check
            loc, key = loc[:-1], True
        if err["type"] == ERROR_TYPE:
            ctx = err.get("ctx") or {}
            items = [(ctx.get("at", ()), ctx["message"], ctx.get("key", False))]
            items += list(ctx.get("more", ()))
            for at, message, at_key in items:
                if key:
                    message = f"key {message}"
                out.append(doc.problem((*path, *loc, *at), message, key=key or at_key))
            continue
        message, at_key = _word(err, model, loc)
        out.append(doc.problem((*path, *loc), message, key=key or at_key))
    return out


def _word(err: Any, model: type[BaseModel], loc: PathT) -> tuple[str, bool]:
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return f"missing required key '{loc[-1]}'", False
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        return f"unknown key '{loc[-1]}'{suggest(loc[-1], allowed)}", True
    if kind == "string_type" and isinstance(value, int | float) and not isinstance(value, bool):
        return "expected a string, got a number: quote the value", False
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {describe(value)}", False
    if kind == "finite_number":
        return f"must be a finite number, got {value}", False
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        word = {
            "greater_than_equal": ("at least", "ge"),
            "less_than_equal": ("at most", "le"),
            "greater_than": ("more than", "gt"),
            "less_than": ("less than", "lt"),
        }[kind]
        return f"must be {word[0]} {ctx[word[1]]}, got {value}", False
    if kind == "literal_error":
        choices = ctx.get("expected", "")
        return f"must be one of {choices}; got {describe(value)}", False
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"]), False
    return str(err["msg"]), False


def _fields_at(model: type[BaseModel], loc: PathT) -> list[str]:
    """The keys the model at ``loc`` (below ``model``) accepts, for "did you mean"."""
    t: Any = model
    for part in loc:
        t = unwrap(t)
        origin = typing.get_origin(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            fields = {(f.alias or n): f for n, f in t.model_fields.items()}
            if part not in fields:
                return []
            t = fields[part].annotation
        elif origin in (tuple, list):
            t = typing.get_args(t)[0]
        elif origin is dict:
            t = typing.get_args(t)[1]
        else:
            return []
    t = unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [f.alias or n for n, f in t.model_fields.items()]
    return []
