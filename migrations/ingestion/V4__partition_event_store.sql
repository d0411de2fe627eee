-- The event store partitioned by ingest day (SPEC §13): retention drops a whole day instead of
-- deleting rows from the largest table. The key is ingested_at, the platform's own clock, so new
-- rows always land in today's partition (event_time is the client's and can be anything). Days
-- are UTC; a daily partition is named event_store_pYYYYMMDD and covers [day, day + 1). The
-- ingestion service creates them a few days ahead and drops those past CJ_RETENTION_EVENTS; the
-- DEFAULT partition catches anything outside the created range, so an insert is never refused.
--
-- A primary key of a partitioned table must contain the partition key, hence
-- (event_id, ingested_at). event_id stays unique: the outbox's unique event_id and
-- ingestion.client_event_ids admit each event once, and retention trims client_event_ids no
-- earlier than the events themselves. The key's leading event_id still serves lookups by event_id.

ALTER TABLE ingestion.event_store RENAME TO event_store_unpartitioned;
ALTER INDEX ingestion.event_store_pkey RENAME TO event_store_unpartitioned_pkey;
DROP INDEX ingestion.idx_event_store_aggregate;
DROP INDEX ingestion.idx_event_store_type;
DROP INDEX ingestion.idx_event_store_timestamp;

CREATE TABLE ingestion.event_store (
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    aggregate_id text        NOT NULL,
    event_time   timestamptz NOT NULL,
    ingested_at  timestamptz NOT NULL,
    payload      jsonb       NOT NULL,
    metadata     jsonb       NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_store_pkey PRIMARY KEY (event_id, ingested_at)
) PARTITION BY RANGE (ingested_at);

CREATE TABLE ingestion.event_store_default PARTITION OF ingestion.event_store DEFAULT;

-- A partition for every day that has events, and for today and the next three days.
DO $$
DECLARE
    d date;
BEGIN
    FOR d IN
        SELECT DISTINCT (ingested_at AT TIME ZONE 'UTC')::date FROM ingestion.event_store_unpartitioned
        UNION
        SELECT (now() AT TIME ZONE 'UTC')::date + i FROM generate_series(0, 3) AS i
    LOOP
        EXECUTE format(
            'CREATE TABLE ingestion.%I PARTITION OF ingestion.event_store FOR VALUES FROM (%L) TO (%L)',
            'event_store_p' || to_char(d, 'YYYYMMDD'),
            d::timestamp AT TIME ZONE 'UTC',
            (d + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END $$;

INSERT INTO ingestion.event_store
    (event_id, event_type, aggregate_id, event_time, ingested_at, payload, metadata, stored_at)
SELECT event_id, event_type, aggregate_id, event_time, ingested_at, payload, metadata, stored_at
FROM ingestion.event_store_unpartitioned;
DROP TABLE ingestion.event_store_unpartitioned;

-- The indexes of V1, now partitioned (one per partition), built after the copy.
CREATE INDEX idx_event_store_aggregate ON ingestion.event_store (aggregate_id, event_time);
CREATE INDEX idx_event_store_type ON ingestion.event_store (event_type, event_time);
CREATE INDEX idx_event_store_timestamp ON ingestion.event_store (event_time);
-- Retention deletes the default partition's old rows in slices by ingested_at; the daily
-- partitions need no such index (they are dropped whole). Usually empty, so it costs nothing.
CREATE INDEX idx_event_store_default_ingested_at ON ingestion.event_store_default (ingested_at);
