//! Adapters shared by the services: database, bus, HTTP and telemetry.

pub mod auth;
pub mod bus;
pub mod clock_guard;
pub mod consume;
pub mod db;
pub mod dlq;
pub mod extract;
pub mod http;
pub mod jobs;
pub mod metrics_catalogue;
pub mod telemetry;
pub mod webhook_signature;
