-- dcbflow subscriptions, version 3: checkpoints, the writer horizon, outbox dead
-- letters and the consumers' processed-message log.

-- Durable, named checkpoints: every event matching the subscription's query with
-- a position up to `position` has been processed.
CREATE TABLE subscriptions (
    name       text PRIMARY KEY CHECK (name <> ''),
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Events an outbox relay gave up on, with the last error.
CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription text        NOT NULL,
    position     bigint      NOT NULL,
    message_id   text        NOT NULL,
    error        text        NOT NULL,
    attempts     int         NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription, position)
);

-- Message ids a consumer has processed (see `Store::mark_processed`).
CREATE TABLE processed_messages (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

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
