-- Outbox schema version 2 (SQLite 3.35+, with its JSON functions): any client can enqueue
-- with a plain INSERT. The triggers run in the writer's SQLite library, which may be older
-- than the store's: they use nothing newer than 3.35 (the MATERIALIZED hint).
--
--   INSERT INTO {table} (destination, "key", payload) VALUES ('orders', 'order-7', x'7b7d');
--   INSERT INTO {table} (destination, "key", payload, headers) VALUES (..., '{"trace":"abc"}');
--
-- Without rebuilding the table. SQLite cannot add a default to a column in place (short of
-- editing sqlite_schema under writable_schema), and a BEFORE trigger cannot change NEW. But a
-- BEFORE trigger runs before the NOT NULL checks, and may insert the completed row itself and
-- then drop the original one with RAISE(IGNORE) (which skips that row only, not the rest of a
-- multi-row INSERT). The completed row gets what `enqueue` writes: id 16 random bytes,
-- partition = partition_of in outbox-core (FNV-1a of the key's UTF-8 bytes, or of the id's 16
-- bytes when the key is NULL, modulo 64; SQLite has no XOR: (a | b) - (a & b)), created_at =
-- available_at = now in microseconds (the store's NOW expression: milliseconds * 1000),
-- headers '{}', attempts 0, state 0.
--
-- The price of the re-insert, for the INSERTs that omit a column only: the statement reports
-- 0 rows changed (changes(), rowcount, sqlx's rows_affected), RETURNING returns no row and
-- last_insert_rowid() is not the new row's seq. Rows that supply every column (Rust's enqueue)
-- are inserted as before. The database must be in UTF-8 (the default; CAST(key AS BLOB) gives
-- the bytes of the database encoding).
--
-- Without the trigger (were it dropped) a plain INSERT fails on NOT NULL, so no row is ever
-- written without its partition.
--
-- Runs in one transaction like every step; every statement is idempotent.

-- Refuses rows no relay could publish, the completed ones included (it fires for the re-insert
-- too). RAISE takes a literal message only.
DROP TRIGGER IF EXISTS {trg_check};
CREATE TRIGGER {trg_check} BEFORE INSERT ON {table}
BEGIN
    SELECT RAISE(ABORT, 'outbox: destination must not be empty')
     WHERE NEW.destination IS NULL OR NEW.destination = '';
    SELECT RAISE(ABORT, 'outbox: partition must be an integer between 0 and 63 (omit it: the database computes it from the key)')
     WHERE NEW."partition" IS NOT NULL
       AND (typeof(NEW."partition") <> 'integer' OR NEW."partition" NOT BETWEEN 0 AND 63);
    SELECT RAISE(ABORT, 'outbox: headers must be a JSON object of strings')
     WHERE NEW.headers IS NOT NULL AND NEW.headers <> '{}'
       AND (NOT json_valid(NEW.headers) OR json_type(NEW.headers) <> 'object'
            OR EXISTS (SELECT 1 FROM json_each(NEW.headers) h WHERE h.type <> 'text'));
END;

-- Completes the rows that omit a column: inserts the completed row, then drops this one.
DROP TRIGGER IF EXISTS {trg_fill};
CREATE TRIGGER {trg_fill} BEFORE INSERT ON {table}
WHEN NEW.id IS NULL OR NEW."partition" IS NULL OR NEW.headers IS NULL
  OR NEW.created_at IS NULL OR NEW.available_at IS NULL
BEGIN
    INSERT INTO {table} (id, "partition", destination, "key", payload, headers, created_at,
                         available_at, attempts, last_error, state, lease_token, lease_until,
                         dead_at, published_at)
    SELECT v.id,
           COALESCE(NEW."partition", (
               WITH RECURSIVE fnv(i, hash, hx) AS (
                   SELECT 0, 2166136261, hex(COALESCE(CAST(NEW."key" AS BLOB), v.id))
                   UNION ALL
                   SELECT i + 1,
                          (((hash | (instr('0123456789ABCDEF', substr(hx, 2 * i + 1, 1)) * 16
                                     + instr('0123456789ABCDEF', substr(hx, 2 * i + 2, 1)) - 17))
                            - (hash & (instr('0123456789ABCDEF', substr(hx, 2 * i + 1, 1)) * 16
                                       + instr('0123456789ABCDEF', substr(hx, 2 * i + 2, 1)) - 17)))
                           * 16777619) % 4294967296,
                          hx
                     FROM fnv WHERE i < length(hx) / 2)
               SELECT hash % 64 FROM fnv ORDER BY i DESC LIMIT 1)),
           NEW.destination, NEW."key", NEW.payload, COALESCE(NEW.headers, '{}'),
           COALESCE(NEW.created_at, v.now), COALESCE(NEW.available_at, NEW.created_at, v.now),
           COALESCE(NEW.attempts, 0), NEW.last_error, COALESCE(NEW.state, 0), NEW.lease_token,
           NEW.lease_until, NEW.dead_at, NEW.published_at
      -- MATERIALIZED: the id is made once; a flattened subquery would repeat randomblob()
      -- wherever v.id appears, and hash another id than the one stored.
      FROM (WITH v AS MATERIALIZED (
                -- 16 random bytes: SQL cannot set a UUID's version bits in a blob before
                -- SQLite 3.41 (unhex); the store's now (SqliteStore's NOW).
                SELECT COALESCE(NEW.id, randomblob(16)) AS id,
                       CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000
                           AS now)
            SELECT id, now FROM v) v;
    SELECT RAISE(IGNORE);
END;
