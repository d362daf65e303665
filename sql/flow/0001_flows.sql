-- dcbflow flow layer, migration 1: read models of flow instances.
--
-- The events are the truth; these tables are projections of them, written in
-- the same transaction as each transition (so they are never behind), and
-- rebuilt from the log by `Flows::rebuild_read_models`.

-- One row per instance: where it is, for queries by flow, status, business key.
CREATE TABLE flow_instances (
    id            uuid        PRIMARY KEY,
    flow          text        NOT NULL,
    definition_version text   NOT NULL,
    business_key  text,
    status        text        NOT NULL,
    started_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    last_position bigint      NOT NULL,
    state         jsonb       NOT NULL
);
CREATE INDEX flow_instances_flow_status_idx ON flow_instances (flow, status, started_at);
CREATE INDEX flow_instances_status_idx ON flow_instances (status, updated_at);
CREATE INDEX flow_instances_business_key_idx ON flow_instances (flow, business_key);

-- When each unfinished instance next needs a worker: a step to start, a retry
-- due, a lease to expire, a deadline. Workers claim due rows with SKIP LOCKED;
-- nobody scans the log to find work.
CREATE TABLE flow_wakeups (
    instance      uuid        PRIMARY KEY,
    due_at        timestamptz NOT NULL,
    claimed_by    text,
    claimed_until timestamptz
);
CREATE INDEX flow_wakeups_due_idx ON flow_wakeups (due_at);

-- Failed or stuck steps (exhausted retries, compensation failures, timeouts,
-- pauses); a row disappears when its step moves on.
CREATE TABLE flow_incidents (
    instance    uuid        NOT NULL,
    step        text        NOT NULL,
    flow        text        NOT NULL,
    task        text        NOT NULL,
    kind        text        NOT NULL,
    error       text        NOT NULL,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    occurrences integer     NOT NULL,
    PRIMARY KEY (instance, step)
);
CREATE INDEX flow_incidents_group_idx ON flow_incidents (flow, task, kind);

-- Writes one instance's projections in one round trip: its row, its wake-up
-- (NULL: none) and its incidents (a JSON array of {step, task, kind, error,
-- occurrences}; rows of steps not in it are resolved, i.e. deleted).
CREATE FUNCTION flow_sync(p_instance jsonb, p_due timestamptz, p_incidents jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_id uuid := (p_instance ->> 'id')::uuid;
BEGIN
    INSERT INTO flow_instances AS f
           (id, flow, definition_version, business_key, status, started_at, updated_at, last_position, state)
    VALUES (v_id, p_instance ->> 'flow', p_instance ->> 'definition_version', p_instance ->> 'business_key',
            p_instance ->> 'status', (p_instance ->> 'started_at')::timestamptz,
            (p_instance ->> 'updated_at')::timestamptz,
            (p_instance ->> 'last_position')::bigint, p_instance)
    ON CONFLICT (id) DO UPDATE
       SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at,
           last_position = EXCLUDED.last_position, state = EXCLUDED.state
     WHERE f.last_position < EXCLUDED.last_position;

    IF p_due IS NULL THEN
        DELETE FROM flow_wakeups WHERE instance = v_id;
    ELSE
        INSERT INTO flow_wakeups (instance, due_at) VALUES (v_id, p_due)
        ON CONFLICT (instance) DO UPDATE SET due_at = EXCLUDED.due_at;
    END IF;

    DELETE FROM flow_incidents i
     WHERE i.instance = v_id
       AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_incidents) n
                        WHERE n ->> 'step' = i.step AND n ->> 'kind' = i.kind);
    INSERT INTO flow_incidents AS i
           (instance, step, flow, task, kind, error, first_seen, last_seen, occurrences)
    SELECT v_id, n ->> 'step', p_instance ->> 'flow', n ->> 'task', n ->> 'kind', n ->> 'error',
           now(), now(), (n ->> 'occurrences')::int
      FROM jsonb_array_elements(p_incidents) n
    ON CONFLICT (instance, step) DO UPDATE
       SET kind = EXCLUDED.kind, error = EXCLUDED.error, last_seen = now(),
           occurrences = EXCLUDED.occurrences;
END;
$fn$;
