"""Turning device samples into billable sessions.

``SessionTracker`` is pure logic: it is fed samples, authorization results and commands, with
the time carried by the samples (or passed in), and returns *effects* (persist, start, finish,
ask for authorization, enable/disable a charger, publish a status, add a curve point). It never
awaits. ``SessionManager`` performs those effects through the ``gateway.ports`` Protocols, so
neither imports SQLite, MQTT or Modbus code.

Rules (one connector per charger device):

* A session starts when an EV is plugged in *and* the connector is authorized, in either order:
  a tag shown by the charger and accepted by the ``Authorizer`` (tag before or after plug-in),
  or a remote start by the app. An authorization made before plug-in waits ``plug_timeout_s``.
  A charger that delivers energy without any authorization (it authorizes by itself, or shows
  no tag) gets a session with ``user.id`` null, ``user.auth`` "local" and the flag
  ``unidentified``; a tag accepted later identifies that same session.
* Its start time and start reading are taken at the later of plug-in and the beginning of the
  authorization (a self-authorizing charger may start charging while the cloud answers). A tag
  is shown at some moment between two polls: when the poll that first shows it also shows
  energy counted since the poll before, the start is that earlier poll (or the plug-in, when
  no poll came in between), never the reading taken together with the tag. Likewise a plug-in
  first seen by a poll that shows energy already: the start reading is the previous poll's
  (or zero on a session counter that visibly restarted at the plug-in).
* It ends at unplug (``ev_disconnected``), remote stop (``remote``), deauthorization
  (``deauthorized``, after a token list change blocks its token), a different tag on the same
  connector (``local``), or a car swap within one poll seen as a drop of the charger's session
  counter that the next sample confirms (``ev_disconnected``; a one-poll glitch is ignored).
  A charger found unplugged after being offline longer than ``grace_s`` (or after a gateway
  restart) ends it at its last seen activity with the flag
  ``end_estimated``.
* Energy comes from one cumulative counter chosen at the start: the charger's ``meter:``
  device, else the charger's ``energy_wh``, else its ``session_energy_wh``. See ``OpenSession.feed``
  for the guards (latched start, resets, rollovers, implausible jumps, gaps).

The package: ``ledger`` (an open session's state, energy bookkeeping and record), ``connector``
(a charger connector's facts and sample reading), ``counters`` (decisions on counter readings:
start readings, swaps), ``tracker`` (the plug/authorization state machine), ``effects`` (what the
tracker returns), ``manager`` (the async side performing them). The effects are the contract
between tracker and manager, not the package's: they are imported from ``gateway.sessions.effects``.
"""

from gateway.sessions.connector import ChargerSpec, Grant, TransactionEnd, TransactionStart
from gateway.sessions.ledger import (
    MAX_COUNTER_WH,
    MAX_SUSPECT_CHAINS,
    Counter,
    OpenSession,
    build_record,
    max_power_w,
)
from gateway.sessions.manager import SessionManager, default_periods
from gateway.sessions.tracker import SessionTracker

__all__ = [
    "MAX_COUNTER_WH",
    "MAX_SUSPECT_CHAINS",
    "ChargerSpec",
    "Counter",
    "Grant",
    "OpenSession",
    "SessionManager",
    "SessionTracker",
    "TransactionEnd",
    "TransactionStart",
    "build_record",
    "default_periods",
    "max_power_w",
]
