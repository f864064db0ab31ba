"""MQTT topic names of one site (CONTRACT section 4), built in one place.

Every topic lives below ``P/S/`` (topic prefix, site id). Outbox rows carry only the suffix
below that root (``sessions/finished``), so a site can change its prefix without rewriting the
buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.outgoing import SESSION_TOPIC

__all__ = ["COMMAND_NAMES", "Topics", "valid_topic_level"]

COMMAND_NAMES = frozenset({"start", "stop", "tokens", "tariffs", "limit", "availability", "reset"})

_FORBIDDEN = ("/", "+", "#", "\x00")


def valid_topic_level(text: str) -> bool:
    """One topic level: non-empty, no separator, no wildcard, no NUL."""
    return bool(text) and not any(ch in text for ch in _FORBIDDEN)


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    site_id: str

    def __post_init__(self) -> None:
        for level in self.prefix.split("/"):
            if not valid_topic_level(level):
                raise ValueError(f"invalid topic prefix {self.prefix!r}")
        if not valid_topic_level(self.site_id):
            raise ValueError(f"invalid site id {self.site_id!r}")

    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.site_id}"

    def full(self, suffix: str) -> str:
        """``P/S/<suffix>`` for an outbox row's topic suffix."""
        return f"{self.root}/{suffix.lstrip('/')}"

    def suffix(self, topic: str) -> str | None:
        """The part below ``P/S/``, or None for a topic of another site."""
        head = self.root + "/"
        return topic[len(head) :] if topic.startswith(head) else None

    @property
    def gateway_status(self) -> str:
        return self.full("gateway/status")

    @property
    def gateway_key(self) -> str:
        return self.full("gateway/key")

    @property
    def grid_limit(self) -> str:
        return self.full("grid/limit")

    def charger_status(self, device_id: str) -> str:
        return self.full(f"chargers/{_level(device_id)}/status")

    @property
    def sessions_finished(self) -> str:
        return self.full(SESSION_TOPIC)

    def readings(self, device_id: str) -> str:
        return self.full(f"readings/{_level(device_id)}")

    @property
    def auth_request(self) -> str:
        return self.full("auth/request")

    @property
    def auth_response(self) -> str:
        return self.full("auth/response")

    @property
    def auth_response_reply(self) -> str:
        """Where the gateway says whether it took an auth response (an extension)."""
        return self.full("auth/response/reply")

    def command(self, name: str) -> str:
        return self.full(f"commands/{_level(name)}")

    def command_reply(self, name: str) -> str:
        return self.full(f"commands/{_level(name)}/reply")

    @property
    def commands_filter(self) -> str:
        """Subscription filter for every command (``+`` keeps ``.../reply`` out)."""
        return self.full("commands/+")

    def command_name(self, topic: str) -> str | None:
        """The command name of a ``P/S/commands/{name}`` topic, else None."""
        rest = self.suffix(topic)
        if rest is None or not rest.startswith("commands/"):
            return None
        name = rest[len("commands/") :]
        return name if valid_topic_level(name) else None


def _level(text: str) -> str:
    if not valid_topic_level(text):
        raise ValueError(f"invalid topic level {text!r}")
    return text
