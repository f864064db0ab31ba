"""Value types and checks of the site config: ids, hosts, URLs, listen addresses, file paths,
secrets and timestamps, each a ``gateway.schema`` marker with the config's wording."""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from gateway.schema import Check, Text, describe, fail, suggest

__all__ = [
    "BAUDRATES",
    "CP_ID",
    "CP_ID_RE",
    "ID",
    "OCPP_DRIVER",
    "FilePath",
    "Host",
    "Secret",
    "SecretRef",
    "Timestamp",
    "check_listen",
    "check_topic_prefix",
    "check_url",
    "is_loopback",
    "serial_answer_timeout_s",
    "split_listen",
]

OCPP_DRIVER = "ocpp"  # a device with this driver is an OCPP-J charge point, not a Modbus profile
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)

ID_RE = r"[A-Za-z0-9_-]{1,64}"
ID_HINT = "1 to 64 characters of A-Z a-z 0-9 _ -"
# OCPP identities end up in a URL path and as the basic auth user name (no ':' there).
CP_ID_RE = r"[A-Za-z0-9_.*-]{1,48}"
CP_ID_HINT = "1 to 48 characters of A-Z a-z 0-9 _ . * -"
ENV_REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*\}"
HHMM_RE = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]|24:00"

ID = Text(pattern=ID_RE, hint=ID_HINT)
CP_ID = Text(pattern=CP_ID_RE, hint=CP_ID_HINT)


class Secret(str):
    """A string that never shows itself in repr, logs or error messages."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"

    def reveal(self) -> str:
        return str.__str__(self)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())


# A serial line's worst request: FC03/04 of 125 registers answers 255 bytes, the request is 8;
# 11 bits a character (start, 8 data, parity or a second stop, stop).
_SERIAL_ROUND_TRIP_BYTES = 8 + 255
# Device turnaround (up to ~60 ms), the converter's own processing and the LAN.
_SERIAL_SLACK_S = 0.5


def serial_answer_timeout_s(baudrate: int) -> float:
    """Answer timeout for a device on a serial line of ``baudrate`` reached through a Modbus TCP
    gateway: the longest request and answer on the wire plus slack, never below the usual 1 s.
    9600 baud: 1 s; 2400 baud: 1.7 s; 1200 baud: 2.9 s."""
    wire_s = _SERIAL_ROUND_TRIP_BYTES * 11 / baudrate
    return max(1.0, round(wire_s + _SERIAL_SLACK_S, 1))


_URL_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>[A-Za-z0-9._-]+)(?::(?P<port>[0-9]+))?/?"
)


def check_timezone(name: str) -> str | None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        hint = suggest(name, _zones()) or " (use an IANA name like Europe/Berlin)"
        return f"unknown time zone {name!r}{hint}"
    return None


def _zones() -> set[str]:
    try:
        return zoneinfo.available_timezones()
    except OSError:  # pragma: no cover - no tz database to list
        return set()


def check_url(url: str) -> str | None:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme and scheme not in ("mqtt", "mqtts"):
        return f"unsupported scheme '{scheme}': use mqtt:// or mqtts://"
    if "@" in url:  # never echo it: it may hold a password
        return "credentials do not belong in the url: use username and password_file"
    m = _URL_RE.fullmatch(url)
    if not scheme or m is None:
        return f"expected mqtt://host[:port] or mqtts://host[:port], got {url!r}"
    if m["port"] is not None and not 1 <= int(m["port"]) <= 65535:
        return f"port must be between 1 and 65535, got {int(m['port'])}"
    return None


def check_topic_prefix(prefix: str) -> str | None:
    if "+" in prefix or "#" in prefix:
        return f"must not contain the MQTT wildcards + or #, got {prefix!r}"
    if prefix.startswith("/") or prefix.endswith("/"):
        return f"must not start or end with /, got {prefix!r}"
    if prefix.startswith("$"):
        return f"must not start with $ (reserved for broker topics), got {prefix!r}"
    if "\0" in prefix or "//" in prefix:
        return f"must not contain empty topic levels, got {prefix!r}"
    return None


def split_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6ADDR]:PORT"`` -> (host, port); ValueError when malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([A-Za-z0-9._-]*):([0-9]{1,5})", listen)
    if m is None:
        raise ValueError(f"expected HOST:PORT (IPv6 as [ADDR]:PORT), got {listen!r}")
    host = m[1] if m[1] is not None else m[3]
    port = int(m[2] if m[2] is not None else m[4])
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1 to 65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``: localhost, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str) -> str | None:
    try:
        split_listen(listen)
    except ValueError as exc:
        return str(exc)
    return None


def _check_host(host: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9._:-]+", host) or "://" in host:
        return f"expected a host name or IP address, got {host!r}"
    return None


Host = Text(check=_check_host)


class FilePath(Check):
    """A file system path; relative paths are relative to the config file's directory (the
    validation context's ``base_dir``). ``must_be``: None, ``"file"`` (readable) or ``"dir"``."""

    def __init__(self, *, must_be: str | None = None) -> None:
        self.must_be = must_be
        self.text = Text()

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> str:
        text = self.text.validate(value, info)
        if info.context is None or "base_dir" not in info.context:
            return text
        resolved = (Path(info.context["base_dir"]) / Path(text).expanduser()).resolve()
        if self.must_be == "file":
            try:
                with resolved.open("rb"):
                    pass
            except OSError as exc:
                raise fail(f"cannot read {resolved}: {exc.strerror}") from None
        elif self.must_be == "dir" and not resolved.is_dir():
            what = "not a directory" if resolved.exists() else "directory not found"
            raise fail(f"{what}: {resolved}")
        return str(resolved)

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}


class SecretRef(Check):
    """A password given as ``"${ENV_VAR}"`` in the file (resolved by the loader), or a
    ``Secret`` that code or the loader put there."""

    def __init__(self, env_hint: str) -> None:
        self.text = Text(
            pattern=ENV_REF,
            hint=f'an environment variable reference like "${{{env_hint}}}"'
            + (
                " (a literal password belongs in password_file)"
                if env_hint == "MQTT_PASSWORD"
                else ""
            ),
            secret=True,
        )

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> Secret:
        if isinstance(value, Secret):
            return value
        return Secret(self.text.validate(value, info))

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "pattern": f"^(?:{ENV_REF})$"}


_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_TIMESTAMP_WHAT = 'an RFC 3339 timestamp with a time zone like "2026-12-31T23:59:59Z"'


class _Timestamp(Check):
    """Seconds since the epoch, from an RFC 3339 timestamp with a time zone."""

    def validate(self, value: Any, info: core_schema.ValidationInfo) -> float:
        if info.context is None and isinstance(value, float):  # built by code
            return value
        if isinstance(value, datetime):  # YAML reads unquoted timestamps itself
            if value.tzinfo is None:
                raise fail(f"expected {_TIMESTAMP_WHAT}, got one without a time zone")
            return value.timestamp()
        if not isinstance(value, str) or not _RFC3339_RE.fullmatch(value):
            raise fail(f"expected {_TIMESTAMP_WHAT}, got {describe(value)}")
        try:
            return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise fail(f"invalid timestamp {value!r}: {exc}") from None

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "format": "date-time"}


Timestamp = Annotated[float, _Timestamp()]
