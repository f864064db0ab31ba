"""Cloud commands: parse, validate, authenticate, deduplicate, dispatch, reply.

A command arrives on ``P/S/commands/{name}`` and is answered on ``P/S/commands/{name}/reply``
with ``{"request_id", "ok": true, "result"}`` or ``{"request_id", "ok": false, "error": {"code",
"message"}}``. Anything wrong with a command (size, JSON, name, schema, types, signature, age, a
refusal by the target) yields an error reply and reaches nothing: the target is called only with a
payload that passed its schema (and, with a command key, its signature check). An auth response
(``P/S/auth/response``) gets the same kind of reply on ``P/S/auth/response/reply``.

Without a command key a ``request_id`` already applied is not applied again: the stored reply is
sent again instead (the cloud retries when a reply is lost); a refused one may be retried.

With a command key (``uplink.command_key``) every message must be signed by the cloud and fresh
(``gateway.uplink.envelope``), and a request id is spent by the first signed message that
carries it, whatever its outcome: a second one is refused as ``replayed`` (a refused ``start``
replayed later, once a car is plugged in, must not charge). Request ids live in the SQLite buffer
for at least a day, longer than the longest allowed age, so a replay is recognised after a
restart too; an older one is refused as stale.

Retained messages are never applied: a retained command would run again at every reconnect.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.errors import CommandError
from gateway.model import AuthStatus, Token, TokenType, from_rfc3339
from gateway.ports import CommandTarget, RequestLog, TokenListPart
from gateway.uplink.envelope import CommandVerifier
from gateway.uplink.schemas import validate
from gateway.uplink.topics import COMMAND_NAMES, Topics

__all__ = ["MAX_COMMAND_BYTES", "CommandHandler", "MemoryRequestLog", "Reply"]

log = structlog.get_logger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
_MAX_MESSAGE_CHARS = 500
_AUTH_PREFIX = "auth-response:"  # auth responses spend ids apart from the cloud's command ids


@dataclass(frozen=True, slots=True)
class Reply:
    topic: str
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":"), ensure_ascii=False).encode()


class MemoryRequestLog:
    """A RequestLog in memory, for a handler without a buffer: the newest ``limit`` ids."""

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._ids: OrderedDict[str, dict[str, Any] | None] = OrderedDict()

    async def request_reply(self, request_id: str) -> tuple[bool, dict[str, Any] | None]:
        if request_id not in self._ids:
            return False, None
        return True, self._ids[request_id]

    async def remember_request_id(self, request_id: str) -> bool:
        if request_id in self._ids:
            return False
        self._put(request_id, None)
        return True

    async def save_request_reply(self, request_id: str, reply: dict[str, Any]) -> None:
        self._put(request_id, reply)

    def _put(self, request_id: str, reply: dict[str, Any] | None) -> None:
        self._ids[request_id] = reply
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._limit:
            self._ids.popitem(last=False)


class CommandHandler:
    """Turns raw MQTT messages into calls on a CommandTarget and replies.

    ``requests`` remembers request ids and replies (the SQLite buffer, so they survive a
    restart; in memory when None). ``verifier`` is set when the site has a command key.
    """

    def __init__(
        self,
        topics: Topics,
        target: CommandTarget,
        requests: RequestLog | None = None,
        *,
        verifier: CommandVerifier | None = None,
        max_bytes: int = MAX_COMMAND_BYTES,
    ) -> None:
        self._topics = topics
        self._target = target
        self._requests: RequestLog = requests if requests is not None else MemoryRequestLog()
        self._verifier = verifier
        self._max_bytes = max_bytes

    @property
    def authenticated(self) -> bool:
        return self._verifier is not None

    def busy(self, topic: str, payload: bytes, *, retained: bool = False) -> Reply | None:
        """The reply to a command that found the queue full: ``busy``, with its request id when
        one can be read cheaply, so the cloud knows to retry. Nothing is applied or remembered:
        a retry with the same request id (even a signed one) is taken as new."""
        if retained:
            return None
        if topic == self._topics.auth_response:
            reply_topic = self._topics.auth_response_reply
        else:
            name = self._topics.command_name(topic)
            if name is None:
                return None
            reply_topic = self._topics.command_reply(name)
        request_id: str | None = None
        if len(payload) <= self._max_bytes:
            try:
                request_id = _request_id(json.loads(payload.decode("utf-8")))
            except (UnicodeDecodeError, ValueError, RecursionError):
                request_id = None
        return Reply(
            reply_topic,
            _error(request_id, "busy", "the gateway's command queue is full; retry later"),
        )

    async def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> Reply | None:
        """Process one message of ``commands/+`` or ``auth/response``; the reply to send, if any
        (none for a retained message or a topic that is not ours)."""
        if retained:
            log.warning("command_retained_ignored", topic=topic, bytes=len(payload))
            return None
        if topic == self._topics.auth_response:
            return await self._auth_response(topic, payload)
        name = self._topics.command_name(topic)
        if name is None:
            log.warning("command_topic_unexpected", topic=topic)
            return None
        reply_topic = self._topics.command_reply(name)
        request_id: str | None = None
        spent = False  # the request id is used up: remember whatever reply it gets
        try:
            data = self._decode(payload)
            request_id = _request_id(data)
            if name not in COMMAND_NAMES:
                raise CommandError("unknown_command", f"no command named {name!r}")
            _check(f"command-{name}", data)
            assert request_id is not None  # the schema requires it
            if self._verifier is not None:
                self._verifier.check(topic, data)
                await self._spend(request_id, request_id)
                spent = True
            else:
                _, previous = await self._requests.request_reply(request_id)
                if previous is not None:
                    log.info("command_repeated", command=name, request_id=request_id)
                    return Reply(reply_topic, previous)
            result = await self._dispatch(name, data)
        except CommandError as exc:
            log.warning(
                "command_refused",
                command=name,
                request_id=request_id,
                code=exc.code,
                reason=exc.message,
            )
            refused = _error(request_id, exc.code, exc.message)
            if spent and request_id is not None:
                await self._save(request_id, refused)
            return Reply(reply_topic, refused)
        except Exception as exc:  # a bug in a target must not take the uplink down
            log.exception("command_failed", command=name, request_id=request_id)
            failed = _error(request_id, "internal_error", _clip(f"{type(exc).__name__}: {exc}"))
            if spent and request_id is not None:
                await self._save(request_id, failed)
            return Reply(reply_topic, failed)
        reply = {"request_id": request_id, "ok": True, "result": result}
        await self._save(request_id, reply)
        log.info("command_applied", command=name, request_id=request_id, signed=spent)
        return Reply(reply_topic, reply)

    async def _spend(self, key: str, request_id: str) -> None:
        """Use up a signed message's request id, or refuse it as replayed."""
        seen, first = await self._requests.request_reply(key)
        if seen or not await self._requests.remember_request_id(key):
            outcome = ""
            if first is not None:
                error = first.get("error")
                outcome = (
                    "; the first one was applied"
                    if first.get("ok")
                    else f"; the first one was refused ({error.get('code')})"
                    if isinstance(error, dict)
                    else ""
                )
            raise CommandError(
                "replayed",
                _clip(f"request_id {request_id!r} was used before{outcome}; not applied again"),
            )

    async def _save(self, request_id: str, reply: dict[str, Any]) -> None:
        try:
            await self._requests.save_request_reply(request_id, reply)
        except Exception:
            log.exception("command_reply_not_saved", request_id=request_id)

    def _decode(self, payload: bytes) -> dict[str, Any]:
        if len(payload) > self._max_bytes:
            raise CommandError(
                "too_large", f"payload of {len(payload)} bytes exceeds {self._max_bytes}"
            )
        try:
            data = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CommandError("bad_json", _clip(f"not JSON: {exc}")) from None
        except RecursionError:
            raise CommandError("bad_json", "nested too deeply") from None
        if not isinstance(data, dict):
            raise CommandError("invalid", "payload must be a JSON object")
        return data

    async def _dispatch(self, name: str, data: Mapping[str, Any]) -> dict[str, Any]:
        target = self._target
        if name == "start":
            result = await target.remote_start(data["charger_id"], data["user"], data.get("token"))
        elif name == "stop":
            result = await target.remote_stop(data.get("charger_id"), data.get("session_id"))
        elif name == "tokens":
            if data["mode"] == "replace" and data.get("remove"):
                raise CommandError("invalid", "remove is only allowed with mode patch")
            tokens = [_token(t) for t in data.get("tokens", [])]
            part = data.get("part")
            if part is not None:
                result = await target.update_token_part(
                    TokenListPart(
                        data["version"],
                        data["mode"],
                        part["index"],
                        part["count"],
                        tokens,
                        list(data.get("remove", [])),
                    )
                )
            else:
                result = await target.update_tokens(
                    data["version"], data["mode"], tokens, list(data.get("remove", []))
                )
        elif name == "limit":
            try:
                expires_at = _timestamp(data.get("expires_at"))
            except ValueError as exc:
                raise CommandError("invalid", _clip(f"expires_at: {exc}")) from None
            result = await target.set_grid_limit(
                data["request_id"],
                data["scope"],
                data.get("max_current_a"),
                data.get("max_power_w"),
                expires_at,
                data.get("reason"),
            )
        elif name == "availability":
            result = await target.change_availability(data["charger_id"], data["available"])
        elif name == "reset":
            result = await target.reset(data["charger_id"], data.get("type", "soft") == "hard")
        else:
            result = await target.update_tariffs(data["version"], data["tariffs"])
        return dict(result or {})

    async def _auth_response(self, topic: str, payload: bytes) -> Reply:
        reply_topic = self._topics.auth_response_reply
        request_id: str | None = None
        try:
            data = self._decode(payload)
            request_id = _request_id(data)
            _check("auth-response", data)
            assert request_id is not None  # the schema requires it
            if self._verifier is not None:
                self._verifier.check(topic, data)
                await self._spend(_AUTH_PREFIX + request_id, request_id)
            await self._target.auth_response(
                request_id,
                data["status"],
                data.get("user"),
                _timestamp(data.get("expires_at")),
            )
        except CommandError as exc:
            log.warning(
                "auth_response_refused", request_id=request_id, code=exc.code, reason=exc.message
            )
            return Reply(reply_topic, _error(request_id, exc.code, exc.message))
        except Exception as exc:
            log.exception("auth_response_failed", request_id=request_id)
            return Reply(
                reply_topic,
                _error(request_id, "internal_error", _clip(f"{type(exc).__name__}: {exc}")),
            )
        return Reply(
            reply_topic,
            {"request_id": request_id, "ok": True, "result": {"status": data["status"]}},
        )


def _token(data: Mapping[str, Any]) -> Token:
    return Token(
        id=data["id"],
        type=TokenType(data["type"]),
        user=data["user"],
        status=AuthStatus(data.get("status", "accepted")),
        expires_at=_timestamp(data.get("expires_at")),
        group=data.get("group"),
    )


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return from_rfc3339(value)
    return float(value)


def _request_id(data: Any) -> str | None:
    """The request id a reply carries: the payload's, when it is a plausible one (a string of
    1 to 128 characters; the schemas refuse any other)."""
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


def _check(schema: str, data: Mapping[str, Any]) -> None:
    """Refuse (``invalid``) a payload its schema does not accept, every problem told."""
    problems = validate(schema, data)
    if problems:
        raise CommandError("invalid", _clip("; ".join(problems)))


def _error(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"request_id": request_id, "ok": False, "error": {"code": code, "message": message}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."
