-- Rules (the seed's action_config, SPEC §10): which events fire which webhook.
CREATE TABLE actions.rules (
    rule_id         uuid        PRIMARY KEY,
    name            text        NOT NULL,
    -- An exact event type, `prefix.*`, or `*`.
    event_type      text        NOT NULL,
    -- The predicate on the envelope (see src/services/actions/condition.rs); NULL matches all.
    condition       jsonb,
    webhook_url     text        NOT NULL,
    -- `whsec_` + base64 of the key bytes (Standard Webhooks).
    webhook_secret  text        NOT NULL,
    webhook_headers jsonb       NOT NULL DEFAULT '{}',
    -- NULL: the configured defaults (CJ_ACTIONS_WEBHOOK_TIMEOUT, CJ_ACTIONS_DEDUP_WINDOW).
    timeout_ms      integer,
    dedup_window_ms bigint,
    enabled         boolean     NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_rules_enabled ON actions.rules (enabled) WHERE enabled;

-- One row per (event, rule): recorded by the consumer before it commits its offset, then driven
-- to a final state by the delivery worker. delivery_id is the `webhook-id` the receiver sees, the
-- same on every retry, so receivers can deduplicate.
CREATE TABLE actions.deliveries (
    delivery_id      uuid        PRIMARY KEY,
    rule_id          uuid        NOT NULL,
    event_id         uuid        NOT NULL,
    event_type       text        NOT NULL,
    aggregate_id     text        NOT NULL,
    -- When the platform accepted the event: dedup windows compare these, so a lagging or
    -- replaying consumer decides exactly as a live one would.
    event_at         timestamptz NOT NULL,
    -- The webhook URL when the delivery was recorded: the circuit breaker's key.
    endpoint         text        NOT NULL,
    -- The envelope exactly as it travelled on the bus: the body that is signed and sent.
    body             text        NOT NULL,
    traceparent      text,
    status           text        NOT NULL CHECK (status IN
                         ('pending', 'delivering', 'delivered', 'failed', 'deduplicated',
                          'circuit_open', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    -- pending: when it is due; delivering: when the claim expires (a vanished worker's claim
    -- is taken over after that).
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claim_token      uuid,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT deliveries_event_rule_key UNIQUE (event_id, rule_id)
);
CREATE INDEX idx_deliveries_due ON actions.deliveries (next_attempt_at)
    WHERE status IN ('pending', 'delivering');
CREATE INDEX idx_deliveries_dedup ON actions.deliveries (rule_id, event_type, aggregate_id, event_at);
CREATE INDEX idx_deliveries_rule ON actions.deliveries (rule_id, created_at);
CREATE INDEX idx_deliveries_status ON actions.deliveries (status, created_at);

-- Circuit breaker per endpoint, shared by every instance and surviving restarts.
CREATE TABLE actions.endpoint_health (
    endpoint             text        PRIMARY KEY,
    state                text        NOT NULL DEFAULT 'closed'
                         CHECK (state IN ('closed', 'open', 'half_open')),
    consecutive_failures integer     NOT NULL DEFAULT 0,
    opened_at            timestamptz,
    open_until           timestamptz,
    last_failure_at      timestamptz,
    last_success_at      timestamptz,
    last_error           text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Messages the consumer could not read (same columns as every consumer's DLQ).
CREATE TABLE actions.dlq (
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
CREATE UNIQUE INDEX dlq_source_key ON actions.dlq (consumer, topic, "partition", "offset");
CREATE INDEX idx_actions_dlq_status ON actions.dlq (status);
