-- dcbflow store, migration 4: guards around the conditional append.
--
-- Three checks that no append may skip, and a bound on how long a transaction
-- may hold the store lock. They wrap the functions of migration 2 instead of
-- redefining them, so each function keeps exactly one definition.
--
-- * A condition's cursor beyond the last position ever allocated cannot come
--   from a read: it would make the check ignore every event in between (a
--   forged or corrupted cursor silently double-books). Refused with DCB03.
-- * Event ids are idempotency keys: re-sending them is a replay only if the
--   stored events are the same events (type, tags, data, metadata). Other
--   content under a stored id is refused with DCB04, as payment APIs refuse a
--   reused idempotency key.
-- * A transaction that appended (or locked a scope) holds the store lock until
--   it ends, and subscribers wait for it. `idle_in_transaction_session_timeout`
--   and, unless the caller set one, `statement_timeout` are set for the rest of
--   the transaction, so one stuck process cannot stall every subscriber.

-- The last position allocated in the log (0 if none yet).
CREATE FUNCTION allocated_head()
RETURNS bigint
LANGUAGE sql
STABLE
SET search_path FROM CURRENT
AS $fn$
    SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END FROM events_position_seq s
$fn$;

-- Refuses a cursor beyond the head (DCB03) and bounds how long the calling
-- transaction may hold the store lock (`p_hold_ms`, 0: no bound).
CREATE FUNCTION guard_transaction(p_after bigint, p_hold_ms int)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_head bigint;
BEGIN
    IF p_after IS NOT NULL THEN
        v_head := allocated_head();
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
END;
$fn$;

-- Whether the stored events with ids `p_ids` are the events given (by id: same
-- type, tags, data and metadata). NULL ids are ignored.
CREATE FUNCTION stored_events_match(
    p_types      text[],
    p_tags       text[],
    p_tag_starts int[],
    p_tag_counts int[],
    p_data       jsonb[],
    p_metadata   jsonb[],
    p_ids        uuid[]
) RETURNS int
LANGUAGE sql
STABLE
SET search_path FROM CURRENT
AS $fn$
    -- The 1-based index of the first given event whose stored twin differs, or 0.
    SELECT coalesce(min(g.ord), 0)::int
      FROM unnest(p_types, p_tag_starts, p_tag_counts, p_data, p_metadata, p_ids)
           WITH ORDINALITY AS g(type, tag_start, tag_count, data, metadata, id, ord)
      JOIN events e ON e.id = g.id
     WHERE e.type <> g.type
        OR e.tags <> p_tags[g.tag_start : g.tag_start + g.tag_count - 1]
        OR e.data <> g.data
        OR e.metadata IS DISTINCT FROM g.metadata
$fn$;

-- append_events with the guards: the entry point of every append outside group
-- commit. Same parameters, plus `p_hold_ms`.
CREATE FUNCTION append_guarded(
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
    p_hold_ms     int
) RETURNS TABLE (positions bigint[], transaction_id xid8, conflict bigint, replayed boolean)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_differs int;
BEGIN
    PERFORM guard_transaction(p_after, p_hold_ms);
    FOR positions, transaction_id, conflict, replayed IN
        SELECT * FROM append_events(p_lock_keys, p_lock_modes, p_types, p_tags, p_tag_starts,
                                    p_tag_counts, p_data, p_metadata, p_ids, p_condition,
                                    p_after, p_snapshot, p_channel)
    LOOP
        IF replayed THEN
            v_differs := stored_events_match(p_types, p_tags, p_tag_starts, p_tag_counts,
                                             p_data, p_metadata, p_ids);
            IF v_differs > 0 THEN
                RAISE EXCEPTION 'event % reuses a stored event id with different content', v_differs - 1
                    USING ERRCODE = 'DCB04', DETAIL = (v_differs - 1)::text;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$fn$;
