"""The buffer's schema as a numbered list of migrations.

Migration N brings a database from version N-1 to N. Each is applied in one transaction together
with its row in ``schema_version``, so a crash mid-upgrade leaves the previous version intact. Only
ever append to ``MIGRATIONS``: a released migration never changes.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

_V1 = (
    # A session that is still running: the session logic's own state, replaced on each transition.
    """CREATE TABLE open_sessions (
        session_id TEXT PRIMARY KEY,
        charger_id TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_ts REAL NOT NULL
    )""",
    # The energy curve of an open session, for pricing; deleted when the session is finished.
    """CREATE TABLE session_points (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        ts REAL NOT NULL,
        energy_wh INTEGER NOT NULL,
        charging INTEGER NOT NULL,
        power_w REAL NOT NULL
    )""",
    "CREATE INDEX session_points_by_session ON session_points(session_id, ts)",
    # Sealed records. Never deleted, never updated except synced_at.
    """CREATE TABLE finished_sessions (
        site_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        session_id TEXT NOT NULL UNIQUE,
        charger_id TEXT,
        user_id TEXT,
        started_ts REAL,
        ended_ts REAL,
        energy_wh INTEGER,
        record TEXT NOT NULL,
        hash TEXT NOT NULL,
        outbox_id INTEGER,
        finished_ts REAL NOT NULL,
        synced_at REAL,
        PRIMARY KEY (site_id, seq)
    )""",
    "CREATE INDEX finished_by_start ON finished_sessions(started_ts)",
    "CREATE INDEX finished_by_outbox ON finished_sessions(outbox_id)",
    "CREATE INDEX finished_unsynced ON finished_sessions(seq) WHERE synced_at IS NULL",
    # AUTOINCREMENT: ids are never reused after deletes, so an uplink cursor (after_id) stays valid.
    """CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        created_ts REAL NOT NULL
    )""",
    "CREATE INDEX outbox_by_stream ON outbox(stream, id)",
    """CREATE TABLE readings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        ts REAL NOT NULL,
        data TEXT NOT NULL,
        synced INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX readings_by_ts ON readings(ts)",
    "CREATE INDEX readings_unsynced ON readings(id) WHERE synced = 0",
    """CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_ts REAL NOT NULL
    )""",
    """CREATE TABLE request_ids (
        request_id TEXT PRIMARY KEY,
        seen_ts REAL NOT NULL
    )""",
    "CREATE INDEX request_ids_by_ts ON request_ids(seen_ts)",
    """CREATE TABLE auth_cache (
        token_id TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        cached_at REAL NOT NULL
    )""",
)

_V2 = (
    # Readings in their wire form (gateway/wire.py), encoded once when buffered and spliced into
    # batches by the uplink. ``data`` stays for rows written before; new rows leave it empty.
    "ALTER TABLE readings ADD COLUMN wire BLOB",
    # Retention deletes by id range (ids follow time), so the time index only cost inserts.
    "DROP INDEX readings_by_ts",
)

_V3 = (
    # Cloud commands: the reply sent for each request id (NULL while it runs, or when a signed
    # command's id is spent before it runs), so a repeated id gets the first answer even after a
    # restart. The replies older versions kept in kv (the last 256) move here.
    "ALTER TABLE request_ids ADD COLUMN reply TEXT",
    # Anything else under that key (not a list of [id, reply] pairs) is dropped: CASE keeps
    # json_type() away from text that is no JSON.
    """INSERT OR IGNORE INTO request_ids (request_id, seen_ts, reply)
        SELECT json_extract(e.value, '$[0]'), kv.updated_ts, json_extract(e.value, '$[1]')
        FROM kv, json_each(
            CASE WHEN json_valid(kv.value) AND json_type(kv.value) = 'array'
                 THEN kv.value ELSE '[]' END) AS e
        WHERE kv.key = 'uplink.applied_requests'
          AND CASE WHEN e.type = 'array'
                   THEN json_type(e.value, '$[0]') = 'text'
                        AND json_type(e.value, '$[1]') = 'object'
                   ELSE 0 END""",
    "DELETE FROM kv WHERE key = 'uplink.applied_requests'",
)

_V4 = (
    # Readings not yet delivered, by id. Marking a delivered batch is a ranged delete of narrow
    # rows here, instead of rewriting every ~400-byte reading row (and its partial index) to flip
    # a flag: that write cost as much as publishing. ``readings.synced`` is neither written nor
    # read from this version on.
    "CREATE TABLE readings_pending (id INTEGER PRIMARY KEY)",
    "INSERT INTO readings_pending (id) SELECT id FROM readings WHERE synced = 0",
    "DROP INDEX readings_unsynced",
    # Pruning deletes readings (rarely, in bulk); their pending marks go with them.
    """CREATE TRIGGER readings_pending_gone AFTER DELETE ON readings BEGIN
        DELETE FROM readings_pending WHERE id = old.id;
    END""",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4)
"""MIGRATIONS[i] holds the statements that bring the schema to version i + 1."""

SCHEMA_VERSION = len(MIGRATIONS)
