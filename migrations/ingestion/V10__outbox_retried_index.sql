-- Rows the processor has retried, for the health check's "over the retry limit" count: a row is
-- indexed only once it has failed (new rows, retry_count 0, add nothing to the insert path), so
-- the count reads a handful of entries instead of scanning a backlog of a million rows.
CREATE INDEX idx_outbox_retried ON ingestion.outbox (retry_count) WHERE retry_count > 0;
