-- dcbflow flow layer, migration 3: the instance row's update in place
-- (docs/performance.md, issue 14, second pass).
--
-- Every transition rewrites its instance's row (flow_sync). The index on
-- (status, updated_at) of migration 1 changed with every transition, so every
-- update was a new row version with an entry in each of the table's six
-- indexes: the flow bench counted 0 HOT updates of 4,476. No query filters or
-- orders on updated_at; the index served status filters, and the listing orders
-- by (started_at DESC, id DESC). It is replaced by (status, started_at DESC,
-- id DESC), which serves the listing filtered by status. With no indexed column
-- changing on most transitions (status changes a few times per instance) and
-- room left on each page for the new version, PostgreSQL updates the row in
-- place (HOT): one heap tuple, no index entries.
--
-- Building the index blocks writes to flow_instances while it runs (a read
-- model: transitions wait, nothing is lost).
DROP INDEX flow_instances_status_idx;
CREATE INDEX flow_instances_status_started_idx ON flow_instances (status, started_at DESC, id DESC);
ALTER TABLE flow_instances SET (fillfactor = 70);

-- The wake-ups: claims and heartbeats change unindexed columns only; leave
-- them room to do it in place.
ALTER TABLE flow_wakeups SET (fillfactor = 50);
