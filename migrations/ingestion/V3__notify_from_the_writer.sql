-- The statement trigger made every outbox commit NOTIFY, and PostgreSQL serialises committing
-- transactions that NOTIFY on one global queue lock held through the WAL flush — which undid group
-- commit. The writer now wakes processors in its own process directly and includes pg_notify in
-- its insert statement only every few milliseconds, for processors in other processes.
DROP TRIGGER outbox_notify ON ingestion.outbox;
DROP FUNCTION ingestion.notify_outbox();
