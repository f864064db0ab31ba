"""What the checks between config keys share: the document (positions, what the file says)
and helpers that word references to ids ("unknown bus 'x' (did you mean 'y'?)")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.schema import suggest
from gateway.tags import normalise_tag
from gateway.yamlpos import PathT, YamlDoc

__all__ = [
    "Ctx",
    "choices_hint",
    "first_line",
    "get",
    "ids",
    "keys_at",
    "section_items",
    "unknown",
]


@dataclass
class Ctx:
    doc: YamlDoc
    # (path, tariff id) of every charger naming a tariff, checked with the tariffs
    tariff_refs: list[tuple[PathT, str]] = field(default_factory=list)

    def add(self, path: PathT, message: str, *, key: bool = False) -> None:
        self.doc.add(path, message, key=key)

    def misplaced(
        self, path: PathT, present: set[str], names: Iterable[str], why: Callable[[str], str]
    ) -> None:
        """Each of ``names`` written at ``path``, where it means nothing: ``why(name)``, at the
        key."""
        for name in names:
            if name in present:
                self.add((*path, name), why(name), key=True)


def choices_hint(name: str, choices: Iterable[str], plural: str) -> str:
    names = sorted(choices)
    suggestion = suggest(name, names)
    if suggestion:
        return suggestion
    if not names:
        return f" (no {plural} are defined)"
    if len(names) <= 12:
        return f" (defined {plural}: {', '.join(names)})"
    return ""


def unknown(kind: str, name: str, choices: Iterable[str], plural: str) -> str:
    return f"unknown {kind} '{name}'{choices_hint(name, choices, plural)}"


def first_line(ctx: Ctx, path: PathT) -> int:
    return ctx.doc.where(path)[0]


def section_items(raw: dict[str, Any], section: str) -> list[tuple[int, dict[str, Any]]]:
    return [(i, item) for i, item in enumerate(raw.get(section) or []) if isinstance(item, dict)]


def ids(
    ctx: Ctx,
    items: list[tuple[int, dict[str, Any]]],
    section: PathT,
    kind: str,
    *,
    fold: bool = False,
) -> dict[str, int]:
    """id -> index of its first definition; reports later duplicates."""
    seen: dict[str, int] = {}
    for i, item in items:
        ident = item.get("id")
        if not isinstance(ident, str):
            continue
        # Token ids compare in the normal form tags read from chargers have (gateway.tags).
        key = (normalise_tag(ident) or ident) if fold else ident
        if key in seen:
            first = (*section, seen[key], "id")
            note = ""
            if fold and get(ctx, first) != ident:
                note = (
                    "; token ids are compared in one normal form (case, hex separators, "
                    "NUL and spaces ignored)"
                )
            ctx.add(
                (*section, i, "id"),
                f"duplicate {kind} id '{ident}' "
                f"(first defined at line {first_line(ctx, first)}{note})",
            )
        else:
            seen[key] = i
    return seen


def get(ctx: Ctx, path: PathT) -> Any:
    node = ctx.doc.data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def keys_at(ctx: Ctx, path: PathT) -> set[str]:
    node = get(ctx, path)
    return {k for k in node if isinstance(k, str)} if isinstance(node, dict) else set()
