-- dcbflow store, migration 7: append_checked with fewer executor starts
-- (docs/performance.md, issue 14).
--
-- Measured with pgbench on the bare call (one event, a one-item condition on
-- the client's own tag, the cursor at the client's last append): 6% more
-- appends per second at 1 client, 3% at 16, from two changes that keep every
-- result and error of migration 5:
-- * the scope locks are taken by a loop of simple expressions instead of a
--   query over unnest() (an executor start and a function scan per call);
-- * the window of events after a near cursor is read after the locks, up to
--   the head read then: it holds every matching event the condition must see
--   (see below), so it needs neither the 128-row count that told a complete
--   window from a truncated one nor an aggregate.
-- The function's settings (search_path, enable_seqscan, plan_cache_mode) are
-- restated: CREATE OR REPLACE resets them.
CREATE OR REPLACE FUNCTION append_checked(
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
    p_channel     text,
    p_hold_ms     int,
    p_item_types  text[],
    p_item_tags   text[],
    OUT positions      bigint[],
    OUT transaction_id xid8,
    OUT conflict       bigint,
    OUT replayed       boolean
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    c_near     CONSTANT int := 64;
    v_count    int := cardinality(p_types);
    v_head     bigint;
    v_found    int;
    v_full     boolean := true;
    v_position bigint;
    v_differs  int;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'dcbflow appends require READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'DCB02';
    END IF;
    IF p_after IS NOT NULL THEN
        -- The function, not a SELECT from the sequence: no executor start
        -- (12% of the whole append at 16 clients). NULL until the first position.
        v_head := coalesce(pg_sequence_last_value('events_position_seq'::regclass), 0);
        IF p_after > v_head THEN
            RAISE EXCEPTION 'cursor position % is beyond the head of the log (%)', p_after, v_head
                USING ERRCODE = 'DCB03', DETAIL = p_after::text || ',' || v_head::text;
        END IF;
    END IF;
    IF p_hold_ms > 0 THEN
        PERFORM set_config('idle_in_transaction_session_timeout', p_hold_ms::text, true);
        IF current_setting('statement_timeout') = '0' THEN
            PERFORM set_config('statement_timeout', p_hold_ms::text, true);
        END IF;
    END IF;

    -- One simple expression per lock, no query: a query over unnest() paid an
    -- executor start and a function scan on every call.
    FOR i IN 1 .. cardinality(p_lock_keys) LOOP
        IF p_lock_modes[i] THEN
            PERFORM pg_advisory_xact_lock(p_lock_keys[i]);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(p_lock_keys[i]);
        END IF;
    END LOOP;

    IF p_ids IS NOT NULL THEN
        SELECT array_agg(e.position ORDER BY e.position), min(e.transaction_id), count(*)
          INTO positions, transaction_id, v_found
          FROM events e WHERE e.id = ANY(p_ids);
        IF v_found = v_count THEN
            v_differs := stored_events_match(p_types, p_tags, p_tag_starts, p_tag_counts,
                                             p_data, p_metadata, p_ids);
            IF v_differs > 0 THEN
                RAISE EXCEPTION 'event % reuses a stored event id with different content', v_differs - 1
                    USING ERRCODE = 'DCB04', DETAIL = (v_differs - 1)::text;
            END IF;
            replayed := true;
            RETURN;
        ELSIF v_found > 0 THEN
            RAISE EXCEPTION 'some event ids of this append are already stored by another append'
                USING ERRCODE = 'DCB01';
        END IF;
    END IF;

    IF p_condition IS NOT NULL THEN
        IF p_item_tags IS NOT NULL AND p_snapshot IS NULL AND p_after IS NOT NULL THEN
            -- The head read again, now that the locks are held: every writer of
            -- a matching event draws its positions while holding a lock that
            -- ours excludes, so each one either committed before we got the
            -- locks (its events lie at or below this head, and this
            -- statement's snapshot, taken after the locks, sees them) or waits
            -- for our commit. The events after the cursor up to this head
            -- therefore decide, when they are few: by primary key, at most 64
            -- rows, no count of a window to tell whether it was complete.
            v_head := coalesce(pg_sequence_last_value('events_position_seq'::regclass), 0);
            IF v_head - p_after <= c_near THEN
                SELECT w.position INTO conflict
                  FROM (SELECT e.position, e.type, e.tags FROM events e
                         WHERE e.position > p_after AND e.position <= v_head
                         ORDER BY e.position LIMIT 128) w
                 WHERE w.tags @> p_item_tags
                   AND (cardinality(p_item_types) = 0 OR w.type = ANY(p_item_types))
                 ORDER BY w.position LIMIT 1;
                v_full := false;
            END IF;
        END IF;
        IF conflict IS NULL AND v_full THEN
            conflict := condition_conflict(p_condition, p_after, p_snapshot);
        END IF;
        IF conflict IS NOT NULL THEN
            positions := NULL;
            transaction_id := NULL;
            replayed := false;
            RETURN;
        END IF;
    END IF;

    transaction_id := pg_current_xact_id();
    IF p_ids IS NULL THEN
        IF v_count = 1 THEN
            INSERT INTO events (transaction_id, type, tags, data, metadata)
            VALUES (transaction_id, p_types[1],
                    p_tags[p_tag_starts[1] : p_tag_starts[1] + p_tag_counts[1] - 1],
                    p_data[1], p_metadata[1])
            RETURNING events.position INTO v_position;
            positions := ARRAY[v_position];
        ELSE
            WITH inserted AS (
                INSERT INTO events (transaction_id, type, tags, data, metadata)
                SELECT append_checked.transaction_id, e.type,
                       p_tags[e.tag_start : e.tag_start + e.tag_count - 1], e.data, e.metadata
                  FROM unnest(p_types, p_tag_starts, p_tag_counts, p_data, p_metadata)
                       WITH ORDINALITY AS e(type, tag_start, tag_count, data, metadata, ord)
                 ORDER BY e.ord
                RETURNING events.position
            )
            SELECT array_agg(i.position ORDER BY i.position) INTO positions FROM inserted i;
        END IF;
    ELSE
        WITH inserted AS (
            INSERT INTO events (transaction_id, type, tags, data, metadata, id)
            SELECT append_checked.transaction_id, e.type,
                   p_tags[e.tag_start : e.tag_start + e.tag_count - 1], e.data, e.metadata, e.id
              FROM unnest(p_types, p_tag_starts, p_tag_counts, p_data, p_metadata, p_ids)
                   WITH ORDINALITY AS e(type, tag_start, tag_count, data, metadata, id, ord)
             ORDER BY e.ord
            ON CONFLICT (id) WHERE id IS NOT NULL DO NOTHING
            RETURNING events.position
        )
        SELECT array_agg(i.position ORDER BY i.position), count(*) INTO positions, v_found
          FROM inserted i;
        IF v_found < v_count THEN
            -- A concurrent call with the same ids committed first (ON CONFLICT
            -- waited for it): hand back what it stored, or refuse a partial overlap.
            SELECT array_agg(e.position ORDER BY e.position), min(e.transaction_id), count(*)
              INTO positions, transaction_id, v_found
              FROM events e WHERE e.id = ANY(p_ids) AND e.transaction_id <> pg_current_xact_id();
            IF v_found = v_count THEN
                v_differs := stored_events_match(p_types, p_tags, p_tag_starts, p_tag_counts,
                                                 p_data, p_metadata, p_ids);
                IF v_differs > 0 THEN
                    RAISE EXCEPTION 'event % reuses a stored event id with different content', v_differs - 1
                        USING ERRCODE = 'DCB04', DETAIL = (v_differs - 1)::text;
                END IF;
                replayed := true;
                RETURN;
            END IF;
            RAISE EXCEPTION 'some event ids of this append are already stored by another append'
                USING ERRCODE = 'DCB01';
        END IF;
    END IF;

    -- Wake subscribers on `p_channel` when this transaction commits
    -- (payload-free; they re-read). NULL: the caller wakes them after the commit.
    IF p_channel IS NOT NULL THEN
        PERFORM pg_notify(p_channel, '');
    END IF;
    replayed := false;
END;
$fn$;
