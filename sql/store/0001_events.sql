-- dcbflow store, migration 1: the event log.
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
-- slow down by an order of magnitude under sustained writes (docs/architecture.md, indexes).
CREATE INDEX events_tags_idx ON events USING gin (tags) WITH (fastupdate = off);
-- Type-only query items and type-scoped reads in position order.
CREATE INDEX events_type_idx ON events (type, position);
-- Late-committer checks: events of transactions a reader's snapshot did not see.
CREATE INDEX events_transaction_idx ON events (transaction_id);
