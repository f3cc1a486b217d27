-- Outbox schema version 5 (PostgreSQL 12+): claims held in a transaction.
--
-- A claim of version 3 writes a lease on every row it takes and commits; the settle then
-- deletes the rows in a second transaction: each message is written three times (row lock,
-- lease, delete). {fn_take} is the claim of a transaction that stays open while its batch is
-- published: it only locks the rows (FOR UPDATE SKIP LOCKED), and the same transaction later
-- deletes the published ones and writes back the failed ones before it commits
-- (PostgresStore::settle). Fencing is the transaction's: a relay that dies, or stays idle in
-- the transaction past its lease, has its transaction rolled back and its rows unlocked,
-- unchanged, for the next claim.
--
-- Per-key order: a row whose key has an earlier pending message that this claim does not
-- take must not be returned. The store passes what its own claims in flight hold (p_keys,
-- the keys of their messages; p_seqs, their keyless rows): those rows, and every later row of
-- those keys, are passed over before any lock is tried, for nothing. A row behind a message
-- waiting for its retry is passed over too, by {ix_wait}, an index of the few rows a retry
-- pushed into the future (enqueue writes available_at = created_at; no claim or lease writes
-- it, so leases stay heap-only updates). What is left is rare: a row held by another relay's
-- transaction (a partition changing hands), or leased by a relay of an earlier release while
-- relays are upgraded one by one (their leases are honoured). blockers finds, in one range
-- scan of the pending rows up to the last one taken, the first pending row of each key that
-- the claim did not take, and the rows of that key after it are dropped from the claim (they
-- stay locked by it until it settles). No per-row lookup of a key's first message.
--
-- Settings: those of {claim} (jit, seqscan and sort off), and for the calling transaction
-- synchronous_commit off (a settle lost in a database crash leaves its messages pending: a
-- duplicate, never a loss) and idle_in_transaction_session_timeout of the lease (at least a
-- second, so that a claim is never ended while its relay still reads the rows): PostgreSQL
-- itself ends a claim whose relay stopped talking to it. The partitions are read without a
-- lock: a relay taking one over meanwhile skips the rows this claim holds, and drops the
-- later messages of their keys.
CREATE INDEX IF NOT EXISTS {ix_wait} ON {table} ("key", seq)
    WHERE state = 0 AND "key" IS NOT NULL AND available_at > created_at;

CREATE OR REPLACE FUNCTION {fn_take}(p_relay TEXT, p_batch BIGINT, p_lease_us BIGINT,
                                     p_keys TEXT[], p_seqs BIGINT[])
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
