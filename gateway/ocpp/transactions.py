"""OCPP transactions as sessions: transaction ids, replays, and the session manager's calls.

A transaction id is given out (and stored) before its session is written, so a StartTransaction
replayed after a crash gets the same id; ``ocpp.tx/{cp}/{id}`` says whether its session is open,
closed or closed by estimate, which tells a resent StopTransaction or late MeterValues from an
unknown one. Signed meter values (OCMF) are kept per transaction and go into the record at its
end. Every change happens under one lock: a charger's queue replayed on reconnection and its live
messages never interleave.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from gateway.model import StopReason
from gateway.ocpp.clocks import ChargePointClocks
from gateway.ocpp.mapping import MeterSample, parse_meter_values, signed_documents, stop_reason_of
from gateway.ports import KeyValueStore
from gateway.sessions import TransactionEnd, TransactionStart

__all__ = ["TransactionBook", "TransactionSink"]

log = structlog.get_logger(__name__)

# No AC session delivers more (22 kW for 9 hours): a MeterValues register further from
# meterStart than this is another register (lifetime vs per session), not this transaction's.
MAX_SESSION_WH = 200_000.0


class TransactionSink(Protocol):
    """What the server needs of the session manager (gateway.sessions.SessionManager)."""

    async def begin_transaction(self, start: TransactionStart) -> str: ...

    async def transaction_meter(
        self, session_id: str, ts: float, energy_wh: float, power_w: float | None = None
    ) -> None: ...

    async def end_transaction(self, end: TransactionEnd) -> bool: ...

    def open_sessions(self) -> list[dict[str, Any]]: ...


class TransactionBook:
    """The site's OCPP transactions and the sessions they are."""

    def __init__(
        self,
        sessions: TransactionSink,
        store: KeyValueStore,
        clocks: ChargePointClocks,
        now: Callable[[], float],
    ) -> None:
        self.sessions = sessions
        self.store = store
        self._clocks = clocks
        self._now = now
        self.lock = asyncio.Lock()

    @staticmethod
    def start_key(
        cp_id: str, connector_id: int, id_tag: str, meter_start: int, ts_text: str
    ) -> str:
        """The store key of a StartTransaction: the same for the same call replayed."""
        call = json.dumps([cp_id, connector_id, id_tag, meter_start, ts_text]).encode()
        return "ocpp.start/" + hashlib.sha256(call).hexdigest()[:32]

    async def start_seen(self, key: str) -> dict[str, Any] | None:
        """What the StartTransaction of ``key`` was given, if it came before."""
        seen: dict[str, Any] | None = await self.store.kv_get(key)
        return seen

    async def give_out(self, key: str, info: dict[str, Any]) -> int:
        """A new transaction id for the StartTransaction of ``key``, written before its session:
        a replay after a crash gets the same id."""
        transaction_id = int(await self.store.kv_get("ocpp.next_transaction_id", 1))
        await self.store.kv_put("ocpp.next_transaction_id", transaction_id + 1)
        await self.store.kv_put(key, {"transaction_id": transaction_id, "id_tag_info": info})
        return transaction_id

    def open_session(self, cp_id: str, transaction_id: int) -> str | None:
        for state in self.sessions.open_sessions():
            ocpp = state.get("ocpp") or {}
            if (
                ocpp.get("charge_point_id") == cp_id
                and ocpp.get("transaction_id") == transaction_id
            ):
                return str(state["session_id"])
        return None

    def connector_session(self, device_id: str) -> dict[str, Any] | None:
        return next(
            (s for s in self.sessions.open_sessions() if s.get("charger_id") == device_id), None
        )

    async def started(
        self, key: str, cp_id: str, transaction_id: int, info: dict[str, Any], session_id: str
    ) -> None:
        await self.store.kv_put(
            key, {"transaction_id": transaction_id, "id_tag_info": info, "session_id": session_id}
        )
        await self.store.kv_put(
            f"ocpp.tx/{cp_id}/{transaction_id}", {"session_id": session_id, "open": True}
        )

    async def end_abandoned(self, device_id: str) -> None:
        """Close the connector's open transaction, if any, at its last activity with its last
        reading, flagged ``end_estimated`` (see ``OcppServer.close_abandoned``)."""
        async with self.lock:
            state = self.connector_session(device_id)
            if state is None:
                return
            ocpp = dict(state.get("ocpp") or {})
            cp_id, transaction_id = str(ocpp.get("charge_point_id")), ocpp.get("transaction_id")
            log.warning(
                "ocpp_transaction_abandoned",
                charge_point_id=cp_id,
                transaction_id=transaction_id,
                session_id=state["session_id"],
            )
            last_wh = state.get("last_wh")
            await self.sessions.end_transaction(
                TransactionEnd(
                    str(state["session_id"]),
                    float(state.get("last_activity_ts") or state["started_at"]),
                    float(last_wh if last_wh is not None else state.get("meter_start_wh") or 0),
                    StopReason.UNKNOWN,
                    estimated=True,
                )
            )
            await self.store.kv_put(
                f"ocpp.tx/{cp_id}/{transaction_id}",
                {"session_id": state["session_id"], "open": False, "estimated": True},
            )

    async def meter_values(
        self,
        cp_id: str,
        device_id: str | None,
        transaction_id: int | None,
        samples: Sequence[MeterSample],
    ) -> None:
        """Feed the samples to the session of ``transaction_id``, or of the connector's running
        transaction (``device_id``) when the charger names none or a wrong one."""
        async with self.lock:
            session_id = None
            if transaction_id is not None:
                session_id = self.open_session(cp_id, transaction_id)
                if session_id is None:
                    known = await self.store.kv_get(f"ocpp.tx/{cp_id}/{transaction_id}")
                    if known is not None:  # closing values sent after StopTransaction
                        log.info(
                            "ocpp_meter_values_after_stop",
                            charge_point_id=cp_id,
                            transaction_id=transaction_id,
                        )
                        return
            if session_id is None and device_id is not None:
                # Clock-aligned values often come without transactionId, and some chargers
                # send a wrong one (0): they belong to the connector's running transaction.
                state = self.connector_session(device_id)
                if state is not None:
                    session_id = str(state["session_id"])
                    transaction_id = int((state.get("ocpp") or {})["transaction_id"])
            if session_id is None or transaction_id is None:
                return
            await self._feed(cp_id, transaction_id, session_id, samples)

    async def _feed(
        self, cp_id: str, transaction_id: int, session_id: str, samples: Sequence[Any]
    ) -> None:
        now = self._now()
        skew = self._clocks.skew_s(cp_id)
        state = next(
            (s for s in self.sessions.open_sessions() if s["session_id"] == session_id), {}
        )
        start_wh = state.get("meter_start_wh")
        last_ts = state.get("last_counter_ts")
        for sample in samples:
            if sample.energy_wh is None:
                continue
            ts = min(sample.ts - skew, now)
            if last_ts is not None and ts <= last_ts:
                continue  # replayed out of order (or the same instant): nothing new
            last_ts = ts
            if start_wh is not None and not 0 <= sample.energy_wh - start_wh <= MAX_SESSION_WH:
                # Some chargers count meterStart/meterStop per session from 0 and report their
                # lifetime register in MeterValues (or the other way round): not the register
                # of this transaction. Its energy comes from meterStop.
                log.warning(
                    "ocpp_meter_values_other_register",
                    charge_point_id=cp_id,
                    transaction_id=transaction_id,
                    meter_start_wh=start_wh,
                    value_wh=sample.energy_wh,
                )
                continue
            await self.sessions.transaction_meter(session_id, ts, sample.energy_wh, sample.power_w)
        docs = signed_documents(samples)
        if docs:
            key = f"ocpp.signed/{cp_id}/{transaction_id}"
            kept = dict(await self.store.kv_get(key, {}) or {})
            if "start" in docs and "start" not in kept:
                kept["start"] = docs["start"]
            if "stop" in docs:
                kept["stop"] = docs["stop"]
            await self.store.kv_put(key, kept)

    async def stop_transaction(
        self,
        cp_id: str,
        transaction_id: int,
        meter_stop: int,
        ts_text: str,
        reason: str | None,
        id_tag: str | None,
        transaction_data: Sequence[Mapping[str, Any]] | None,
    ) -> None:
        async with self.lock:
            session_id = self.open_session(cp_id, transaction_id)
            if session_id is None:
                known = await self.store.kv_get(f"ocpp.tx/{cp_id}/{transaction_id}")
                if known is not None and known.get("estimated"):
                    log.error(  # the record is sealed: an operator must know the difference
                        "ocpp_stop_after_estimated_end",
                        charge_point_id=cp_id,
                        transaction_id=transaction_id,
                        session_id=known.get("session_id"),
                        meter_stop_wh=meter_stop,
                    )
                elif known is not None and not known.get("open", True):
                    log.info(
                        "ocpp_stop_transaction_repeated",
                        charge_point_id=cp_id,
                        transaction_id=transaction_id,
                    )
                else:
                    log.error(
                        "ocpp_stop_unknown_transaction",
                        charge_point_id=cp_id,
                        transaction_id=transaction_id,
                        meter_stop_wh=meter_stop,
                    )
                return
            samples = parse_meter_values(transaction_data or ())
            await self._feed(cp_id, transaction_id, session_id, samples)
            extra: dict[str, Any] = {}
            signed = await self.store.kv_get(f"ocpp.signed/{cp_id}/{transaction_id}")
            if signed:
                extra["signed_meter_values"] = dict(signed)
            if id_tag is not None:
                extra["stop_id_tag"] = id_tag
            await self.sessions.end_transaction(
                TransactionEnd(
                    session_id,
                    self._clocks.event_time(ts_text, cp_id),
                    float(meter_stop),
                    stop_reason_of(reason),
                    extra,
                )
            )
            await self.store.kv_put(
                f"ocpp.tx/{cp_id}/{transaction_id}", {"session_id": session_id, "open": False}
            )
