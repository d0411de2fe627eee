-- sensor_state keeps every quantity of a device under `values` (readings may carry several):
-- each existing row gets its one quantity there, named `value`, with the version of the event
-- that set it, so the per-quantity merge of the upsert has something to compare with and no
-- latest value is lost.
UPDATE eventhandler.projections
SET state = state || jsonb_build_object('values', jsonb_build_object('value', jsonb_build_object(
        'value', state->'value',
        'unit', state->'unit',
        'event_time', state->'event_time',
        'event_id', last_event_id::text)))
WHERE projection_type = 'sensor_state' AND NOT state ? 'values' AND state ? 'value';
