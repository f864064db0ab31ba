"""The durable local buffer: one SQLite file in WAL mode, reached through aiosqlite.

What it promises (CONTRACT section 5): a finished session, once ``finish_session`` returned, is
never lost or changed, whatever happens to the process, the broker, the power or the disk.
Readings are the only thing that gives way: pruned by age, by the size cap (oldest synced first,
then oldest unsynced) and dropped while the disk is full.

The ``Store`` is made of parts, one module each, over one aiosqlite connection (``StoreCore``),
beside which buffering readings writes, and the uplink reads, on connections of their own on the
event loop's thread (``StoreCore._write_now``, ``StoreCore._read_now``):

- gateway/store/core.py: opening (checks, migration, salvage of a damaged file), closing, the
  shielded transactions and the uplink's read-only connection;
- gateway/store/space.py: the size cap, pruning, the disk-full reserve and the durable write
  that makes room and retries;
- gateway/store/sessions.py: open sessions and their energy curves, the sealed finished records;
- gateway/store/outbox.py: messages waiting for a PUBACK (which ones: gateway/outgoing.py);
- gateway/store/readings.py: buffered readings in their wire form;
- gateway/store/state.py: auth state, key-values, command request ids and replies.
"""

from __future__ import annotations

from gateway.store.outbox import OutboxTable
from gateway.store.readings import ReadingsTable
from gateway.store.sessions import SessionTables
from gateway.store.state import SmallState

__all__ = ["Store"]


class Store(SessionTables, OutboxTable, ReadingsTable, SmallState):
    """The gateway's SQLite buffer. Implements ``SessionStore``, ``UplinkStore`` and ``AuthStore``
    of gateway.ports. Open with ``await Store.open(path, site_id=...)`` or
    ``async with Store.open(path, site_id=...) as store``."""
