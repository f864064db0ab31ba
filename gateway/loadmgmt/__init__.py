"""Load management: keep the site under its grid limit.

``balancer.LoadBalancer`` is pure logic (no I/O, time passed in): it keeps the latest sample of
the grid meter and of every charger and decides a current limit per controllable charger.
``manager.LoadManager`` runs it: it takes every sample from the app, applies the decisions
through ``gateway.ports.ChargerControl`` and stands between the session manager and the chargers
(it is a ``ChargerControl`` itself) so that a charger the session manager disabled is never
switched back on by a limit write.

See docs/load-management.md.
"""

from gateway.loadmgmt.balancer import ChargerSpec, Decision, LoadBalancer, LoadSettings, Mode
from gateway.loadmgmt.manager import LoadManager

__all__ = [
    "ChargerSpec",
    "Decision",
    "LoadBalancer",
    "LoadManager",
    "LoadSettings",
    "Mode",
]
