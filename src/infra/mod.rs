//! Adapters shared by the services: database, bus, HTTP and telemetry.

pub mod bus;
pub mod db;
pub mod http;
pub mod telemetry;
