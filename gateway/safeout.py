"""Text from session records made safe to show: on a terminal, in a CSV cell, in HTML.

Anything in a record that a person or a device chose (user ids, card tags, charger ids, flags) can
hold control characters: an escape sequence that rewrites the terminal, a carriage return that
hides the rest of a line, a bidirectional override that shows text in another order than it is
stored. :func:`printable` spells every such character out (``\\x1b``, ``\\u202e``), so what is
shown is what is stored. :func:`csv_cell` also keeps a spreadsheet from reading a cell as a
formula (OWASP "CSV injection"): a cell starting with ``= + - @``, a tab or a carriage return gets
a leading apostrophe, unless the cell is a plain number such as ``-1.50``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

__all__ = ["csv_cell", "csv_row", "printable"]

# Bidirectional embeddings, overrides and isolates (Unicode 15 "Bidi_Control" less the marks
# LRM/RLM/ALM, which change nothing but the position of neutral characters).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_SEPARATORS = frozenset("\u2028\u2029\x85")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or ch in _LINE_SEPARATORS or unicodedata.category(ch) in ("Cc", "Cs")


def printable(value: Any) -> str:
    """``value`` as text with every control character (C0, DEL, C1), line separator, lone
    surrogate and bidirectional override written as a backslash escape. A backslash stays a
    backslash: the output is for reading, not for parsing back."""
    text = "" if value is None else str(value)
    if all(ch.isprintable() and ch not in _BIDI for ch in text):
        return text
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)


def csv_cell(value: Any) -> str:
    """A CSV cell that no spreadsheet runs as a formula, with control characters escaped."""
    text = printable(value)
    if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def csv_row(values: Any) -> list[str]:
    return [csv_cell(v) for v in values]
