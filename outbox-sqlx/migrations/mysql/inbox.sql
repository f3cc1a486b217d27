-- Inbox table (MySQL 8.0.1+, MariaDB 10.6+): one row per message a consumer received.
-- Placeholders are replaced with quoted, validated names by `MySqlInbox::migrate`. The index
-- is declared inside CREATE TABLE because MySQL has no CREATE INDEX IF NOT EXISTS.
-- utf8mb4_bin: consumer names compare byte for byte.

CREATE TABLE IF NOT EXISTS {table} (
    consumer    VARCHAR(255) NOT NULL,
    message_id  BINARY(16) NOT NULL,
    received_at DATETIME(6) NOT NULL,
    PRIMARY KEY (consumer, message_id),
    KEY {ix_received} (received_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
