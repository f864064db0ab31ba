"""Cloud commands: parse, validate, deduplicate, dispatch, reply.

A command arrives on ``P/S/commands/{name}`` and is answered on ``P/S/commands/{name}/reply``
with ``{"request_id", "ok": true, "result"}`` or ``{"request_id", "ok": false, "error": {"code",
"message"}}``. Anything wrong with a command (size, JSON, name, schema, types, a refusal by the
target) yields an error reply and reaches nothing: the target is called only with a payload that
passed its schema. A ``request_id`` already applied is not applied again: the stored reply is
sent again instead (the cloud retries when a reply is lost).
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
from gateway.ports import CommandTarget
from gateway.uplink.schemas import validate
from gateway.uplink.topics import COMMAND_NAMES, Topics

__all__ = ["MAX_COMMAND_BYTES", "CommandHandler", "Reply"]

log = structlog.get_logger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
_KV_KEY = "uplink.applied_requests"
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class Reply:
    topic: str
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":"), ensure_ascii=False).encode()


class CommandHandler:
    """Turns raw MQTT messages into calls on a CommandTarget and replies.

    ``store`` is optional: when it has ``kv_get``/``kv_put`` the applied request ids (with their
    replies) survive a restart; otherwise they are remembered in memory only.
    """

    def __init__(
        self,
        topics: Topics,
        target: CommandTarget,
        store: object | None = None,
        *,
        max_bytes: int = MAX_COMMAND_BYTES,
        remember: int = 1024,
        persist: int = 256,
    ) -> None:
        self._topics = topics
        self._target = target
        self._max_bytes = max_bytes
        self._remember = remember
        self._persist = persist
        self._applied: OrderedDict[str, dict[str, Any]] = OrderedDict()
        kv_get = getattr(store, "kv_get", None)
        kv_put = getattr(store, "kv_put", None)
        self._kv = (kv_get, kv_put) if callable(kv_get) and callable(kv_put) else None
        self._loaded = self._kv is None

    async def load(self) -> None:
        """Read the persisted applied request ids (once; also done lazily on first use)."""
        if self._loaded or self._kv is None:
            return
        self._loaded = True
        raw = await self._kv[0](_KV_KEY)
        if raw is None:
            return
        try:
            entries = json.loads(raw) if isinstance(raw, str | bytes) else raw
            for request_id, reply in entries:
                self._applied[str(request_id)] = dict(reply)
        except (ValueError, TypeError) as exc:
            log.warning("applied_requests_unreadable", error=str(exc))

    async def handle(self, topic: str, payload: bytes) -> Reply | None:
        """Process one message of ``commands/+`` or ``auth/response``; the reply to send, if any."""
        await self.load()
        if topic == self._topics.auth_response:
            await self._auth_response(payload)
            return None
        name = self._topics.command_name(topic)
        if name is None:
            log.warning("command_topic_unexpected", topic=topic)
            return None
        reply_topic = self._topics.command_reply(name)
        request_id: str | None = None
        try:
            data = self._decode(payload)
            rid = data.get("request_id")
            request_id = rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None
            if name not in COMMAND_NAMES:
                raise CommandError("unknown_command", f"no command named {name!r}")
            problems = validate(f"command-{name}", data)
            if problems:
                raise CommandError("invalid", _clip("; ".join(problems)))
            assert request_id is not None  # the schema requires it
            previous = self._applied.get(request_id)
            if previous is not None:
                self._applied.move_to_end(request_id)
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
            return Reply(reply_topic, _error(request_id, exc.code, exc.message))
        except Exception as exc:  # a bug in a target must not take the uplink down
            log.exception("command_failed", command=name, request_id=request_id)
            return Reply(
                reply_topic,
                _error(request_id, "internal_error", _clip(f"{type(exc).__name__}: {exc}")),
            )
        reply = {"request_id": request_id, "ok": True, "result": result}
        await self._remember_applied(request_id, reply)
        log.info("command_applied", command=name, request_id=request_id)
        return Reply(reply_topic, reply)

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
            result = await target.update_tokens(
                data["version"], data["mode"], tokens, list(data.get("remove", []))
            )
        elif name == "availability":
            result = await target.change_availability(data["charger_id"], data["available"])
        elif name == "reset":
            result = await target.reset(data["charger_id"], data.get("type", "soft") == "hard")
        else:
            result = await target.update_tariffs(data["version"], data["tariffs"])
        return dict(result or {})

    async def _auth_response(self, payload: bytes) -> None:
        try:
            data = self._decode(payload)
        except CommandError as exc:
            log.warning("auth_response_invalid", code=exc.code, reason=exc.message)
            return
        problems = validate("auth-response", data)
        if problems:
            log.warning("auth_response_invalid", code="invalid", reason=_clip("; ".join(problems)))
            return
        try:
            await self._target.auth_response(
                data["request_id"],
                data["status"],
                data.get("user"),
                _timestamp(data.get("expires_at")),
            )
        except CommandError as exc:
            log.warning("auth_response_refused", code=exc.code, reason=exc.message)
        except Exception:
            log.exception("auth_response_failed", request_id=data["request_id"])

    async def _remember_applied(self, request_id: str, reply: dict[str, Any]) -> None:
        self._applied[request_id] = reply
        while len(self._applied) > self._remember:
            self._applied.popitem(last=False)
        if self._kv is None:
            return
        recent = list(self._applied.items())[-self._persist :]
        try:
            await self._kv[1](_KV_KEY, [list(item) for item in recent])
        except Exception:
            log.exception("applied_requests_not_saved", request_id=request_id)


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


def _error(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"request_id": request_id, "ok": False, "error": {"code": code, "message": message}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."
