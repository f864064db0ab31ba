"""The mosquitto ACL of docs/security.md (config/mosquitto/evgw.acl) on a real mosquitto with a
password file: a site's account publishes only its own site's topics and no command; the cloud's
account sends commands; the real gateway uplink runs under it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs
from test_uplink_mqtt import uplink_config

from gateway.config import Secret
from gateway.records import UnsealedRecord
from gateway.store import Store
from gateway.uplink import pahoport
from gateway.uplink.mqtt import MqttUplink
from tests.support.mqtt_broker import MOSQUITTO, MosquittoBroker
from tests.support.uplink import Target, running, session_record, wait_until

REPO = Path(__file__).resolve().parent.parent
ACL = REPO / "config" / "mosquitto" / "evgw.acl"
PASSWORDS = {
    "cloud": "cloud-pw",
    "billing": "billing-pw",
    "homeassistant": "ha-pw",
    "site-a": "a-pw",
    "site-b": "b-pw",
    "observer": "observer-pw",  # the tests' own reader: see acl_broker
}


def test_the_documented_acl_is_the_tested_one() -> None:
    doc = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    assert ACL.read_text(encoding="utf-8").strip() in doc


# the tests' own account, added to every ACL here: it reads everything, to see what got through
_OBSERVER = "\nuser observer\ntopic read #\n"


async def _broker_with_acl(tmp_path: Path, acl_text: str) -> MosquittoBroker:
    """A started mosquitto with a password file of every account in ``PASSWORDS`` and the ACL
    ``acl_text`` plus ``_OBSERVER``; the ACL file is ``tmp_path / "evgw.acl"``."""
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"{MOSQUITTO} is not installed")
    pw = tmp_path / "evgw.passwd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if i == 0 else []
        done = await asyncio.to_thread(
            subprocess.run,
            ["mosquitto_passwd", *create, "-b", str(pw), user, password],
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    acl = tmp_path / "evgw.acl"
    acl.write_text(acl_text + _OBSERVER)
    broker = MosquittoBroker(
        tmp_path / "mosquitto",
        allow_anonymous=False,
        extra_config=f"password_file {pw}\nacl_file {acl}\n",
    )
    await broker.start()
    return broker


@pytest.fixture
async def acl_broker(tmp_path: Path) -> Any:
    """The shipped ACL."""
    broker = await _broker_with_acl(tmp_path, ACL.read_text(encoding="utf-8"))
    try:
        yield broker
    finally:
        broker.kill()


class Client:
    """One account's connection, recording what it receives."""

    def __init__(self, port: int, user: str) -> None:
        self.port = port
        self.user = user
        self.received: list[tuple[str, bytes]] = []
        self.client: aiomqtt.Client | None = None
        self.ready = asyncio.Event()
        self.error: Exception | None = None

    async def run(self, *filters: str) -> None:
        async with pahoport.Client(
            "127.0.0.1",
            self.port,
            username=self.user,
            password=PASSWORDS[self.user],
            identifier=f"acl-{self.user}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            for f in filters:
                await client.subscribe(f, qos=1)
            self.client = client
            self.ready.set()
            try:
                async for m in client.messages:
                    self.received.append((m.topic.value, bytes(m.payload)))  # type: ignore[arg-type]
            except aiomqtt.MqttError as exc:  # dropped or torn down: tests check what arrived
                self.error = exc

    async def publish(self, topic: str, payload: bytes) -> None:
        assert self.client is not None
        # MQTT 5: mosquitto acknowledges a denied publish with reason 0x87 and drops it
        await self.client.publish(topic, payload, qos=1)

    async def publish_once(self, topic: str, payload: bytes) -> None:
        """Publish on a connection of its own: here the client's connection ended after a
        publish the broker refused (PUBACK reason 0x87); the next publish must not depend on it."""
        with contextlib.suppress(aiomqtt.MqttError):
            async with pahoport.Client(
                "127.0.0.1",
                self.port,
                username=self.user,
                password=PASSWORDS[self.user],
                identifier=f"acl-{self.user}-once",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as client:
                await client.publish(topic, payload, qos=1, timeout=5)

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p in self.received if t == topic]


@pytest.mark.e2e
async def test_site_accounts_cannot_command_the_cloud_account_can(
    acl_broker: MosquittoBroker, tmp_path: Path
) -> None:
    cloud = Client(acl_broker.port, "cloud")
    billing = Client(acl_broker.port, "billing")
    site_b = Client(acl_broker.port, "site-b")
    stolen_a = Client(acl_broker.port, "site-a")  # site-a's credentials in other hands
    target = Target()
    cfg = uplink_config(
        acl_broker.url, client_id="evgw-site-a", username="site-a", password=Secret("a-pw")
    )

    def start(rid: str) -> bytes:
        return json.dumps({"request_id": rid, "charger_id": "cp1", "user": "carol"}).encode()

    async with Store.open(tmp_path / "b.db", site_id="site-a", reserve_bytes=0) as store:
        uplink = MqttUplink(
            cfg, "site-a", store, target, backoff_min_s=0.1, backoff_max_s=1.0, safety_poll_s=0.5
        )
        async with contextlib.AsyncExitStack() as stack:
            # everyone subscribes to everything: the broker delivers only what each may read
            for c in (cloud, billing, site_b, stolen_a):
                await stack.enter_async_context(running(c.run("evgw/#")))
            for c in (cloud, billing, site_b, stolen_a):
                await asyncio.wait_for(c.ready.wait(), 10)
            await stack.enter_async_context(running(uplink.run()))
            await wait_until(lambda: uplink.online, 10, "gateway online with site-a's account")
            await asyncio.sleep(0.3)
            # refused by the broker: commands from site accounts, records from the wrong ones
            await site_b.publish_once("evgw/site-a/commands/start", start("from-site-b"))
            await stolen_a.publish_once("evgw/site-a/commands/start", start("from-site-a"))
            await stolen_a.publish_once("evgw/site-a/auth/response", b'{"request_id": "q"}')
            await site_b.publish_once("evgw/site-a/sessions/finished", b'{"forged": 1}')
            await cloud.publish_once("evgw/site-a/sessions/finished", b'{"forged": 2}')
            await site_b.publish_once("evgw/site-b/sessions/finished", b'{"own": 1}')
            # the cloud's command goes through, and its reply comes back to the cloud
            await cloud.publish("evgw/site-a/commands/start", start("from-cloud"))
            await wait_until(
                lambda: cloud.on("evgw/site-a/commands/start/reply"), 10, "reply to the cloud"
            )
            await wait_until(lambda: billing.on("evgw/site-b/sessions/finished"), 10, "own record")
            # the gateway publishes its own topics under its account: an auth request
            await uplink.send_auth_request("q1", "04AA", "rfid", "cp1")
            await wait_until(lambda: cloud.on("evgw/site-a/auth/request"), 10, "auth request")
            await asyncio.sleep(0.5)  # anything let through would have arrived by now
    assert target.calls == [("start", ("cp1", "carol", None))]
    replies = [json.loads(p) for p in cloud.on("evgw/site-a/commands/start/reply")]
    assert [(r["request_id"], r["ok"]) for r in replies] == [("from-cloud", True)]
    # nobody saw a forged record; billing reads records but not commands
    assert billing.on("evgw/site-a/sessions/finished") == []
    assert cloud.on("evgw/site-a/sessions/finished") == []
    assert not [t for t, _ in billing.received if "/commands/" in t]
    # a site reads nothing of another site; site-a's account reads only its commands
    assert not [t for t, _ in site_b.received if t.startswith("evgw/site-a/")]
    assert {t for t, _ in stolen_a.received} == {"evgw/site-a/commands/start"}
    assert [json.loads(p)["request_id"] for p in stolen_a.on("evgw/site-a/commands/start")] == [
        "from-cloud"
    ]
    # billing read its own topics only: site-b's record, no command, no reply, no status
    assert {t for t, _ in billing.received} == {"evgw/site-b/sessions/finished"}
    assert {t for t, _ in cloud.received} == {
        "evgw/site-a/commands/start/reply",
        "evgw/site-a/auth/request",
    }
    assert [c.error for c in (cloud, billing, site_b, stolen_a)] == [None] * 4


@pytest.mark.e2e
async def test_a_site_publishes_its_grid_limit_and_home_assistant_topics_only(
    acl_broker: MosquittoBroker,
) -> None:
    """The retained topics of issue 15 (grid/limit, Home Assistant discovery and states) pass
    the ACL for the site's own account, and not for another site's; Home Assistant's account
    reads them, the cloud's reads the limit in force."""
    cloud = Client(acl_broker.port, "homeassistant")
    operator = Client(acl_broker.port, "cloud")
    site_a = Client(acl_broker.port, "site-a")
    async with running(cloud.run("#")), running(operator.run("#")):
        await asyncio.wait_for(cloud.ready.wait(), 10)
        await asyncio.wait_for(operator.ready.wait(), 10)
        async with running(site_a.run()):
            await asyncio.wait_for(site_a.ready.wait(), 10)
            for topic in (
                "evgw/site-a/grid/limit",
                "evgw/site-a/ha/cp1/state",
                "homeassistant/sensor/site-a/cp1_status/config",
            ):
                await site_a.publish(topic, b"{}")
        for topic in (
            "evgw/site-b/grid/limit",
            "homeassistant/sensor/site-b/cp1_status/config",
            "homeassistant/sensor/site-a/cp1_status/other",
        ):
            await site_a.publish_once(topic, b"{}")
        await wait_until(lambda: len(cloud.received) >= 3, 5, "the allowed three")
        await asyncio.sleep(0.5)
    assert sorted(t for t, _ in cloud.received) == [
        "evgw/site-a/grid/limit",
        "evgw/site-a/ha/cp1/state",
        "homeassistant/sensor/site-a/cp1_status/config",
    ]
    assert [t for t, _ in operator.received] == ["evgw/site-a/grid/limit"]


@pytest.mark.e2e
@pytest.mark.parametrize("account", ["billing", "cloud", "homeassistant"])
async def test_service_accounts_cannot_publish_as_a_site_named_after_them(
    acl_broker: MosquittoBroker, account: str
) -> None:
    """mosquitto applies ``pattern`` lines to every user: without its deny lines the billing
    account could publish a gateway key and finished sessions for a "site" called billing, which
    a trust-on-first-use consumer would bill. The account's deny lines come first."""
    observer = Client(acl_broker.port, "observer")
    attacker = Client(acl_broker.port, account)
    site_a = Client(acl_broker.port, "site-a")
    async with running(observer.run("#")):
        await asyncio.wait_for(observer.ready.wait(), 10)
        for topic in (
            f"evgw/{account}/gateway/key",
            f"evgw/{account}/sessions/finished",
            f"evgw/{account}/gateway/status",
            f"evgw/{account}/auth/request",
            f"homeassistant/sensor/{account}/x_status/config",
        ):
            await attacker.publish_once(topic, b'{"forged": 1}')
        async with running(site_a.run()):  # the control: a site's own record goes through
            await asyncio.wait_for(site_a.ready.wait(), 10)
            await site_a.publish("evgw/site-a/sessions/finished", b'{"own": 1}')
            await wait_until(lambda: observer.received, 5, "site-a's record")
        await asyncio.sleep(0.5)  # anything let through would have arrived by now
    assert [t for t, _ in observer.received] == ["evgw/site-a/sessions/finished"]


# A cloud broker whose ACL lets site-a publish its status but, by mistake, not its records.
FINISHED = "evgw/site-a/sessions/finished"
_ACL_WITHOUT_RECORDS = """user site-a
topic deny evgw/site-a/sessions/#
topic readwrite evgw/site-a/#
"""


@pytest.mark.e2e
async def test_a_finished_session_the_broker_refuses_stays_buffered_until_it_is_taken(
    tmp_path: Path,
) -> None:
    """An MQTT 5 broker answers a publish it will not take with a PUBACK all the same: here
    reason 0x87 (not authorized) from a cloud broker whose ACL leaves out the site's records,
    after which mosquitto also drops the connection. That PUBACK is not a delivery: the
    finished session stays in the outbox, the uplink logs the refusal and tries again with
    backoff, and once the ACL is fixed the same record goes out. Before, the refusal's PUBACK
    deleted it from the outbox: a session billed nowhere."""
    broker = await _broker_with_acl(tmp_path, _ACL_WITHOUT_RECORDS)
    cfg = uplink_config(
        broker.url,
        client_id="evgw-site-a",
        username="site-a",
        password=Secret(PASSWORDS["site-a"]),
    )
    try:
        async with Store.open(tmp_path / "b.db", site_id="site-a", reserve_bytes=0) as store:
            uplink = MqttUplink(
                cfg, "site-a", store, Target(), backoff_min_s=0.1, backoff_max_s=0.5
            )
            record = await store.finish_session(
                UnsealedRecord.from_dict({**session_record(1), "site_id": "site-a"})
            )
            with capture_logs() as logs:
                async with running(uplink.run()):
                    await wait_until(
                        lambda: uplink.stats.refused >= 2 and uplink.stats.connects >= 2,
                        10,
                        "the session refused on two connections",
                    )
            assert (await store.outbox_backlog()).get("session") == 1
            assert uplink.stats.acked_rows == 0 and "session" not in uplink.stats.published
            refused = [e for e in logs if e["event"] == "uplink_publish_refused"]
            assert refused[0]["log_level"] == "error"
            assert (refused[0]["stream"], refused[0]["code"], refused[0]["rows"]) == (
                "session",
                0x87,
                1,
            )

            fixed = _ACL_WITHOUT_RECORDS.replace("topic deny evgw/site-a/sessions/#\n", "")
            (tmp_path / "evgw.acl").write_text(fixed + _OBSERVER)
            await broker.restart()
            observer = Client(broker.port, "observer")
            async with running(observer.run(FINISHED)):
                await asyncio.wait_for(observer.ready.wait(), 10)
                async with running(uplink.run()):
                    await wait_until(
                        lambda: observer.received, 10, "the session, once the ACL allows it"
                    )
                    await wait_until(lambda: uplink.stats.acked_rows == 1, 5, "its PUBACK marked")
            assert (await store.outbox_backlog()).get("session", 0) == 0
            assert [json.loads(p)["session_id"] for p in observer.on(FINISHED)] == [
                record.session_id
            ]
    finally:
        broker.kill()


@pytest.mark.e2e
async def test_a_refused_status_is_logged_as_a_warning_not_an_error(tmp_path: Path) -> None:
    """A latest value the broker refuses (a status, when its ACL leaves out the chargers'
    topics) carries no rows: it is counted and logged as a warning, never as the error a
    refused record is (mosquitto drops the connection after each refusal; the uplink
    reconnects and the status is refused again)."""
    broker = await _broker_with_acl(
        tmp_path,
        "user site-a\ntopic deny evgw/site-a/chargers/#\ntopic readwrite evgw/site-a/#\n",
    )
    cfg = uplink_config(
        broker.url, client_id="evgw-site-a", username="site-a", password=Secret(PASSWORDS["site-a"])
    )
    try:
        async with Store.open(tmp_path / "b.db", site_id="site-a", reserve_bytes=0) as store:
            uplink = MqttUplink(
                cfg, "site-a", store, Target(), backoff_min_s=0.1, backoff_max_s=0.5
            )
            uplink.publish_status(
                "cp1", {"status": "available", "online": True, "session_id": None, "power_w": 0}
            )
            with capture_logs() as logs:
                async with running(uplink.run()):
                    await wait_until(lambda: uplink.stats.refused >= 2, 10, "two refusals")
            refused = [e for e in logs if e["event"] == "uplink_publish_refused"]
            assert {(e["log_level"], e["stream"], e["code"]) for e in refused} == {
                ("warning", "charger_status", 0x87)
            }
            assert "rows" not in refused[0]
    finally:
        broker.kill()
