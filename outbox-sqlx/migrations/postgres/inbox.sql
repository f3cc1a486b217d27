-- Inbox table (PostgreSQL 12+): one row per message a consumer received. Placeholders are
-- replaced with quoted, validated names by `PostgresInbox::migrate`; every statement is
-- idempotent.

CREATE TABLE IF NOT EXISTS {table} (
    consumer    TEXT NOT NULL,
    message_id  UUID NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, message_id)
);

-- The retention purge deletes the oldest records first.
CREATE INDEX IF NOT EXISTS {ix_received} ON {table} (received_at);
