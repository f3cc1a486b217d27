-- Outbox schema version 6 (PostgreSQL 12+): claims of the rows a log relay hands over.
--
-- A log relay (change data capture) publishes new rows from the write-ahead log and deletes
-- them. What it cannot publish it hands to the table: a failed message gets its attempt and
-- an available_at after its retry delay, a message it hands over untried an available_at of
-- the moment it did, at least a microsecond after created_at. So the rows the table holds as
-- its own are the pending rows with available_at > created_at (those {ix_wait} indexes), which
-- also covers rows written to become available later and replayed dead letters. With
-- p_handed, {fn_take} claims only those. The rest of the claim is version 5's: blockers still
-- looks at every pending row, so a handed row is never taken while an earlier row of its key
-- is pending, the log relay's or not.
--
-- The function gains an argument with a default: relays of the previous release, which call
-- it with five, keep working while relays are upgraded one by one.
DROP FUNCTION IF EXISTS {fn_take}(TEXT, BIGINT, BIGINT, TEXT[], BIGINT[]);

CREATE FUNCTION {fn_take}(p_relay TEXT, p_batch BIGINT, p_lease_us BIGINT,
                          p_keys TEXT[], p_seqs BIGINT[], p_handed BOOLEAN DEFAULT false)
RETURNS TABLE (row_id TEXT, seq BIGINT, id UUID, destination TEXT, "key" TEXT, payload BYTEA,
               headers TEXT, created_at TIMESTAMPTZ, attempts INTEGER, last_error TEXT)
LANGUAGE plpgsql VOLATILE
SET jit = off SET enable_seqscan = off SET enable_sort = off
AS $take$
#variable_conflict use_column
DECLARE
    owned SMALLINT[];
    waiting BOOLEAN;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('idle_in_transaction_session_timeout',
                       GREATEST(p_lease_us / 1000, 1000)::text, true);
    SELECT array_agg(p."partition") INTO owned FROM {partitions} p
     WHERE p.owner = p_relay AND p.expires_at > now();
    IF owned IS NULL OR p_batch <= 0 THEN
        RETURN;
    END IF;
    -- Whether any message waits for a retry now: most claims then skip the per-row check.
    waiting := EXISTS (SELECT 1 FROM {table} w
                        WHERE w.state = 0 AND w."key" IS NOT NULL
                          AND w.available_at > w.created_at AND w.available_at > now());
    RETURN QUERY
    WITH claimable AS (
        SELECT o.ctid AS row_id, o.seq, o.id, o.destination, o."key", o.payload, o.headers,
               o.created_at, o.attempts, o.last_error
          FROM {table} o
         WHERE o.state = 0 AND o."partition" = ANY (owned)
           AND o.available_at <= now()
           AND (NOT p_handed OR o.available_at > o.created_at)
           AND (o.lease_until IS NULL OR o.lease_until <= now())
           AND (o."key" IS NULL
                OR (o."key" NOT IN (SELECT k FROM unnest(p_keys) k)
                    AND (NOT waiting
                         OR NOT EXISTS (SELECT 1 FROM {table} w
                                         WHERE w."key" = o."key" AND w.state = 0
                                           AND w.available_at > w.created_at
                                           AND w.seq < o.seq AND w.available_at > now()))))
           AND (o."key" IS NOT NULL OR o.seq NOT IN (SELECT s FROM unnest(p_seqs) s))
         ORDER BY o.seq LIMIT p_batch
           FOR UPDATE OF o SKIP LOCKED),
    blockers AS MATERIALIZED (
        SELECT b."key", MIN(b.seq) AS seq
          FROM {table} b
         WHERE b.state = 0 AND b."partition" = ANY (owned) AND b."key" IS NOT NULL
           AND b.seq <= (SELECT MAX(c.seq) FROM claimable c)
           AND b.seq NOT IN (SELECT c.seq FROM claimable c)
         GROUP BY b."key")
    SELECT c.row_id::text, c.seq, c.id, c.destination, c."key", c.payload, c.headers,
           c.created_at, c.attempts, c.last_error
      FROM claimable c LEFT JOIN blockers b ON b."key" = c."key"
     WHERE b.seq IS NULL OR c.seq < b.seq;
END
$take$;
