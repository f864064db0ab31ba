"""Authorization rules: local list > cloud list > cache > online request > offline policy."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.auth import Authorizer
from gateway.config import AuthConfig
from gateway.errors import CommandError
from gateway.model import AuthSource, AuthStatus, Token, TokenType

T0 = 1_790_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


class MemoryAuthStore:
    """In-memory AuthStore for the pure rules (the SQLite one is tested at the end)."""

    def __init__(self) -> None:
        self.version = 0
        self.tokens: list[Token] = []
        self.cache: dict[str, tuple[Token, float]] = {}

    async def load_cloud_list(self) -> tuple[int, list[Token]]:
        return self.version, list(self.tokens)

    async def save_cloud_list(self, version: int, tokens: Sequence[Token]) -> None:
        self.version, self.tokens = version, list(tokens)

    async def load_auth_cache(self) -> list[tuple[Token, float]]:
        return list(self.cache.values())

    async def cache_auth(self, token: Token, cached_at: float) -> None:
        self.cache[token.id] = (token, cached_at)


@dataclass
class FakeCloud:
    """The uplink side: records requests and answers them (or not) after ``delay_s``."""

    online: bool = True
    answers: dict[str, tuple[str, str | None, float | None]] = field(default_factory=dict)
    delay_s: dict[str, float] = field(default_factory=dict)
    sent: list[tuple[str, str, str, str]] = field(default_factory=list)
    authorizer: Authorizer | None = None
    fail: bool = False
    tasks: list[asyncio.Future[None]] = field(default_factory=list)

    async def send_auth_request(
        self, request_id: str, token: str, token_type: str, charger_id: str
    ) -> None:
        if self.fail:
            raise ConnectionError("link dropped")
        self.sent.append((request_id, token, token_type, charger_id))
        if token in self.answers:
            asyncio.get_running_loop().call_later(
                self.delay_s.get(token, 0.0), self._answer, request_id, self.answers[token]
            )

    def _answer(self, request_id: str, answer: tuple[str, str | None, float | None]) -> None:
        assert self.authorizer is not None
        self.tasks.append(asyncio.ensure_future(self.authorizer.auth_response(request_id, *answer)))


ALICE = Token("04A2B3C4D5E6F7", TokenType.RFID, "alice", group="staff")
BOB_BLOCKED = Token("FOB-0042", TokenType.KEYFOB, "bob", status=AuthStatus.BLOCKED)
CAROL_EXPIRED = Token("CAROL-1", TokenType.RFID, "carol", expires_at=T0 - 1)


async def make(
    policy: str = "allow_known",
    tokens: tuple[Token, ...] = (ALICE, BOB_BLOCKED, CAROL_EXPIRED),
    store: MemoryAuthStore | None = None,
    cloud: FakeCloud | None = None,
    timeout_s: float = 0.2,
    clock: FakeClock | None = None,
    truncated_to: dict[str, int] | None = None,
) -> tuple[Authorizer, MemoryAuthStore, FakeCloud, FakeClock]:
    store = store or MemoryAuthStore()
    cloud = cloud or FakeCloud()
    clock = clock or FakeClock()
    config = AuthConfig(
        offline_policy=policy, tokens=tokens, request_timeout_s=timeout_s, cache_ttl_s=3600.0
    )
    auth = Authorizer(config, store, cloud, clock, truncated_to=truncated_to)
    cloud.authorizer = auth
    await auth.load()
    return auth, store, cloud, clock


async def test_local_list_accepts_without_asking_the_cloud() -> None:
    auth, _, cloud, _ = await make()
    d = await auth.authorize("04a2b3c4d5e6f7", "rfid", "cp1")  # UIDs compare case-insensitively
    assert (d.status, d.user, d.source, d.offline_unknown) == (
        AuthStatus.ACCEPTED,
        "alice",
        AuthSource.LOCAL,
        False,
    )
    assert d.token is not None and d.token.group == "staff"
    assert cloud.sent == []


@pytest.mark.parametrize(
    ("token", "status"),
    [("FOB-0042", AuthStatus.BLOCKED), ("CAROL-1", AuthStatus.EXPIRED)],
)
@pytest.mark.parametrize("policy", ["allow_known", "allow_all", "deny"])
async def test_blocked_and_expired_are_refused_under_every_policy(
    token: str, status: AuthStatus, policy: str
) -> None:
    auth, _, cloud, _ = await make(policy)
    cloud.online = False
    d = await auth.authorize(token, "rfid", "cp1")
    assert d.status is status and not d.accepted
    cloud.online = True
    assert (await auth.authorize(token, "rfid", "cp1")).status is status
    assert cloud.sent == []  # a known refusal is final: no second opinion from the cloud


async def test_expiry_by_date_applies_when_it_passes() -> None:
    later = Token("DAVE-1", TokenType.RFID, "dave", expires_at=T0 + 60)
    auth, _, _, clock = await make(tokens=(later,))
    assert (await auth.authorize("DAVE-1", "rfid", "cp1")).accepted
    clock.t = T0 + 60
    assert (await auth.authorize("DAVE-1", "rfid", "cp1")).status is AuthStatus.EXPIRED


async def test_cloud_list_is_used_and_persisted() -> None:
    auth, store, cloud, clock = await make()
    await auth.update_tokens(3, "replace", [Token("ERIN-1", TokenType.RFID, "erin")], [])
    d = await auth.authorize("ERIN-1", "rfid", "cp1")
    assert (d.status, d.user, d.source) == (AuthStatus.ACCEPTED, "erin", AuthSource.CLOUD)
    assert cloud.sent == []
    again, *_ = await make(store=store, cloud=FakeCloud(online=False), clock=clock)
    assert again.cloud_version == 3
    assert (await again.authorize("ERIN-1", "rfid", "cp1")).accepted


async def test_local_list_beats_cloud_list_and_cache() -> None:
    store = MemoryAuthStore()
    store.cache["FOB-0042"] = (Token("FOB-0042", TokenType.KEYFOB, "bob"), T0)
    store.version, store.tokens = 1, [Token("FOB-0042", TokenType.KEYFOB, "bob")]
    auth, *_ = await make(store=store)
    d = await auth.authorize("FOB-0042", "keyfob", "cp1")
    assert (d.status, d.source) == (AuthStatus.BLOCKED, AuthSource.LOCAL)


async def test_cloud_list_beats_cache() -> None:
    store = MemoryAuthStore()
    store.cache["ZED-1"] = (Token("ZED-1", TokenType.RFID, "zed"), T0)
    store.version = 2
    store.tokens = [Token("ZED-1", TokenType.RFID, "zed", status=AuthStatus.BLOCKED)]
    auth, *_ = await make(store=store)
    assert (await auth.authorize("ZED-1", "rfid", "cp1")).status is AuthStatus.BLOCKED


async def test_fresh_cache_answers_without_asking() -> None:
    store = MemoryAuthStore()
    store.cache["GUS-1"] = (Token("GUS-1", TokenType.RFID, "gus"), T0 - 60)
    auth, _, cloud, _ = await make(store=store)
    d = await auth.authorize("GUS-1", "rfid", "cp1")
    assert (d.status, d.user, d.source) == (AuthStatus.ACCEPTED, "gus", AuthSource.CLOUD)
    assert cloud.sent == []


async def test_unknown_token_online_accepted_is_cached() -> None:
    auth, store, cloud, clock = await make()
    cloud.answers["NEW-1"] = ("accepted", "frank", None)
    d = await auth.authorize("NEW-1", "rfid", "cp2")
    assert (d.status, d.user, d.source) == (AuthStatus.ACCEPTED, "frank", AuthSource.CLOUD)
    ((request_id, token, token_type, charger_id),) = cloud.sent
    assert (token, token_type, charger_id) == ("NEW-1", "rfid", "cp2")
    assert len(request_id) == 36 and request_id[14] == "4"  # uuid4
    assert store.cache["NEW-1"][0].user == "frank"
    # Offline later, within the TTL: the cached answer stands.
    cloud.online = False
    clock.t += 600
    assert (await auth.authorize("NEW-1", "rfid", "cp2")).accepted
    assert len(cloud.sent) == 1


async def test_unknown_token_online_blocked_answer_is_refused_and_cached() -> None:
    auth, store, cloud, _ = await make(policy="allow_all")
    cloud.answers["BAD-1"] = ("blocked", None, None)
    d = await auth.authorize("BAD-1", "rfid", "cp1")
    assert d.status is AuthStatus.BLOCKED and d.source is AuthSource.CLOUD
    cloud.online = False  # allow_all must not resurrect a token the cloud blocked
    assert (await auth.authorize("BAD-1", "rfid", "cp1")).status is AuthStatus.BLOCKED
    assert store.cache["BAD-1"][0].status is AuthStatus.BLOCKED


async def test_cloud_answer_unknown_is_refused_and_not_cached() -> None:
    auth, store, cloud, _ = await make(policy="allow_all")
    cloud.answers["WHO-1"] = ("unknown", None, None)
    d = await auth.authorize("WHO-1", "rfid", "cp1")
    assert d.status is AuthStatus.UNKNOWN and not d.offline_unknown
    assert "WHO-1" not in store.cache


async def test_cloud_answer_with_past_expiry_is_expired() -> None:
    auth, _, cloud, _ = await make()
    cloud.answers["OLD-1"] = ("accepted", "olga", T0 - 5)
    assert (await auth.authorize("OLD-1", "rfid", "cp1")).status is AuthStatus.EXPIRED


@pytest.mark.parametrize(
    ("policy", "accepted", "source"),
    [
        ("allow_known", False, AuthSource.OFFLINE_UNKNOWN),
        ("allow_all", True, AuthSource.OFFLINE_UNKNOWN),
        ("deny", False, AuthSource.OFFLINE_UNKNOWN),
    ],
)
async def test_timeout_then_offline_policy(policy: str, accepted: bool, source: AuthSource) -> None:
    auth, store, cloud, _ = await make(policy, timeout_s=0.05)  # the cloud never answers
    loop = asyncio.get_running_loop()
    t = loop.time()
    d = await auth.authorize("NOBODY-1", "rfid", "cp1")
    assert 0.04 <= loop.time() - t < 1.0
    assert len(cloud.sent) == 1
    assert d.accepted is accepted and d.source is source
    assert d.offline_unknown is accepted
    assert store.cache == {}  # a policy decision is not a cloud answer
    # Known accepted tokens stay accepted under every policy, even offline.
    cloud.online = False
    assert (await auth.authorize("04A2B3C4D5E6F7", "rfid", "cp1")).accepted


@pytest.mark.parametrize("policy", ["allow_known", "allow_all", "deny"])
async def test_offline_sends_nothing(policy: str) -> None:
    auth, _, cloud, _ = await make(policy)
    cloud.online = False
    d = await auth.authorize("NOBODY-2", "rfid", "cp1")
    assert cloud.sent == []
    assert d.accepted is (policy == "allow_all")


async def test_send_failure_falls_back_to_offline_policy() -> None:
    auth, _, cloud, _ = await make("allow_all")
    cloud.fail = True
    d = await auth.authorize("NOBODY-3", "rfid", "cp1")
    assert d.accepted and d.offline_unknown


@pytest.mark.parametrize(("policy", "accepted"), [("allow_known", True), ("deny", False)])
async def test_stale_cache_entry_offline(policy: str, accepted: bool) -> None:
    store = MemoryAuthStore()
    store.cache["HAL-1"] = (Token("HAL-1", TokenType.RFID, "hal"), T0 - 7200)  # TTL is 1 h
    auth, _, cloud, _ = await make(policy, store=store)
    cloud.online = False
    d = await auth.authorize("HAL-1", "rfid", "cp1")
    assert d.accepted is accepted
    assert not d.offline_unknown


async def test_stale_cache_entry_online_asks_the_cloud_again() -> None:
    store = MemoryAuthStore()
    store.cache["HAL-1"] = (Token("HAL-1", TokenType.RFID, "hal"), T0 - 7200)
    auth, _, cloud, _ = await make(store=store)
    cloud.answers["HAL-1"] = ("blocked", "hal", None)
    assert (await auth.authorize("HAL-1", "rfid", "cp1")).status is AuthStatus.BLOCKED
    assert len(cloud.sent) == 1


async def test_one_slow_answer_does_not_block_another() -> None:
    auth, _, cloud, _ = await make(timeout_s=2.0)
    cloud.answers.update({"SLOW-1": ("accepted", "s", None), "FAST-1": ("accepted", "f", None)})
    cloud.delay_s["SLOW-1"] = 0.5
    loop = asyncio.get_running_loop()
    t = loop.time()
    slow = asyncio.create_task(auth.authorize("SLOW-1", "rfid", "cp1"))
    await asyncio.sleep(0)
    fast = await auth.authorize("FAST-1", "rfid", "cp2")
    assert fast.user == "f" and loop.time() - t < 0.3
    assert (await slow).user == "s"


async def test_unmatched_auth_response_is_refused_and_logged() -> None:
    auth, *_ = await make()
    with capture_logs() as logs, pytest.raises(CommandError) as err:
        await auth.auth_response("no-such-request", "accepted", "mallory", None)
    assert err.value.code == "unmatched"
    assert any(e["event"] == "auth_response_unmatched" for e in logs)
    assert auth.known("MALLORY") is None


async def test_update_tokens_rejects_stale_version_and_changes_nothing() -> None:
    auth, store, _, _ = await make()
    await auth.update_tokens(5, "replace", [Token("A-1", TokenType.RFID, "a")], [])
    for version in (5, 4):
        with pytest.raises(CommandError) as err:
            await auth.update_tokens(version, "replace", [], [])
        assert err.value.code == "stale_version"
    assert auth.cloud_version == 5 and store.version == 5
    assert (await auth.authorize("A-1", "rfid", "cp1")).accepted
    with pytest.raises(CommandError) as err:
        await auth.update_tokens(6, "merge", [], [])
    assert err.value.code == "bad_request"


async def test_update_tokens_patch_and_replace() -> None:
    calls: list[int] = []
    auth, store, cloud, _ = await make()
    cloud.online = False

    async def listener() -> None:
        calls.append(auth.cloud_version)

    auth.add_listener(listener)
    await auth.update_tokens(
        1, "replace", [Token("A-1", TokenType.RFID, "a"), Token("B-1", TokenType.RFID, "b")], []
    )
    await auth.update_tokens(2, "patch", [Token("C-1", TokenType.RFID, "c")], ["a-1"])
    assert sorted(t.id for t in store.tokens) == ["B-1", "C-1"]
    assert not (await auth.authorize("A-1", "rfid", "cp1")).accepted
    assert (await auth.authorize("C-1", "rfid", "cp1")).user == "c"
    await auth.update_tokens(3, "replace", [], [])
    assert not (await auth.authorize("C-1", "rfid", "cp1")).accepted
    assert calls == [1, 2, 3]


async def test_lookup_user_prefers_an_accepted_token() -> None:
    second = Token("BOB-CARD", TokenType.RFID, "bob")
    auth, *_ = await make(tokens=(BOB_BLOCKED, second, ALICE))
    assert auth.lookup_user("bob") == second
    assert auth.lookup_user("alice") == ALICE
    assert auth.lookup_user("nobody") is None
    only_blocked, *_ = await make(tokens=(BOB_BLOCKED,))
    found = only_blocked.lookup_user("bob")
    assert found is not None and found.status is AuthStatus.BLOCKED


def test_bad_offline_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        Authorizer(AuthConfig(offline_policy="maybe"), MemoryAuthStore(), None, FakeClock())


async def test_cloud_list_and_cache_survive_a_restart_on_the_real_store(tmp_path: Path) -> None:
    from gateway.store import Store

    path = tmp_path / "buffer.db"
    clock = FakeClock()
    cloud = FakeCloud(answers={"NEW-9": ("accepted", "nina", None)})
    async with Store.open(path, site_id="t", reserve_bytes=0) as store:
        auth = Authorizer(AuthConfig(request_timeout_s=1.0), store, cloud, clock)
        cloud.authorizer = auth
        await auth.load()
        await auth.update_tokens(7, "replace", [Token("PUSHED-1", TokenType.KEYFOB, "pia")], [])
        assert (await auth.authorize("NEW-9", "rfid", "cp1")).accepted
    async with Store.open(path, site_id="t", reserve_bytes=0) as store:
        offline = FakeCloud(online=False)
        auth = Authorizer(AuthConfig(offline_policy="deny"), store, offline, clock)
        await auth.load()
        assert auth.cloud_version == 7
        d = await auth.authorize("PUSHED-1", "keyfob", "cp1")
        assert (d.user, d.source) == ("pia", AuthSource.CLOUD)
        assert (await auth.authorize("NEW-9", "rfid", "cp1")).user == "nina"
        assert offline.sent == []


async def test_truncated_uid_matches_one_known_token_only() -> None:
    """KEBA shows 4 bytes of a UID (tag.truncated_to: 8): there a unique prefix of exactly 8
    characters names the token."""
    twins = (
        ALICE,
        Token("99887766AA", TokenType.RFID, "x"),
        Token("99887766BB", TokenType.RFID, "y"),
    )
    auth, _, cloud, _ = await make(tokens=twins, truncated_to={"cp1": 8})
    cloud.online = False
    d = await auth.authorize("04a2b3c4", "rfid", "cp1")
    assert d.accepted and d.user == "alice" and d.token == ALICE
    assert not (await auth.authorize("99887766", "rfid", "cp1")).accepted  # ambiguous
    assert not (await auth.authorize("04A2B3", "rfid", "cp1")).accepted  # too short
    assert not (await auth.authorize("04A2B3C4D5", "rfid", "cp1")).accepted  # too long


async def test_prefix_matching_only_on_the_charger_that_truncates() -> None:
    """An unlisted EMP-0001 shown on a charger that shows whole ids is not EMP-000123's user;
    the same 8 characters on the KEBA (which shows 8 of them) are."""
    emp = Token("EMP-000123", TokenType.RFID, "emma")
    auth, _, cloud, _ = await make(tokens=(ALICE, emp), truncated_to={"keba": 8})
    cloud.online = False
    wrong = await auth.authorize("EMP-0001", "rfid", "vestel")
    assert not wrong.accepted and wrong.user is None
    assert auth.known("EMP-0001", "vestel") is None and auth.known("EMP-0001") is None
    assert not (await auth.authorize("04A2B3C4", "rfid", "vestel")).accepted
    assert (await auth.authorize("EMP-0001", "rfid", "keba")).user == "emma"
    assert (await auth.authorize("04A2B3C4", "rfid", "keba")).user == "alice"
    # a running session's tag is re-checked where it was shown
    assert auth.check("04A2B3C4", "keba") is AuthStatus.ACCEPTED
    assert auth.check("04A2B3C4", "vestel") is None


def test_keba_profiles_declare_their_truncated_tag() -> None:
    from gateway.profiles import load_profiles

    profiles = load_profiles(Path(__file__).resolve().parent.parent / "drivers")
    truncating = {
        n: p.tag.truncated_to for n, p in profiles.items() if p.tag and p.tag.truncated_to
    }
    assert truncating == {"keba-p30": 8, "keba-p40": 8}


@pytest.mark.parametrize("version", [10**300, 2**53 + 1, 0, 1.5, True])
async def test_update_tokens_refuses_versions_beyond_2_53(version: Any) -> None:
    # A version of 1e300 was accepted, and every later list was refused as stale.
    auth, *_ = await make()
    with pytest.raises(CommandError) as err:
        await auth.update_tokens(version, "replace", [Token("A-1", TokenType.RFID, "a")], [])
    assert err.value.code == "invalid"
    assert auth.cloud_version == 0 and auth.known("A-1") is None
    await auth.update_tokens(2**53, "replace", [Token("A-1", TokenType.RFID, "a")], [])
    assert auth.cloud_version == 2**53


async def test_a_stored_version_beyond_2_53_does_not_block_every_later_push() -> None:
    store = MemoryAuthStore()
    store.version, store.tokens = 10**300, [Token("OLD-1", TokenType.RFID, "old")]
    auth, *_ = await make(store=store)
    assert auth.cloud_version == 0 and auth.known("OLD-1") is not None  # kept until replaced
    await auth.update_tokens(1, "replace", [Token("NEW-1", TokenType.RFID, "new")], [])
    assert auth.known("OLD-1") is None and auth.known("NEW-1") is not None
