-- dcbflow event log, version 4: condition checks that do not depend on statistics.
--
-- The check of an append condition asks "is there an event matching the query
-- after position p_after?". Version 1 let the planner pick the index for every
-- item; with stale statistics (a store that grew since its last ANALYZE, or a
-- hot tag the sample missed) it bitmap-scans every event of a tag to find the
-- few after the cursor, so a conditional append slowed down as its scope's
-- history grew. When few events were appended after the cursor (the head is at
-- most c_near positions past it), those events are now scanned in position
-- order instead, for each item, whatever the statistics say, and when fewer
-- than c_window events follow the cursor that scan decides alone. A condition
-- with no cursor on a tagged item is a probe of the tag index, planned once
-- per connection. With a near cursor that carries a snapshot, the events of
-- transactions the snapshot did not see are found through the transaction-id
-- index. A cursor further behind, or a window that overflows, uses the
-- per-item index query planned for its values, as before.
CREATE OR REPLACE FUNCTION condition_conflict(p_condition jsonb, p_after bigint, p_snapshot pg_snapshot)
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
