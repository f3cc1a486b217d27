-- Inbox table (SQLite 3.35+): one row per message a consumer received; times in microseconds
-- since the Unix epoch. Placeholders are replaced with quoted, validated names by
-- `SqliteInbox::migrate`; every statement is idempotent.

CREATE TABLE IF NOT EXISTS {table} (
    consumer    TEXT NOT NULL,
    message_id  BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);

-- The retention purge deletes the oldest records first.
CREATE INDEX IF NOT EXISTS {ix_received} ON {table} (received_at);
