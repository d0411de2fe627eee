-- Client-supplied event_ids ever accepted. The outbox forgets an event once it is published, and
-- a check against the event store can race with the processor moving it; a row here is written in
-- the same statement as the outbox row and never moved, so its unique index settles concurrent
-- and late repeats alike. Retention trims it together with the event store.
CREATE TABLE ingestion.client_event_ids (
    event_id   uuid        PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_client_event_ids_created_at ON ingestion.client_event_ids (created_at);
