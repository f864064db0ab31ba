"""Keeping secrets out of error messages: URLs lose their password before they are shown."""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# scheme://user:PASSWORD@host: everything between the first ':' of the user part and the last
# '@' of the authority (a password may itself hold '@', ':' or '/' when not percent-encoded).
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*:)(?P<pw>\S*)@")
# key=value connection parameters (libpq DSNs and URL query strings).
_PARAM = re.compile(r"(?i)(?P<key>\bpass(?:word)?|\bsecret|\btoken)(?P<sep>\s*=\s*)(?P<v>[^&\s]+)")


def redact_url(text: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``; also ``password=...``."""
    out = _USERINFO.sub(lambda m: f"{m['head']}***@", text, count=1)
    return _PARAM.sub(lambda m: f"{m['key']}{m['sep']}***", out)
