"""Logging: one structlog pipeline for our logs and the standard-library logs of dependencies.

JSON lines when stderr is not a terminal (production, systemd journal), a readable console
rendering on a terminal. Secrets never reach a log: config values are wrapped in
``gateway.config.Secret`` and the ``redact_secrets`` processor masks known secret keys anyway.
On a terminal, control characters in logged values (a card tag, a site id from a topic) are
escaped: a device or a publisher cannot write escape sequences to an operator's terminal.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from gateway.safeout import printable

__all__ = ["configure_logging"]

_SECRET_KEYS = frozenset({"password", "secret", "token_secret", "key", "private_key"})


class RedactSecrets:
    """Mask values of keys that name secrets, whatever the caller passed."""

    __slots__ = ()

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        for key in _SECRET_KEYS.intersection(event):
            event[key] = "***"
        return event


class EscapeControls:
    """Escape control characters in string values for the console (JSON escapes them itself);
    tracebacks keep their line breaks."""

    __slots__ = ()
    _KEEP = frozenset({"exception", "stack"})

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in event.items():
            if isinstance(value, str) and key not in self._KEEP:
                event[key] = printable(value)
        return event


def configure_logging(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    """Set up structlog and route standard-library logging through the same renderer."""
    out = stream or sys.stderr
    if json is None:
        json = not out.isatty()
    numeric = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        RedactSecrets(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        # Plain tracebacks: the rich formatter structlog picks when rich is installed prints every
        # frame's local variables, and those hold passwords (paho's, a parsed broker URL's).
        else structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Not cached: module-level loggers must follow a later reconfiguration (tests capture
        # logs after a CLI run configured them); the cost is a dict lookup per log call.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([structlog.processors.format_exc_info] if json else [EscapeControls()]),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # pymodbus logs every failed transaction at ERROR; our bus layer reports state changes itself.
    logging.getLogger("pymodbus").setLevel(max(numeric, logging.CRITICAL))
    logging.getLogger("amqtt").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("aiosqlite").setLevel(max(numeric, logging.INFO))
    logging.getLogger("transitions").setLevel(max(numeric, logging.WARNING))
