"""The consumer bills only what it can trust (issue 11, item 3), against real parts: a mosquitto
started per test, a second MQTT client publishing forged keys and records, the consumer storing
into SQLite and PostgreSQL, and the real ``evgw`` command line on the result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_consumer import _consumer, _publish, _session_msg, _until, db_url  # noqa: F401

from gateway.billing.signing import Signer, check_rotation, raw_hex, sign_rotation
from gateway.cli import main
from gateway.cloud import consumer as consumer_module
from gateway.cloud.cloudstore import CloudStore, open_cloud_store
from gateway.cloud.consumer import SessionConsumer
from gateway.cloud.subscriber import _connection_loop, parse_broker_url
from gateway.cloud.trust import TrustDirError, load_trust_dir
from gateway.records import GENESIS, seal
from tests.support.consumer import make_chain, make_signer, record_body
from tests.support.mqtt_broker import MosquittoBroker

SITE = "depot-7"
TOPIC = f"evgw/{SITE}/sessions/finished"


def _key_msg(signer: Signer, site: str = SITE, **extra: Any) -> tuple[str, bytes, bool]:
    payload = {**signer.public_key_payload(), **extra}
    return (f"evgw/{site}/gateway/key", json.dumps(payload).encode(), True)


def _priced(body: dict[str, Any], excl: str, vat: str, incl: str) -> dict[str, Any]:
    body["cost"] = {
        "currency": "EUR",
        "excl_vat": excl,
        "vat": vat,
        "incl_vat": incl,
        "lines": [
            {"type": "energy", "quantity": "1.000", "unit": "kWh", "unit_price": excl,
             "amount": excl},
        ],
    }  # fmt: skip
    return body


def _forged(seq: int, signer: Signer | None, site: str = SITE, **kw: Any) -> dict[str, Any]:
    """A record for user victim costing EUR 99.99, sealed (and signed) by whoever forges it."""
    body = _priced(record_body(seq, site=site, user="victim", **kw), "84.03", "15.96", "99.99")
    body["prev_hash"] = GENESIS
    return seal(body, signer.sign if signer is not None else None)


async def _cli(*args: str) -> int:
    """The real command line, in a worker thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, list(args))


async def _held(store: CloudStore) -> list[str]:
    return sorted(q.kind for q in await store.quarantined())


async def test_forged_keys_and_records_are_quarantined_never_billed(
    mosquitto: MosquittoBroker,
    db_url: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The issue's scenario: someone who can publish on the broker pushes a second key for a
    known site and three sessions of EUR 99.99 for user ``victim``. Before: stored, billed
    (EUR 299.97 on victim's statement) and ``verify --db`` said OK."""
    gateway = make_signer(tmp_path)
    attacker = make_signer(tmp_path, "attacker.key")
    genuine = make_chain(1, gateway, user="victim", energy_wh=1000)[0]
    month = genuine["started_at"][:7]
    # 1. signed by the attacker, whose key it publishes for the site (retained, replacing ours)
    by_attacker = _forged(2, attacker, start=genuine_start(genuine, 1))
    # 2. signed by the attacker under the gateway's key id: a bad signature
    lying = _forged(3, None, start=genuine_start(genuine, 2))
    lying["signature"] = dict(attacker.sign(lying["hash"].encode()), key_id=gateway.key_id)
    # 3. a site nobody has heard of, signed by a key it never published
    ghost = _forged(1, attacker, site="ghost-site", start=genuine_start(genuine, 3))

    await _publish(mosquitto, [_key_msg(gateway)])
    async with (
        _consumer(mosquitto.url, db_url, client_id="billing"),
        open_cloud_store(db_url) as view,
    ):
        await _until(lambda: _has_keys(view, 1), what="the gateway's key")
        await _publish(mosquitto, [_session_msg(genuine)])
        await _until(lambda: _count(view, 1, 0), what="the genuine session")
        # a second client: the attacker
        await _publish(
            mosquitto,
            [
                _key_msg(attacker),  # "the site's new key"
                _session_msg(by_attacker),
                _session_msg(lying),
                _session_msg(ghost, site="ghost-site"),
            ],
        )
        await _until(lambda: _count(view, 1, 4), what="everything forged held")
        assert await _held(view) == ["bad_signature", "key", "no_key", "unknown_key"]
        keys = await view.key_rows()
        assert [(k.site_id, k.key_id, k.status, k.source) for k in keys] == [
            (SITE, gateway.key_id, "active", "first_use")
        ]
        [refused] = [q for q in await view.quarantined() if q.kind == "key"]
        assert refused.reason == (
            f"key: site {SITE} is signed by {gateway.key_id}; new key {attacker.key_id} "
            "refused: it carries no rotation statement"
        )
        assert [s.session_id for s in await view.sessions()] == [genuine["session_id"]]

    # victim's statement bills the genuine session only, and says what it left out
    capsys.readouterr()
    args = ["statement", "--db", db_url, "--user", "victim", "--month", month]
    assert await _cli(*args, "--format", "json") == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [s["session_id"] for s in doc["sessions"]] == [genuine["session_id"]]
    assert doc["totals"]["EUR"]["incl_vat"] == genuine["cost"]["incl_vat"] != "299.97"
    assert doc["quarantined_records"] == 3  # 3 x 99.99 = 299.97 not billed
    assert captured.err == (
        f"evgw statement: 3 quarantined record(s) of victim in {month} not billed; 4 in the "
        "store (`evgw trust quarantine --db ...` lists them)\n"
    )

    # verify --db fails and names every held record
    assert await _cli("verify", "--db", db_url) == 1
    out = capsys.readouterr().out
    assert "4 record(s) quarantined, never billed:" in out
    assert f"signature by key {gateway.key_id} does not verify" in out
    assert f"signed with key {attacker.key_id}, not a key of site {SITE}" in out


def genuine_start(genuine: dict[str, Any], n: int) -> float:
    from gateway.model import from_rfc3339

    return from_rfc3339(genuine["started_at"]) + 600 * n


async def _has_keys(store: CloudStore, n: int) -> bool:
    return len(await store.key_rows()) == n


async def _count(store: CloudStore, sessions: int, held: int) -> bool:
    return len(await store.sessions()) == sessions and len(await store.quarantined()) == held


def _poison(signer: Signer) -> list[tuple[str, bytes]]:
    """(expected kind, payload): records no check foresaw before, each of which used to raise
    in the consumer (never acknowledged, redelivered for ever, everything behind it stuck)."""

    def signed(**changes: Any) -> dict[str, Any]:
        body = record_body(1)
        body.update(changes, prev_hash=GENESIS)
        return seal(body, signer.sign)

    text = json.dumps(signed())
    return [
        ("range", json.dumps(signed(seq=2**64)).encode()),  # overflowed SQLite
        ("range", json.dumps(signed(seq=2**63)).encode()),  # and PostgreSQL's BIGINT
        ("schema", json.dumps(signed(energy_wh=-5)).encode()),
        ("schema", text.replace('"charging_s": 5400', '"charging_s": NaN').encode()),
        ("schema", text.replace('"charging_s": 5400', '"charging_s": 1e400').encode()),
        ("range", json.dumps(signed(user={"id": "a\x00b", "auth": "local"})).encode()),
        ("range", text.replace('"id": "alice"', '"id": "\\ud800"').encode()),
        ("range", json.dumps(signed(started_at="2026-02-30T10:00:00Z")).encode()),
        ("schema", text.replace('"meter_start_wh": 1100000', '"meter_start_wh": ' + "9" * 5000)
                   .encode()),
        ("schema", b"[" * 100_000 + b"]" * 100_000),
        ("schema", b"\xff\xfe\x00 not even text"),
    ]  # fmt: skip


UNKNOWN_ALG_KEY = json.dumps(
    {
        "alg": "ed25519",
        "key_id": "0123456789abcdef",
        "public_key_pem": (
            "-----BEGIN PUBLIC KEY-----\nMA0wBQYDKgMEAwQAAQID\n-----END PUBLIC KEY-----\n"
        ),
    }
).encode()


async def test_poison_records_are_quarantined_and_the_next_is_billed(
    mosquitto: MosquittoBroker,
    db_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    signer = make_signer(tmp_path)
    chain = make_chain(2, signer)
    poison = _poison(signer)
    async with open_cloud_store(db_url) as store:
        consumer = SessionConsumer(store)
        assert await consumer.handle(*_key_msg(signer)[:2]) == "key"
        # a retained key whose algorithm cryptography does not know (UnsupportedAlgorithm, not
        # a ValueError): it used to escape the consumer on every (re)subscription
        await _publish(mosquitto, [("evgw/depot-9/gateway/key", UNKNOWN_ALG_KEY, True)])
        topics = [TOPIC, "evgw/+/gateway/key"]
        loop = asyncio.create_task(
            _connection_loop(consumer, parse_broker_url(mosquitto.url), topics, "poison", None)
        )
        try:
            await _until(lambda: _count(store, 0, 1), what="the poison key held")
            await _publish(
                mosquitto,
                [(TOPIC, payload, False) for _, payload in poison]
                + [_session_msg(chain[0]), _session_msg(chain[1])],
            )
            await _until(lambda: _count(store, 2, len(poison) + 1), 20, "the genuine records")
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        assert consumer.stats.connects == 1  # never dropped the connection over a message
        key, *held = await store.quarantined()
        assert key.kind == "key" and key.site_id == "depot-9"
        assert key.reason == "key: cannot process: UnsupportedAlgorithm: Unknown key type: 1.2.3.4"
        assert [q.kind for q in held] == [kind for kind, _ in poison]
        assert held[0].seq == str(2**64) and held[0].payload == poison[0][1].decode()
        assert held[0].reason.endswith(f"seq: {2**64} is beyond 64 bits")
        assert "contains a NUL character" in held[5].reason
        assert "not a real date and time" in held[7].reason
        assert [s.seq for s in await store.sessions()] == [1, 2]


async def _connected(consumer: SessionConsumer) -> bool:
    return consumer.stats.connects > 0


async def test_trust_dir_names_the_only_keys(
    mosquitto: MosquittoBroker,
    db_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    gateway = make_signer(tmp_path)
    other_site = make_signer(tmp_path, "depot-8.key")
    attacker = make_signer(tmp_path, "attacker.key")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / f"{SITE}.pem").write_text(gateway.public_pem())
    (trust / "depot-8.pem").write_text(raw_hex_of(other_site) + "\n")  # 64 hex also works
    assert set(load_trust_dir(trust)) == {SITE, "depot-8"}
    chain = make_chain(2, gateway)
    ghost = make_chain(1, attacker, site="ghost-site")[0]
    await _publish(mosquitto, [_key_msg(attacker, "ghost-site")])  # retained
    async with (
        _consumer(mosquitto.url, db_url, client_id="trusting", trust_dir=trust),
        open_cloud_store(db_url) as view,
    ):
        # the retained key, refused, shows the consumer has subscribed
        await _until(lambda: _count(view, 0, 1), what="the ghost site's key refused")
        await _publish(
            mosquitto,
            [
                _key_msg(attacker),  # not in the directory, no rotation statement
                _session_msg(chain[0]),  # no key message needed: the directory has it
                _session_msg(ghost, site="ghost-site"),
                _session_msg(chain[1]),
            ],
        )
        await _until(lambda: _count(view, 2, 3), what="2 stored, 3 held")
        held = {q.kind: q.reason for q in await view.quarantined()}
        assert held["unknown_site"].endswith("site ghost-site is not in the trust directory")
        assert sorted(held) == ["key", "unknown_site"]
        keys = [(k.site_id, k.source, k.status) for k in await view.key_rows()]
        assert keys == [(SITE, "trust_dir", "active"), ("depot-8", "trust_dir", "active")]


def raw_hex_of(signer: Signer) -> str:
    return raw_hex(signer.public_keys()[signer.key_id])


async def test_rotation_signed_by_the_old_key_hands_the_site_over(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`evgw rotate-key` on the gateway, the new key published with its statement: the
    consumer (trusting the old key) trusts the new one; forged and replayed statements fail."""
    cfg = tmp_path / "site.yaml"
    buffer = tmp_path / "buffer.db"
    cfg.write_text(f"site: {{id: {SITE}, timezone: UTC}}\nstorage: {{path: {buffer}}}\n")
    key_path = tmp_path / "evgw-signing.key"
    old = Signer.load_or_create(key_path)  # as the gateway makes it at its first start
    assert "rotation" not in old.public_key_payload()
    db = f"sqlite:///{tmp_path}/cloud.db"
    first = make_chain(3, old)
    await _publish(mosquitto, [_key_msg(old)])
    async with _consumer(mosquitto.url, db, client_id="rot"), open_cloud_store(db) as view:
        await _until(lambda: _has_keys(view, 1), what="the old key")
        await _publish(mosquitto, [_session_msg(first[0])])
        await _until(lambda: _count(view, 1, 0), what="seq 1")

        assert await _cli("rotate-key", "-c", str(cfg)) == 0
        assert f"signing key {old.key_id} replaced by" in capsys.readouterr().out
        new = Signer.load_or_create(key_path)
        assert new.key_id != old.key_id and new.rotation is not None
        assert new.previous_keys == [{"key_id": old.key_id, "public_key_pem": old.public_pem()}]
        # what the gateway publishes after its restart; the records go on with the new key
        second = seal({**record_body(4), "seq": 4, "prev_hash": first[2]["hash"]}, new.sign)
        await _publish(
            mosquitto,
            [
                _key_msg(new),
                _session_msg(second),
                _session_msg(first[1]),  # the backlog, signed by the old key, still trusted
                _session_msg(first[2]),
            ],
        )
        await _until(lambda: _count(view, 4, 0), what="both keys' records")
        keys = {k.key_id: (k.status, k.source) for k in await view.key_rows()}
        assert keys == {old.key_id: ("retired", "first_use"), new.key_id: ("active", "rotation")}

        attacker = make_signer(tmp_path, "attacker.key")
        forged = sign_rotation(SITE, attacker_public(attacker), attacker_private(attacker), 0)
        replayed = dict(new.rotation)  # the genuine statement, with someone else's key
        await _publish(
            mosquitto,
            [_key_msg(attacker, rotation=forged), _key_msg(attacker, rotation=replayed)],
        )
        await _until(lambda: _count(view, 4, 2), what="two refused keys")
        reasons = sorted(q.reason.split(" refused: ")[1] for q in await view.quarantined())
        assert reasons == [
            f"the rotation statement is signed by '{attacker.key_id}', not a trusted key",
            "the rotation statement names another key",
        ]
    # the gateway's own buffer keeps both keys for `evgw verify -c`
    from gateway.billing.verify import buffer_keys

    assert set(buffer_keys(key_path) or {}) == {old.key_id, new.key_id}


def attacker_public(signer: Signer) -> Any:
    return signer.public_keys()[signer.key_id]


def attacker_private(signer: Signer) -> Any:
    return signer._private


async def test_operator_trust_add_list_revoke_quarantine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumer_module, "KEY_RELOAD_S", 0.0)  # see the CLI's changes at once
    signer = make_signer(tmp_path)
    newer = make_signer(tmp_path, "newer.key")
    pem = tmp_path / "depot-7.pem"
    pem.write_text(signer.public_pem())
    chain = make_chain(3, signer)
    db = f"sqlite:///{tmp_path}/cloud.db"
    async with open_cloud_store(db) as store:
        consumer = SessionConsumer(store)
        for rec in chain[:2]:  # the site never published its key: held
            assert await consumer.handle(TOPIC, json.dumps(rec).encode()) == "quarantined"
        capsys.readouterr()
        assert await _cli("trust", "add", "--db", db, "--site", SITE, "--key", str(pem)) == 0
        assert capsys.readouterr().out == (
            f"site {SITE}: key {signer.key_id} trusted; 2 held record(s) released\n"
        )
        assert [s.seq for s in await store.sessions()] == [1, 2]
        assert await _cli("trust", "list", "--db", db) == 0
        listing = capsys.readouterr().out.splitlines()
        assert listing[0].split() == ["site", "key_id", "status", "source", "since", "note"]
        assert listing[1].split()[:4] == [SITE, signer.key_id, "active", "operator"]

        assert await _cli("trust", "revoke", "--db", db, "--site", SITE, signer.key_id) == 0
        assert "(2 stored record(s) signed by it stay stored)" in capsys.readouterr().out
        assert await consumer.handle(TOPIC, json.dumps(chain[2]).encode()) == "quarantined"
        # with every key revoked nobody takes the site over by publishing a key
        key_topic, key_payload, _ = _key_msg(newer)
        assert await consumer.handle(key_topic, key_payload) == "quarantined"
        assert await _held(store) == ["key", "revoked_key"]
        assert await _cli("trust", "quarantine", "--db", db) == 0
        out = capsys.readouterr().out
        assert f"signed with key {signer.key_id}, which is revoked" in out
        assert "every known key is revoked; a new key needs `evgw trust add`" in out
        # the operator has looked into it: closed, kept, never billed; verify passes again
        assert await _cli("verify", "--db", db) == 1
        capsys.readouterr()
        note = ["--note", "key stolen 2026-11-30, see ticket 42"]
        assert await _cli("trust", "dismiss", "--db", db, "--all", *note) == 0
        assert (
            capsys.readouterr().out == "2 quarantined message(s) dismissed (kept, never billed)\n"
        )
        assert await _held(store) == []
        closed = await store.quarantined(released=True)
        assert {q.resolution for q in closed} >= {"dismissed: key stolen 2026-11-30, see ticket 42"}
        assert await _cli("verify", "--db", db) == 0
        assert await _cli("trust", "dismiss", "--db", db, "nope", *note) == 2
        assert capsys.readouterr().err == "evgw trust: not held: nope\n"

    assert await _cli("trust", "revoke", "--db", db, "--site", SITE, "0000") == 2
    assert capsys.readouterr().err == (
        f"evgw trust: site {SITE} has no key 0000 (`evgw trust list`)\n"
    )


async def test_missing_store_exits_2_and_creates_nothing(
    db_url: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A mistyped path used to create an empty database and report success."""
    if db_url.startswith("sqlite"):
        db_url = f"sqlite:///{tmp_path}/no/such/cloud.db"
    for args in (
        ["verify", "--db", db_url],
        ["statement", "--db", db_url, "--user", "alice", "--month", "2026-11"],
        ["trust", "list", "--db", db_url],
    ):
        assert await _cli(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"evgw {args[0]}: ") and "nothing was created" in err
    if db_url.startswith("sqlite"):
        assert await asyncio.to_thread(os.listdir, tmp_path) == []
    else:
        import psycopg

        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            cur = await conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
            assert await cur.fetchall() == []
    # the gateway's reading commands never create a buffer either
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"site: {{id: {SITE}, timezone: UTC}}\nstorage: {{path: {tmp_path}/b/b.db}}\n")
    for args in (
        ["sessions", "-c", str(cfg)],
        ["report", "-c", str(cfg), "--by", "user", "--from", "2026-11-01", "--to", "2026-11-30"],
        ["verify", "-c", str(cfg)],
    ):
        assert await _cli(*args) != 0, args
        assert "no local buffer here" in capsys.readouterr().err
    assert not await asyncio.to_thread((tmp_path / "b").exists)


_OLD_SCHEMA = (
    "CREATE TABLE sessions (session_id TEXT PRIMARY KEY, site_id TEXT NOT NULL, "
    "seq BIGINT NOT NULL, user_id TEXT, charger_id TEXT NOT NULL, started_at TEXT NOT NULL, "
    "ended_at TEXT NOT NULL, started_ts DOUBLE PRECISION NOT NULL, energy_wh BIGINT NOT NULL, "
    "currency TEXT, incl_vat TEXT, hash TEXT NOT NULL, prev_hash TEXT NOT NULL, "
    "signature_ok BOOLEAN, record TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE site_keys (site_id TEXT NOT NULL, key_id TEXT NOT NULL, alg TEXT NOT NULL, "
    "public_key_pem TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL, "
    "PRIMARY KEY (site_id, key_id))",
    "CREATE TABLE rejects (topic TEXT NOT NULL, payload TEXT NOT NULL, reason TEXT NOT NULL, "
    "received_at DOUBLE PRECISION NOT NULL)",
)


async def test_store_of_an_earlier_version_is_upgraded(
    db_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Its rejects and the sessions it stored unverified (signature_ok NULL or false) move to
    the quarantine; keys it learnt stay, as active ``legacy`` keys."""
    signer = make_signer(tmp_path)
    chain = make_chain(3, signer)
    rows = [
        (r["session_id"], SITE, r["seq"], "alice", "cp1", r["started_at"], r["ended_at"], 1.0,
         r["energy_wh"], "EUR", "1.00", r["hash"], r["prev_hash"], ok, json.dumps(r), 2.0)
        for r, ok in zip(chain, (True, None, False), strict=True)
    ]  # fmt: skip
    statements: list[tuple[str, tuple[Any, ...]]] = [(s, ()) for s in _OLD_SCHEMA]
    statements += [("INSERT INTO sessions VALUES (" + ", ".join("?" * 16) + ")", r) for r in rows]
    statements.append(("INSERT INTO rejects VALUES (?, ?, ?, ?)", (TOPIC, "{bad", "not JSON", 3.0)))
    statements.append(
        (
            "INSERT INTO site_keys VALUES (?, ?, ?, ?, ?)",
            (SITE, signer.key_id, "ed25519", signer.public_pem(), 1.0),
        )
    )
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url[len("sqlite:///") :]) as conn:
            for sql, params in statements:
                conn.execute(sql, params)
    else:
        import psycopg

        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as pg:
            for sql, params in statements:
                await pg.execute(sql.replace("?", "%s"), params)
    for _ in range(2):  # idempotent
        async with open_cloud_store(db_url) as store:
            assert [s.seq for s in await store.sessions()] == [1]
            held = {q.kind: q for q in await store.quarantined()}
            assert sorted(held) == ["bad_signature", "legacy", "no_key"]
            assert held["no_key"].seq == "2" and held["no_key"].user_id == "alice"
            assert held["legacy"].payload == "{bad"
            [key] = await store.key_rows()
            assert (key.status, key.source) == ("active", "legacy")
    # the next start re-checks what waited for a key: seq 2 verifies, seq 3 (false) stays
    async with open_cloud_store(db_url) as store:
        await SessionConsumer(store).load_keys()
        assert [s.seq for s in await store.sessions()] == [1, 2]


BEGIN, END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"


def test_a_trust_directory_that_cannot_be_used_is_a_usage_error(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    trust = tmp_path / "trust"
    cases: list[tuple[str, str, str]] = [
        ("", "", "not a directory"),
        ("README", "hello", "no <site id>.pem files in it"),
        ("depot 7.pem", signer.public_pem(), "the file name must be <site id>.pem"),
        ("depot-7.pem", "not a key", "no public key in it"),
        ("depot-7.pem", f"{BEGIN}\nAAAA\n{END}", "not an Ed25519"),
    ]  # fmt: skip
    for name, text, message in cases:
        if name:
            trust.mkdir(exist_ok=True)
            for old in trust.iterdir():
                old.unlink()
            (trust / name).write_text(text)
        with pytest.raises(TrustDirError, match=message) as err:
            load_trust_dir(trust)
        assert err.value.exit_code == 2
    db = tmp_path / "never.db"
    handler = signal.getsignal(signal.SIGTERM)  # `consume` installs its own
    try:
        args = ["consume", "--broker", "mqtt://127.0.0.1:9", "--db", f"sqlite:///{db}"]
        rc = main([*args, "--trust", str(trust)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert rc == 2 and not db.exists()


def test_a_rotation_statement_binds_site_key_and_signer(tmp_path: Path) -> None:
    old, new, other = (make_signer(tmp_path, f"{n}.key") for n in ("old", "new", "other"))
    new_public = new.public_keys()[new.key_id]
    statement = sign_rotation(SITE, new_public, old._private, 1_790_000_000)
    trusted = {old.key_id: old.public_keys()[old.key_id]}
    assert check_rotation(statement, SITE, new_public, trusted) == (old.key_id, "")
    assert check_rotation(statement, "depot-8", new_public, trusted)[1] == (
        "the rotation statement is for site 'depot-7'"
    )
    other_public = other.public_keys()[other.key_id]
    assert check_rotation(statement, SITE, other_public, trusted)[1] == (
        "the rotation statement names another key"
    )
    assert check_rotation(statement, SITE, new_public, {})[1].endswith("not a trusted key")
    later = dict(statement, issued_at="2030-01-01T00:00:00Z")  # changed after signing
    assert check_rotation(later, SITE, new_public, trusted)[1] == (
        f"the rotation statement's signature by {old.key_id} does not verify"
    )
    assert check_rotation(None, SITE, new_public, trusted)[0] is None


async def test_verify_db_fails_on_a_gap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signer = make_signer(tmp_path)
    chain = make_chain(4, signer)
    db = f"sqlite:///{tmp_path}/cloud.db"
    async with open_cloud_store(db) as store:
        consumer = SessionConsumer(store)
        assert await consumer.handle(*_key_msg(signer)[:2]) == "key"
        for rec in (chain[1], chain[3]):  # seq 1 and 3 never arrived
            assert await consumer.handle(TOPIC, json.dumps(rec).encode()) == "stored"
    capsys.readouterr()
    assert await _cli("verify", "--db", db) == 1
    assert capsys.readouterr().out.splitlines() == [
        "missing record(s) before seq 2",
        "missing record(s) between seq 2 and seq 4",
        "2 problem(s) in 2 records",
    ]


@pytest.mark.parametrize("site", ["billing", "cloud", "homeassistant"])
async def test_a_site_named_after_a_broker_account_is_never_trusted_on_first_use(
    db_url: str,  # noqa: F811
    tmp_path: Path,
    site: str,
) -> None:
    """Defence in depth behind the ACL (docs/security.md): a key and records published for a
    "site" called billing are held, never billed, until an operator trusts the key."""
    signer = make_signer(tmp_path)
    async with open_cloud_store(db_url) as store:
        consumer = SessionConsumer(store)
        assert await consumer.handle(*_key_msg(signer, site=site)[:2]) == "quarantined"
        topic = f"evgw/{site}/sessions/finished"
        assert await consumer.handle(topic, json.dumps(_forged(1, signer, site=site)).encode()) == (
            "quarantined"
        )
        assert await store.sessions() == []
        assert await _held(store) == ["key", "no_key"]
        (key,) = [q for q in await store.quarantined() if q.kind == "key"]
        assert "--reserved-site" in key.reason
        # the same name is an ordinary site for a consumer told of other accounts only
        other = SessionConsumer(store, reserved_sites=["ops"])
        assert await other.handle(*_key_msg(signer, site=site)[:2]) == "key"
