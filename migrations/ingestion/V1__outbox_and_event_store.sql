-- The outbox (seed design spec §6.1): accepted events waiting to reach the event store and the bus.
-- outbox_id is a UUID v7, so its order is arrival order and it doubles as the "oldest first" index
-- (the seed's idx_outbox_created_at would be a second copy of the same order on the hottest table).
CREATE TABLE ingestion.outbox (
    outbox_id       uuid        PRIMARY KEY,
    -- hash(aggregate_id) mod 16: the unit of ordering; one processor worker holds a shard at a time.
    shard           smallint    NOT NULL CHECK (shard >= 0 AND shard < 16),
    event_id        uuid        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    event_payload   jsonb       NOT NULL,
    retry_count     integer     NOT NULL DEFAULT 0,
    last_error      text,
    last_attempt_at timestamptz
);
-- A client-supplied event_id is the idempotency key: one row per event.
CREATE UNIQUE INDEX outbox_event_id_key ON ingestion.outbox (event_id);
CREATE INDEX idx_outbox_shard ON ingestion.outbox (shard, outbox_id);

-- The append-only event log (seed §6.2); `timestamp` of the seed is event_time (ADR-0015).
CREATE TABLE ingestion.event_store (
    event_id     uuid        PRIMARY KEY,
    event_type   text        NOT NULL,
    aggregate_id text        NOT NULL,
    event_time   timestamptz NOT NULL,
    ingested_at  timestamptz NOT NULL,
    payload      jsonb       NOT NULL,
    metadata     jsonb       NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_event_store_aggregate ON ingestion.event_store (aggregate_id, event_time);
CREATE INDEX idx_event_store_type ON ingestion.event_store (event_type, event_time);
CREATE INDEX idx_event_store_timestamp ON ingestion.event_store (event_time);

-- Idempotency-Key header → the event it created, so a repeat answers with the same event_id.
CREATE TABLE ingestion.idempotency_keys (
    key        text        PRIMARY KEY,
    event_id   uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_idempotency_keys_created_at ON ingestion.idempotency_keys (created_at);

-- NOTIFY in the inserting transaction (delivered at commit). A statement trigger keeps a group
-- commit at one round trip; NOTIFY is only a hint, the processor's poll is the truth.
CREATE FUNCTION ingestion.notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cj_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON ingestion.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION ingestion.notify_outbox();
