-- Per-aggregate order by construction, idempotency that refuses a changed body, and a quarantine
-- for rows that can never move (src/services/ingestion/writer.rs and processor.rs say how each is
-- used).

-- 1. The outbox's order is `seq`, drawn by the writer while it holds the advisory lock of every
-- shard it writes (ingestion.append below). Two transactions that write one shard are therefore
-- serialised, and the later one draws its seq only after the earlier one committed: within a
-- shard, seq order is commit order, and no committed row can ever have an uncommitted row of the
-- same shard below it. The processor claims in seq order without skipping anything. (outbox_id,
-- a UUID v7 drawn by concurrent commit tasks before their transactions even started, was neither.)
CREATE SEQUENCE ingestion.outbox_seq;
ALTER TABLE ingestion.outbox ADD COLUMN seq bigint;
UPDATE ingestion.outbox o SET seq = n.rn
FROM (SELECT outbox_id, row_number() OVER (ORDER BY outbox_id) AS rn FROM ingestion.outbox) AS n
WHERE o.outbox_id = n.outbox_id;
SELECT setval('ingestion.outbox_seq', COALESCE((SELECT max(seq) FROM ingestion.outbox), 0) + 1, false);
ALTER TABLE ingestion.outbox ALTER COLUMN seq SET DEFAULT nextval('ingestion.outbox_seq');
ALTER TABLE ingestion.outbox ALTER COLUMN seq SET NOT NULL;
ALTER SEQUENCE ingestion.outbox_seq OWNED BY ingestion.outbox.seq;
-- One index on the hottest table instead of three: the claim reads (shard, seq); the unique
-- event_id moved to ingestion.event_ids, which outlives the outbox row anyway.
ALTER TABLE ingestion.outbox DROP CONSTRAINT outbox_pkey;
DROP INDEX ingestion.idx_outbox_shard;
DROP INDEX ingestion.outbox_event_id_key;
ALTER TABLE ingestion.outbox DROP COLUMN outbox_id;
ALTER TABLE ingestion.outbox ADD PRIMARY KEY (shard, seq);

-- 2. Every event_id ever accepted (the platform's own as well as the clients'), with a
-- fingerprint of what the client sent, so that a repeat of an id is recognised whether the
-- client or the platform chose it: the same body is a duplicate (answered, not stored again), a
-- different one a conflict (409). Rows from before this migration have no fingerprint; a repeat
-- of one is treated as a duplicate.
ALTER TABLE ingestion.client_event_ids RENAME TO event_ids;
ALTER INDEX ingestion.client_event_ids_pkey RENAME TO event_ids_pkey;
ALTER INDEX ingestion.idx_client_event_ids_created_at RENAME TO idx_event_ids_created_at;
ALTER TABLE ingestion.event_ids ADD COLUMN body_hash bytea;
INSERT INTO ingestion.event_ids (event_id, created_at)
SELECT event_id, ingested_at FROM ingestion.event_store
UNION ALL
SELECT event_id, created_at FROM ingestion.outbox
ON CONFLICT (event_id) DO NOTHING;

-- 3. Idempotency keys belong to the authenticated subject ('' without authentication): one
-- tenant's key never answers for another's. The fingerprint tells a retry from a reuse.
ALTER TABLE ingestion.idempotency_keys ADD COLUMN subject text NOT NULL DEFAULT '';
ALTER TABLE ingestion.idempotency_keys ADD COLUMN body_hash bytea;
ALTER TABLE ingestion.idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE ingestion.idempotency_keys ADD PRIMARY KEY (subject, key);

-- 4. Rows that can never move (a value the database refuses, a message the broker refuses),
-- each narrowed down alone by the processor and moved here with its error, so that the rest of
-- its shard goes on. `cornjacket outbox quarantine …` and /api/v1/outbox/quarantine list,
-- re-queue (as a new outbox row at the end of its shard) and discard them.
CREATE TABLE ingestion.outbox_quarantine (
    seq            bigint      PRIMARY KEY,
    shard          smallint    NOT NULL,
    event_id       uuid        NOT NULL,
    created_at     timestamptz NOT NULL,
    event_payload  jsonb       NOT NULL,
    retry_count    integer     NOT NULL,
    error          text        NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now()
);

-- Takes the writer lock of each shard, in sorted order so that two writers never deadlock.
-- Namespace 0x636a7772 ('cjwr'), distinct from the processor's claim locks (writers never wait
-- for a publishing worker). Held to the end of the transaction.
CREATE FUNCTION ingestion.lock_shards(p_shard int2[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s int2;
BEGIN
    FOR s IN SELECT DISTINCT x FROM unnest(p_shard) AS x ORDER BY x LOOP
        PERFORM pg_advisory_xact_lock(1667921778, s);
    END LOOP;
END $$;

-- The writer's insert, one round trip: the shard locks first, then every event id (for later
-- repeats) and the outbox rows, in array order, which is the order their requests were accepted;
-- seq (the column default) is drawn row by row as they are inserted. The arrays hold only events
-- the writer decided are new.
CREATE FUNCTION ingestion.append(
    p_shard    int2[],
    p_event_id uuid[],
    p_payload  text[],
    p_hash     bytea[],
    p_notify   boolean
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM ingestion.lock_shards(p_shard);
    INSERT INTO ingestion.event_ids (event_id, body_hash)
    SELECT * FROM unnest(p_event_id, p_hash)
    ON CONFLICT (event_id) DO NOTHING;
    INSERT INTO ingestion.outbox (shard, event_id, event_payload)
    SELECT u.shard, u.event_id, u.payload::jsonb
    FROM unnest(p_shard, p_event_id, p_payload) WITH ORDINALITY AS u(shard, event_id, payload, ord)
    ORDER BY u.ord;
    IF p_notify THEN
        PERFORM pg_notify('cj_outbox', '');
    END IF;
END $$;
