"""Every message the gateway sends to the cloud, by class, and the way each one goes.

Only finished sessions, session starts and readings go through SQLite first. The rest is
either a latest value (the broker keeps it; after a restart the gateway sends it again) or part
of a live exchange that has no use once it is late.

============================  ========================================  ====================
class (topic below ``P/S/``)   way                                       when the link is down
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
latest values, retained:      kept in memory by ``MqttUplink``, the     nothing is queued:
``gateway/status`` (will:     latest per topic wins; published now      every one is published
offline), ``gateway/key``,    and again after every reconnect; never    again on connect; lost
``chargers/{id}/status``,     buffered (an old status is no news)       on restart until
``grid/limit``, Home                                                    produced again (next
Assistant topics                                                        poll, start-up)
command replies               live only: published (QoS 1) when the     dropped and logged
(``commands/{name}/reply``,   command is done; the reply is first       (``command_reply_
``auth/response/reply``)      saved with its request id (SQLite) so     dropped_offline``);
                              a repeated request gets it again          the cloud retries the
                                                                        request id
auth requests                 live only, QoS 1, sent only while         never sent: the
(``auth/request``)            online; no answer within                  ``auth.offline_policy``
                              ``auth.request_timeout`` means offline    decides at once (a
                                                                        driver is waiting)
============================  ========================================  ====================

This module names the outbox streams; the uplink drains them in ``OUTBOX_STREAMS`` order. No
other stream is written: a stream not named here is never read (older versions wrote none).
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
