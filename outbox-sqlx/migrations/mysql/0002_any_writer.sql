-- Outbox schema version 2 (MySQL 8.0.1+, MariaDB 10.6+): any client can enqueue with a plain
-- INSERT.
--
--   INSERT INTO {table} (destination, `key`, payload) VALUES ('orders', 'order-7', 'hello');
--   INSERT INTO {table} (destination, `key`, payload, headers) VALUES (..., '{"trace":"abc"}');
--
-- A BEFORE INSERT trigger fills in what the writer omits, as `enqueue` writes it: id (a UUID
-- v7, 16 bytes big-endian), partition (partition_of in outbox-core: FNV-1a of the key's UTF-8
-- bytes, or of the id's 16 bytes when the key is NULL, modulo 64), created_at = available_at
-- = UTC_TIMESTAMP(6) (UTC whatever the session time_zone), headers '{}'; attempts and state
-- keep their DEFAULT 0. A writer may still supply any of them (Rust does: all of them).
--
-- The columns keep NOT NULL without a default: the trigger runs before the NOT NULL checks
-- (MariaDB, strict mode: an omitted column is NULL in NEW), and were it missing a plain INSERT
-- fails ("Field 'partition' doesn't have a default value") instead of writing a row no relay
-- claims.
--
-- No table copy: the checks are made in the trigger (SIGNAL) because ALTER TABLE ... ADD
-- CONSTRAINT ... CHECK copies the table (ALGORITHM=COPY only, on MariaDB 10.11), and a CHECK
-- would be re-checked on every UPDATE of an old row (a claim) too.
--
-- MySQL commits DDL statement by statement: each statement is idempotent by itself. Between
-- the DROP and the CREATE (one step, milliseconds) a plain INSERT fails as above; an INSERT
-- that supplies every column (Rust's enqueue) is not affected. With binary logging on,
-- CREATE TRIGGER needs SUPER or log_bin_trust_function_creators = 1 (error 1419 otherwise);
-- UUID() and RAND() make the trigger unsafe for statement-based logging: MIXED or ROW
-- logging writes these INSERTs as rows.
--
-- The trigger does its work for a row that leaves its partition to the database (or another
-- column); a row that supplies every column, as enqueue does after validating the message,
-- is only checked for what would strand it: a partition out of range, an empty destination,
-- headers that do not even begin as a JSON object.

DROP TRIGGER IF EXISTS {trg_fill};

CREATE TRIGGER {trg_fill} BEFORE INSERT ON {table} FOR EACH ROW
BEGIN
    DECLARE bytes VARBINARY(4096);
    DECLARE hash BIGINT UNSIGNED DEFAULT 2166136261;
    DECLARE i INT DEFAULT 0;
    DECLARE n INT;
    DECLARE r CHAR(32);
    DECLARE msg VARCHAR(512);
    DECLARE vals LONGTEXT;
    IF NEW.`partition` IS NULL OR NEW.`partition` NOT BETWEEN 0 AND 63 OR NEW.id IS NULL
       OR NEW.destination IS NULL OR LENGTH(NEW.destination) = 0
       OR NEW.headers IS NULL OR LEFT(NEW.headers, 1) <> '{'
       OR NEW.created_at IS NULL OR NEW.available_at IS NULL THEN
        -- LENGTH, not = '': utf8mb4_bin pads, so ' ' = '' is true, and Rust accepts ' '.
        IF NEW.destination IS NULL OR LENGTH(NEW.destination) = 0 THEN
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'outbox: destination must not be empty';
        END IF;
        IF NEW.id IS NULL THEN
            -- 48-bit Unix time in ms, version 7, variant 10, 74 bits of MD5(UUID(), RAND()):
            -- UUID() never repeats on a server, and RANDOM_BYTES() is missing before MariaDB 10.10.
            SET r = MD5(CONCAT(UUID(), RAND(), CONNECTION_ID()));
            SET NEW.id = UNHEX(CONCAT(
                LPAD(HEX(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000), 12, '0'),
                '7', SUBSTRING(r, 1, 3),
                HEX(8 | (CONV(SUBSTRING(r, 4, 1), 16, 10) & 3)), SUBSTRING(r, 5, 15)));
        END IF;
        IF NEW.`partition` IS NULL THEN
            -- partition_of: FNV-1a 32-bit; the product stays below 2^57.
            SET bytes = IF(NEW.`key` IS NULL, NEW.id, CAST(NEW.`key` AS BINARY));
            SET n = LENGTH(bytes);
            WHILE i < n DO
                SET i = i + 1;
                SET hash = ((hash ^ ORD(SUBSTRING(bytes, i, 1))) * 16777619) & 4294967295;
            END WHILE;
            SET NEW.`partition` = hash % 64;
        ELSEIF NEW.`partition` NOT BETWEEN 0 AND 63 THEN
            SET msg = CONCAT('outbox: partition ', NEW.`partition`,
                             ' is not between 0 and 63 (omit it: the database computes it from the key)');
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = msg;
        END IF;
        IF NEW.headers IS NULL THEN
            SET NEW.headers = '{}';
        ELSEIF NEW.headers <> '{}' THEN
            IF NOT JSON_VALID(NEW.headers) THEN
                SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'outbox: headers are not valid JSON';
            END IF;
            IF JSON_TYPE(NEW.headers) <> 'OBJECT' THEN
                SET msg = CONCAT('outbox: headers must be a JSON object of strings, not a JSON ',
                                 LOWER(JSON_TYPE(NEW.headers)));
                SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = msg;
            END IF;
            SET vals = JSON_EXTRACT(NEW.headers, '$.*'), i = 0, n = COALESCE(JSON_LENGTH(vals), 0);
            WHILE i < n DO
                IF JSON_TYPE(JSON_EXTRACT(vals, CONCAT('$[', i, ']'))) <> 'STRING' THEN
                    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'outbox: header values must be JSON strings';
                END IF;
                SET i = i + 1;
            END WHILE;
        END IF;
        IF NEW.created_at IS NULL THEN
            SET NEW.created_at = UTC_TIMESTAMP(6);
        END IF;
        IF NEW.available_at IS NULL THEN
            SET NEW.available_at = NEW.created_at;
        END IF;
        SET NEW.attempts = COALESCE(NEW.attempts, 0), NEW.state = COALESCE(NEW.state, 0);
    END IF;
END;
