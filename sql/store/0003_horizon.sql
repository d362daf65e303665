-- dcbflow store, migration 3: the writer horizon that gap-free subscriptions
-- deliver up to (Store::writer_horizon, used by subscriptions).

-- A candidate delivery horizon: every position allocated so far (`allocated`),
-- and the transactions of this store's writers still holding the store lock
-- (`writers`, virtual transaction ids). Once all of them have ended, no event with
-- a position up to `allocated` can still appear. The sequence is read first: a
-- writer that drew a position before that read holds the store lock from before
-- its insert until it ends, so it is among `writers`. Transactions that are not
-- writers of this store (an idle session elsewhere) are never waited for.
CREATE FUNCTION writer_horizon(p_store_key bigint)
RETURNS TABLE (allocated bigint, writers text[])
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_last   bigint;
    v_called boolean;
BEGIN
    SELECT s.last_value, s.is_called INTO v_last, v_called FROM events_position_seq s;
    RETURN QUERY
        SELECT CASE WHEN v_called THEN v_last ELSE 0 END,
               coalesce(array_agg(l.virtualtransaction), '{}')
          FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid::bigint = (p_store_key >> 32) & 4294967295
           AND l.objid::bigint = p_store_key & 4294967295;
END;
$fn$;

-- Whether none of `p_writers` still holds the store lock.
CREATE FUNCTION writers_finished(p_store_key bigint, p_writers text[])
RETURNS boolean
LANGUAGE sql
AS $fn$
    SELECT NOT EXISTS (
        SELECT 1 FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.virtualtransaction = ANY (p_writers)
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid::bigint = (p_store_key >> 32) & 4294967295
           AND l.objid::bigint = p_store_key & 4294967295)
$fn$;
