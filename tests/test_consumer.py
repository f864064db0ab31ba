"""evgw consume end to end: a real mosquitto on a free port, records published with QoS 1, the
consumer storing into SQLite (always) and PostgreSQL (when 127.0.0.1:5432 answers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.billing.verify import run_verify
from gateway.cloud.cloudstore import CloudStore, CloudStoreError, open_cloud_store
from gateway.cloud.consumer import SessionConsumer
from gateway.cloud.subscriber import (
    _connection_loop,
    parse_broker_url,
    run_consumer,
    subscriptions,
)
from gateway.records import seal
from gateway.uplink import pahoport
from tests.support.consumer import make_chain, make_signer, tampered
from tests.support.mqtt_broker import FaultProxy, MosquittoBroker

SITE = "depot-7"
PG_BASE = "postgresql://{user}@127.0.0.1:5432/test"


async def _postgres_user() -> str | None:
    try:
        import psycopg
    except ImportError:
        return None
    for user in ("root", "postgres"):
        try:
            conn = await psycopg.AsyncConnection.connect(
                PG_BASE.format(user=user), connect_timeout=2
            )
        except psycopg.Error:
            continue
        await conn.close()
        return user
    return None


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/consumer.db"
        return
    user = await _postgres_user()
    if user is None:
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
    import psycopg

    schema = f"evgw_test_{uuid.uuid4().hex[:12]}"
    base = PG_BASE.format(user=user)
    async with await psycopg.AsyncConnection.connect(base, autocommit=True) as conn:
        await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        async with await psycopg.AsyncConnection.connect(base, autocommit=True) as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def _publish(broker: MosquittoBroker, items: list[tuple[str, bytes, bool]]) -> None:
    async with pahoport.Client(broker.host, broker.port, identifier=f"pub-{uuid.uuid4().hex}") as c:
        for topic, payload, retain in items:
            await c.publish(topic, payload, qos=1, retain=retain)


def _session_msg(record: dict[str, Any], site: str = SITE) -> tuple[str, bytes, bool]:
    return (f"evgw/{site}/sessions/finished", json.dumps(record).encode(), False)


async def _until(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, what: str = ""
) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - the state lives in another process's DB
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _consumer(broker_url: str, db_url: str, **kw: Any) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(run_consumer(broker_url, db_url, **kw), name="consumer")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_consumer_end_to_end(
    mosquitto: MosquittoBroker,
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    signer = make_signer(tmp_path)
    chain = make_chain(6, signer)
    key_msg = (
        f"evgw/{SITE}/gateway/key",
        json.dumps(signer.public_key_payload()).encode(),
        True,
    )
    # the same session id, other content, validly hashed and signed: must not replace seq 1
    conflicting = seal(tampered(chain[0], energy_wh=1), signer.sign)
    changed = tampered(chain[2], energy_wh=99_999)  # hash left as it was

    async with open_cloud_store(db_url) as view:

        async def count(n_sessions: int, n_held: int) -> bool:
            return (
                len(await view.sessions()) == n_sessions and len(await view.quarantined()) == n_held
            )

        with capture_logs() as logs:
            await _publish(mosquitto, [key_msg])
            async with _consumer(mosquitto.url, db_url, client_id="consumer-e2e"):
                await _until(lambda: _has_key(view), what="site key")
                await _publish(
                    mosquitto,
                    [
                        _session_msg(chain[0]),
                        _session_msg(chain[1]),
                        _session_msg(chain[1]),  # at-least-once: a duplicate
                        _session_msg(changed),  # tampered
                        _session_msg(chain[2]),
                        _session_msg(chain[5]),  # seq 6: 4..5 missing
                        (f"evgw/{SITE}/sessions/finished", b"{not json", False),
                        _session_msg(chain[3]),  # seq 4 arrives late
                        _session_msg(conflicting),
                        _session_msg(chain[0], site="elsewhere"),  # site_id not the topic's
                    ],
                )
                await _until(lambda: count(5, 4), what="5 sessions, 4 quarantined")
            # consumer offline; the broker queues for its persistent session
            await _publish(mosquitto, [_session_msg(chain[4])])
            async with _consumer(mosquitto.url, db_url, client_id="consumer-e2e"):
                await _until(lambda: count(6, 4), what="the queued seq 5")

        stored = await view.sessions(SITE)
        assert [s.seq for s in stored] == [1, 2, 3, 4, 5, 6]
        assert [s.record for s in stored] == chain  # each once, exactly as published
        assert all(s.signature_ok for s in stored)
        assert await view.missing_seqs(SITE) == []
        held = await view.quarantined()
        assert sorted(q.kind for q in held) == ["conflict", "hash", "schema", "site_mismatch"]
        reasons = sorted(q.reason for q in held)
        s1, s3 = chain[0]["session_id"], chain[2]["session_id"]
        assert reasons[0].startswith("not JSON")
        assert reasons[1] == f"seq 1 (session {s1}): session delivered again with different content"
        assert reasons[2] == f"seq 1 (session {s1}): site_id 'depot-7' is not the topic's site"
        assert reasons[3] == f"seq 3 (session {s3}): hash does not match its content"
        problems = await view.problems(SITE)
        assert sorted(p.kind for p in problems) == ["conflict", "gap"]
        assert [p.detail for p in problems if p.kind == "gap"] == [f"site {SITE}: missing seq 4..5"]

    events = [e["event"] for e in logs]
    gap = next(e for e in logs if e["event"] == "session_gap")
    assert gap["missing"] == "4..5"
    late = next(e for e in logs if e["event"] == "session_out_of_order")
    assert (late["seq"], late["after_seq"]) == (4, 6)
    # (info events such as session_stored depend on the level another test configured)
    assert events.count("record_quarantined") == 4
    assert events.count("session_conflicting_duplicate") == 1

    # the chain verifies, with the key the consumer learnt; what is quarantined fails it
    capsys.readouterr()
    assert await run_verify(db_url=db_url) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 record(s) quarantined, never billed:"
    assert (
        f"  quarantined (conflict): site {SITE}: seq 1 (session {s1}): session delivered "
        "again with different content" in out
    )
    assert out[-1] == (
        "6 records OK, chain intact, signatures valid; but the store has problems (above)"
    )


async def _has_key(view: CloudStore) -> bool:
    return bool(await view.site_keys())


async def test_key_arriving_after_sessions_releases_them(tmp_path: Path) -> None:
    """Records that arrive before their site's key are held, never stored unchecked; the key
    (trusted on first use) releases those it signed, the forged one stays held."""
    signer = make_signer(tmp_path)
    other = make_signer(tmp_path, "other.key")
    chain = make_chain(3, signer)
    forged = dict(chain[2], signature=other.sign(chain[2]["hash"].encode()))
    forged["signature"]["key_id"] = signer.key_id
    async with open_cloud_store(f"sqlite:///{tmp_path}/c.db") as store:
        consumer = SessionConsumer(store)
        for rec in (chain[0], chain[1], forged):
            outcome = await consumer.handle(
                f"evgw/{SITE}/sessions/finished", json.dumps(rec).encode()
            )
            assert outcome == "quarantined"  # no key yet: held, not billed
        assert await store.sessions() == []
        assert [q.kind for q in await store.quarantined()] == ["no_key"] * 3
        key = json.dumps(signer.public_key_payload()).encode()
        assert await consumer.handle(f"evgw/{SITE}/gateway/key", key) == "key"
        assert [s.seq for s in await store.sessions()] == [1, 2]
        [held] = await store.quarantined()
        assert held.kind == "bad_signature" and held.seq == "3"
        assert held.reason == (
            f"seq 3 (session {chain[2]['session_id']}): signature by key {signer.key_id} "
            "does not verify"
        )
        # the genuine seq 3 is stored next to it
        topic = f"evgw/{SITE}/sessions/finished"
        assert await consumer.handle(topic, json.dumps(chain[2]).encode()) == "stored"
        # a key message whose key_id lies is quarantined
        lying = dict(other.public_key_payload(), key_id=signer.key_id)
        outcome = await consumer.handle(f"evgw/{SITE}/gateway/key", json.dumps(lying).encode())
        assert outcome == "quarantined"


async def test_chain_break_and_seq_reuse_are_problems(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    chain = make_chain(3, signer)
    restarted = make_chain(2, signer)  # a reinstalled gateway starting over at seq 1
    async with open_cloud_store(f"sqlite:///{tmp_path}/c.db") as store:
        consumer = SessionConsumer(store)
        key = json.dumps(signer.public_key_payload()).encode()
        assert await consumer.handle(f"evgw/{SITE}/gateway/key", key) == "key"
        topic = f"evgw/{SITE}/sessions/finished"
        for rec in [chain[0], chain[2], restarted[0], restarted[1]]:
            assert await consumer.handle(topic, json.dumps(rec).encode()) == "stored"
        r0, r1, c2 = (r["session_id"] for r in (restarted[0], restarted[1], chain[2]))
        problems = [(p.kind, p.detail) for p in await store.problems()]
        assert problems == [
            ("gap", f"site {SITE}: missing seq 2"),
            (
                "seq_conflict",
                f"site {SITE}: seq 1 (session {r0}): seq already used by session "
                f"{chain[0]['session_id']}",
            ),
            (
                "chain_break",
                f"site {SITE}: seq 2 (session {r1}): prev_hash does not match the hash of seq 1",
            ),
            (
                "chain_break",
                f"site {SITE}: seq 3 (session {c2}): prev_hash does not match the hash of seq 2",
            ),
        ]


async def test_v311_fallback_and_shared_group(
    mosquitto: MosquittoBroker,
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    fault_proxy.v311_only = True
    signer = make_signer(tmp_path)
    chain = make_chain(2, signer)
    async with open_cloud_store(f"sqlite:///{tmp_path}/c.db") as store:
        consumer = SessionConsumer(store)
        key = json.dumps(signer.public_key_payload()).encode()
        assert await consumer.handle(f"evgw/{SITE}/gateway/key", key) == "key"
        topics = subscriptions("evgw", [SITE], "billing")
        assert topics == [
            f"$share/billing/evgw/{SITE}/sessions/finished",
            f"evgw/{SITE}/gateway/key",
        ]
        task = asyncio.create_task(
            _connection_loop(consumer, parse_broker_url(fault_proxy.url), topics, "c311", None)
        )
        try:
            await _until(lambda: _connected(consumer))
            await _publish(mosquitto, [_session_msg(r) for r in chain])
            await _until(lambda: _stored(store, 2))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert consumer.stats.protocol == "3.1.1"


async def _connected(consumer: SessionConsumer) -> bool:
    return consumer.stats.connects > 0


async def _stored(store: CloudStore, n: int) -> bool:
    return len(await store.sessions()) == n


async def test_duration_stops_cleanly_and_bad_urls(tmp_path: Path) -> None:
    # nothing listens there: the reconnect loop backs off until the duration ends
    rc = await asyncio.wait_for(
        run_consumer("mqtt://127.0.0.1:9", f"sqlite:///{tmp_path}/c.db", duration_s=0.3), 5
    )
    assert rc == 0
    with pytest.raises(CloudStoreError, match="unsupported store URL") as bad:
        await run_consumer("mqtt://127.0.0.1:9", "mysql://x/y", duration_s=0.1)
    assert bad.value.exit_code == 2  # a usage error
    assert parse_broker_url("mqtts://u:p%40ss@h").port == 8883
    assert parse_broker_url("mqtts://u:p%40ss@h").password == "p@ss"


async def test_stores_open_concurrently(db_url: str) -> None:
    """Consumers starting together (a shared-subscription group) set up the tables once;
    PostgreSQL's CREATE TABLE IF NOT EXISTS alone races (unique violation in pg_type)."""

    async def open_one() -> list[str]:
        async with open_cloud_store(db_url) as store:
            return await store.site_ids()

    assert await asyncio.gather(*(open_one() for _ in range(4))) == [[]] * 4
