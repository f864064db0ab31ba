"""The base of every model, and the checks that need positions in the YAML document."""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar, NoReturn, Union

from pydantic import BaseModel, ConfigDict, model_validator

from gateway.schema.types import fail

__all__ = ["Model", "Problems", "container_fields", "unwrap"]

PathT = tuple[str | int, ...]


class Model(BaseModel):
    """Strict (no coercion: ``"5"`` is not 5, ``true`` is not 1), unknown keys refused, frozen.

    An optional section or list left empty in YAML (``devices:`` with every entry commented out)
    reads as if it were absent."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    _containers: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._containers = frozenset(container_fields(cls))

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(
            data.get(k, 0) is None for k in cls._containers if isinstance(k, str)
        ):
            return {k: v for k, v in data.items() if not (v is None and k in cls._containers)}
        return data


def unwrap(annotation: Any) -> Any:
    """``Annotated[X | None, ...]`` -> ``X``."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return unwrap(args[0])
    return annotation


def container_fields(model: type[BaseModel]) -> list[str]:
    """Optional fields holding a mapping, list or model: YAML null there means absent."""
    out = []
    for name, info in model.model_fields.items():
        if info.is_required():
            continue
        t = unwrap(info.annotation)
        origin = typing.get_origin(t) or t
        if origin in (tuple, list, dict) or (isinstance(t, type) and issubclass(t, BaseModel)):
            out.append(info.alias or name)
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
