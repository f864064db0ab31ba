"""The consumer store's tables, written once for SQLite and PostgreSQL, and the upgrades of
tables an earlier version made (run at every open; each is idempotent)."""

from __future__ import annotations

__all__ = ["ADDED_COLUMNS", "MIGRATION_LOCK", "SCHEMA", "UNTRUSTED_SESSIONS"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT PRIMARY KEY,
        site_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        user_id TEXT,
        charger_id TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        started_ts DOUBLE PRECISION NOT NULL,
        energy_wh BIGINT NOT NULL,
        currency TEXT,
        incl_vat TEXT,
        hash TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        signature_ok BOOLEAN,
        record TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_site_seq ON sessions (site_id, seq)",
    "CREATE INDEX IF NOT EXISTS sessions_user_start ON sessions (user_id, started_ts)",
    # finds (in no time: none) what an earlier version stored unverified, at every open
    "CREATE INDEX IF NOT EXISTS sessions_untrusted ON sessions (session_id) "
    "WHERE signature_ok IS NOT TRUE",
    """CREATE TABLE IF NOT EXISTS site_keys (
        site_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        alg TEXT NOT NULL,
        public_key_pem TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (site_id, key_id)
    )""",
    """CREATE TABLE IF NOT EXISTS chain_problems (
        site_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        seq BIGINT,
        session_id TEXT,
        detail TEXT NOT NULL,
        found_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS quarantine (
        qid TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload TEXT NOT NULL,
        site_id TEXT,
        session_id TEXT,
        seq TEXT,
        user_id TEXT,
        started_ts DOUBLE PRECISION,
        received_at DOUBLE PRECISION NOT NULL,
        released_at DOUBLE PRECISION,
        resolution TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS quarantine_site ON quarantine (site_id, kind)",
    "CREATE INDEX IF NOT EXISTS quarantine_user_start ON quarantine (user_id, started_ts)",
)
# Columns added to tables of earlier versions: (table, column, definition).
ADDED_COLUMNS = (
    ("site_keys", "status", "TEXT NOT NULL DEFAULT 'active'"),
    ("site_keys", "source", "TEXT NOT NULL DEFAULT 'legacy'"),
    ("site_keys", "note", "TEXT"),
)
# Sessions an earlier version stored without a verified signature: moved to quarantine.
UNTRUSTED_SESSIONS = (
    "INSERT INTO quarantine (qid, kind, reason, topic, payload, site_id, session_id, seq, "
    "user_id, started_ts, received_at) SELECT 'legacy-' || session_id, "
    "CASE WHEN signature_ok IS NULL THEN 'no_key' ELSE 'bad_signature' END, "
    "CASE WHEN signature_ok IS NULL THEN 'stored by an earlier version before any key of the "
    "site was known: not verified' ELSE 'signature does not verify (stored by an earlier "
    "version)' END, "
    "'legacy', record, site_id, session_id, CAST(seq AS TEXT), user_id, started_ts, received_at "
    "FROM sessions WHERE signature_ok IS NOT TRUE "
    "ON CONFLICT (qid) DO NOTHING",
    "DELETE FROM sessions WHERE signature_ok IS NOT TRUE",
)

MIGRATION_LOCK = 0x65766777  # "evgw": pg_advisory_xact_lock key of the table set-up
