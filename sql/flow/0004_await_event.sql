-- dcbflow flow layer, migration 4: await_event (issue 15; ADR 0012).
--
-- An `await_event` task waits until an event matching its query (any of its
-- types, all of its tags) is in the log. While it waits, its query is a row
-- here, written by flow_sync from the state's `awaiting` in the transition
-- that reached the task. The engine's event waker, a subscription on the log
-- (below the writer horizon, so late committers are delivered in their place),
-- matches each appended event against these rows and makes the instances it
-- matches due at once in flow_wakeups; the worker that claims one reads the
-- log for the event and records it as the task's output.

CREATE TABLE flow_awaits (
    instance uuid   NOT NULL,
    step     text   NOT NULL,
    types    text[] NOT NULL,
    tags     text[] NOT NULL,
    PRIMARY KEY (instance, step)
);
CREATE INDEX flow_awaits_tags_idx ON flow_awaits USING gin (tags);

-- As in 0002, and: the await_event queries of the instance (flow_awaits).
CREATE OR REPLACE FUNCTION flow_sync(p_instance jsonb, p_due timestamptz, p_incidents jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    v_id uuid := (p_instance ->> 'id')::uuid;
    v_flow text := p_instance ->> 'flow';
BEGIN
    INSERT INTO flow_instances AS f
           (id, flow, definition_version, business_key, status, started_at, updated_at, last_position, state)
    VALUES (v_id, v_flow, p_instance ->> 'definition_version', p_instance ->> 'business_key',
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

    -- The await_event steps waiting now (the state's `awaiting`, by step key);
    -- an instance without any has no row, and the DELETE is one probe.
    IF p_instance ? 'awaiting' THEN
        DELETE FROM flow_awaits a
         WHERE a.instance = v_id AND NOT (p_instance -> 'awaiting' ? a.step);
        INSERT INTO flow_awaits (instance, step, types, tags)
        SELECT v_id, x.key,
               ARRAY(SELECT jsonb_array_elements_text(x.value -> 'types')),
               ARRAY(SELECT jsonb_array_elements_text(x.value -> 'tags'))
          FROM jsonb_each(p_instance -> 'awaiting') x
        ON CONFLICT (instance, step) DO NOTHING;
    ELSE
        DELETE FROM flow_awaits WHERE instance = v_id;
    END IF;

    DELETE FROM flow_incidents i
     WHERE i.instance = v_id
       AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_incidents) n
                        WHERE n ->> 'step' = i.step AND n ->> 'kind' = i.kind);
    INSERT INTO flow_incidents AS i
           (instance, step, flow, task, kind, error, first_seen, last_seen, occurrences,
            group_id, acknowledged_by, acknowledged_note, acknowledged_at)
    SELECT v_id, n ->> 'step', v_flow, n ->> 'task', n ->> 'kind', n ->> 'error',
           now(), now(), (n ->> 'occurrences')::int,
           flow_incident_group(v_flow, n ->> 'task', n ->> 'kind', n ->> 'error'),
           n -> 'acknowledged' ->> 'actor', n -> 'acknowledged' ->> 'note',
           (n -> 'acknowledged' ->> 'at')::timestamptz
      FROM jsonb_array_elements(p_incidents) n
    ON CONFLICT (instance, step) DO UPDATE
       SET kind = EXCLUDED.kind, error = EXCLUDED.error, occurrences = EXCLUDED.occurrences,
           group_id = EXCLUDED.group_id,
           last_seen = CASE WHEN (i.kind, i.error, i.occurrences)
                                 IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.error, EXCLUDED.occurrences)
                            THEN now() ELSE i.last_seen END,
           acknowledged_by = EXCLUDED.acknowledged_by,
           acknowledged_note = EXCLUDED.acknowledged_note,
           acknowledged_at = EXCLUDED.acknowledged_at;
END;
$fn$;
