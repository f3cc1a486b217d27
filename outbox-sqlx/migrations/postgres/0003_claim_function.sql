-- Outbox schema version 3 (PostgreSQL 12+): a claim is one call.
--
-- A claim used to be a transaction of four round trips: BEGIN with its settings, the partition
-- lock, the claim statement, COMMIT. This function does all of it in the one call
-- `SELECT ... FROM {claim}(relay, batch, token, lease_us)`, run in its own implicit transaction,
-- and a statement of a VOLATILE function takes a fresh snapshot: the claim statement still
-- reads every lease committed before the partition lock was granted. A failure (a deadlock
-- while relays rebalance, a lock timeout) rolls the call back and leaves the connection idle.
--
-- Settings, for the call only:
-- - jit off: the planner's estimate can exceed jit_above_cost on a large table, and compiling
--   takes hundreds of milliseconds for a statement that runs in one or two;
-- - enable_seqscan and enable_sort off: the one good plan reads the pending index in enqueue
--   order and stops after the batch; on a table written faster than it is analyzed the planner
--   would otherwise sort the whole backlog;
-- - synchronous_commit off, for the calling transaction: a lease lost in a database crash
--   leaves its messages pending, published again (a duplicate), never lost.
CREATE OR REPLACE FUNCTION {claim}(p_relay TEXT, p_batch BIGINT, p_token UUID, p_lease_us BIGINT)
RETURNS TABLE (seq BIGINT, id UUID, destination TEXT, "key" TEXT, payload BYTEA, headers TEXT,
               created_at TIMESTAMPTZ, attempts INTEGER, last_error TEXT)
LANGUAGE plpgsql VOLATILE
SET jit = off SET enable_seqscan = off SET enable_sort = off
AS $claim$
#variable_conflict use_column
DECLARE
    owned SMALLINT[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- The partitions this relay owns, locked in partition order. A relay taking one over
    -- (FOR UPDATE) waits until this call committed, and its own claims then read these
    -- leases. Claims of one relay share the lock and run side by side: each skips the rows the
    -- other has locked, and drops the later messages of their keys (first_left below).
    SELECT array_agg(l."partition") INTO owned
      FROM (SELECT p."partition" FROM {partitions} p
             WHERE p.owner = p_relay AND p.expires_at > now()
             ORDER BY p."partition" FOR SHARE) l;
    IF owned IS NULL OR p_batch <= 0 THEN
        RETURN;
    END IF;
    -- claimable locks the next rows in enqueue order, each with the first pending message of
    -- its key (f, one step into the key index), which must be neither leased nor waiting for a
    -- retry. kept drops the rows with an earlier pending message of their key outside
    -- claimable: a row some other transaction held locked, which SKIP LOCKED passed over
    -- although it is not leased, or a held row behind a free first one. A key whose claimed
    -- rows are exactly its first pending messages is checked by a count over the key index up
    -- to its last claimed row; a single claimed row, by its first_seq alone (most keys of most
    -- batches: no lookup at all). Only a key that fails its check has first_left walk its
    -- messages in order for the first one not claimed: linear in the batch, whatever the key's
    -- backlog. The lease update finds the claimed rows by ctid and writes heap-only tuples.
    RETURN QUERY
    WITH claimable AS (
        SELECT o.ctid AS row_id, o.seq, o."key", f.seq AS first_seq
          FROM {table} o
          LEFT JOIN LATERAL (SELECT e.seq, e.available_at, e.lease_until FROM {table} e
                              WHERE e."key" = o."key" AND e.state = 0
                              ORDER BY e.seq LIMIT 1) f ON true
         WHERE o.state = 0 AND o."partition" = ANY (owned)
           AND o.available_at <= now()
           AND (o.lease_until IS NULL OR o.lease_until <= now())
           AND (o."key" IS NULL OR (f.available_at <= now()
                                    AND (f.lease_until IS NULL OR f.lease_until <= now())))
         ORDER BY o.seq LIMIT p_batch
           FOR UPDATE OF o SKIP LOCKED),
    per_key AS MATERIALIZED (
        SELECT c."key", MIN(c.seq) AS lo, MAX(c.seq) AS hi, COUNT(*) AS n,
               MIN(c.first_seq) AS first_seq
          FROM claimable c WHERE c."key" IS NOT NULL GROUP BY c."key"),
    first_left AS MATERIALIZED (
        SELECT p."key",
               (SELECT e.seq FROM {table} e
                 WHERE e."key" = p."key" AND e.state = 0
                   AND e.seq NOT IN (SELECT c.seq FROM claimable c)
                 ORDER BY e.seq LIMIT 1) AS seq
          FROM per_key p
         WHERE p.lo IS DISTINCT FROM p.first_seq
            OR (p.n > 1 AND (SELECT COUNT(*) FROM {table} e
                              WHERE e."key" = p."key" AND e.state = 0 AND e.seq <= p.hi) <> p.n)),
    kept AS (
        SELECT c.row_id FROM claimable c LEFT JOIN first_left f ON f."key" = c."key"
         WHERE f.seq IS NULL OR c.seq < f.seq)
    UPDATE {table} u
       SET lease_token = p_token, lease_until = now() + p_lease_us * interval '1 microsecond'
      FROM kept WHERE u.ctid = kept.row_id
    RETURNING u.seq, u.id, u.destination, u."key", u.payload, u.headers, u.created_at,
              u.attempts, u.last_error;
END
$claim$;
