-- Outbox schema version 1 (SQLite 3.35+).
--
-- Placeholders are replaced with quoted, validated names by `SqliteStore::migrate`; the
-- migration runs in one transaction. Times are microseconds since the Unix epoch (UTC).
-- AUTOINCREMENT: a sequence number is never reused, even after the newest row is deleted.

CREATE TABLE IF NOT EXISTS {table} (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           BLOB NOT NULL CHECK (length(id) = 16),
    "partition"  INTEGER NOT NULL,
    destination  TEXT NOT NULL,
    "key"        TEXT,
    payload      BLOB NOT NULL,
    headers      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    state        INTEGER NOT NULL DEFAULT 0,
    lease_token  BLOB,
    lease_until  INTEGER,
    dead_at      INTEGER,
    published_at INTEGER
);

CREATE UNIQUE INDEX IF NOT EXISTS {ix_id} ON {table} (id);

-- Partial indexes hold pending rows only, as on PostgreSQL.
CREATE INDEX IF NOT EXISTS {ix_pend} ON {table} (seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS {ix_pend_key} ON {table} ("key", seq) WHERE state = 0 AND "key" IS NOT NULL;
-- The pending rows that can hold back later messages of their key: leased, or pushed into the
-- future by a retry (enqueue writes available_at = created_at, and it only moves forward).
-- Few (the messages in flight or waiting), so the per-key check of a claim stays cheap even
-- when one key has a long backlog.
CREATE INDEX IF NOT EXISTS {ix_held} ON {table} ("key", seq)
    WHERE state = 0 AND "key" IS NOT NULL AND (lease_until IS NOT NULL OR available_at > created_at);
CREATE INDEX IF NOT EXISTS {ix_dead} ON {table} (dead_at) WHERE state = 1;
CREATE INDEX IF NOT EXISTS {ix_pub} ON {table} (published_at) WHERE state = 2;

CREATE TABLE IF NOT EXISTS {partitions} (
    "partition" INTEGER PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS {relays} (
    relay      TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
