-- Read models (seed design spec §6.4): one row per (projection_type, aggregate_id).
CREATE TABLE eventhandler.projections (
    projection_id        uuid        PRIMARY KEY,
    projection_type      text        NOT NULL,
    aggregate_id         text        NOT NULL,
    state                jsonb       NOT NULL,
    last_event_id        uuid        NOT NULL,
    last_event_timestamp timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    -- Also serves "list a type" and cursor paging by aggregate_id (the seed's idx_projections_type).
    CONSTRAINT projections_type_aggregate_key UNIQUE (projection_type, aggregate_id)
);
CREATE INDEX idx_projections_aggregate_id ON eventhandler.projections (aggregate_id);

-- Dead letters (seed §6.3), plus where the message came from so a redelivery never doubles it.
CREATE TABLE eventhandler.dlq (
    dlq_id        uuid        PRIMARY KEY,
    consumer      text        NOT NULL,
    event_id      uuid,
    event_type    text,
    aggregate_id  text,
    event_payload jsonb,
    raw_payload   text,
    error_message text        NOT NULL,
    failed_at     timestamptz NOT NULL DEFAULT now(),
    retry_count   integer     NOT NULL DEFAULT 0,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'replayed', 'discarded')),
    topic         text,
    "partition"   integer,
    "offset"      bigint,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX dlq_source_key ON eventhandler.dlq (consumer, topic, "partition", "offset");
CREATE INDEX idx_dlq_consumer ON eventhandler.dlq (consumer);
CREATE INDEX idx_dlq_status ON eventhandler.dlq (status);
CREATE INDEX idx_dlq_failed_at ON eventhandler.dlq (failed_at);
