-- [Actions] Deliveries that scale out and heal by themselves, every attempt recorded, secrets that
-- rotate with an overlap.

-- Every webhook call, as the receiver answered it (GET /api/v1/actions/deliveries/{id}/attempts).
-- Goes with its delivery when retention deletes it.
CREATE TABLE actions.attempts (
    delivery_id      uuid        NOT NULL REFERENCES actions.deliveries ON DELETE CASCADE,
    -- 1, 2, …: the delivery's attempts counter after this call; never reused, also across
    -- recoveries and manual retries.
    attempt          integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      integer     NOT NULL,
    status_code      integer,
    -- At most 512 bytes of the answer, secrets and credentials masked.
    response_excerpt text,
    error            text,
    -- What the receiver asked for with Retry-After, in seconds, when it did.
    retry_after_s    double precision,
    PRIMARY KEY (delivery_id, attempt)
);
-- The stall check's "when did a call last happen".
CREATE INDEX idx_attempts_started ON actions.attempts (started_at);

-- The retry schedule of a delivery restarts (recovery, manual retry) without renumbering its
-- attempts: the schedule index is attempts - round_start.
ALTER TABLE actions.deliveries ADD COLUMN round_start integer NOT NULL DEFAULT 0;

-- The claim goes round-robin over endpoints with due work, one delivery each in turn, skipping
-- endpoints whose breaker is open: a loose index scan over this index finds them without reading
-- a deep backlog.
CREATE INDEX idx_deliveries_endpoint_due ON actions.deliveries (endpoint, next_attempt_at, delivery_id)
    WHERE status IN ('pending', 'delivering');
-- Short-circuited deliveries are sent again when their endpoint's breaker closes; the oldest
-- is the trial when nothing else is due for the endpoint.
CREATE INDEX idx_deliveries_circuit_open ON actions.deliveries (endpoint, delivery_id)
    WHERE status = 'circuit_open';
-- When each endpoint was last given a slot: least recently served goes first.
ALTER TABLE actions.endpoint_health ADD COLUMN served_at timestamptz;

-- 410 Gone from the receiver disables the rule, saying why; enabling it again clears both.
ALTER TABLE actions.rules ADD COLUMN disabled_reason text;
ALTER TABLE actions.rules ADD COLUMN disabled_at timestamptz;
-- Secret rotation: the previous secret keeps signing (a second signature) until it expires.
ALTER TABLE actions.rules ADD COLUMN previous_secret text;
ALTER TABLE actions.rules ADD COLUMN previous_secret_expires_at timestamptz;
