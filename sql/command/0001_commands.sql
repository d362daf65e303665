-- dcbflow command layer, migration 1: every executed command, written in the same
-- transaction as the events it appended.

CREATE TABLE commands (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type            text        NOT NULL CHECK (type <> ''),
    payload         jsonb       NOT NULL,
    idempotency_key text        UNIQUE,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    positions       bigint[]    NOT NULL,
    outcome         text        NOT NULL,
    attempts        int         NOT NULL,
    executed_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX commands_transaction_idx ON commands (transaction_id);
