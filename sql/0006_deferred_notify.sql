-- dcbflow event log, version 6: appends may leave the wake-up to the caller.
--
-- A transaction that sends a notification takes a database-wide lock in
-- PostgreSQL's pre-commit step and holds it through its commit's WAL flush, so
-- concurrent appends that each notify cannot share a flush: they commit one at
-- a time. With `p_notify = false` the append commits without notifying and the
-- caller sends one coalesced notification after the commit, outside the
-- appenders' transactions (`Store::append` does this; appends inside a
-- caller's transaction keep notifying on commit). Subscribers also poll, so a
-- wake-up lost to a crash between commit and notification only delays them.
--
-- The body is version 1's, with the notification made conditional.

DROP FUNCTION append_events(bigint[], boolean[], text[], text[], int[], int[], jsonb[], jsonb[], uuid[], jsonb, bigint, pg_snapshot);

CREATE FUNCTION append_events(
    p_lock_keys   bigint[],
    p_lock_modes  boolean[],
    p_types       text[],
    p_tags        text[],
    p_tag_starts  int[],
    p_tag_counts  int[],
    p_data        jsonb[],
    p_metadata    jsonb[],
    p_ids         uuid[],
    p_condition   jsonb,
    p_after       bigint,
    p_snapshot    pg_snapshot,
    p_notify      boolean DEFAULT true
) RETURNS TABLE (positions bigint[], transaction_id xid8, conflict bigint, replayed boolean)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_count     int := cardinality(p_types);
    v_with_ids  int := cardinality(array_remove(p_ids, NULL));
    v_positions bigint[];
    v_xid       xid8;
    v_found     int;
    v_conflict  bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'dcbflow appends require READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'DCB02';
    END IF;

    PERFORM CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.key)
                 ELSE pg_advisory_xact_lock_shared(l.key) END
    FROM unnest(p_lock_keys, p_lock_modes) AS l(key, exclusive);

    IF v_with_ids > 0 THEN
        SELECT array_agg(e.position ORDER BY e.position), min(e.transaction_id), count(*)
          INTO v_positions, v_xid, v_found
          FROM events e WHERE e.id = ANY(p_ids);
        IF v_found = v_count THEN
            RETURN QUERY SELECT v_positions, v_xid, NULL::bigint, true;
            RETURN;
        ELSIF v_found > 0 THEN
            RAISE EXCEPTION 'some event ids of this append are already stored by another append'
                USING ERRCODE = 'DCB01';
        END IF;
    END IF;

    v_conflict := condition_conflict(p_condition, p_after, p_snapshot);
    IF v_conflict IS NOT NULL THEN
        RETURN QUERY SELECT NULL::bigint[], NULL::xid8, v_conflict, false;
        RETURN;
    END IF;

    v_xid := pg_current_xact_id();
    WITH inserted AS (
        INSERT INTO events (transaction_id, type, tags, data, metadata, id)
        SELECT v_xid, e.type, p_tags[e.tag_start : e.tag_start + e.tag_count - 1],
               e.data, e.metadata, e.id
          FROM unnest(p_types, p_tag_starts, p_tag_counts, p_data, p_metadata, p_ids)
               WITH ORDINALITY AS e(type, tag_start, tag_count, data, metadata, id, ord)
         ORDER BY e.ord
        ON CONFLICT (id) DO NOTHING
        RETURNING events.position
    )
    SELECT array_agg(i.position ORDER BY i.position), count(*) INTO v_positions, v_found
      FROM inserted i;

    IF v_found < v_count THEN
        -- A concurrent call with the same ids committed first (ON CONFLICT
        -- waited for it): hand back what it stored, or refuse a partial overlap.
        SELECT array_agg(e.position ORDER BY e.position), min(e.transaction_id), count(*)
          INTO v_positions, v_xid, v_found
          FROM events e WHERE e.id = ANY(p_ids) AND e.transaction_id <> pg_current_xact_id();
        IF v_found = v_count THEN
            RETURN QUERY SELECT v_positions, v_xid, NULL::bigint, true;
            RETURN;
        END IF;
        RAISE EXCEPTION 'some event ids of this append are already stored by another append'
            USING ERRCODE = 'DCB01';
    END IF;

    -- Wake subscribers when this transaction commits (payload-free; they re-read),
    -- unless the caller wakes them itself after the commit.
    IF p_notify THEN
        PERFORM pg_notify('dcbflow_' || left(md5(current_schema()), 16), '');
    END IF;
    RETURN QUERY SELECT v_positions, v_xid, NULL::bigint, false;
END;
$fn$;
