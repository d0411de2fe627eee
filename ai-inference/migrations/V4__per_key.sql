-- Multi-key readings (payload.values): every quantity of a reading is scored by a model of its
-- own, so results are one row per (event, key) and model state one row per (device, key). Rows
-- from before keep the key a legacy reading without `metric` has, 'value': nothing is lost, a
-- device's model continues under that key, and a redelivered old reading still finds its result.
-- Adding a column with a constant default rewrites no table (PostgreSQL 11+).
ALTER TABLE ai.inference_results ADD COLUMN key text NOT NULL DEFAULT 'value';
ALTER TABLE ai.inference_results DROP CONSTRAINT inference_results_pkey;
ALTER TABLE ai.inference_results ADD CONSTRAINT inference_results_pkey PRIMARY KEY (event_id, key);

ALTER TABLE ai.device_models ADD COLUMN key text NOT NULL DEFAULT 'value';
ALTER TABLE ai.device_models DROP CONSTRAINT device_models_pkey;
ALTER TABLE ai.device_models ADD CONSTRAINT device_models_pkey PRIMARY KEY (device_id, key);

-- One quantity's series of a device. idx_inference_results_device_time (device_id, time) stays:
-- the query service lists a device's results newest first across its keys.
CREATE INDEX idx_inference_results_device_key_time ON ai.inference_results (device_id, key, time);
