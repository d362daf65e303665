-- dcbflow store, migration 5: a leaner append (docs/performance.md, issue 14).
--
-- Measured with pgbench on the bare statements, 16 clients: the path of
-- migrations 2 and 4 (append_guarded -> guard_transaction -> append_events ->
-- condition_conflict) did 0.39x the appends per second of a hand-written
-- scoped append, mostly in PL/pgSQL statements that decide nothing for the
-- common case: two nested set-returning calls, the guard's settings outside a
-- transaction, the condition decoded from jsonb, the head read twice, an
-- ON CONFLICT insert for events without ids.
--
-- 1. Event ids are unique where given. A partial index: most events carry no
--    id, and the full index took a btree entry (and WAL) for every NULL.
CREATE UNIQUE INDEX events_id_idx ON events (id) WHERE id IS NOT NULL;
ALTER TABLE events DROP CONSTRAINT events_id_key;

-- 2. append_checked: the entry point of every append that carries a condition,
-- a cursor or event ids, or runs in a caller's transaction. (The unconditional
-- append on the store's own connection is one plain INSERT, built in
-- src/store/mod.rs: it needs no function.)
--
-- The same guarantees and errors as append_guarded of migration 4, in one
-- function that returns one row:
-- * READ COMMITTED only (DCB02); a cursor beyond the head refused (DCB03);
-- * the scope locks, in the caller's order;
-- * `p_ids` NULL when no event carries an id (the client knows): no replay
--   lookup and a plain INSERT. Otherwise an idempotent replay of stored ids,
--   refused if only some are stored (DCB01) or if the content differs (DCB04);
-- * the condition: `p_item_types`/`p_item_tags` repeat it when it has exactly
--   one item and that item has tags. With such an item, a cursor without a
--   snapshot and few events after it, the window of the events after the
--   cursor decides here, as condition_conflict's first step would; every
--   other case is condition_conflict's, unchanged;
-- * `p_hold_ms` bounds how long a caller's transaction may hold the store
--   lock (0: none; an append on the store's own connection commits with its
--   statement and passes 0).
CREATE FUNCTION append_checked(
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

    PERFORM CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.key)
                 ELSE pg_advisory_xact_lock_shared(l.key) END
    FROM unnest(p_lock_keys, p_lock_modes) AS l(key, exclusive);

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
        IF p_item_tags IS NOT NULL AND p_snapshot IS NULL AND p_after IS NOT NULL
           AND v_head - p_after <= c_near THEN
            -- The few events after the cursor, by primary key (at most 128,
            -- condition_conflict's window). Writers of matching events are
            -- blocked by our locks; if the window holds every event after the
            -- cursor, it decides. The limit is a literal: as a PL/pgSQL constant
            -- it is a parameter of the cached plan, and that plan cost 20% of
            -- the append at 16 clients.
            SELECT min(w.position) FILTER (WHERE w.tags @> p_item_tags
                                             AND (cardinality(p_item_types) = 0
                                                  OR w.type = ANY(p_item_types))),
                   count(*) >= 128
              INTO conflict, v_full
              FROM (SELECT e.position, e.type, e.tags FROM events e
                     WHERE e.position > p_after ORDER BY e.position LIMIT 128) w;
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

-- The functions of migrations 2 and 4 that append_checked replaces.
-- condition_conflict, stored_events_match, guard_transaction (scope locks in a
-- caller's transaction) and allocated_head stay.
DROP FUNCTION append_guarded(bigint[], boolean[], text[], text[], int[], int[], jsonb[], jsonb[],
                             uuid[], jsonb, bigint, pg_snapshot, text, int);
DROP FUNCTION append_events(bigint[], boolean[], text[], text[], int[], int[], jsonb[], jsonb[],
                            uuid[], jsonb, bigint, pg_snapshot, text);
