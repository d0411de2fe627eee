-- A stored event as its envelope (src/envelope/mod.rs): the JSON object the processor published,
-- re-assembled from the event store's columns, with both times in the platform's one textual
-- form (RFC 3339, microseconds, Z: envelope::format_time). The one definition for everything
-- that reads events back as envelopes: `cornjacket replay`, the bus recovery, `cornjacket
-- projections rebuild` and the tests. Callers that send it take `::text` (jsonb's canonical
-- text); a replay overrides `metadata` with `||`.
--
-- LANGUAGE sql and STABLE (to_char is), so the planner inlines it into the caller's query.
CREATE FUNCTION ingestion.envelope_json(e ingestion.event_store) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'event_id', e.event_id, 'event_type', e.event_type, 'aggregate_id', e.aggregate_id,
        'event_time', to_char(e.event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'ingested_at', to_char(e.ingested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'payload', e.payload,
        'metadata', e.metadata)
$$;
