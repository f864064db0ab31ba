"""Billing end to end: simulated site -> gateway -> mosquitto -> ``evgw consume`` ->
``evgw statement``; then ``evgw verify`` on the delivered records, and on tampered, deleted and
reordered copies of them."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from test_e2e import SPEED, _count, _full, write_site

from gateway.app import Gateway
from gateway.billing.verify import run_verify
from gateway.cloud.cloudstore import open_cloud_store
from gateway.cloud.statement import run_statement
from gateway.cloud.subscriber import run_consumer
from gateway.config import load_config
from gateway.profiles import Profile
from gateway.sim.site import SimSite
from tests.support.mqtt_broker import MosquittoBroker
from tests.support.uplink import PREFIX, running, wait_until


@pytest.mark.slow
async def test_site_to_statement_and_verify(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    shipped_profiles: dict[str, Profile],
    capsys: Any,
) -> None:
    config = load_config(write_site(tmp_path, mosquitto.port))
    db_url = f"sqlite:///{tmp_path / 'cloud.db'}"
    async with (
        running(
            run_consumer(mosquitto.url, db_url, topic_prefix=PREFIX, client_id="billing-1"),
            "consumer",
        ),
        SimSite(config, shipped_profiles, speed=SPEED, traffic=False) as site,
        Gateway(config, shipped_profiles, time_scale=SPEED) as gw,
        running(gw.run(), "gateway"),
    ):
        await wait_until(lambda: gw.uplink.online, 10, "gateway uplink")
        await asyncio.sleep(1.0)
        cp1, cp2 = site.charger("cp1"), site.charger("cp2")
        # Each car charges until it is full, its counters then stand still for a minute (the
        # gateway reads the final energy) before it leaves. The energies are small: the point is
        # the statement's arithmetic, not the size of a session.
        for need_wh in (600, 900):  # alice twice on cp1, bob once on cp2
            cp1.plug_in(tag="04A2B3C4D5E6F7", power_w=11_000, energy_need_wh=need_wh)
            if need_wh == 600:
                cp2.plug_in(tag="FOB-0042", power_w=7_400, energy_need_wh=1_200)
            await site.sleep(10)
            cp1.start_charging()
            cp2.start_charging()
            await wait_until(lambda: _full(cp1), 30, "alice's car full")
            await site.sleep(60)
            cp1.unplug()
            await site.sleep(60)
        await wait_until(lambda: _full(cp2), 30, "bob's car full")
        await site.sleep(60)
        cp2.unplug()
        await wait_until(lambda: _count(gw.store.finished_sessions(), 3), 15, "3 sessions")
        gateway_records = await gw.store.finished_sessions()

        async def consumed() -> bool:
            async with open_cloud_store(db_url) as cloud:
                return len(await cloud.sessions(config.site.id)) >= 3

        await wait_until(consumed, 20, "the consumer stored every session")

    # The statement's totals are the sum of the sessions' own costs.
    month = datetime.now(UTC).strftime("%Y-%m")
    out = tmp_path / "alice.json"
    assert await run_statement(db_url, "alice", month, "json", output=out) == 0
    statement = json.loads(out.read_text())
    alice = [r for r in gateway_records if r["user"]["id"] == "alice"]
    assert len(alice) == 2 and len(statement["sessions"]) == 2
    total = sum(Decimal(r["cost"]["incl_vat"]) for r in alice)
    assert Decimal(statement["totals"]["EUR"]["incl_vat"]) == total > 0
    html = tmp_path / "alice.html"
    assert await run_statement(db_url, "alice", month, "html", output=html) == 0
    assert "alice" in html.read_text()

    # verify: the consumer's store, then the records as a file, intact and damaged
    key = tmp_path / "evgw-signing.key"
    assert await run_verify(db_url=db_url) == 0
    records = sorted(gateway_records, key=lambda r: r["seq"])
    intact = tmp_path / "records.jsonl"
    intact.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert await run_verify(file=intact, key=key) == 0
    capsys.readouterr()

    tampered = [dict(r) for r in records]
    tampered[1]["energy_wh"] += 1000
    deleted = records[:1] + records[2:]
    reordered = [records[0], records[2], records[1]]
    for name, damaged, expect in (
        ("tampered", tampered, "hash does not match"),
        ("deleted", deleted, "missing record"),
        ("reordered", reordered, "order"),
    ):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in damaged))
        assert await run_verify(file=path, key=key) == 1, name
        assert expect in capsys.readouterr().out, name
