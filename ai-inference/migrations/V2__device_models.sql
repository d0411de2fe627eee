-- The per-device model state (see ai_inference/model.py), written in the transaction that stores
-- each result, so a restart or a partition moving to another instance resumes where it was and a
-- redelivered reading is never learned twice.
CREATE TABLE ai.device_models (
    device_id     text             PRIMARY KEY,
    model         text             NOT NULL,
    model_version text             NOT NULL,
    readings      bigint           NOT NULL,
    n             double precision NOT NULL,
    mean          double precision NOT NULL,
    variance      double precision NOT NULL,
    updated_at    timestamptz      NOT NULL DEFAULT now()
);
