-- Recovery from a bus that lost what it was given (a broker restarted on memory storage, a topic
-- deleted and recreated): see src/services/ingestion/recovery.rs.
--
-- publish_seq: the order in which the processor published events, drawn in outbox order as each
-- batch moves (after the broker acknowledged it). A shard is published by one worker at a time,
-- batch after batch, so within a shard (hence within an aggregate) publish_seq is the order the
-- bus received. Rows stored before this migration have none and are never republished by the
-- recovery (`cornjacket replay` still covers them).
CREATE SEQUENCE ingestion.publish_seq;
ALTER TABLE ingestion.event_store ADD COLUMN publish_seq bigint;
-- Appended in increasing order, so a BRIN index is enough for "everything after N".
CREATE INDEX idx_event_store_publish_seq ON ingestion.event_store USING brin (publish_seq);

-- Per (shard, topic, partition): the highest offset the broker acknowledged and the highest
-- publish_seq of the shard moved with it, written in the move transaction. Keyed by shard so
-- that concurrent workers never contend for a row; a shard's batches are sequential, so every
-- event of the shard with publish_seq <= last_seq sits at or below max_offset.
CREATE TABLE ingestion.bus_offsets (
    shard       smallint NOT NULL,
    topic       text     NOT NULL,
    "partition" integer  NOT NULL,
    max_offset  bigint   NOT NULL,
    last_seq    bigint   NOT NULL,
    PRIMARY KEY (topic, "partition", shard)
);

-- Per (topic, shard): every event with publish_seq <= consumed_seq has been consumed (committed)
-- by every consumer group that reads the topic, so a recovery republishes only what follows.
CREATE TABLE ingestion.bus_progress (
    topic          text        NOT NULL,
    shard          smallint    NOT NULL,
    consumed_seq   bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, shard)
);

-- Every recovery, for operators (and `cj_bus_recoveries_total`).
CREATE TABLE ingestion.bus_recoveries (
    recovered_at timestamptz NOT NULL DEFAULT now(),
    topics       text[]      NOT NULL,
    republished  bigint      NOT NULL
);
