-- Outbox schema version 1 (MySQL 8.0.1+, MariaDB 10.6+).
--
-- Placeholders are replaced with quoted, validated names by `MySqlStore::migrate`. MySQL
-- commits each DDL statement on its own, so every statement is idempotent by itself; the
-- indexes are declared inside CREATE TABLE because MySQL has no CREATE INDEX IF NOT EXISTS.
--
-- MySQL has no partial indexes: the state leads the claim indexes instead, so that a claim
-- ranges over the pending rows only, however many dead and retained rows there are.
-- utf8mb4_bin: keys and destinations compare byte for byte, as everywhere else.

CREATE TABLE IF NOT EXISTS {table} (
    seq          BIGINT NOT NULL AUTO_INCREMENT,
    id           BINARY(16) NOT NULL,
    `partition`  SMALLINT NOT NULL,
    destination  VARCHAR(1024) NOT NULL,
    `key`        VARCHAR(512) NULL,
    payload      LONGBLOB NOT NULL,
    headers      MEDIUMTEXT NOT NULL,
    created_at   DATETIME(6) NOT NULL,
    available_at DATETIME(6) NOT NULL,
    attempts     INT NOT NULL DEFAULT 0,
    last_error   MEDIUMTEXT NULL,
    state        TINYINT NOT NULL DEFAULT 0,
    lease_token  BINARY(16) NULL,
    lease_until  DATETIME(6) NULL,
    dead_at      DATETIME(6) NULL,
    published_at DATETIME(6) NULL,
    -- Can hold back later messages of its key: leased, or pushed into the future by a retry
    -- (enqueue writes available_at = created_at, and it only moves forward). MySQL has no
    -- partial indexes, so this column leads the per-key check to those few rows.
    held         TINYINT AS (lease_until IS NOT NULL OR available_at > created_at) STORED,
    PRIMARY KEY (seq),
    UNIQUE KEY {ix_id} (id),
    KEY {ix_pend} (state, seq),
    KEY {ix_pend_key} (`key`, state, seq),
    KEY {ix_held} (`key`, state, held, seq),
    KEY {ix_dead} (state, dead_at),
    KEY {ix_pub} (state, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS {partitions} (
    `partition` SMALLINT NOT NULL,
    owner       VARCHAR(255) NOT NULL,
    expires_at  DATETIME(6) NOT NULL,
    PRIMARY KEY (`partition`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS {relays} (
    relay      VARCHAR(255) NOT NULL,
    expires_at DATETIME(6) NOT NULL,
    PRIMARY KEY (relay)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
