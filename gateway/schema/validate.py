"""Validate a YAML document with a model and word every error as ``FILE:LINE:COL: path: message``.

Every error pydantic finds is reported, not just the first; positions come from
``gateway.yamlpos``; wording is the gateway's own ("expected an integer, got 'x'", "unknown key
'adress' (did you mean 'address'?)", "must be between 1 and 125, got 200").
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from gateway.errors import ConfigProblem
from gateway.schema.model import PathT, container_fields, fields_of, unwrap
from gateway.schema.types import ERROR_TYPE, describe, suggest
from gateway.yamlpos import YamlDoc, load_yaml

__all__ = [
    "adapter",
    "file_view",
    "load_and_validate",
    "problems_of",
    "validate_doc",
    "validate_parts",
    "validate_value",
]

M = TypeVar("M")

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
    """``data`` (found at ``path`` in ``doc``) as a ``model`` (a model, pydantic dataclass or any
    type pydantic validates); None after adding every problem to ``doc.problems``. ``context``
    reaches validators as ``info.context``. Only the keys a file may use are accepted (aliases,
    not the attribute names code uses)."""
    try:
        return adapter(model).validate_python(  # type: ignore[arg-type]
            data, context=context if context is not None else {}, by_alias=True, by_name=False
        )
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


def validate_parts(
    model: Any, data: Any, doc: YamlDoc, path: PathT = (), *, context: dict[str, Any]
) -> Any:
    """``data`` validated key by key, so that one bad value does not hide the rest: the valid
    parts as plain data keyed like the file (``file_view``), a bad list item as None, a bad key
    left out; every problem added to ``doc`` once. A model whose keys are all valid is validated
    whole (its model validators run). For files whose checks between keys must see every valid
    part (the site config); code builds the result with ``adapter(model).validate_python``."""
    t = unwrap(model)
    if fields_of(t) is None:
        t = _file_model(model) or t
    fields = fields_of(t)
    if fields is None or not isinstance(data, dict):
        if typing.get_origin(t) is tuple and isinstance(data, list):
            item = typing.get_args(t)[0]
            return [
                validate_parts(item, v, doc, (*path, i), context=context)
                for i, v in enumerate(data)
            ]
        return file_view(validate_value(model, data, doc, path, context=context))
    before = len(doc.problems)
    code_only = getattr(t, "code_only", ())
    empty = set(container_fields(t))
    out: dict[str, Any] = {}
    for key, value in data.items():
        info = fields.get(key) if isinstance(key, str) else None
        if info is None or key in code_only:
            hint = suggest(key, [k for k in fields if k not in code_only])
            doc.add((*path, key), f"unknown key '{key}'{hint}", key=True)
            continue
        if value is None and key in empty:
            continue
        annotation = (
            Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        )
        checked = validate_parts(annotation, value, doc, (*path, key), context=context)
        if checked is not None:
            out[key] = checked
    for key, info in fields.items():
        if info.is_required() and key not in data:
            doc.add((*path, key), f"missing required key '{key}'")
    if len(doc.problems) == before:
        return file_view(validate_value(model, data, doc, path, context=context))
    return out


def _file_model(annotation: Any) -> Any:
    """The model a type is read from (a marker with ``file_model``, e.g. a ``Token`` read from
    its entry model), looking through ``Optional``; None for any other type."""
    for part in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(part) is Annotated:
            for marker in part.__metadata__:
                if hasattr(marker, "file_model"):
                    return marker.file_model
    return None


def file_view(value: Any) -> Any:
    """A validated model as plain data: the keys its file set (YAML keys, not attribute names)
    with their validated values; lists as lists. Other values as they are."""
    if isinstance(value, BaseModel):
        keys = {
            info.validation_alias if isinstance(info.validation_alias, str) else name: name
            for name, info in type(value).model_fields.items()
        }
        return {
            key: file_view(getattr(value, name))
            for key, name in keys.items()
            if name in value.model_fields_set
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [file_view(v) for v in value]
    if isinstance(value, dict):
        return {k: file_view(v) for k, v in value.items()}
    return value


@functools.cache
def adapter(model: Any) -> TypeAdapter[Any]:
    """The (cached) validator of any type pydantic knows; a bare type (a key's type on its own)
    gets the models' rules (strict, finite numbers)."""
    t = unwrap(model)
    if fields_of(t) is not None or (isinstance(t, type) and dataclasses.is_dataclass(t)):
        return TypeAdapter(model)  # a model or dataclass carries its own configuration
    return TypeAdapter(model, config=_LEAF)


_LEAF = ConfigDict(strict=True, allow_inf_nan=False)


def problems_of(
    exc: ValidationError, model: Any, doc: YamlDoc, path: PathT = ()
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


def _word(err: Any, model: Any, loc: PathT) -> tuple[str, bool]:
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


def _fields_at(model: Any, loc: PathT) -> list[str]:
    """The keys the model at ``loc`` (below ``model``) accepts, for "did you mean"."""
    t: Any = model
    for part in loc:
        t = unwrap(t)
        origin = typing.get_origin(t)
        fields = fields_of(t)
        if fields is not None:
            if not isinstance(part, str) or part not in fields:
                return []
            t = fields[part].annotation
        elif origin in (tuple, list):
            t = typing.get_args(t)[0]
        elif origin is dict:
            t = typing.get_args(t)[1]
        else:
            return []
    return list(fields_of(unwrap(t)) or ())
