-- dcbflow outbox layer, migration 1: dead letters and consumer-side deduplication.

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

-- Message ids a consumer has processed (see `outbox::mark_processed`).
CREATE TABLE processed_messages (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
