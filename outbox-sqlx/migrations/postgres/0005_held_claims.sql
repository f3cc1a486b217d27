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
-- Per-key order still comes from the first pending message of each key (its head). A row
-- locked by another claim in flight is still visible, pending, to every other transaction, so
-- it keeps holding back the later messages of its key as a lease did. A later row is a
-- candidate only when its head is free: the lateral h locks the head (SKIP LOCKED), which a
-- row of the same run takes anyway, and passes over the key when another claim holds it. So a
-- claim does not lock rows it cannot return: they would stay locked, unpublished, for as long
-- as its batch is published. What the candidates still let through (a head freed between the
-- two looks) is dropped by first_left, as in {claim} of version 3, whose statement this is
-- otherwise, without the lease update. Leases written by relays of an earlier release are
-- still honoured, so both kinds of claim can run on one table while relays are upgraded one
-- by one.
--
-- Settings: those of {claim}, and for the calling transaction synchronous_commit off (a
-- settle lost in a database crash leaves its messages pending: a duplicate, never a loss) and
-- idle_in_transaction_session_timeout of the lease (at least a second, so that a claim is
-- never ended while its relay still reads the rows): PostgreSQL itself ends a claim whose
-- relay stopped talking to it. The partitions are read without a lock: a relay taking one over
-- meanwhile skips the rows this claim holds, and the later messages of their keys.
CREATE OR REPLACE FUNCTION {fn_take}(p_relay TEXT, p_batch BIGINT, p_lease_us BIGINT)
RETURNS TABLE (row_id TEXT, seq BIGINT, id UUID, destination TEXT, "key" TEXT, payload BYTEA,
               headers TEXT, created_at TIMESTAMPTZ, attempts INTEGER, last_error TEXT)
LANGUAGE plpgsql VOLATILE
SET jit = off SET enable_seqscan = off SET enable_sort = off
AS $take$
#variable_conflict use_column
DECLARE
    owned SMALLINT[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM set_config('idle_in_transaction_session_timeout',
                       GREATEST(p_lease_us / 1000, 1000)::text, true);
    SELECT array_agg(p."partition") INTO owned FROM {partitions} p
     WHERE p.owner = p_relay AND p.expires_at > now();
    IF owned IS NULL OR p_batch <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH claimable AS (
        SELECT o.ctid AS row_id, o.seq, o.id, o.destination, o."key", o.payload, o.headers,
               o.created_at, o.attempts, o.last_error, f.seq AS first_seq
          FROM {table} o
          LEFT JOIN LATERAL (SELECT e.ctid AS head, e.seq, e.available_at, e.lease_until
                               FROM {table} e
                              WHERE e."key" = o."key" AND e.state = 0
                              ORDER BY e.seq LIMIT 1) f ON true
          LEFT JOIN LATERAL (SELECT true AS free FROM {table} h
                              WHERE h.ctid = f.head AND f.seq <> o.seq
                                FOR UPDATE SKIP LOCKED) h ON true
         WHERE o.state = 0 AND o."partition" = ANY (owned)
           AND o.available_at <= now()
           AND (o.lease_until IS NULL OR o.lease_until <= now())
           AND (o."key" IS NULL OR (f.available_at <= now()
                                    AND (f.lease_until IS NULL OR f.lease_until <= now())
                                    AND (f.seq = o.seq OR h.free)))
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
                              WHERE e."key" = p."key" AND e.state = 0 AND e.seq <= p.hi) <> p.n))
    SELECT c.row_id::text, c.seq, c.id, c.destination, c."key", c.payload, c.headers,
           c.created_at, c.attempts, c.last_error
      FROM claimable c LEFT JOIN first_left f ON f."key" = c."key"
     WHERE f.seq IS NULL OR c.seq < f.seq;
END
$take$;
