"""What a failed SQLite call means: the disk is full, the file is read-only, or the file itself
is damaged. Read from the primary result code (the low byte of the extended code Python gives
since 3.11) or, where an error carries no code, from SQLite's message.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["is_busy", "is_damage", "is_disk_full", "is_read_only"]

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26


def _is(exc: BaseException, codes: Collection[int], phrases: Collection[str]) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in codes
    text = str(exc).lower()
    return any(phrase in text for phrase in phrases)


def is_disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL, or an I/O error (ENOSPC can surface as SQLITE_IOERR_WRITE)."""
    return _is(exc, (_SQLITE_FULL, _SQLITE_IOERR), ("disk is full", "disk i/o error"))


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock; worth asking again."""
    return _is(exc, (_SQLITE_BUSY, _SQLITE_LOCKED), ("locked", "busy"))


def is_read_only(exc: BaseException) -> bool:
    return _is(exc, (_SQLITE_READONLY,), ("readonly database",))


def is_damage(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB: the file itself is bad (not locked, not missing)."""
    return _is(exc, (_SQLITE_CORRUPT, _SQLITE_NOTADB), ("malformed", "not a database"))
