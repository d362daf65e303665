-- dcbflow projection layer, migration 1: named subscriptions' checkpoints.

-- Durable, named checkpoints: every event matching the subscription's query with
-- a position up to `position` has been processed.
CREATE TABLE subscriptions (
    name       text PRIMARY KEY CHECK (name <> ''),
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
