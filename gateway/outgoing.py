"""Every message the gateway sends to the cloud, by class, and the way each one goes.

Only finished sessions, session starts and readings go through SQLite first. The rest is
either a latest value (the broker keeps it; after a restart the gateway sends it again) or part
of a live exchange that has no use once it is late.

============================  ========================================  ====================
class (topic below ``P/S/``)  way                                       when the link is down
============================  ========================================  ====================
finished session records      outbox stream ``session``: written with   waits in the outbox,
(``sessions/finished``)       the sealed record in one FULL-sync        never pruned; sent in
                              transaction (``Store.finish_session``);   ``seq`` order after
                              QoS 1; the row is deleted and the record  reconnect
                              marked ``synced_at`` only on PUBACK
session starts                outbox stream ``event`` (app.py,          waits; pruned with
(``sessions/started``)        ``Store.enqueue``, FULL sync); QoS 1,     the readings'
                              deleted on PUBACK; drained before the     retention if never
                              sessions each round                       delivered
readings                      ``readings`` table (+ ``readings_         waits; pruned by age
(``readings/{device}``)       pending``), batched or folded per         and size cap, dropped
                              ``uplink.readings``; ``uplink.readings_   while the disk is
                              qos`` (0 by default: marked delivered     full (store/space.py)
                              once written to the socket), else on
                              PUBACK
latest values, retained:      kept in memory by the uplink (its         nothing is queued:
``gateway/status`` (will:     ``Drain``), the latest per topic wins;    every one is published
offline), ``gateway/key``,    published now and again after every       again on connect; lost
``chargers/{id}/status``,     reconnect; never buffered (an old status  on restart until
``grid/limit``, Home          is no news)                               produced again (next
Assistant topics                                                        poll, start-up)
command replies               live only: published (QoS 1) when the     dropped and logged
(``commands/{name}/reply``,   command is done; an applied command's     (``command_reply_
``auth/response/reply``)      reply is first saved with its request     dropped_offline``);
                              id (SQLite), so a repeated request id     the cloud retries the
                              gets it again (with a command key:        request id
                              ``replayed``, naming the first outcome)
auth requests                 live only, QoS 1, sent only while         never sent: the
(``auth/request``)            online; no answer within                  ``auth.offline_policy``
                              ``auth.request_timeout`` means offline    decides at once (a
                                                                        driver is waiting)
============================  ========================================  ====================

With ``homeassistant: {broker: local}`` the Home Assistant topics go the same latest-value way
over a connection of their own (gateway/uplink/halink.py).

This module names the outbox streams; the uplink drains them in ``OUTBOX_STREAMS`` order. No
other stream is written and no other is read. No released version wrote another (the
``status`` and ``auth`` streams the drain used to poll were only ever written by a test), so no
buffer holds rows the drain would now leave behind (and prune() would take any such row with
the readings' retention).
"""

from __future__ import annotations

__all__ = ["EVENT_STREAM", "OUTBOX_STREAMS", "SESSION_STREAM", "SESSION_TOPIC", "STARTED_TOPIC"]

SESSION_STREAM = "session"
"""Finished session records: never pruned, marked ``synced_at`` on PUBACK."""
SESSION_TOPIC = "sessions/finished"

EVENT_STREAM = "event"
"""Session starts: small, drained first, pruned with the readings' retention if undelivered."""
STARTED_TOPIC = "sessions/started"

OUTBOX_STREAMS = (EVENT_STREAM, SESSION_STREAM)
"""The outbox streams in the order a drain round reads them."""
