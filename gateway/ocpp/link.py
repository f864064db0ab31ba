"""One charge point's OCPP-J 1.6 connection: the library's routing on our side of the socket.

A ``ChargePointLink`` answers a resent call with the answer it already gave, logs frames
(without secrets, at debug), turns the charger's calls into calls on its ``LinkHost`` (the
``OcppServer``) and makes our calls to the charger, with every failure a ``DeviceError``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import structlog
from ocpp.routing import on
from ocpp.v16 import ChargePoint as _OcppChargePoint
from ocpp.v16 import call_result
from ocpp.v16.enums import Action
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.config import OcppConfig
from gateway.errors import DeviceError
from gateway.model import AuthStatus
from gateway.ocpp.mapping import id_tag_status, timestamp
from gateway.ocpp.transactions import TransactionBook
from gateway.sessions import Grant

__all__ = ["WIRE_LOG", "ChargePointLink", "LinkHost"]

log = structlog.get_logger(__name__)

# The library logs every frame at INFO; frames are ours to log (without secrets, at debug).
WIRE_LOG = logging.getLogger("gateway.ocpp.wire")


class LinkHost(Protocol):
    """What a link asks of the server (``gateway.ocpp.server.OcppServer``): the answers it gave,
    the charger's clock, and the calls that touch connectors; a StopTransaction goes straight to
    the ``TransactionBook``."""

    @property
    def config(self) -> OcppConfig: ...

    def now(self) -> float: ...

    def answered(self, cp_id: str, unique_id: str) -> str | None: ...

    def remember_answer(self, cp_id: str, unique_id: str, frame: str) -> None: ...

    def observe_clock(self, cp_id: str, text: str | None) -> None: ...

    async def authorize(
        self, cp_id: str, connector_id: int | None, id_tag: str
    ) -> tuple[AuthStatus, Grant | None, float | None]: ...

    async def status_notification(
        self, cp_id: str, connector_id: int, status: str, error_code: str
    ) -> None: ...

    async def start_transaction(
        self, cp_id: str, connector_id: int, id_tag: str, meter_start: int, ts_text: str
    ) -> tuple[int, dict[str, Any]]: ...

    async def meter_values(
        self,
        cp_id: str,
        connector_id: int,
        transaction_id: int | None,
        entries: Sequence[Mapping[str, Any]],
    ) -> None: ...


class ChargePointLink(_OcppChargePoint):
    """One charge point's websocket: the library routes calls to the handlers below."""

    def __init__(
        self,
        cp_id: str,
        ws: ServerConnection,
        server: LinkHost,
        transactions: TransactionBook,
    ) -> None:
        super().__init__(cp_id, ws, response_timeout=server.config.call_timeout_s, logger=WIRE_LOG)
        self.ws = ws
        self._srv = server
        self._tx = transactions

    async def route_message(self, raw_msg: str) -> None:
        unique_id = _call_id(raw_msg)
        if unique_id is not None:
            frame = self._srv.answered(self.id, unique_id)
            if frame is not None:
                log.info("ocpp_call_repeated", charge_point_id=self.id, unique_id=unique_id[:36])
                await self._connection.send(frame)
                return
        await super().route_message(raw_msg)

    async def _send(self, message: str) -> None:
        reply_id = _reply_id(message)
        if reply_id is not None:
            self._srv.remember_answer(self.id, reply_id, message)
        WIRE_LOG.debug("%s: send %s", self.id, message)
        await self._connection.send(message)

    async def request(self, device_id: str, payload: Any) -> Any:
        try:
            result = await self.call(payload, suppress=False)
        except TimeoutError:
            what = type(payload).__name__
            raise DeviceError(device_id, "timeout", f"no answer to {what}") from None
        except ConnectionClosed:
            raise DeviceError(device_id, "offline", "the charge point disconnected") from None
        except Exception as exc:  # a CallError from the charger
            raise DeviceError(device_id, "call_error", str(exc)[:200]) from None
        return result

    # ---- calls from the charge point
    @on(Action.boot_notification)
    async def on_boot_notification(
        self, charge_point_vendor: str, charge_point_model: str, **extra: Any
    ) -> call_result.BootNotification:
        log.info(
            "ocpp_boot",
            charge_point_id=self.id,
            vendor=charge_point_vendor,
            model=charge_point_model,
            firmware=extra.get("firmware_version"),
        )
        return call_result.BootNotification(
            current_time=timestamp(self._srv.now()),
            interval=int(self._srv.config.heartbeat_interval_s),
            status="Accepted",
        )

    @on(Action.heartbeat)
    async def on_heartbeat(self) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=timestamp(self._srv.now()))

    @on(Action.status_notification)
    async def on_status_notification(
        self, connector_id: int, error_code: str, status: str, **extra: Any
    ) -> call_result.StatusNotification:
        self._srv.observe_clock(self.id, extra.get("timestamp"))
        await self._srv.status_notification(self.id, connector_id, status, error_code)
        return call_result.StatusNotification()

    @on(Action.authorize)
    async def on_authorize(self, id_tag: str) -> call_result.Authorize:
        status, _, expires = await self._srv.authorize(self.id, None, id_tag)
        info: dict[str, Any] = {"status": id_tag_status(status)}
        if expires is not None:
            info["expiryDate"] = timestamp(expires)
        return call_result.Authorize(id_tag_info=info)

    @on(Action.start_transaction)
    async def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **extra: Any
    ) -> call_result.StartTransaction:
        transaction_id, info = await self._srv.start_transaction(
            self.id, connector_id, id_tag, meter_start, timestamp
        )
        return call_result.StartTransaction(transaction_id=transaction_id, id_tag_info=info)

    @on(Action.meter_values)
    async def on_meter_values(
        self, connector_id: int, meter_value: list[dict[str, Any]], **extra: Any
    ) -> call_result.MeterValues:
        await self._srv.meter_values(
            self.id, connector_id, extra.get("transaction_id"), _camel_entries(meter_value)
        )
        return call_result.MeterValues()

    @on(Action.stop_transaction)
    async def on_stop_transaction(
        self, meter_stop: int, timestamp: str, transaction_id: int, **extra: Any
    ) -> call_result.StopTransaction:
        await self._tx.stop_transaction(
            self.id,
            transaction_id,
            meter_stop,
            timestamp,
            extra.get("reason"),
            extra.get("id_tag"),
            _camel_entries(extra.get("transaction_data") or []),
        )
        if extra.get("id_tag") is not None:
            return call_result.StopTransaction(id_tag_info={"status": "Accepted"})
        return call_result.StopTransaction()

    @on(Action.data_transfer)
    async def on_data_transfer(self, vendor_id: str, **extra: Any) -> call_result.DataTransfer:
        log.info("ocpp_data_transfer", charge_point_id=self.id, vendor_id=vendor_id[:255])
        return call_result.DataTransfer(status="UnknownVendorId")

    @on(Action.firmware_status_notification)
    async def on_firmware_status(self, status: str) -> call_result.FirmwareStatusNotification:
        log.info("ocpp_firmware_status", charge_point_id=self.id, status=status)
        return call_result.FirmwareStatusNotification()

    @on(Action.diagnostics_status_notification)
    async def on_diagnostics_status(self, status: str) -> call_result.DiagnosticsStatusNotification:
        log.info("ocpp_diagnostics_status", charge_point_id=self.id, status=status)
        return call_result.DiagnosticsStatusNotification()


def _call_id(raw: str) -> str | None:
    """The uniqueId of a CALL frame ``[2, id, action, payload]``, else None."""
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    if isinstance(msg, list) and len(msg) == 4 and msg[0] == 2 and isinstance(msg[1], str):
        return msg[1]
    return None


def _reply_id(frame: str) -> str | None:
    """The uniqueId of a CALLRESULT or CALLERROR frame we send."""
    try:
        msg = json.loads(frame)
    except ValueError:
        return None
    if isinstance(msg, list) and msg and msg[0] in (3, 4) and isinstance(msg[1], str):
        return msg[1]
    return None


def _camel_entries(entries: list[Any]) -> list[dict[str, Any]]:
    """The library hands payloads over in snake_case; the mapping reads the wire's camelCase."""
    from ocpp.charge_point import snake_to_camel_case

    return [snake_to_camel_case(e) for e in entries if isinstance(e, dict)]
