-- Outbox schema version 1 (PostgreSQL 12+).
--
-- Placeholders are replaced with quoted, validated names by `PostgresStore::migrate`.
-- Every statement is idempotent, and the whole migration runs in one transaction.

CREATE TABLE IF NOT EXISTS {table} (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- enqueue order
    id           UUID NOT NULL,
    "partition"  SMALLINT NOT NULL,                                 -- NewMessage::partition()
    destination  TEXT NOT NULL,
    "key"        TEXT,
    payload      BYTEA NOT NULL,
    headers      TEXT NOT NULL,      -- JSON, as text: a damaged row must still be readable
    created_at   TIMESTAMPTZ NOT NULL,
    available_at TIMESTAMPTZ NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    state        SMALLINT NOT NULL DEFAULT 0,  -- 0 pending, 1 dead, 2 published (retained)
    lease_token  UUID,
    lease_until  TIMESTAMPTZ,
    dead_at      TIMESTAMPTZ,
    published_at TIMESTAMPTZ
);

CREATE UNIQUE INDEX IF NOT EXISTS {ix_id} ON {table} (id);

-- Partial indexes hold pending rows only: claims scan them in enqueue order and look up
-- earlier messages of a key without ever touching the dead and retained rows, however many.
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
    "partition" SMALLINT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE IF NOT EXISTS {relays} (
    relay      TEXT PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
