//! The rows of the table, one module each; `main` runs them in its order.

pub mod anomaly_to_webhook;
pub mod batch_max;
pub mod broker_baseline;
pub mod console;
pub mod db_ceiling;
pub mod e2e_latency;
pub mod footprint;
pub mod http_ceiling;
pub mod ingest_baseline;
pub mod ingest_max;
pub mod mqtt;
pub mod pipeline_max;
pub mod query;
pub mod timeseries;
