"""OCPP 1.6J chargers end to end: the simulated charge point (``gateway.ocpp.sim``, the ``ocpp``
package's client) talks over a real websocket to the gateway's OCPP server; sessions go through
the same authorizer, session tracker, tariffs and SQLite buffer to a real mosquitto.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
import websockets
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.app import Gateway
from gateway.config import check_config, load_config
from gateway.ocpp.mapping import parse_meter_values, parse_timestamp, timestamp
from gateway.ocpp.sim import SimChargePoint
from gateway.profiles import Profile
from tests.support.mqtt_broker import MosquittoBroker, Pki, free_port
from tests.support.uplink import PREFIX, SITE, Recorder, running, wait_until

ALICE = "04A2B3C4D5E6F7"
PASSWORD = "s3cret-Passw0rd-CP9"
# Shaped like OCMF (Open Charge Metering Format): header|payload|signature; kept unchanged.
OCMF_START = 'OCMF|{"FV":"1.0","GI":"SIM","RD":[{"TM":"2026-12-02T10:00:00,000+0000 S","TX":"B","RV":1203.345,"RI":"1-b:1.8.0","RU":"kWh"}]}|{"SD":"3045"}'  # noqa: E501
OCMF_STOP = 'OCMF|{"FV":"1.0","GI":"SIM","RD":[{"TM":"2026-12-02T10:25:00,000+0000 S","TX":"E","RV":1207.928,"RI":"1-b:1.8.0","RU":"kWh"}]}|{"SD":"3046"}'  # noqa: E501

SITE_YAML = """
site: {{id: {site}, timezone: Europe/Berlin}}
storage: {{path: ./buffer.db}}
{uplink}
ocpp: {{listen: "127.0.0.1:{port}", security_profile: {profile}{extra}}}
devices:
  - {{id: cp9, driver: ocpp, charge_point_id: CP9, tariff: standard{device_extra}}}
auth:
  tokens:
    - {{id: "{alice}", type: rfid, user: alice}}
    - {{id: "FOB-0042", type: keyfob, user: bob, status: blocked}}
tariffs:
  standard:
    currency: EUR
    vat_percent: 19
    elements: [{{components: [{{type: energy, price: "0.30"}}]}}]
{grid}
"""


def write_site(
    tmp_path: Path,
    *,
    broker: int | None = None,
    profile: int = 0,
    extra: str = "",
    grid: str = "",
    device_extra: str = "",
) -> tuple[Path, int]:
    port = free_port()
    uplink = (
        f'uplink: {{url: "mqtt://127.0.0.1:{broker}", client_id: evgw-ocpp, '
        f"topic_prefix: {PREFIX}, keepalive: 5s}}"
        if broker is not None
        else ""
    )
    path = tmp_path / "site.yaml"
    path.write_text(
        SITE_YAML.format(
            site=SITE,
            uplink=uplink,
            port=port,
            profile=profile,
            extra=extra,
            alice=ALICE,
            grid=grid,
            device_extra=device_extra,
        )
    )
    return path, port


def expected_cost(energy_wh: int) -> str:
    kwh = (Decimal(energy_wh) / 1000).quantize(Decimal("0.001"), ROUND_HALF_UP)
    excl = (kwh * Decimal("0.30")).quantize(Decimal("0.01"), ROUND_HALF_UP)
    vat = (excl * Decimal("0.19")).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return str(excl + vat)


async def listening(gw: Gateway) -> None:
    await wait_until(lambda: gw.ocpp is not None and gw.ocpp.listening, 10, "OCPP server")


async def finished(gw: Gateway, n: int, timeout_s: float = 10) -> list[dict[str, Any]]:
    async def count() -> bool:
        return len(await gw.store.finished_sessions()) >= n

    await wait_until(count, timeout_s, f"{n} finished session(s)")
    return list(await gw.store.finished_sessions())


# --------------------------------------------------------------------------- end to end
async def test_rfid_session_identified_exact_priced_and_delivered(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path, broker=mosquitto.port)
    config = load_config(path)
    recorder = Recorder(mosquitto.port)
    async with (
        running(recorder.run(), "recorder"),
        Gateway(config, shipped_profiles) as gw,
        running(gw.run(), "gateway"),
    ):
        await listening(gw)
        await wait_until(recorder.connected.is_set, 5, "cloud subscriber")
        await wait_until(lambda: gw.uplink.online, 10, "gateway uplink")
        sim = SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", meter_wh=1_203_345)
        async with sim:
            await sim.plug_in()
            assert await sim.start(ALICE) == "Accepted"
            start_wh = 1_203_345
            for _ in range(5):
                await sim.charge(300, 11_000)  # five minutes of charging per MeterValues
            await wait_until(
                lambda: any(
                    m.json()["status"] == "charging" and m.json()["session_id"]
                    for m in recorder.on("chargers/cp9/status")
                ),
                10,
                "charging status with the session id",
            )
            assert await sim.authorize("FOB-0042") == "Blocked"
            assert await sim.authorize("NOBODY") == "Invalid"  # offline policy allow_known
            await sim.meter_values(11_000, signed=OCMF_START)
            await sim.stop("EVDisconnected", signed=OCMF_STOP)
            await sim.unplug()
            (record,) = await finished(gw, 1)
            await wait_until(lambda: recorder.sessions(), 10, "the session at the subscriber")
            await wait_until(
                lambda: recorder.on("chargers/cp9/status")[-1].json()["status"] == "available",
                10,
                "available again",
            )
        await wait_until(
            lambda: recorder.on("chargers/cp9/status")[-1].json()["online"] is False,
            10,
            "offline status after the charger left",
        )
    energy = int(sim.meter_wh) - start_wh
    (delivered,) = recorder.sessions()
    assert delivered == record
    assert recorder.problems == []
    assert uuid.UUID(record["session_id"]).version == 7
    assert record["user"] == {"id": "alice", "token": ALICE, "token_type": "rfid", "auth": "local"}
    assert record["meter_start_wh"] == start_wh
    assert record["meter_stop_wh"] == int(sim.meter_wh)
    assert record["energy_wh"] == energy == 4583
    assert record["cost"]["incl_vat"] == expected_cost(energy)
    assert record["stop_reason"] == "ev_disconnected"
    assert record["flags"] == []
    assert record["ocpp"]["charge_point_id"] == "CP9"
    assert record["ocpp"]["signed_meter_values"] == {"start": OCMF_START, "stop": OCMF_STOP}
    (start_conf,) = [r for action, r in sim.answers if action == "StartTransaction"]
    assert record["ocpp"]["transaction_id"] == start_conf.transaction_id
    started = [m.json() for m in recorder.on("sessions/started")]
    assert [s["session_id"] for s in started] == [record["session_id"]]


@pytest.mark.slow
async def test_offline_stop_replayed_on_reconnect_is_one_exact_session(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path)
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        sim = SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", meter_wh=50_000)
        async with sim:
            await sim.plug_in()
            await sim.start(ALICE)
            await sim.charge(600, 7_400)
            await sim.disconnect()
            await wait_until(
                lambda: gw.live.devices["cp9"].online is False, 5, "the gateway sees it offline"
            )
            # Offline: more charging, the EV leaves, a second driver charges and leaves too.
            await sim.charge(600, 7_400)
            await sim.charge(600, 7_400)
            stop_1 = sim.now()
            await sim.unplug()
            first_wh = int(sim.meter_wh) - 50_000
            await sim.plug_in()
            assert await sim.start(ALICE) == "Accepted"  # accepted locally, queued
            second_start = int(sim.meter_wh)
            await sim.charge(900, 11_000)
            await sim.unplug()
            assert sim.queued == 6  # 2 x MeterValues, Stop, Start, MeterValues, Stop
            sim.duplicate_next = True  # the first replayed call goes out twice, same uniqueId
            sim.out_of_order = True  # meter values replayed newest first
            await asyncio.sleep(0.5)
            await sim.connect()
            assert sim.queued == 0
            records = await finished(gw, 2)
            await asyncio.sleep(0.3)
            assert len(await gw.store.finished_sessions()) == 2
    one, two = sorted(records, key=lambda r: r["started_at"])
    assert one["energy_wh"] == first_wh
    assert two["energy_wh"] == int(sim.meter_wh) - second_start
    assert one["meter_stop_wh"] == two["meter_start_wh"]
    assert abs(parse_timestamp(one["ended_at"]) - stop_1) < 0.01  # the charger's stop time
    for record in (one, two):
        assert "end_estimated" not in record["flags"]
        assert record["user"]["id"] == "alice"
        assert record["stop_reason"] == "ev_disconnected"
    assert one["ocpp"]["transaction_id"] != two["ocpp"]["transaction_id"]


async def test_gateway_restart_mid_transaction_resumes_the_session(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path)
    config = load_config(path)
    sim = SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", meter_wh=10_000)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        await sim.connect()
        await sim.plug_in()
        await sim.start(ALICE)
        await sim.charge(600, 11_000)
        await wait_until(lambda: gw.sessions.open_sessions(), 5, "open session")
        (state,) = gw.sessions.open_sessions()
    await wait_until(lambda: not sim.online, 5, "link dropped by the stopping gateway")
    await sim.charge(600, 11_000)  # queued while the gateway is down
    await sim.unplug()
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        await sim.connect()
        (record,) = await finished(gw, 1)
        await sim.close()
    assert record["session_id"] == state["session_id"]
    assert record["energy_wh"] == int(sim.meter_wh) - 10_000
    assert record["flags"] == []


async def test_same_unique_id_answered_idempotently_and_same_start_same_transaction(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path)
    config = load_config(path)
    start = {
        "connectorId": 1,
        "idTag": ALICE,
        "meterStart": 5000,
        "timestamp": timestamp(1_790_000_000.0),
    }
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        async with connect(f"ws://127.0.0.1:{port}/CP9", subprotocols=["ocpp1.6"]) as ws:
            frame = json.dumps([2, "u-1", "StartTransaction", start])
            await ws.send(frame)
            first = json.loads(await ws.recv())
            await ws.send(frame)
            again = json.loads(await ws.recv())
            await ws.send(json.dumps([2, "u-2", "StartTransaction", start]))
            resent = json.loads(await ws.recv())
            stop = {"meterStop": 6000, "timestamp": timestamp(1_790_000_600.0)}
            stop["transactionId"] = first[2]["transactionId"]
            for uid in ("u-3", "u-4"):  # the second with a new uniqueId: already finished
                await ws.send(json.dumps([2, uid, "StopTransaction", stop]))
                assert json.loads(await ws.recv())[0] == 3
            garbage = json.dumps([2, "u-5", "MeterValues", {"connectorId": "x"}])
            await ws.send(garbage)
            error = json.loads(await ws.recv())
        (record,) = await finished(gw, 1)
    assert first[0] == 3 and first[2]["idTagInfo"] == {"status": "Accepted"}
    assert again == first
    assert resent[1] == "u-2" and resent[2] == first[2]
    assert record["energy_wh"] == 1000
    assert record["stop_reason"] == "local"  # no reason: Local, as OCPP 1.6 says
    assert error[0] == 4 and error[1] == "u-5"


async def test_grid_limit_arrives_as_set_charging_profile_within_two_cycles(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path, grid="grid: {max_current_a: 16}")
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        assert gw.load is not None
        cycle_s = gw.load.interval_s
        async with SimChargePoint(f"ws://127.0.0.1:{port}", "CP9") as sim:
            await sim.plug_in()
            await sim.start(ALICE)
            t0 = asyncio.get_running_loop().time()
            await wait_until(lambda: sim.limit_a == 16.0, 2 * cycle_s, "the grid limit")
            elapsed = asyncio.get_running_loop().time() - t0
            profile = sim.profiles[-1]
            assert profile["charging_profile_purpose"] == "TxDefaultProfile"
            assert profile["charging_schedule"]["charging_rate_unit"] == "A"
            # The charger now draws at most 16 A on three phases.
            await sim.charge(600, 22_000)
            assert sim.power_w(22_000) == pytest.approx(16 * 230 * 3)
    assert elapsed <= 2 * cycle_s


async def test_remote_start_and_stop_from_the_cloud(
    tmp_path: Path, mosquitto: MosquittoBroker, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path, broker=mosquitto.port)
    config = load_config(path)
    recorder = Recorder(mosquitto.port)
    async with (
        running(recorder.run(), "recorder"),
        Gateway(config, shipped_profiles) as gw,
        running(gw.run(), "gateway"),
    ):
        await listening(gw)
        await wait_until(recorder.connected.is_set, 5, "cloud subscriber")
        await wait_until(lambda: gw.uplink.online, 10, "gateway uplink")
        async with SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", meter_wh=700) as sim:
            await sim.plug_in()
            await recorder.publish(
                "commands/start",
                json.dumps({"request_id": "r1", "charger_id": "cp9", "user": "carol"}),
            )
            await wait_until(lambda: sim.transaction_id is not None, 5, "remote start")
            await wait_until(lambda: sim.transaction_id > 0, 5, "transaction id")
            await sim.charge(600, 11_000)
            await recorder.publish(
                "commands/stop", json.dumps({"request_id": "r2", "charger_id": "cp9"})
            )
            (record,) = await finished(gw, 1)
            await sim.unplug()  # after the remote stop the driver takes the cable
            commands = [
                ("availability", {"request_id": "r3", "charger_id": "cp9", "available": False}),
                ("reset", {"request_id": "r4", "charger_id": "cp9", "type": "hard"}),
                ("reset", {"request_id": "r5", "charger_id": "nope"}),
            ]
            for name, body in commands:
                await recorder.publish(f"commands/{name}", json.dumps(body))
            await wait_until(lambda: sim.resets == ["Hard"], 5, "Reset at the charger")
            await wait_until(
                lambda: gw.live.devices["cp9"].status == "unavailable", 5, "out of service"
            )
            await wait_until(
                lambda: sum("reply" in m.topic for m in recorder.messages) == 5, 5, "replies"
            )
        replies = {
            m.json()["request_id"]: m.json() for m in recorder.messages if "reply" in m.topic
        }
    assert replies["r1"]["ok"] is True and replies["r2"]["ok"] is True
    assert replies["r3"]["result"] == {"charger_id": "cp9", "status": "Accepted"}
    assert replies["r4"]["ok"] is True and sim.availability == ["Inoperative"]
    assert replies["r5"]["error"]["code"] == "not_supported"
    assert record["user"]["id"] == "carol" and record["user"]["auth"] == "remote"
    assert record["stop_reason"] == "remote"
    assert record["energy_wh"] == int(sim.meter_wh) - 700


# --------------------------------------------------------------------------- refusals
async def test_unknown_charge_point_refused_and_logged(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path)
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        with capture_logs() as logs, pytest.raises(InvalidStatus) as refused:
            await SimChargePoint(f"ws://127.0.0.1:{port}", "CP-UNKNOWN").connect()
        with capture_logs() as logs_2, pytest.raises(InvalidStatus) as no_protocol:
            async with connect(f"ws://127.0.0.1:{port}/CP9"):  # no ocpp1.6 offered
                pass
    assert refused.value.response.status_code == 404
    assert no_protocol.value.response.status_code == 400
    assert [e["event"] for e in logs_2 if e["log_level"] == "warning"] == ["ocpp_no_subprotocol"]
    events = [e for e in logs if e["event"] == "ocpp_unknown_charge_point"]
    assert events and events[0]["charge_point_id"] == "CP-UNKNOWN"


async def test_basic_auth_refuses_a_wrong_password(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    secrets = tmp_path / "ocpp.passwords"
    secrets.write_text(f"# charge point : password\nCP9:{PASSWORD}\n")
    path, port = write_site(tmp_path, profile=1, extra=f", passwords_file: {secrets}")
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        url = f"ws://127.0.0.1:{port}"
        with capture_logs() as logs:
            for wrong in ("not-the-password", None):
                with pytest.raises(InvalidStatus) as refused:
                    await SimChargePoint(url, "CP9", password=wrong).connect()
                assert refused.value.response.status_code == 401
        async with SimChargePoint(url, "CP9", password=PASSWORD) as sim:
            assert sim.answers[0][1].status == "Accepted"  # BootNotification
    assert sum(e["event"] == "ocpp_auth_failed" for e in logs) == 2
    assert PASSWORD not in repr(logs) and "not-the-password" not in repr(logs)


async def test_passwords_stay_out_of_debug_logs(
    tmp_path: Path, shipped_profiles: dict[str, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    """websockets logs handshake headers at DEBUG: the Authorization header must not get there
    even when the gateway runs at log_level debug."""
    import logging

    secrets = tmp_path / "ocpp.passwords"
    secrets.write_text(f"CP9:{PASSWORD}\n")
    path, port = write_site(tmp_path, profile=1, extra=f", passwords_file: {secrets}")
    config = load_config(path)
    encoded = base64.b64encode(f"CP9:{PASSWORD}".encode()).decode()
    with caplog.at_level(logging.DEBUG):
        async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
            await listening(gw)
            url = f"ws://127.0.0.1:{port}"
            async with SimChargePoint(url, "CP9", password=PASSWORD) as sim:
                await sim.plug_in()
    text = caplog.text
    assert "Authorization" not in text
    assert encoded not in text and PASSWORD not in text
    assert "ocpp_connected" in text


async def test_basic_auth_with_a_binary_authorization_key(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    key = bytes(range(0xF0, 0x100)) + b"\x00\x01\x02\x03"  # 20 bytes, not UTF-8
    secrets = tmp_path / "ocpp.passwords"
    secrets.write_text(f"CP9:hex:{key.hex()}\n")
    path, port = write_site(tmp_path, profile=1, extra=f", passwords_file: {secrets}")
    config = load_config(path)
    url = f"ws://127.0.0.1:{port}/CP9"

    def basic(password: bytes) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(b"CP9:" + password).decode()}

    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        for good in (key, key.hex().encode()):  # decoded, or the hex as configured
            async with connect(url, subprotocols=["ocpp1.6"], additional_headers=basic(good)):
                pass
        with pytest.raises(InvalidStatus):
            bad = key[:-1] + b"\x04"
            async with connect(url, subprotocols=["ocpp1.6"], additional_headers=basic(bad)):
                pass


async def test_tls_with_basic_auth(
    tmp_path: Path, test_pki: Pki, shipped_profiles: dict[str, Profile]
) -> None:
    import ssl

    secrets = tmp_path / "ocpp.passwords"
    secrets.write_text(f"CP9:{PASSWORD}\n")
    path, port = write_site(
        tmp_path,
        profile=2,
        extra=f", passwords_file: {secrets}, cert_file: {test_pki.server_cert}, "
        f"key_file: {test_pki.server_key}",
    )
    config = load_config(path)
    ctx = ssl.create_default_context(cafile=test_pki.ca_file)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        async with SimChargePoint(
            f"wss://127.0.0.1:{port}", "CP9", password=PASSWORD, ssl_context=ctx
        ) as sim:
            await sim.plug_in()
            await wait_until(
                lambda: gw.live.devices["cp9"].status == "preparing", 5, "status over TLS"
            )
        with pytest.raises((InvalidStatus, OSError, websockets.exceptions.InvalidMessage)):
            await SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", password=PASSWORD).connect()


# --------------------------------------------------------------------------- config
def test_check_config_accepts_an_ocpp_charger(tmp_path: Path) -> None:
    path, _ = write_site(tmp_path)
    code, text = check_config(path)
    assert code == 0, text
    assert "cp9: ocpp charge point CP9, tariff standard" in text


def test_check_config_reports_ocpp_mistakes_with_lines(tmp_path: Path) -> None:
    secrets = tmp_path / "pw"
    secrets.write_text(f"CP9:{PASSWORD}\nnot a line\n")
    path = tmp_path / "bad.yaml"
    path.write_text(
        "site: {id: s1}\n"
        "storage: {path: ./b.db}\n"
        f'ocpp: {{listen: "127.0.0.1:9000", security_profile: 1, passwords_file: {secrets}}}\n'
        "devices:\n"
        "  - {id: cp1, driver: ocpp, charge_point_id: CP9}\n"
        "  - {id: cp2, driver: ocpp, charge_point_id: CP9, host: 10.0.0.1}\n"
        "  - {id: cp3, driver: ocpp}\n"
        "  - {id: cp4, driver: ocpp, charge_point_id: CP4}\n"
        "  - {id: cp5, driver: ocpp, charge_point_id: 'bad/id'}\n"
        f"  - {{id: cp6, driver: ocpp, charge_point_id: CP6, meter_public_key: {'ab' * 30}}}\n"
    )
    code, text = check_config(path)
    assert code == 2
    lines = text.splitlines()
    assert any(
        ":3:" in line and "line 2: expected CHARGE_POINT_ID:PASSWORD" in line for line in lines
    )
    assert any(
        ":6:" in line
        and "devices[1].charge_point_id: connector 1 of charge point 'CP9' is already" in line
        for line in lines
    )
    assert any(
        ":6:" in line and "devices[1].host: host is for Modbus devices" in line for line in lines
    )
    assert any(":7:" in line and "devices[2]: needs charge_point_id" in line for line in lines)
    assert any(":8:" in line and "no password for 'CP4'" in line for line in lines)
    assert any(":9:" in line and "devices[4].charge_point_id: must be" in line for line in lines)
    assert any(
        ":10:" in line and "devices[5].meter_public_key: not a meter public key: not a DER" in line
        for line in lines
    )
    assert PASSWORD not in text
    no_section = tmp_path / "nosection.yaml"
    no_section.write_text(
        "site: {id: s1}\nstorage: {path: ./b.db}\n"
        "devices:\n  - {id: cp1, driver: ocpp, charge_point_id: CP1}\n"
    )
    code, text = check_config(no_section)
    assert code == 2 and "needs the ocpp: section" in text


# --------------------------------------------------------------------------- mapping
def test_meter_values_units_locations_and_signed_data() -> None:
    (sample,) = parse_meter_values(
        [
            {
                "timestamp": "2026-12-02T10:00:00.123456789+01:00",
                "sampledValue": [
                    {"value": "12.5", "measurand": "Energy.Active.Import.Register", "unit": "kWh"},
                    {"value": "99999", "location": "Inlet"},  # not the outlet's register
                    {"value": "7.4", "measurand": "Power.Active.Import", "unit": "kW"},
                    {"value": "16.1", "measurand": "Current.Import", "phase": "L2"},
                    {"value": "OCMF|{}|{}", "format": "SignedData", "context": "Transaction.Begin"},
                    {"value": "nan"},
                ],
            },
            {"timestamp": "not a time", "sampledValue": [{"value": "1"}]},
        ]
    )
    assert sample.energy_wh == 12_500.0
    assert sample.power_w == 7_400.0
    assert sample.values["current_l2_a"] == 16.1
    assert sample.signed == [
        {
            "measurand": "Energy.Active.Import.Register",
            "context": "Transaction.Begin",
            "value": "OCMF|{}|{}",
        }
    ]
    assert sample.ts == parse_timestamp("2026-12-02T09:00:00.123456Z")
    assert parse_timestamp("2026-12-02T09:00:00") == parse_timestamp("2026-12-02T09:00:00Z")


@pytest.mark.slow
@pytest.mark.parametrize("skew_s", [-3600.0, 5400.0])
async def test_charger_clock_skew_is_measured_and_taken_off(
    tmp_path: Path, shipped_profiles: dict[str, Profile], skew_s: float
) -> None:
    path, port = write_site(tmp_path)
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        sim = SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", meter_wh=900, clock_skew_s=skew_s)
        async with sim:
            t0 = time.time()
            await sim.plug_in()
            await sim.start(ALICE)
            await sim.charge(1200, 7_400)
            await asyncio.sleep(0.2)
            await sim.disconnect()  # the stop is replayed later, still with the skewed clock
            await sim.unplug()
            t1 = time.time()
            await asyncio.sleep(2.0)  # an uncorrected clock ahead would be clamped to "now" here
            await sim.connect()
            (record,) = await finished(gw, 1)
    assert abs(parse_timestamp(record["started_at"]) - t0) < 1.0
    assert abs(parse_timestamp(record["ended_at"]) - t1) < 1.0
    assert record["energy_wh"] == int(sim.meter_wh) - 900
    assert record["ocpp"]["clock_skew_s"] == pytest.approx(skew_s, abs=1.0)
    assert record["flags"] == []


def _ocmf(private_key: Any, reading_kwh: float, tx: str) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = json.dumps(
        {
            "FV": "1.0",
            "GI": "SIM-METER",
            "PG": "T1",
            "MS": "SIM-0001",
            "IS": True,
            "IT": "ISO14443",
            "ID": ALICE,
            "RD": [
                {
                    "TM": "2026-12-02T10:00:00,000+0000 S",
                    "TX": tx,
                    "RV": reading_kwh,
                    "RI": "1-b:1.8.0",
                    "RU": "kWh",
                    "ST": "G",
                }
            ],
        },
        separators=(",", ":"),
    )
    signature = private_key.sign(payload.encode(), ec.ECDSA(hashes.SHA256())).hex()
    return f'OCMF|{payload}|{{"SA":"ECDSA-secp256r1-SHA256","SD":"{signature}"}}'


async def test_signed_meter_values_kept_unchanged_and_verified(
    tmp_path: Path, shipped_profiles: dict[str, Profile], capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.billing.verify import run_verify

    meter = ec.generate_private_key(ec.SECP256R1())
    public_hex = (
        meter.public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        .hex()
    )
    path, port = write_site(tmp_path, device_extra=f", meter_public_key: {public_hex}")
    config = load_config(path)
    docs = []
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        async with SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", meter_wh=1000) as sim:
            for n in range(2):
                await sim.plug_in()
                await sim.start(ALICE)
                start_doc = _ocmf(meter, sim.meter_wh / 1000, "B")
                await sim.meter_values(0, signed=start_doc)
                await sim.charge(600, 11_000)
                stop_doc = _ocmf(meter, sim.meter_wh / 1000, "E")
                if n == 1:  # tampered on the way: a reading changed after signing
                    stop_doc = stop_doc.replace('"RV":', '"RV":1', 1)
                await sim.stop("EVDisconnected", signed=stop_doc)
                await sim.unplug()
                docs.append({"start": start_doc, "stop": stop_doc})
            records = await finished(gw, 2)
    by_start = sorted(records, key=lambda r: r["started_at"])
    assert [r["ocpp"]["signed_meter_values"] for r in by_start] == docs
    capsys.readouterr()
    assert await run_verify(config=config) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == [
        f"seq 2 (session {by_start[1]['session_id']}): signed stop meter value: "
        "signature does not match the meter's key"
    ]
    assert out[-1].endswith("; 3 signed meter value(s) valid")


async def test_meter_values_without_transaction_id_and_from_another_register(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    """Clock-aligned MeterValues without transactionId feed the connector's transaction; a
    charger counting meterStart/meterStop from 0 per session while its MeterValues carry the
    lifetime register is billed meterStop - meterStart, without a false meter reset."""
    path, port = write_site(tmp_path)
    config = load_config(path)
    t0 = time.time() - 1800

    def mv(ts: float, wh: int, tx: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "connectorId": 1,
            "meterValue": [{"timestamp": timestamp(ts), "sampledValue": [{"value": str(wh)}]}],
        }
        if tx is not None:
            body["transactionId"] = tx
        return body

    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        async with connect(f"ws://127.0.0.1:{port}/CP9", subprotocols=["ocpp1.6"]) as ws:
            n = 0

            async def send(action: str, body: dict[str, Any]) -> Any:
                nonlocal n
                n += 1
                await ws.send(json.dumps([2, f"m{n}", action, body]))
                reply = json.loads(await ws.recv())
                assert reply[0] == 3, reply
                return reply[2]

            start = {"connectorId": 1, "idTag": ALICE, "meterStart": 20_000}
            tx = (await send("StartTransaction", {**start, "timestamp": timestamp(t0)}))[
                "transactionId"
            ]
            await send("MeterValues", mv(t0 + 600, 21_000, None))  # no transactionId
            await wait_until(lambda: gw.sessions.open_sessions()[0]["last_wh"] == 21_000, 5, "fed")
            stop = {"meterStop": 22_500, "timestamp": timestamp(t0 + 1200), "transactionId": tx}
            await send("StopTransaction", stop)
            await send("MeterValues", mv(t0 + 1201, 22_500, tx))  # closing values, after stop
            # Per-session meterStart/meterStop, lifetime register in MeterValues.
            start = {"connectorId": 1, "idTag": ALICE, "meterStart": 0}
            tx = (await send("StartTransaction", {**start, "timestamp": timestamp(t0 + 1300)}))[
                "transactionId"
            ]
            await send("MeterValues", mv(t0 + 1400, 8_500_000, tx))
            stop = {"meterStop": 2_345, "timestamp": timestamp(t0 + 1700), "transactionId": tx}
            await send("StopTransaction", stop)
        one, two = sorted(await finished(gw, 2), key=lambda r: r["started_at"])
    assert one["energy_wh"] == 2_500 and one["flags"] == []
    assert two["energy_wh"] == 2_345 and two["flags"] == []


@pytest.mark.slow
async def test_transaction_whose_stop_never_comes_is_closed_as_estimated(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    """A charger that lost its queue (power cut) comes back Available and never sends the
    StopTransaction: the session is closed at its last activity, flagged end_estimated; a stop
    arriving after that is logged, and the sealed record stays as it is."""
    path, port = write_site(tmp_path)
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        assert gw.ocpp is not None
        gw.ocpp.abandon_after_s = 1.0
        sim = SimChargePoint(f"ws://127.0.0.1:{port}", "CP9", meter_wh=4_000)
        async with sim:
            await sim.plug_in()
            await sim.start(ALICE)
            await sim.charge(600, 11_000)
            tx = sim.transaction_id
            await sim.disconnect()
            sim._queue = []  # a power cut takes the charger's queue and transaction with it
            sim.transaction_id = None
            sim.status = "Available"
            await sim.connect()
            await asyncio.sleep(0.3)
            await gw.ocpp.close_abandoned()
            assert gw.sessions.open_sessions()  # not before abandon_after_s
            await asyncio.sleep(1.0)
            await gw.ocpp.close_abandoned()
            (record,) = await finished(gw, 1)
            with capture_logs() as logs:
                stop = call_stop(tx, int(sim.meter_wh))
                await sim._call(stop)
    assert record["flags"] == ["end_estimated"]
    assert record["stop_reason"] == "unknown"
    assert record["energy_wh"] == 1833  # up to the last reading the gateway got
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "ocpp_stop_after_estimated_end"
    ]


def call_stop(transaction_id: int | None, meter_stop: int) -> Any:
    from ocpp.v16 import call

    assert transaction_id is not None
    return call.StopTransaction(
        meter_stop=meter_stop, timestamp=timestamp(time.time()), transaction_id=transaction_id
    )


@pytest.mark.slow
async def test_evgw_simulate_drives_the_sites_ocpp_chargers(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    """What ``evgw simulate`` adds for OCPP chargers: a charge point per device, connecting
    with the configured (here binary, hex:) password, EVs arriving with the site's tokens."""
    import io

    from gateway.ocpp.sim import simulate_charge_points

    secrets = tmp_path / "ocpp.passwords"
    secrets.write_text("CP9:hex:000102030405060708090a0b0c0d0e0f\n")
    path, port = write_site(tmp_path, profile=1, extra=f", passwords_file: {secrets}")
    config = load_config(path)
    out = io.StringIO()
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        async with running(simulate_charge_points(config, 600.0, out), "sim"):
            (record,) = await finished(gw, 1, timeout_s=15)
    assert f"cp9: OCPP charge point CP9 connecting to ws://127.0.0.1:{port}/CP9" in out.getvalue()
    assert record["user"]["id"] == "alice" and record["energy_wh"] == 1833


async def test_a_reconnect_replaces_a_half_open_connection(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    """A charger whose old socket is still open on our side (its network dropped without a
    close) reconnects: the new connection wins, the old one is closed, the charger stays online."""
    path, port = write_site(tmp_path)
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        first = SimChargePoint(f"ws://127.0.0.1:{port}", "CP9")
        second = SimChargePoint(f"ws://127.0.0.1:{port}", "CP9")
        await first.connect()
        with capture_logs() as logs:
            await second.connect()
            await second.plug_in()
        await wait_until(lambda: not first.online, 5, "the old connection closed")
        await wait_until(lambda: gw.live.devices["cp9"].status == "preparing", 5, "status")
        assert gw.ocpp is not None and gw.ocpp.connected("cp9")
        await first.close()
        await second.close()
    assert "ocpp_replaced_connection" in [e["event"] for e in logs]


async def test_two_connectors_of_one_charge_point_are_two_devices(
    tmp_path: Path, shipped_profiles: dict[str, Profile]
) -> None:
    path, port = write_site(tmp_path)
    text = path.read_text().replace(
        "  - {id: cp9, driver: ocpp, charge_point_id: CP9, tariff: standard}",
        "  - {id: cp9, driver: ocpp, charge_point_id: CP9, tariff: standard}\n"
        "  - {id: cp9b, driver: ocpp, charge_point_id: CP9, connector: 2, tariff: standard}",
    )
    path.write_text(text)
    config = load_config(path)
    async with Gateway(config, shipped_profiles) as gw, running(gw.run(), "gateway"):
        await listening(gw)
        url = f"ws://127.0.0.1:{port}"
        one = SimChargePoint(url, "CP9", meter_wh=1000)
        two = SimChargePoint(url, "CP9", meter_wh=5000, connector=2)
        async with one:
            await one.plug_in()
            await one.start(ALICE)
            await one.charge(600, 11_000)
            # the second connector's messages come over the same connection in real life;
            # here its simulator reconnects as CP9 and replaces the first connection
            await one.disconnect()
            async with two:
                await two.plug_in()
                # blocked, but the charger starts anyway (its own list): recorded, unidentified
                await two.start("FOB-0042", authorize=False)
                await two.charge(600, 7_400)
                await two.unplug()
            await one.connect()
            await one.unplug()
        records = {r["charger_id"]: r for r in await finished(gw, 2)}
    assert records["cp9"]["energy_wh"] == 1833 and records["cp9"]["user"]["id"] == "alice"
    assert records["cp9b"]["energy_wh"] == 1233 and records["cp9b"]["user"]["id"] is None
    assert records["cp9b"]["flags"] == ["unidentified"]
    assert records["cp9b"]["ocpp"]["connector_id"] == 2
