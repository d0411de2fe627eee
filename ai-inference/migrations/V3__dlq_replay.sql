-- Replays of ai.dlq are asynchronous (the model runs only here): `cornjacket dlq replay` marks a
-- pending row 'replaying', the sidecar's replay worker claims it, re-processes its event_payload
-- and sets 'replayed', or 'pending' again with the new error. The constraint is dropped by its
-- generated name and re-added under it, so the statuses can be extended again the same way.
ALTER TABLE ai.dlq DROP CONSTRAINT IF EXISTS dlq_status_check;
ALTER TABLE ai.dlq ADD CONSTRAINT dlq_status_check
    CHECK (status IN ('pending', 'replaying', 'replayed', 'discarded'));
-- The worker's claim (WHERE status = 'replaying' ORDER BY updated_at, dlq_id) reads only the few
-- requested rows, however many dead letters are kept.
CREATE INDEX IF NOT EXISTS idx_dlq_replaying ON ai.dlq (updated_at, dlq_id) WHERE status = 'replaying';
