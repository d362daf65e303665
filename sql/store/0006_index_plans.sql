-- dcbflow store, migration 6: the append's cached plans use the indexes at any
-- table size (docs/performance.md, issue 14).
--
-- PL/pgSQL caches a plan per statement and connection. condition_conflict
-- builds a generic plan on its first call (plan_cache_mode), append_checked
-- after a few calls. A plan built while the events table is small, which is
-- every new store until autovacuum's first ANALYZE, chose a sequential scan and
-- a sort for the window after the cursor ("the events after position p, in
-- order, at most 128"), and kept it for the connection's life: pooled
-- connections then read the whole table on every conditional append. Seen in
-- the flow bench: 4,201 sequential scans of the events table in 12 s, 26
-- million rows read, and PostgreSQL at 79% of both cores.
--
-- Every statement in these functions has one right plan whatever the table's
-- size: a primary-key range near the head, the tag index, or the id index.
-- Turning sequential scans off for the functions' own statements makes the
-- planner take it also while the statistics say the table is tiny. It does not
-- change a result: where no index applies, the planner still scans.
ALTER FUNCTION append_checked(bigint[], boolean[], text[], text[], int[], int[], jsonb[], jsonb[],
                              uuid[], jsonb, bigint, pg_snapshot, text, int, text[], text[])
    SET enable_seqscan = off
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION condition_conflict(jsonb, bigint, pg_snapshot)
    SET enable_seqscan = off;
