-- Sensor readings (SPEC §9) with typed columns. The primary key is the idempotency key of the
-- writer: a redelivered reading lands on its own row and is ignored. It also serves every query
-- of one device over a time range (device_id, time).
CREATE TABLE tsdb.sensor_readings (
    time        timestamptz      NOT NULL,
    device_id   text             NOT NULL,
    value       double precision NOT NULL,
    unit        text             NOT NULL,
    event_id    uuid             NOT NULL,
    ingested_at timestamptz,
    PRIMARY KEY (device_id, time, event_id)
);

-- Poison readings (same columns as every consumer's DLQ, so /api/v1/query/dlq reads them all).
CREATE TABLE tsdb.dlq (
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
CREATE UNIQUE INDEX dlq_source_key ON tsdb.dlq (consumer, topic, "partition", "offset");
CREATE INDEX idx_tsdb_dlq_status ON tsdb.dlq (status);

-- One migration for both kinds of server, decided when it runs (SPEC §4): with TimescaleDB
-- loaded, a hypertable, a 1-minute continuous aggregate and a retention policy; without it
-- (plain PostgreSQL), a BRIN index on time — readings arrive in time order, so a few pages of
-- BRIN cover what a large btree would — for the retention job's range deletes. The retention
-- policy's window is set again from CJ_RETENTION_TIMESERIES when the service starts.
-- (pg_settings, unlike current_setting, answers a role that may not read the setting with no
-- row instead of an error; an extension an administrator already created counts too.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
           AND EXISTS (SELECT 1 FROM pg_settings
                       WHERE name = 'shared_preload_libraries' AND setting LIKE '%timescaledb%'))
    THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('tsdb.sensor_readings', 'time',
                                  chunk_time_interval => interval '1 day');
        EXECUTE $v$
            CREATE MATERIALIZED VIEW tsdb.sensor_readings_1m
            WITH (timescaledb.continuous) AS
            SELECT time_bucket(interval '1 minute', time) AS bucket, device_id,
                   avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count,
                   last(value, time) AS last
            FROM tsdb.sensor_readings
            GROUP BY 1, 2
            WITH NO DATA
        $v$;
        PERFORM add_continuous_aggregate_policy('tsdb.sensor_readings_1m',
            start_offset => interval '1 hour', end_offset => interval '1 minute',
            schedule_interval => interval '1 minute');
        PERFORM add_retention_policy('tsdb.sensor_readings', interval '7 days');
    ELSE
        CREATE INDEX idx_sensor_readings_time ON tsdb.sensor_readings USING brin (time);
    END IF;
END
$$;
