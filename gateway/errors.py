"""The gateway's error tree.

Every error a person can cause carries structured attributes and renders as one clear line;
the CLI prints ``str(err)`` and exits non-zero, with a traceback only under ``--debug``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CommandError",
    "ConfigError",
    "ConfigProblem",
    "DeviceError",
    "GatewayError",
    "ProfileError",
    "StoreError",
    "TariffError",
    "UplinkError",
    "UsageError",
]


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    exit_code = 1


class UsageError(GatewayError):
    """A command was called in a way that cannot work (a bad argument, a missing file): exit 2."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a YAML file, located by file, line, column (1-based) and key path."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.path or '<root>'}: {self.message}"


class ConfigError(GatewayError):
    """A configuration (or profile, or scenario) file has one or more problems."""

    exit_code = 2

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col, p.path))
        super().__init__("\n".join(str(p) for p in self.problems))


class ProfileError(ConfigError):
    """A device profile file has problems (same format as config problems)."""


class DeviceError(GatewayError):
    """A device did not answer as it should: timeout, exception response, bad frame, lost link."""

    def __init__(
        self, device_id: str, reason: str, detail: str = "", *, exception_code: int | None = None
    ) -> None:
        self.device_id = device_id
        self.reason = reason
        self.detail = detail
        self.exception_code = exception_code  # Modbus exception code, for exception_response
        super().__init__(f"{device_id}: {reason}" + (f" ({detail})" if detail else ""))


class UplinkError(GatewayError):
    """The MQTT uplink failed (connection refused, TLS, authentication)."""


class StoreError(GatewayError):
    """The local buffer cannot be opened or written."""


class TariffError(GatewayError):
    """A tariff definition is invalid. ``path`` points at the offending key."""

    exit_code = 2

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class CommandError(GatewayError):
    """A cloud command was rejected; ``code`` is the machine-readable reason in the reply."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
