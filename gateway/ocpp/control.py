"""Charger control for a site with OCPP and Modbus chargers: one ``ChargerControl`` that sends
each request to the part that owns the charger."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from gateway.ports import ChargerControl

if TYPE_CHECKING:
    from gateway.config import DeviceConfig
    from gateway.loadmgmt import LoadBalancer

__all__ = ["OCPP_MIN_CURRENT_A", "OcppRoute"]

# IEC 61851-1: the smallest current a control pilot may offer an EV.
OCPP_MIN_CURRENT_A = 6.0
OCPP_DEFAULT_MAX_A = 32.0  # without max_current_a: the largest common AC charger


class OcppRoute:
    """Routes ``ChargerControl`` calls: OCPP chargers to the OCPP server (attached once it
    exists), every other charger to the Modbus engine."""

    def __init__(self, modbus: ChargerControl, ocpp_ids: Iterable[str]) -> None:
        self._modbus = modbus
        self._ids = frozenset(ocpp_ids)
        self._ocpp: ChargerControl | None = None

    def attach(self, ocpp: ChargerControl) -> None:
        self._ocpp = ocpp

    def _target(self, device_id: str) -> ChargerControl | None:
        if device_id in self._ids:
            return self._ocpp
        return self._modbus

    def can_control(self, device_id: str) -> bool:
        if device_id in self._ids:
            return True
        return self._modbus.can_control(device_id)

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        target = self._target(device_id)
        if target is not None:
            await target.set_enabled(device_id, enabled)

    async def set_current_limit(self, device_id: str, current_a: float) -> None:
        target = self._target(device_id)
        if target is None:
            from gateway.errors import DeviceError

            raise DeviceError(device_id, "offline", "the OCPP server is not running yet")
        await target.set_current_limit(device_id, current_a)

    @staticmethod
    def with_chargers(balancer: LoadBalancer, devices: Sequence[DeviceConfig]) -> LoadBalancer:
        """The balancer with the OCPP chargers added: limits in 0.1 A (the 1.6 schema's
        resolution), a limit of 0 pauses (SetChargingProfile allows it), and start/stop is
        not a limit (authorization goes through the idTag, so ``enable_register``)."""
        from gateway.loadmgmt import ChargerSpec, LoadBalancer

        specs = [
            ChargerSpec(
                dev.id,
                min_a=OCPP_MIN_CURRENT_A,
                max_a=dev.max_current_a or OCPP_DEFAULT_MAX_A,
                step_a=0.1,
                controllable=True,
                can_pause=True,
                enable_register=True,
            )
            for dev in devices
        ]
        return LoadBalancer(balancer.settings, [*balancer.specs.values(), *specs])
