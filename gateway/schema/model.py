"""The base of every model, and the checks that need positions in the YAML document.

``Model``: strict (no coercion: ``"5"`` is not 5, ``true`` is not 1), unknown keys refused,
frozen (hashable, ``model_copy(update=...)`` for a changed copy), and an optional section or list
left empty in YAML (``devices:`` with every entry commented out) read as if it were absent. A YAML
key that differs from the attribute is declared as ``Field(validation_alias="timeout")`` on
``timeout_s``: files use the key (``gateway.schema.validate_*``), code the attribute name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn, TypeVar, Union, cast

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator
from pydantic.fields import FieldInfo

from gateway.schema.types import fail

__all__ = ["STRICT", "Model", "Problems", "container_fields", "fields_of", "to_spec", "unwrap"]

T = TypeVar("T")

PathT = tuple[str | int, ...]

STRICT = ConfigDict(
    strict=True,
    extra="forbid",
    frozen=True,
    allow_inf_nan=False,
    validate_by_name=True,
    validate_by_alias=True,
)

_containers: dict[type, frozenset[str]] = {}


def _drop_empty(cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    keys = _containers.get(cls)
    if keys is None:
        keys = _containers[cls] = frozenset(container_fields(cls))
    if any(data.get(k, 0) is None for k in keys):
        return {k: v for k, v in data.items() if not (v is None and k in keys)}
    return data


class Model(BaseModel):
    model_config = STRICT

    # Fields code sets but a file may not (hide them from the JSON Schema with SkipJsonSchema).
    code_only: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any, info: ValidationInfo) -> Any:
        if info.context is not None and isinstance(data, dict):
            for name in cls.code_only:
                if name in data:
                    raise fail(f"unknown key '{name}'", at=(name,), key=True)
        return _drop_empty(cls, data)


def to_spec(model: BaseModel, spec: type[T], /, **computed: Any) -> T:
    """The dataclass ``spec`` built from a checked ``model``: the ``computed`` fields as given,
    every other field copied from the model's field of the same name (a spec field the model
    lacks is a TypeError: nothing falls back to a default unseen)."""
    values = dict(computed)
    for f in dataclasses.fields(cast(Any, spec)):
        if f.name not in values:
            if f.name not in type(model).model_fields:
                raise TypeError(f"{spec.__name__}.{f.name}: not in {type(model).__name__}")
            values[f.name] = getattr(model, f.name)
    return cast(Callable[..., T], spec)(**values)


def unwrap(annotation: Any) -> Any:
    """``Annotated[X | None, ...]`` -> ``X``."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return unwrap(args[0])
    return annotation


def fields_of(t: Any) -> dict[str, FieldInfo] | None:
    """Input key -> field of a model or pydantic dataclass; None for anything else."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        fields = t.model_fields
    elif isinstance(t, type) and hasattr(t, "__pydantic_fields__"):
        fields = t.__pydantic_fields__
    else:
        return None
    out = {}
    for name, info in fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        out[alias or name] = info
    return out


def container_fields(model: type) -> list[str]:
    """Optional fields holding a mapping, list or model: YAML null there means absent."""
    out = []
    for key, info in (fields_of(model) or {}).items():
        if info.is_required():
            continue
        t = unwrap(info.annotation)
        origin = typing.get_origin(t) or t
        if origin in (tuple, list, dict) or fields_of(t) is not None:
            out.append(key)
    return out


class Problems:
    """Checks between keys inside a model validator, reported all at once with their positions::

        @model_validator(mode="after")
        def _periods(self) -> Self:
            problems = Problems()
            if self.period >= self.timeout:
                problems.add(("period",), "must be shorter than the timeout")
            problems.raise_any()
            return self

    Paths are relative to the model being validated; ``key=True`` points at the key rather than
    the value (for "X is not allowed here")."""

    def __init__(self) -> None:
        self.items: list[tuple[PathT, str, bool]] = []

    def add(self, at: PathT, message: str, *, key: bool = False) -> None:
        self.items.append((tuple(at), message, key))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_any(self) -> None:
        if self.items:
            self._raise()

    def _raise(self) -> NoReturn:
        first = fail(self.items[0][1], at=self.items[0][0], key=self.items[0][2])
        ctx = dict(first.context or {})
        ctx["more"] = tuple(self.items[1:])
        raise type(first)(first.type, "{message}", ctx)
