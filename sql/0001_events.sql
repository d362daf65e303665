-- dcbflow event log, version 1.
--
-- Runs with `search_path` set to the store's schema; every object below is
-- created there, so several stores can share one database.

CREATE TABLE events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id xid8        NOT NULL,
    type           text        NOT NULL CHECK (type <> ''),
    tags           text[]      NOT NULL,
    data           jsonb       NOT NULL,
    metadata       jsonb,
    id             uuid        UNIQUE,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);

-- Tag queries. `fastupdate = off`: with the default pending list, tag reads
-- slow down by an order of magnitude under sustained writes (DESIGN.md trap 8).
CREATE INDEX events_tags_idx ON events USING gin (tags) WITH (fastupdate = off);
-- Type-only query items and type-scoped reads in position order.
CREATE INDEX events_type_idx ON events (type, position);
-- Late-committer checks: events of transactions a reader's snapshot did not see.
CREATE INDEX events_transaction_idx ON events (transaction_id);

-- The first position of an event matching one of the condition's items that the
-- reader behind (p_after, p_snapshot) did not see: position > p_after, or written
-- by a transaction that was in progress or not yet started in p_snapshot. NULL if
-- none, or if there is no condition. Run it after the scope locks are granted, in
-- its own statement, so it sees every writer that committed meanwhile.
CREATE FUNCTION condition_conflict(p_condition jsonb, p_after bigint, p_snapshot pg_snapshot)
RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_conflict bigint;
    v_xmax     xid8;
    v_xip      xid8[];
    v_item     jsonb;
    v_types    text[];
    v_tags     text[];
BEGIN
    IF p_condition IS NULL THEN
        RETURN NULL;
    END IF;
    IF p_snapshot IS NOT NULL THEN
        v_xmax := pg_snapshot_xmax(p_snapshot);
        v_xip := ARRAY(SELECT pg_snapshot_xip(p_snapshot));
    END IF;
    FOR v_item IN SELECT jsonb_array_elements(p_condition) LOOP
        v_types := ARRAY(SELECT jsonb_array_elements_text(v_item -> 'types'));
        v_tags := ARRAY(SELECT jsonb_array_elements_text(v_item -> 'tags'));
        -- EXECUTE: planned for these very values every time (no generic plan).
        -- For an item with tags the tag index leads: the type test is kept
        -- out of index use (`type || ''`), because a type shared by much of
        -- the log would otherwise be bitmap-scanned in full whenever the
        -- planner misjudges how common it is (e.g. before ANALYZE).
        EXECUTE format(
            'SELECT least('
            || '(SELECT min(e.position) FROM events e WHERE e.position > $1 AND %1$s),'
            || '(SELECT min(e.position) FROM events e WHERE $2 IS NOT NULL'
            || '   AND (e.transaction_id >= $2 OR e.transaction_id = ANY($5)) AND %1$s))',
            CASE
                WHEN cardinality(v_tags) > 0 AND cardinality(v_types) > 0
                    THEN 'e.tags @> $4 AND e.type || '''' = ANY($3)'
                WHEN cardinality(v_tags) > 0 THEN 'e.tags @> $4'
                WHEN cardinality(v_types) > 0 THEN 'e.type = ANY($3)'
                ELSE 'true'
            END)
            INTO v_conflict
            USING coalesce(p_after, 0), v_xmax, v_types, v_tags, coalesce(v_xip, '{}');
        IF v_conflict IS NOT NULL THEN
            RETURN v_conflict;
        END IF;
    END LOOP;
    RETURN NULL;
END;
$fn$;

-- Appends events in one statement (one round trip, atomic, cancel-safe).
--
-- 1. Takes the advisory scope locks computed by the client (sorted, each key
--    once in its strongest mode; true = exclusive).
-- 2. Idempotent replay: if the events' ids are already stored, returns the
--    original positions and writes nothing.
-- 3. Checks the append condition: an event matching one of the items that
--    the reader did not see, i.e. position > p_after, or written by a
--    transaction that was in progress or not yet started in p_snapshot.
-- 4. Inserts the events in order.
--
-- Every statement runs with a fresh READ COMMITTED snapshot, taken after the
-- locks were granted; that is what makes the check see every conflicting
-- writer that committed while this call waited.
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
    p_snapshot    pg_snapshot
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

    -- Wake subscribers when this transaction commits (payload-free; they re-read).
    PERFORM pg_notify('dcbflow_' || left(md5(current_schema()), 16), '');
    RETURN QUERY SELECT v_positions, v_xid, NULL::bigint, false;
END;
$fn$;
