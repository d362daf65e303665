-- dcbflow store, migration 2: the conditional append.
--
-- condition_conflict: the first position of an event matching one of the
-- condition's items that the reader behind (p_after, p_snapshot) did not see:
-- position > p_after, or written by a transaction that was in progress or not
-- yet started in p_snapshot. NULL if none, or if there is no condition. Run it
-- after the scope locks are granted, in its own statement, so it sees every
-- writer that committed meanwhile.
--
-- It does not depend on statistics. Letting the planner pick the index for
-- every item, with stale statistics (a store that grew since its last
-- ANALYZE, or a hot tag the sample missed), bitmap-scans every event of a tag
-- to find the few after the cursor, so a conditional append slows down as its
-- scope's history grows. Instead, when few events were appended after the
-- cursor (the head is at most c_near positions past it), those events are
-- scanned in position order, for each item, whatever the statistics say, and when fewer
-- than c_window events follow the cursor that scan decides alone. A condition
-- with no cursor on a tagged item is a probe of the tag index, planned once
-- per connection. With a near cursor that carries a snapshot, the events of
-- transactions the snapshot did not see are found through the transaction-id
-- index. A cursor further behind, or a window that overflows, uses the
-- per-item index query planned for its values.

CREATE FUNCTION condition_conflict(p_condition jsonb, p_after bigint, p_snapshot pg_snapshot)
RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    c_near     CONSTANT int := 64;
    c_window   CONSTANT int := 128;
    v_conflict bigint;
    v_full     boolean;
    v_xmax     xid8;
    v_xip      xid8[];
    v_item     jsonb;
    v_types    text[];
    v_tags     text[];
    v_near     boolean := false;
    v_over     boolean;
BEGIN
    IF p_condition IS NULL THEN
        RETURN NULL;
    END IF;
    IF p_snapshot IS NOT NULL THEN
        v_xmax := pg_snapshot_xmax(p_snapshot);
        v_xip := ARRAY(SELECT pg_snapshot_xip(p_snapshot));
    END IF;
    IF p_after IS NOT NULL THEN
        v_near := coalesce((SELECT max(position) FROM events), 0) - p_after <= c_near;
    END IF;
    FOR v_item IN SELECT jsonb_array_elements(p_condition) LOOP
        v_types := ARRAY(SELECT jsonb_array_elements_text(v_item -> 'types'));
        v_tags := ARRAY(SELECT jsonb_array_elements_text(v_item -> 'tags'));
        v_full := true;
        IF v_near THEN
            -- The few events after the cursor, by primary key. Matching writers
            -- are blocked by our locks, so events committed since the head was
            -- read do not match; the window reaches past them anyway, and only
            -- if it fills up does the index query below decide.
            SELECT min(w.position) FILTER (WHERE w.tags @> v_tags
                                             AND (cardinality(v_types) = 0 OR w.type = ANY(v_types))),
                   count(*) >= c_window
              INTO v_conflict, v_full
              FROM (SELECT e.position, e.type, e.tags FROM events e
                     WHERE e.position > p_after ORDER BY e.position LIMIT c_window) w;
            IF v_conflict IS NOT NULL THEN
                RETURN v_conflict;
            END IF;
        END IF;
        IF NOT v_full AND v_xmax IS NULL THEN
            -- The window held every event after the cursor: decided.
            CONTINUE;
        END IF;
        IF p_after IS NULL AND cardinality(v_tags) > 0 THEN
            -- "No such event at all", the condition of a first decision on a
            -- new tag: a probe of the tag index decides it (every matching
            -- event is one the reader did not see, late committers included).
            -- This statement is planned once per connection (plan_cache_mode
            -- below), as the tag index lookup, which costs a few microseconds
            -- where planning it for its values, as EXECUTE does, costs about
            -- a hundred.
            SELECT min(e.position + 0) INTO v_conflict FROM events e
             WHERE e.tags @> v_tags
               AND (cardinality(v_types) = 0 OR e.type || '' = ANY(v_types));
            IF v_conflict IS NOT NULL THEN
                RETURN v_conflict;
            END IF;
            CONTINUE;
        END IF;
        IF NOT v_full AND v_xmax IS NOT NULL THEN
            -- The window decided the events after the cursor. Left are the
            -- events of transactions the reader's snapshot did not see, which
            -- may sit below the cursor (late committers): found by transaction
            -- id, those of transactions started after the snapshot in id
            -- order, and those of transactions in flight at it. If either
            -- holds more than c_window events, the planned query decides.
            SELECT min(w.position) FILTER (WHERE w.tags @> v_tags
                                             AND (cardinality(v_types) = 0 OR w.type = ANY(v_types))),
                   count(*) > c_window
              INTO v_conflict, v_over
              FROM (SELECT e.position, e.type, e.tags FROM events e
                     WHERE e.transaction_id >= v_xmax
                     ORDER BY e.transaction_id LIMIT c_window + 1) w;
            IF NOT v_over AND cardinality(v_xip) > 0 THEN
                SELECT least(v_conflict,
                             min(w.position) FILTER (WHERE w.tags @> v_tags
                                                       AND (cardinality(v_types) = 0 OR w.type = ANY(v_types)))),
                       count(*) > c_window
                  INTO v_conflict, v_over
                  FROM (SELECT e.position, e.type, e.tags FROM events e
                         WHERE e.transaction_id = ANY(v_xip) LIMIT c_window + 1) w;
            END IF;
            IF NOT v_over THEN
                IF v_conflict IS NOT NULL THEN
                    RETURN v_conflict;
                END IF;
                CONTINUE;
            END IF;
        END IF;
        -- EXECUTE: planned for these very values every time (no generic plan).
        -- For an item with tags the tag index leads: the type test is kept
        -- out of index use (`type || ''`), because a type shared by much of
        -- the log would otherwise be bitmap-scanned in full whenever the
        -- planner misjudges how common it is (e.g. before ANALYZE). For the
        -- same reason `min(position + 0)`: a plain min(position) may be
        -- planned as a walk of the primary key in order, stopping at the first
        -- match, and when nothing matches (the usual answer: "no such event
        -- yet") that walk reads the whole log.
        EXECUTE format(
            'SELECT least('
            || '(SELECT min(%2$s) FROM events e WHERE $6 AND e.position > $1 AND %1$s),'
            || '(SELECT min(%2$s) FROM events e WHERE $2 IS NOT NULL'
            || '   AND (e.transaction_id >= $2 OR e.transaction_id = ANY($5)) AND %1$s))',
            CASE
                WHEN cardinality(v_tags) > 0 AND cardinality(v_types) > 0
                    THEN 'e.tags @> $4 AND e.type || '''' = ANY($3)'
                WHEN cardinality(v_tags) > 0 THEN 'e.tags @> $4'
                WHEN cardinality(v_types) > 0 THEN 'e.type = ANY($3)'
                ELSE 'true'
            END,
            CASE WHEN cardinality(v_tags) > 0 THEN 'e.position + 0' ELSE 'e.position' END)
            INTO v_conflict
            USING coalesce(p_after, 0), v_xmax, v_types, v_tags, coalesce(v_xip, '{}'), v_full;
        IF v_conflict IS NOT NULL THEN
            RETURN v_conflict;
        END IF;
    END LOOP;
    RETURN NULL;
END;
$fn$;

-- append_events: the scope locks, an idempotent replay by event ids, the
-- condition check and the insert, in one round trip.
--
-- A transaction that sends a notification takes a database-wide lock in
-- PostgreSQL's pre-commit step and holds it through its commit's WAL flush, so
-- concurrent appends that each notify cannot share a flush: they commit one at
-- a time. With `p_channel` NULL the append commits without notifying and the
-- caller sends one coalesced notification after the commit, outside the
-- appenders' transactions (`Store::append` does this; appends inside a
-- caller's transaction notify on commit). Subscribers also poll, so a wake-up
-- lost to a crash between commit and notification only delays them. The
-- channel name is the store's (`Store::channel`), passed in by the caller.
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
    p_channel     text DEFAULT NULL
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

    -- Wake subscribers on `p_channel` when this transaction commits
    -- (payload-free; they re-read). NULL: the caller wakes them itself after
    -- the commit.
    IF p_channel IS NOT NULL THEN
        PERFORM pg_notify(p_channel, '');
    END IF;
    RETURN QUERY SELECT v_positions, v_xid, NULL::bigint, false;
END;
$fn$;
