-- dcbflow flow layer, migration 2: what the admin queries need.
--
-- Instances are listed newest first by (started_at DESC, id DESC) with keyset
-- pagination; incidents get a stable group id (for cursor pagination of the
-- groups) and an operator's acknowledgement (from `FlowIncidentAcknowledged`).
-- Migrations are append-only: 0001 stays as it was, this replaces `flow_sync`.

-- The listing's order, with and without a flow (the status and business key
-- filters of 0001's indexes narrow further).
CREATE INDEX flow_instances_started_idx ON flow_instances (started_at DESC, id DESC);
CREATE INDEX flow_instances_flow_started_idx ON flow_instances (flow, started_at DESC, id DESC);

-- The id of an incident group (flow, task, kind, error): the first 16 hex digits
-- of the SHA-256 of the JSON array [flow, task, kind, error]. Stable across
-- processes and versions; the groups are paginated in its order.
CREATE FUNCTION flow_incident_group(p_flow text, p_task text, p_kind text, p_error text)
RETURNS text
LANGUAGE sql
STABLE
PARALLEL SAFE
AS $fn$
    SELECT left(encode(sha256(convert_to(jsonb_build_array(p_flow, p_task, p_kind, p_error)::text, 'UTF8')), 'hex'), 16)
$fn$;

ALTER TABLE flow_incidents
    ADD COLUMN group_id          text COLLATE "C",
    ADD COLUMN acknowledged_by   text,
    ADD COLUMN acknowledged_note text,
    ADD COLUMN acknowledged_at   timestamptz;
UPDATE flow_incidents SET group_id = flow_incident_group(flow, task, kind, error);
ALTER TABLE flow_incidents ALTER COLUMN group_id SET NOT NULL;
CREATE INDEX flow_incidents_group_id_idx ON flow_incidents (group_id, instance, step);

-- As in 0001, and: the group id, the acknowledgement ({actor, note, at} in each
-- incident's `acknowledged`, absent: none), and `last_seen` only moves when the
-- incident changes (its kind, error or attempts), not on every transition.
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
