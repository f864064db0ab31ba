"""OCPP-like authorization: local list > cloud-pushed list > authorization cache > online request.

Lookup order for a presented token (ids compare case-insensitively, as RFID UIDs do):

1. the local list (``auth.tokens`` in the config): whatever it says is final, even "blocked";
2. the cloud-pushed list (versioned, persisted through the ``AuthStore``): final when present;
3. the authorization cache (cloud answers, persisted, valid for ``auth.cache_ttl_s``);
4. unknown: while the uplink is online an ``auth/request`` goes to the cloud and the answer
   (accepted / blocked / expired / unknown) is awaited for ``auth.request_timeout_s`` and cached
   (except "unknown": a card the cloud does not know yet may be registered a minute later);
5. offline or timed out: the offline policy decides for tokens still unknown:
   ``allow_known``: refuse unknown tokens, but accept an accepted token whose cache entry is
   older than the TTL (it is still *known*); ``allow_all``: accept with source
   ``offline_unknown`` (the session is flagged ``offline_authorized``); ``deny``: refuse
   unknown tokens and stale cache entries alike (known = local list, cloud list, fresh cache).

Blocked and expired tokens (by status or by ``expires_at``) are refused whatever the policy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from gateway.config import AuthConfig
from gateway.errors import CommandError
from gateway.model import MAX_VERSION, AuthSource, AuthStatus, Clock, Token, TokenType
from gateway.ports import AuthRequester, AuthStore
from gateway.tags import normalise_tag

__all__ = ["OFFLINE_POLICIES", "AuthDecision", "Authorizer"]

log = structlog.get_logger(__name__)

OFFLINE_POLICIES = ("allow_known", "allow_all", "deny")


@dataclass(frozen=True, slots=True)
class AuthDecision:
    """The answer for one presented token.

    ``source`` says where the answer came from (the record's ``user.auth``); ``offline_unknown``
    is set only when an unknown token was accepted by the ``allow_all`` offline policy.
    """

    status: AuthStatus
    user: str | None
    source: AuthSource
    token: Token | None
    offline_unknown: bool = False

    @property
    def accepted(self) -> bool:
        return self.status is AuthStatus.ACCEPTED


def _key(token_id: str) -> str:
    """The token's id in the normal form tags read from chargers have (gateway.tags)."""
    return normalise_tag(token_id) or ""


def _token_type(value: str) -> TokenType:
    try:
        return TokenType(value)
    except ValueError:
        return TokenType.RFID


Listener = Callable[[], Awaitable[None] | None]


class Authorizer:
    """Decides whether a token may charge. See the module docstring for the rules."""

    def __init__(
        self,
        auth_config: AuthConfig,
        store: AuthStore,
        requester: AuthRequester | None,
        clock: Clock,
        truncated_to: Mapping[str, int] | None = None,
    ) -> None:
        """``truncated_to``: charger id -> how many characters of a card id the charger shows,
        for chargers whose profile says ``tag.truncated_to`` (KEBA: 8); only there is a tag
        matched as a prefix of a known token."""
        if auth_config.offline_policy not in OFFLINE_POLICIES:
            raise ValueError(f"offline_policy must be one of {OFFLINE_POLICIES}")
        self._config = auth_config
        self._store = store
        self._requester = requester
        self._clock = clock
        self._truncated_to = dict(truncated_to or {})
        self._local: dict[str, Token] = {_key(t.id): t for t in auth_config.tokens}
        self._cloud: dict[str, Token] = {}
        self._cloud_version = 0
        self._cache: dict[str, tuple[Token, float]] = {}
        self._pending: dict[str, asyncio.Future[tuple[AuthStatus, str | None, float | None]]] = {}
        self._listeners: list[Listener] = []

    # ----------------------------------------------------------------- state
    async def load(self) -> None:
        """Read the persisted cloud list and cache (call once before authorizing)."""
        version, tokens = await self._store.load_cloud_list()
        if isinstance(version, bool) or not isinstance(version, int) or version > MAX_VERSION:
            # Stored before versions were bounded: the list stays until the next push, which
            # any version now replaces (else a version of 1e300 would refuse every push).
            log.warning("auth_cloud_version_out_of_range", version=str(version)[:40])
            version = 0
        self._cloud_version = version
        self._cloud = {_key(t.id): t for t in tokens}
        self._cache = {}
        for token, cached_at in await self._store.load_auth_cache():
            key = _key(token.id)
            old = self._cache.get(key)
            if old is None or cached_at >= old[1]:
                self._cache[key] = (token, cached_at)
        log.info(
            "auth_loaded",
            local=len(self._local),
            cloud=len(self._cloud),
            cloud_version=version,
            cached=len(self._cache),
            offline_policy=self._config.offline_policy,
        )

    @property
    def cloud_version(self) -> int:
        return self._cloud_version

    def add_listener(self, listener: Listener) -> None:
        """Called (and awaited) after the cloud list changed, e.g. to end sessions of tokens that
        are now blocked."""
        self._listeners.append(listener)

    # ----------------------------------------------------------- decisions
    def known(
        self, token_id: str, charger_id: str | None = None
    ) -> tuple[Token, AuthSource, bool] | None:
        """The entry that answers for ``token_id`` without asking anyone:
        (token, source, fresh) where ``fresh`` is False for a cache entry past its TTL.

        Some chargers show only the first bytes of a card UID (KEBA: 4 bytes, profile key
        ``tag.truncated_to: 8``): on such a charger, a presented id of exactly that length that
        is the prefix of exactly one known token id matches that token; two or more candidates
        are ambiguous and match nothing. Elsewhere an id matches only a whole token id."""
        key = _key(token_id)
        found = self._exact(key)
        shown = self._truncated_to.get(charger_id) if charger_id is not None else None
        if found is None and shown is not None and len(key) == shown:
            ids = {
                k
                for table in (self._local, self._cloud, self._cache)
                for k in table
                if k.startswith(key)
            }
            if len(ids) == 1:
                found = self._exact(ids.pop())
                if found is not None:
                    log.info(
                        "auth_prefix_match",
                        presented=token_id,
                        token=found[0].id,
                        charger_id=charger_id,
                    )
        return found

    def _exact(self, key: str) -> tuple[Token, AuthSource, bool] | None:
        if key in self._local:
            return self._local[key], AuthSource.LOCAL, True
        if key in self._cloud:
            return self._cloud[key], AuthSource.CLOUD, True
        cached = self._cache.get(key)
        if cached is not None:
            token, cached_at = cached
            fresh = self._clock.time() - cached_at <= self._config.cache_ttl_s
            return token, AuthSource.CLOUD, fresh
        return None

    def check(self, token_id: str, charger_id: str | None = None) -> AuthStatus | None:
        """Status of a token known locally (lists or fresh cache) now, None when unknown.
        Used to re-check running sessions after a list change (``charger_id``: where the tag
        was shown, for chargers that truncate it)."""
        entry = self.known(token_id, charger_id)
        if entry is None or not entry[2]:
            return None
        return entry[0].status_at(self._clock.time())

    def _decide(self, token: Token, source: AuthSource) -> AuthDecision:
        status = token.status_at(self._clock.time())
        return AuthDecision(
            status=status,
            user=token.user or None,
            source=source,
            token=token,
        )

    async def authorize(self, token_id: str, token_type: str, charger_id: str) -> AuthDecision:
        entry = self.known(token_id, charger_id)
        if entry is not None and entry[2]:
            decision = self._decide(entry[0], entry[1])
            self._log_decision(decision, token_id, charger_id, "known")
            return decision
        requester = self._requester
        if requester is not None and requester.online:
            answer = await self._ask_cloud(requester, token_id, token_type, charger_id)
            if answer is not None:
                status, user, expires_at = answer
                token = Token(
                    id=token_id,
                    type=_token_type(token_type),
                    user=user or "",
                    status=status,
                    expires_at=expires_at,
                )
                if status is not AuthStatus.UNKNOWN:
                    now = self._clock.time()
                    self._cache[_key(token_id)] = (token, now)
                    await self._store.cache_auth(token, now)
                decision = self._decide(token, AuthSource.CLOUD)
                self._log_decision(decision, token_id, charger_id, "cloud_answer")
                return decision
        decision = self._offline(token_id, token_type, entry)
        self._log_decision(decision, token_id, charger_id, "offline_policy")
        return decision

    def _offline(
        self, token_id: str, token_type: str, entry: tuple[Token, AuthSource, bool] | None
    ) -> AuthDecision:
        policy = self._config.offline_policy
        if entry is not None:  # a stale cache entry
            token, source, _ = entry
            decision = self._decide(token, source)
            if not decision.accepted or policy != "deny":
                return decision
            return replace(decision, status=AuthStatus.UNKNOWN)
        if policy == "allow_all":
            token = Token(id=token_id, type=_token_type(token_type), user="")
            return AuthDecision(
                status=AuthStatus.ACCEPTED,
                user=None,
                source=AuthSource.OFFLINE_UNKNOWN,
                token=token,
                offline_unknown=True,
            )
        return AuthDecision(
            status=AuthStatus.UNKNOWN, user=None, source=AuthSource.OFFLINE_UNKNOWN, token=None
        )

    async def _ask_cloud(
        self, requester: AuthRequester, token_id: str, token_type: str, charger_id: str
    ) -> tuple[AuthStatus, str | None, float | None] | None:
        request_id = str(uuid.uuid4())
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[AuthStatus, str | None, float | None]] = loop.create_future()
        self._pending[request_id] = fut
        try:
            try:
                await requester.send_auth_request(request_id, token_id, token_type, charger_id)
            except Exception as exc:  # the uplink dropped between `online` and the send
                log.warning("auth_request_failed", request_id=request_id, error=str(exc))
                return None
            try:
                async with asyncio.timeout(self._config.request_timeout_s):
                    return await fut
            except TimeoutError:
                log.warning(
                    "auth_request_timeout",
                    request_id=request_id,
                    charger_id=charger_id,
                    timeout_s=self._config.request_timeout_s,
                )
                return None
        finally:
            self._pending.pop(request_id, None)

    def _log_decision(self, d: AuthDecision, token_id: str, charger_id: str, via: str) -> None:
        log.info(
            "auth_decision",
            charger_id=charger_id,
            token=token_id,
            status=d.status.value,
            user=d.user,
            source=d.source.value,
            via=via,
            offline_unknown=d.offline_unknown,
        )

    # --------------------------------------------------- command target parts
    async def auth_response(
        self, request_id: str, status: str, user: str | None, expires_at: float | None
    ) -> None:
        """The cloud's answer to an ``auth/request`` this gateway sent and still waits for. The
        first answer is taken; one for an id never issued, already answered or timed out is
        refused (``CommandError`` ``unmatched``) and changes nothing."""
        fut = self._pending.pop(request_id, None)
        if fut is None or fut.done():
            log.warning("auth_response_unmatched", request_id=request_id, status=status)
            raise CommandError(
                "unmatched",
                f"no auth request {request_id!r} is waiting for an answer "
                "(never sent by this gateway, already answered, or timed out)",
            )
        try:
            parsed = AuthStatus(status)
        except ValueError:
            log.warning("auth_response_bad_status", request_id=request_id, status=status)
            parsed = AuthStatus.UNKNOWN
        fut.set_result((parsed, user, expires_at))

    async def update_tokens(
        self, version: int, mode: str, tokens: Sequence[Token], remove: Sequence[str]
    ) -> dict[str, Any]:
        """Replace or patch the cloud-pushed list. Refuses a version not newer than the current
        one (``stale_version``); a refused update changes nothing."""
        if mode not in ("replace", "patch"):
            raise CommandError("bad_request", f"mode must be replace or patch, not {mode!r}")
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or not 1 <= version <= MAX_VERSION
        ):
            raise CommandError(
                "invalid", f"tokens version must be an integer in 1..{MAX_VERSION}, got {version!r}"
            )
        if version <= self._cloud_version:
            raise CommandError(
                "stale_version",
                f"token list version {version} is not newer than {self._cloud_version}",
            )
        if mode == "replace":
            new = {_key(t.id): t for t in tokens}
        else:
            new = dict(self._cloud)
            for token_id in remove:
                new.pop(_key(token_id), None)
            new.update({_key(t.id): t for t in tokens})
        await self._store.save_cloud_list(version, list(new.values()))
        self._cloud = new
        self._cloud_version = version
        log.info("auth_tokens_updated", version=version, mode=mode, count=len(new))
        for listener in self._listeners:
            res = listener()
            if res is not None:
                await res
        return {"version": version, "count": len(new)}

    def lookup_user(self, user: str) -> Token | None:
        """A token of ``user`` for app/remote starts: an accepted one if the user has any
        (local list, cloud list, cache in that order), else a refused one (so the caller can say
        why), else None."""
        now = self._clock.time()
        found: Token | None = None
        sources: list[Any] = [self._local.values(), self._cloud.values()]
        sources.append(t for t, _ in self._cache.values())
        for tokens in sources:
            for token in tokens:
                if token.user != user:
                    continue
                if token.status_at(now) is AuthStatus.ACCEPTED:
                    return token
                if found is None:
                    found = token
        return found
