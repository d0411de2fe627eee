-- One row per scored sensor reading; event_id is the source event's, so a redelivery is a no-op.
CREATE TABLE ai.inference_results (
    event_id      uuid             PRIMARY KEY,
    device_id     text             NOT NULL,
    time          timestamptz      NOT NULL,
    value         double precision NOT NULL,
    score         double precision NOT NULL,
    is_anomaly    boolean          NOT NULL,
    model         text             NOT NULL,
    model_version text             NOT NULL,
    created_at    timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX idx_inference_results_device_time ON ai.inference_results (device_id, time);
CREATE INDEX idx_inference_results_anomalies ON ai.inference_results (time) WHERE is_anomaly;

-- Dead letters: the same columns as eventhandler.dlq, so the query service can list both with
-- one UNION (GET /api/v1/query/dlq); the source position makes a redelivery record nothing twice.
CREATE TABLE ai.dlq (
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
CREATE UNIQUE INDEX dlq_source_key ON ai.dlq (consumer, topic, "partition", "offset");
CREATE INDEX idx_dlq_consumer ON ai.dlq (consumer);
CREATE INDEX idx_dlq_status ON ai.dlq (status);
CREATE INDEX idx_dlq_failed_at ON ai.dlq (failed_at);
