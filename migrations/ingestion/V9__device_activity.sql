-- Devices that go quiet ([Telemetry]): every device's last-seen time (when the platform last
-- committed a sensor.reading of it, by the platform's clock), its state, and the transition
-- that is decided but not yet in the outbox.
--
-- A transition is decided by one UPDATE (the row lock makes two instances decide it once) that
-- sets `pending` and the event's fields; the event goes into the outbox through the writer with
-- an event_id derived from (device, kind, changed_seen), so a crash between the two, or two
-- instances emitting the same pending row, still stores it once (a repeated client event_id
-- with the same body is a duplicate); `pending` is cleared after. No next transition is decided
-- while one is pending, so transitions reach the outbox in the order they were decided.
CREATE TABLE ingestion.device_activity (
    device_id       text        PRIMARY KEY,
    last_seen       timestamptz NOT NULL,
    state           text        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'inactive')),
    -- last_seen when the state last changed: names the transition, and a reading seen after it
    -- is what reactivates an inactive device.
    changed_seen    timestamptz,
    -- The per-device inactivity period in seconds (NULL: CJ_DEVICE_INACTIVITY_TIMEOUT; 0: never).
    timeout_seconds integer     CHECK (timeout_seconds >= 0),
    pending         text        CHECK (pending IN ('device.inactive', 'device.active')),
    pending_at      timestamptz,
    pending_since   timestamptz,
    pending_timeout integer,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_device_activity_active ON ingestion.device_activity (last_seen) WHERE state = 'active';
CREATE INDEX idx_device_activity_inactive ON ingestion.device_activity (device_id) WHERE state = 'inactive';
CREATE INDEX idx_device_activity_pending ON ingestion.device_activity (device_id) WHERE pending IS NOT NULL;
