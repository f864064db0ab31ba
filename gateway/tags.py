"""One normal form for an identification tag (RFID card UID, OCPP idTag), whatever the encoding.

Chargers show the same card differently: NUL-padded on the right (most), right-aligned behind
leading NULs (Bender 720, Phoenix EV-ETH 606, CHARX 1275, Webasto NEXT 1600), space-padded,
lower- or upper-case hex, hex bytes with separators (``04:a2:b3``), a ``0x`` prefix. Local and
cloud token lists are typed by people, with the same variety. Both sides go through
:func:`normalise_tag`, so one card is one token on every charger:

1. cut at the first NUL after leading NULs and whitespace are stripped (a C string), then strip
   whitespace again;
2. upper-case (UIDs are hex and compared case-insensitively; idTags are compared the same way);
3. a hex UID written as byte pairs with one separator (``:``, ``-`` or space) loses the
   separators; a ``0x`` prefix before hex digits is dropped.

Byte order is changed only where a profile says the charger shows a hex UID least significant
byte first (``tag.byte_order: reversed``, :func:`reverse_hex_bytes`); no shipped profile is known
to. Truncated UIDs (KEBA shows 4 bytes) stay truncated; on a charger whose profile says
``tag.truncated_to`` the authoriser matches them as a unique prefix of a known token.
"""

from __future__ import annotations

import re

__all__ = ["normalise_tag", "reverse_hex_bytes"]

_STRIP = "\x00 \t\r\n"
_HEX_PAIRS = re.compile(r"^[0-9A-F]{2}(?:([:\- ])[0-9A-F]{2})(?:\1[0-9A-F]{2})*$")
_HEX_PREFIXED = re.compile(r"^0X([0-9A-F]+)$")


def normalise_tag(raw: str | None) -> str | None:
    """The normal form of a tag, or None when nothing is left (no tag)."""
    if raw is None:
        return None
    text = raw.strip(_STRIP)
    if "\x00" in text:
        text = text.split("\x00", 1)[0].strip(_STRIP)
    text = text.upper()
    if _HEX_PAIRS.match(text):
        text = re.sub(r"[:\- ]", "", text)
    elif m := _HEX_PREFIXED.match(text):
        text = m.group(1)
    return text or None


_HEX = re.compile(r"^(?:[0-9A-F]{2})+$")


def reverse_hex_bytes(tag: str | None) -> str | None:
    """A normalised hex UID with its bytes in reverse order; other text unchanged."""
    if tag is None or not _HEX.match(tag):
        return tag
    return "".join(reversed([tag[i : i + 2] for i in range(0, len(tag), 2)]))
