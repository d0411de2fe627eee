-- Readings of several quantities (SPEC §9 as amended by [Telemetry]): one row per
-- (device, key, time, event). Rows from before (and writers that name no key) keep their one
-- quantity under the key `value`,
-- which is what a single-value reading without a `metric` means.
--
-- TimescaleDB's 1-minute continuous aggregate of V1 grouped by device only; it goes, since the
-- rollups below are kept by the writer on either kind of server (one implementation, tested
-- here on plain PostgreSQL, and the same answers wherever it runs).
DROP MATERIALIZED VIEW IF EXISTS tsdb.sensor_readings_1m;

ALTER TABLE tsdb.sensor_readings ADD COLUMN key text NOT NULL DEFAULT 'value';
-- A quantity of a multi-quantity reading may have no unit.
ALTER TABLE tsdb.sensor_readings ALTER COLUMN unit DROP NOT NULL;
ALTER TABLE tsdb.sensor_readings DROP CONSTRAINT sensor_readings_pkey;
ALTER TABLE tsdb.sensor_readings ADD PRIMARY KEY (device_id, key, time, event_id);

-- Rollups at 1 minute and 1 hour, epoch-aligned like the queries' buckets. The writer adds to
-- them only what its insert into sensor_readings actually inserted (ON CONFLICT DO NOTHING ...
-- RETURNING), in the same transaction, so a redelivered reading changes nothing. `last` is the
-- value of the newest reading by (time, event_id), the same tie-break as the raw query's.
-- fillfactor leaves room in each page so the updates of a current bucket stay HOT.
CREATE TABLE tsdb.sensor_rollups_1m (
    device_id     text             NOT NULL,
    key           text             NOT NULL,
    bucket        timestamptz      NOT NULL,
    count         bigint           NOT NULL,
    sum           double precision NOT NULL,
    min           double precision NOT NULL,
    max           double precision NOT NULL,
    last_time     timestamptz      NOT NULL,
    last_event_id uuid             NOT NULL,
    last_value    double precision NOT NULL,
    PRIMARY KEY (device_id, key, bucket)
) WITH (fillfactor = 70);
CREATE TABLE tsdb.sensor_rollups_1h (LIKE tsdb.sensor_rollups_1m INCLUDING ALL) WITH (fillfactor = 70);
-- For the retention jobs' range deletes (buckets are written in roughly time order).
CREATE INDEX idx_sensor_rollups_1m_bucket ON tsdb.sensor_rollups_1m USING brin (bucket);
CREATE INDEX idx_sensor_rollups_1h_bucket ON tsdb.sensor_rollups_1h USING brin (bucket);

-- Existing readings, rolled up, so nothing already stored is missing from a long chart.
INSERT INTO tsdb.sensor_rollups_1m
SELECT device_id, key, date_bin(interval '1 minute', time, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
       count(*), sum(value), min(value), max(value),
       (array_agg(time ORDER BY time DESC, event_id DESC))[1],
       (array_agg(event_id ORDER BY time DESC, event_id DESC))[1],
       (array_agg(value ORDER BY time DESC, event_id DESC))[1]
FROM tsdb.sensor_readings GROUP BY 1, 2, 3;
INSERT INTO tsdb.sensor_rollups_1h
SELECT device_id, key, date_bin(interval '1 hour', time, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
       count(*), sum(value), min(value), max(value),
       (array_agg(time ORDER BY time DESC, event_id DESC))[1],
       (array_agg(event_id ORDER BY time DESC, event_id DESC))[1],
       (array_agg(value ORDER BY time DESC, event_id DESC))[1]
FROM tsdb.sensor_readings GROUP BY 1, 2, 3;
