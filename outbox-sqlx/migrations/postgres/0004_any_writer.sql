-- Outbox schema version 4 (PostgreSQL 13+, or 12 with the pgcrypto extension): any client can enqueue with a plain INSERT.
--
--   INSERT INTO {table} (destination, "key", payload) VALUES ('orders', 'order-7', '\x7b7d');
--   INSERT INTO {table} (destination, "key", payload, headers) VALUES (..., '{"trace":"abc"}');
--
-- The database fills in what the writer omits, as `enqueue` writes it: id (a UUID v7),
-- partition (partition_of in outbox-core: FNV-1a of the key's UTF-8 bytes, or of the id's 16
-- bytes when the key is NULL, modulo 64), created_at = available_at = now(), headers '{}',
-- attempts 0, state 0. A writer may still supply any of them (Rust does: all of them).
--
-- Nothing rewrites or scans the table: defaults are catalog changes, and the checks are made
-- by the BEFORE INSERT trigger on new rows only. The trigger runs in full for a row that
-- leaves its partition to the database (or has an explicit NULL to fill); a row that supplies
-- it, as enqueue does after validating the message, is only checked by the trigger's WHEN
-- condition for what would strand it: a partition out of range, an empty destination,
-- headers that do not even begin as a JSON object. No CHECK constraint on purpose: PostgreSQL
-- re-checks every CHECK on every UPDATE, so one old row that fails it (written by a client
-- before this step) would make every claim of its batch fail, for ever; and VALIDATE
-- CONSTRAINT would scan the table under the ACCESS EXCLUSIVE lock this transaction holds.
--
-- Runs in one transaction like every step; every statement is idempotent. gen_random_uuid()
-- is core from PostgreSQL 13 (on 12 it needs `CREATE EXTENSION pgcrypto`).
--
-- The NOTIFY channel is the store's (StoreConfig::channel()) when the migration ran.

-- A UUID v7: 48-bit Unix time in ms, version 7, variant 10, 74 random bits (gen_random_uuid()
-- with its first 6 bytes replaced by the time and its version nibble 0100 turned into 0111).
CREATE OR REPLACE FUNCTION {fn_uuid7}() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $uuid7$
    SELECT encode(set_bit(set_bit(
               overlay(uuid_send(gen_random_uuid())
                       PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                       FROM 1 FOR 6),
               52, 1), 53, 1), 'hex')::uuid
$uuid7$;

-- Fills the omitted columns of a new row and refuses rows no relay could publish. Its
-- search_path is the migration's, so the writer's does not matter. Runs before
-- the NOT NULL checks, so "partition" stays NOT NULL without a default: were this trigger
-- missing, a plain INSERT would fail rather than write a row no relay claims.
CREATE OR REPLACE FUNCTION {fn_fill}() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fill$
DECLARE
    headers JSONB;
    bytes   BYTEA;
    hash    BIGINT := 2166136261;
BEGIN
    IF NEW.destination IS NULL OR NEW.destination = '' THEN
        RAISE EXCEPTION 'outbox %.%: destination must not be empty', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.id IS NULL THEN  -- an explicit NULL; an omitted id has its default already
        NEW.id := {fn_uuid7}();
    END IF;
    IF NEW."partition" IS NULL THEN
        -- partition_of: FNV-1a 32-bit over the key's UTF-8 bytes ('' hashes no bytes), or over
        -- the id's 16 bytes when the key is NULL, modulo 64. `#` is XOR; the product < 2^57.
        bytes := CASE WHEN NEW."key" IS NULL THEN uuid_send(NEW.id) ELSE convert_to(NEW."key", 'UTF8') END;
        FOR i IN 0 .. length(bytes) - 1 LOOP
            hash := ((hash # get_byte(bytes, i)) * 16777619) & 4294967295;
        END LOOP;
        NEW."partition" := hash % 64;
    ELSIF NEW."partition" NOT BETWEEN 0 AND 63 THEN
        RAISE EXCEPTION 'outbox %.%: partition % is not between 0 and 63 (omit it: the database computes it from the key)',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, NEW."partition"
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.headers IS NULL THEN
        NEW.headers := '{}';
    ELSIF NEW.headers <> '{}' THEN
        -- Text that is not JSON fails here with "invalid input syntax for type json".
        headers := NEW.headers::jsonb;
        IF jsonb_typeof(headers) <> 'object' THEN
            RAISE EXCEPTION 'outbox %.%: headers must be a JSON object of strings, not a JSON %',
                TG_TABLE_SCHEMA, TG_TABLE_NAME, jsonb_typeof(headers)
                USING ERRCODE = 'check_violation';
        END IF;
        IF EXISTS (SELECT 1 FROM jsonb_each(headers) h WHERE jsonb_typeof(h.value) <> 'string') THEN
            RAISE EXCEPTION 'outbox %.%: header values must be JSON strings', TG_TABLE_SCHEMA, TG_TABLE_NAME
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    NEW.created_at := COALESCE(NEW.created_at, now());
    NEW.available_at := COALESCE(NEW.available_at, NEW.created_at);
    NEW.attempts := COALESCE(NEW.attempts, 0);
    NEW.state := COALESCE(NEW.state, 0);
    RETURN NEW;
END
$fill$;

-- Defaults: catalog only, no rewrite. (The trigger also covers explicit NULLs.)
ALTER TABLE {table}
    ALTER COLUMN id SET DEFAULT {fn_uuid7}(),
    ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN available_at SET DEFAULT now(),
    ALTER COLUMN headers SET DEFAULT '{}';

DROP TRIGGER IF EXISTS {trg_fill} ON {table};
CREATE TRIGGER {trg_fill} BEFORE INSERT ON {table}
    FOR EACH ROW
    WHEN (NEW."partition" IS NULL OR NEW."partition" NOT BETWEEN 0 AND 63
          OR NEW.id IS NULL OR NEW.destination IS NULL OR NEW.destination = ''
          OR NEW.headers IS NULL OR left(NEW.headers, 1) <> '{'
          OR NEW.created_at IS NULL OR NEW.available_at IS NULL)
    EXECUTE FUNCTION {fn_fill}();

-- Wakes listening relays when the inserting transaction commits, as enqueue's own
-- pg_notify does: once per INSERT statement (PostgreSQL folds the duplicates of one
-- transaction into one notification, so enqueue's pg_notify on top costs nothing more).
CREATE OR REPLACE FUNCTION {fn_notify}() RETURNS trigger
LANGUAGE plpgsql
AS $notify$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$notify$;

DROP TRIGGER IF EXISTS {trg_notify} ON {table};
CREATE TRIGGER {trg_notify} AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {fn_notify}({channel});
