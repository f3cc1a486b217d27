-- Outbox schema version 2 (PostgreSQL 12+): claims update rows in place.
--
-- A claim writes lease_token and lease_until on every row it takes. When no index mentions a
-- column an UPDATE changes, and the row's page has room for its new version, PostgreSQL writes
-- a heap-only tuple: no index entry at all, a quarter of the WAL. Version 1 had an index whose
-- predicate read lease_until, so every claim inserted into every index of the table; claims
-- now find held rows by the first pending message of a key instead (PostgresStore::claim).
--
-- Half of each page stays free at insert, room for one new version of each row: a message is
-- inserted once, leased about once, then deleted, and the table holds the backlog only.
DROP INDEX IF EXISTS {ix_held};
ALTER TABLE {table} SET (fillfactor = 50);
