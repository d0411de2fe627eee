-- The outbox is a queue: every row is inserted, updated at most a few times and deleted within
-- milliseconds, so it holds a few hundred live rows and accumulates dead ones fast (tens of
-- thousands between default autovacuums at 1k ev/s, which the processor's claim scans must skip).
-- Vacuum it after a fixed number of dead rows instead of a fraction of a tiny table, without the
-- cost-based pauses, and never truncate it (truncation takes an exclusive lock that would stall
-- the writers).
ALTER TABLE ingestion.outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    vacuum_truncate = false
);
