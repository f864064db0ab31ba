"""Uplink pieces without a broker: topics, payload schemas, the command handler."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import jsonschema
import pydantic
import pytest

from gateway.records import GENESIS, SessionRecord, canonical_json, record_hash, seal
from gateway.uplink.commands import MAX_COMMAND_BYTES, CommandHandler
from gateway.uplink.drain import Inflight
from gateway.uplink.payloads import PAYLOAD_MODELS
from gateway.uplink.schemas import (
    SCHEMA_NAMES,
    load_schema,
    model_problems,
    schema_text,
    validate,
)
from gateway.uplink.topics import Topics
from tests.support.uplink import PREFIX, ROOT, SITE, Target, session_record

TOPICS = Topics(PREFIX, SITE)


def test_topics() -> None:
    assert TOPICS.gateway_status == f"{ROOT}/gateway/status"
    assert TOPICS.gateway_key == f"{ROOT}/gateway/key"
    assert TOPICS.charger_status("cp1") == f"{ROOT}/chargers/cp1/status"
    assert TOPICS.readings("m1") == f"{ROOT}/readings/m1"
    assert TOPICS.sessions_finished == f"{ROOT}/sessions/finished"
    assert TOPICS.commands_filter == f"{ROOT}/commands/+"
    assert TOPICS.command_reply("start") == f"{ROOT}/commands/start/reply"
    assert TOPICS.command_name(f"{ROOT}/commands/start") == "start"
    assert TOPICS.command_name(f"{ROOT}/commands/start/reply") is None
    assert TOPICS.command_name("evgw/other-site/commands/start") is None
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(ValueError):
            TOPICS.charger_status(bad)
    with pytest.raises(ValueError):
        Topics("evgw", "site/x")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schemas_are_valid_draft_2020_12(name: str) -> None:
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def _sealed(i: int) -> dict:
    rec = session_record(i)
    rec.update(seq=i + 1, site_id=SITE, prev_hash=GENESIS)
    return seal(rec)


GOOD = {
    "session": _sealed(0),
    "gateway-status": {"state": "online", "version": "0.1.0", "ts": "2026-11-26T08:13:20.123Z"},
    "charger-status": {
        "status": "charging",
        "online": True,
        "session_id": "x",
        "power_w": 11000.0,
        "ts": "2026-11-26T08:13:20.123Z",
    },
    "readings": {
        "schema": "evgw.readings/1",
        "device_id": "m1",
        "readings": [{"ts": "2026-11-26T08:13:20.123Z", "power_w": 1.5, "energy_wh": 3}],
    },
    "command-start": {"request_id": "r1", "charger_id": "cp1", "user": "alice"},
    "command-stop": {"request_id": "r1", "session_id": "s"},
    "command-availability": {"request_id": "r1", "charger_id": "cp9", "available": False},
    "command-reset": {"request_id": "r1", "charger_id": "cp9", "type": "hard"},
    "command-reply": {
        "request_id": None,
        "ok": False,
        "error": {"code": "bad_json", "message": "x"},
    },
    "auth-response": {"request_id": "r", "status": "accepted", "user": "u", "expires_at": None},
    "auth-request": {"request_id": "r", "token": "t", "token_type": "rfid", "charger_id": "cp1"},
    "command-limit": {
        "request_id": "r",
        "scope": "site",
        "max_current_a": 16,
        "expires_at": "2026-11-26T08:13:20+01:00",
        "reason": None,
        "issued_at": "2026-11-26T08:13:20Z",
        "signature": {"alg": "ed25519", "key_id": "0123456789abcdef", "value": "QUJD"},
    },
    "command-tariffs": {"request_id": "r", "version": 3, "tariffs": {"a": {"x": 1}}},
    "command-tokens": {
        "request_id": "r",
        "version": 3,
        "mode": "patch",
        "tokens": [{"id": "A", "type": "rfid", "user": "u", "status": "accepted", "expires_at": 5}],
        "remove": ["B"],
        "part": {"index": 1, "count": 2},
    },
    "gateway-key": {
        "alg": "ed25519",
        "key_id": "k",
        "public_key_pem": "PEM",
        "ts": "2026-11-26T08:13:20Z",
        "rotation": {
            "schema": "evgw.key-rotation/1",
            "site_id": "s",
            "key_id": "k",
            "public_key": "a" * 64,
            "previous_key_id": "j",
            "issued_at": "2026-11-26T08:13:20Z",
            "signature": {"alg": "ed25519", "key_id": "j", "value": "v"},
        },
    },
    "grid-limit": {
        "schema": "evgw.grid-limit/1",
        "max_current_a": 30,
        "source": "cloud",
        "reason": None,
        "expires_at": None,
        "chargers": {},
        "signal": None,
        "ts": "2026-11-26T08:13:20Z",
        "more": 1,
    },
    "session-started": {
        "schema": "evgw.session-started/1",
        "session_id": "s",
        "charger_id": "c",
        "user": None,
        "started_at": "2026-11-26T08:13:20Z",
        "meter_start_wh": 5,
    },
}


def _mutations(value: object, rng: random.Random) -> object:
    """Random breakage of a valid payload: wrong types, removed keys, extra keys."""
    if isinstance(value, dict) and value:
        out = dict(value)
        key = rng.choice(sorted(out))
        action = rng.randrange(4)
        if action == 0:
            del out[key]
        elif action == 1:
            out[key] = rng.choice([None, 1, "x", 1.5, True, [], {}])
        elif action == 2:
            out["unexpected_" + key] = 1
        else:
            out[key] = _mutations(out[key], rng)
        return out
    if isinstance(value, list) and value:
        return [_mutations(value[0], rng), *value[1:]]
    return rng.choice([None, -1, "", "x", 2.5, False, [], {}])


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_checked_in_schemas_are_generated_from_the_models(name: str) -> None:
    checked_in = Path(__file__).parents[1] / "gateway" / "uplink" / "schemas" / f"{name}.json"
    assert checked_in.read_text("utf-8") == schema_text(name), (
        "regenerate with: python -m gateway.uplink.schemas"
    )


def test_every_payload_has_an_example() -> None:
    assert sorted(GOOD) == sorted(SCHEMA_NAMES) == sorted(PAYLOAD_MODELS)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_the_model_reads_every_payload_its_schema_accepts(name: str) -> None:
    """Readers parse a validated payload into its model: that must never fail. (The model is
    laxer in one way only: it reads an explicit null where the schema wants the key absent.)"""
    model = PAYLOAD_MODELS[name]
    assert validate(name, GOOD[name]) == []
    assert jsonschema.Draft202012Validator(load_schema(name)).is_valid(GOOD[name])
    model.model_validate(GOOD[name])
    rng = random.Random(name)
    rejected = 0
    for _ in range(400):
        candidate = _mutations(GOOD[name], rng)
        if validate(name, candidate):
            rejected += 1
        else:
            model.model_validate(candidate)
    assert rejected > 0


REJECTED = [
    ("command-limit", {"request_id": "r", "scope": "s", "clear": 1}, ["$.clear: must be true"]),
    (
        "command-limit",
        {"request_id": "r", "scope": "s", "clear": True, "max_power_w": 5},
        ["$: matches more than one form"],
    ),
    (
        "command-limit",
        {"request_id": "r", "scope": "s"},
        [
            "$: matches none of the allowed forms ($: missing required key 'max_current_a'; "
            "$: missing required key 'max_power_w'; $: missing required key 'clear')"
        ],
    ),
    (
        "command-stop",
        {"request_id": "r"},
        [
            "$: matches none of the allowed forms ($: missing required key 'charger_id'; "
            "$: missing required key 'session_id')"
        ],
    ),
    (
        "command-start",
        {"request_id": "r", "charger_id": 7, "user": "u", "token": 5},
        [
            "$.charger_id: expected string, got number",
            "$.token: expected string or null, got number",
        ],
    ),
    (
        "command-tokens",
        {
            "request_id": "r",
            "version": True,
            "mode": "merge",
            "tokens": [{"id": "A", "type": "rfid"}],
        },
        [
            "$.version: expected integer, got boolean",
            '$.mode: must be one of "replace", "patch"',
            "$.tokens[0]: missing required key 'user'",
        ],
    ),
    (
        "auth-response",
        {"request_id": "r", "status": "ok", "expires_at": -1},
        [
            '$.status: must be one of "accepted", "blocked", "expired", "unknown"',
            "$.expires_at: less than 0",
        ],
    ),
    (
        "command-reply",
        {"request_id": "r", "ok": False, "error": {"code": "bad", "message": 5}},
        ["$.error.message: expected string, got number"],
    ),
    (
        "charger-status",
        {
            "status": "charging",
            "online": True,
            "session_id": None,
            "power_w": float("nan"),
            "ts": "2026-11-26T08:13:20Z",
        },
        ["$.power_w: expected number or null, got nan"],
    ),
    (
        "readings",
        {"schema": "evgw.readings/1", "device_id": "m", "readings": []},
        ["$.readings: fewer than 1 items"],
    ),
    (
        "gateway-key",
        {"alg": "ed25519", "key_id": "", "public_key_pem": "P", "ts": None},
        ["$.key_id: shorter than 1 characters", "$.ts: expected string, got null"],
    ),
]


@pytest.mark.parametrize(("name", "payload", "problems"), REJECTED)
def test_problems_are_one_clear_line_each(name: str, payload: dict, problems: list[str]) -> None:
    """Wrong types, values outside an enum, missing and unexpected keys: the wording of the
    hand-written validator this replaced; of the forms a value may take, the one meant."""
    assert validate(name, payload) == problems


def test_validator_messages_name_the_path() -> None:
    bad = dict(GOOD["session"], seq="42", cost={"currency": "EUR"})
    problems = validate("session", bad)
    assert any(p.startswith("$.seq: expected integer") for p in problems)
    assert "$.cost: missing required key 'excl_vat'" in problems
    assert validate(
        "command-start", {"request_id": "r", "charger_id": "cp1", "user": "u", "x": 1}
    ) == ["$: unexpected key 'x'"]


# -- the session record -----------------------------------------------------------------------


def _full_record() -> dict:
    rec = dict(_sealed(3), meter_start_wh=None, max_power_w=None, tariff_id=None)
    rec["user"] = {"id": None, "auth": "offline_unknown"}  # token keys absent: stay absent
    rec["charging_periods"] = [
        {"start": rec["started_at"], "tariff_element": None, "energy_wh": 0, "idle_s": 0.25}
    ]
    rec["ocpp"] = {
        "charge_point_id": "CP-Ü",
        "transaction_id": 12,
        "clock_skew_s": -1.5,
        "signed_meter_values": {"start": "OCMF|{}|{}"},
    }
    rec["signature"] = {"alg": "ed25519", "key_id": "k1", "value": "c2ln"}
    return seal(rec)


@pytest.mark.parametrize("make", [lambda: _sealed(0), _full_record])
def test_a_session_record_read_into_the_model_dumps_to_the_same_bytes(make) -> None:
    raw = make()
    assert validate("session", raw) == []
    record = SessionRecord.from_dict(json.loads(json.dumps(raw)))
    assert record.to_dict() == raw
    assert record.canonical() == canonical_json(raw)
    assert record.body_hash() == record_hash(raw) == raw["hash"]
    assert isinstance(record.to_dict()["max_power_w"], type(raw["max_power_w"]))
    with pytest.raises(ValueError, match="frozen"):
        record.seq = 9  # type: ignore[misc]


def test_an_integer_written_as_a_float_passes_the_schema_but_not_the_model() -> None:
    """JSON Schema's integer takes 1.0; the record model does not (its dump would say 1 and the
    hash would no longer match): the consumer holds such a record as a schema problem."""
    raw = seal(dict(_sealed(0), seq=1.0))
    assert validate("session", raw) == []
    with pytest.raises(pydantic.ValidationError) as caught:
        SessionRecord.from_dict(raw)
    assert model_problems(caught.value) == ["$.seq: Input should be a valid integer"]


def test_session_records_keep_int_and_float_as_they_came() -> None:
    """The hash covers ``5400`` and ``5400.0`` as different bytes: a record read into the model
    must give back the one it was signed with."""
    for value in (5400, 5400.0, 0.5):
        raw = seal(dict(_sealed(1), charging_s=value, max_power_w=value))
        dumped = SessionRecord.from_dict(raw).to_dict()
        assert canonical_json(dumped) == canonical_json(raw), value


# -- command handler ------------------------------------------------------------------------


async def _handle(handler: CommandHandler, name: str, payload: object) -> dict:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply = await handler.handle(TOPICS.command(name), raw)
    assert reply is not None
    assert reply.topic == TOPICS.command_reply(name)
    assert validate("command-reply", reply.payload) == []
    return reply.payload


MALFORMED = [
    ("start", b"{not json", "bad_json", None),
    ("start", b"\xff\xfe", "bad_json", None),
    ("start", b"[1, 2]", "invalid", None),
    ("start", b'"text"', "invalid", None),
    (
        "start",
        b'{"request_id": "r1", "charger_id": "cp1", "user": "u", "x": NaN}',
        "bad_json",
        None,
    ),
    ("start", {"request_id": "r1", "charger_id": 7, "user": "u"}, "invalid", "r1"),
    ("start", {"request_id": "r1", "user": "u"}, "invalid", "r1"),
    ("start", {"charger_id": "cp1", "user": "u"}, "invalid", None),
    ("start", {"request_id": 5, "charger_id": "cp1", "user": "u"}, "invalid", None),
    ("start", {"request_id": "r1", "charger_id": "cp9", "user": "u"}, "unknown_charger", "r1"),
    ("stop", {"request_id": "r2"}, "invalid", "r2"),
    (
        "tokens",
        {"request_id": "r3", "version": "2", "mode": "replace", "tokens": []},
        "invalid",
        "r3",
    ),
    ("tokens", {"request_id": "r3", "version": 2, "mode": "merge", "tokens": []}, "invalid", "r3"),
    (
        "tokens",
        {
            "request_id": "r3",
            "version": 2,
            "mode": "replace",
            "tokens": [{"id": "A", "type": "rfid"}],
        },
        "invalid",
        "r3",
    ),
    (
        "tokens",
        {"request_id": "r3", "version": 2, "mode": "replace", "tokens": [], "remove": ["A"]},
        "invalid",
        "r3",
    ),
    ("tokens", {"request_id": "r3", "version": True, "mode": "patch"}, "invalid", "r3"),
    ("tariffs", {"request_id": "r4", "version": 1, "tariffs": []}, "invalid", "r4"),
    ("tariffs", {"request_id": "r4", "version": 1, "tariffs": {"x": 1}}, "invalid", "r4"),
    ("reboot", {"request_id": "r5"}, "unknown_command", "r5"),
    ("start", b"[" * 100_000 + b"]" * 100_000, "too_large", None),
    (
        "start",
        json.dumps(
            {"request_id": "r6", "charger_id": "cp1", "user": "u" * MAX_COMMAND_BYTES}
        ).encode(),
        "too_large",
        None,
    ),
    ("start", b"[" * 30_000 + b"]" * 30_000, "bad_json", None),
]


@pytest.mark.parametrize(("name", "payload", "code", "request_id"), MALFORMED)
async def test_malformed_commands_get_error_replies_and_change_nothing(
    name: str, payload: object, code: str, request_id: str | None
) -> None:
    target = Target()
    handler = CommandHandler(TOPICS, target)
    before = target.snapshot()
    reply = await _handle(handler, name, payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["request_id"] == request_id
    assert target.snapshot() == before


async def test_random_json_never_reaches_the_target() -> None:
    target = Target()
    handler = CommandHandler(TOPICS, target)
    rng = random.Random(7)
    base = {
        "request_id": "r",
        "version": 3,
        "mode": "patch",
        "tokens": [{"id": "A", "type": "rfid", "user": "u"}],
    }
    applied = 0
    for i in range(300):
        candidate = _mutations(base, rng)
        if isinstance(candidate, dict):
            candidate["request_id"] = f"r{i}"  # each one new: dedupe must not hide a refusal
        before = target.snapshot()
        reply = await _handle(handler, "tokens", candidate)
        if reply["ok"]:
            assert validate("command-tokens", candidate) == []
            applied += 1
        else:
            assert target.snapshot() == before
    assert 0 < applied < 300


async def test_commands_apply_once_per_request_id() -> None:
    target = Target()
    handler = CommandHandler(TOPICS, target)
    cmd = {
        "request_id": "t-1",
        "version": 1,
        "mode": "replace",
        "tokens": [
            {"id": "A", "type": "rfid", "user": "alice", "expires_at": "2030-01-01T00:00:00Z"}
        ],
    }
    first = await _handle(handler, "tokens", cmd)
    again = await _handle(handler, "tokens", cmd)
    assert first == again == {"request_id": "t-1", "ok": True, "result": {"version": 1, "count": 1}}
    assert target.calls == [("tokens", (1, "replace"))]
    assert target.tokens["A"].expires_at == 1893456000.0
    # a refused command is not remembered: fixing the cause and retrying works
    start = {"request_id": "s-1", "charger_id": "cp9", "user": "bob"}
    assert (await _handle(handler, "start", start))["ok"] is False
    assert (await _handle(handler, "start", dict(start, charger_id="cp1")))["ok"] is True


async def test_applied_request_ids_survive_a_restart(tmp_path) -> None:
    from gateway.store import Store

    async with Store.open(tmp_path / "b.db", site_id=SITE, reserve_bytes=0) as store:
        target = Target()
        cmd = {"request_id": "p-1", "charger_id": "cp1", "user": "alice"}
        assert (await _handle(CommandHandler(TOPICS, target, store), "start", cmd))["ok"]
        again = await _handle(CommandHandler(TOPICS, target, store), "start", cmd)
        assert again["ok"] is True
        assert len(target.calls) == 1


def _v2_buffer_with_kv(path: object, value: str) -> None:
    import sqlite3

    from gateway.store.schema import MIGRATIONS

    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_ts REAL)")
    for version in (1, 2):
        for statement in MIGRATIONS[version - 1]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
    db.execute("INSERT INTO kv VALUES ('uplink.applied_requests', ?, 1000.0)", (value,))
    db.commit()
    db.close()


@pytest.mark.parametrize("value", ["not json", '"[[1]]"', "{}", '[1, "x", [null, {}]]', "[]"])
async def test_odd_old_request_lists_do_not_stop_the_upgrade(tmp_path, value: str) -> None:
    from gateway.store import Store

    _v2_buffer_with_kv(tmp_path / "old.db", value)
    async with Store.open(tmp_path / "old.db", site_id=SITE, reserve_bytes=0) as store:
        assert await store.kv_get("uplink.applied_requests") is None
        assert await store.request_reply("1") == (False, None)


async def test_request_ids_of_older_buffers_move_into_the_table(tmp_path) -> None:
    """Before schema v3 the last 256 applied request ids lived in kv; the upgrade keeps them."""
    from gateway.store import Store

    path = tmp_path / "old.db"
    old_reply = {"request_id": "old-1", "ok": True, "result": {"charger_id": "cp1"}}
    entries = [["old-1", old_reply], ["bad", "not a reply"], [7, {}], "x"]
    _v2_buffer_with_kv(path, json.dumps(entries))
    async with Store.open(path, site_id=SITE, reserve_bytes=0) as store:
        assert await store.kv_get("uplink.applied_requests") is None
        assert await store.request_reply("old-1") == (True, old_reply)
        assert await store.request_reply("bad") == (False, None)
        target = Target()
        handler = CommandHandler(TOPICS, target, store)
        cmd = {"request_id": "old-1", "charger_id": "cp1", "user": "alice"}
        assert await _handle(handler, "start", cmd) == old_reply  # not applied again
        assert target.calls == []


async def test_auth_response_reaches_the_target_only_when_valid() -> None:
    target = Target()
    handler = CommandHandler(TOPICS, target)
    for bad in (b"nope", b"{}", json.dumps({"request_id": "a", "status": "maybe"}).encode()):
        reply = await handler.handle(TOPICS.auth_response, bad)
        assert reply is not None and reply.topic == TOPICS.auth_response_reply
        assert reply.payload["ok"] is False and validate("command-reply", reply.payload) == []
    assert target.auth == []
    ok = {
        "request_id": "a",
        "status": "accepted",
        "user": "u",
        "expires_at": "2030-01-01T00:00:00Z",
    }
    reply = await handler.handle(TOPICS.auth_response, json.dumps(ok).encode())
    assert reply is not None
    assert reply.payload == {"request_id": "a", "ok": True, "result": {"status": "accepted"}}
    assert target.auth == [("a", "accepted", "u", 1893456000.0)]


async def test_prune_keeps_request_ids_longer_than_the_largest_command_age(tmp_path) -> None:
    """uplink.command_max_age is at most 1 h; the shortest retention (1 day) keeps ids longer."""
    from gateway.config import config_json_schema
    from gateway.store import Store

    models = config_json_schema()["$defs"]
    max_age_s = models["UplinkConfig"]["properties"]["command_max_age"]["anyOf"][0]["maximum"]
    retention = models["StorageConfig"]["properties"]["readings_retention_days"]
    shortest_retention_s = retention["minimum"] * 86400

    class Clock:
        t = 1_796_000_000.0

        def time(self) -> float:
            return self.t

        def monotonic(self) -> float:
            return self.t

    clock = Clock()
    async with Store.open(
        tmp_path / "b.db",
        site_id=SITE,
        reserve_bytes=0,
        readings_retention_days=retention["minimum"],
        clock=clock,
    ) as store:
        await store.save_request_reply("r1", {"request_id": "r1", "ok": True, "result": {}})
        clock.t += max_age_s + 60
        await store.prune()
        assert (await store.request_reply("r1"))[0] is True
        clock.t += shortest_retention_s
        await store.prune()
        assert (await store.request_reply("r1"))[0] is False


async def test_the_window_wakes_the_drain_for_every_free_slot() -> None:
    """A full window lets the drain go on at the first PUBACK, not after a tenth of the window:
    with nothing of ours on the wire while it waited, the broker's PUBACKs sat in its Nagle
    buffer (bench/findings.md); and a message larger than the bytes left waits for room."""
    window = Inflight(50, max_bytes=10_000)
    for mid in range(1, 51):
        window.add(mid, 0.0, 10, "readings", None, (), 1)
    waiter = asyncio.create_task(window.wait_room(10))
    await asyncio.sleep(0)
    assert not waiter.done()
    window.pop(1)
    await asyncio.wait_for(waiter, 1)
    window.add(51, 0.0, 10, "readings", None, (), 1)
    big = asyncio.create_task(window.wait_room(9_600))  # 50 in flight, 500 bytes
    window.pop(2)
    await asyncio.sleep(0)
    assert not big.done()  # a slot, but not the bytes
    for mid in range(3, 12):
        window.pop(mid)
    await asyncio.wait_for(big, 1)
    assert window.count == 40 and window.bytes == 400
