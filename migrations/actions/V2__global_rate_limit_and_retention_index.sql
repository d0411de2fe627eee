-- The global webhook rate limit (SPEC §10): a GCRA bucket in one row — its theoretical arrival
-- time — shared by every instance and kept across restarts. Each call reserves the next slot
-- with one UPDATE under the row lock (src/services/actions/deliver.rs, reserve_slot).
CREATE TABLE actions.rate_limit (
    id  boolean     PRIMARY KEY DEFAULT true CHECK (id),
    tat timestamptz NOT NULL DEFAULT 'epoch'
);
INSERT INTO actions.rate_limit DEFAULT VALUES;

-- The retention job deletes finished deliveries by age, in slices.
CREATE INDEX idx_deliveries_finished ON actions.deliveries (updated_at)
    WHERE status NOT IN ('pending', 'delivering');
