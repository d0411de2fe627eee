//! The integration tests, one binary (STYLE §11; svix's `tests/it`): each module is a suite
//! against the real services and infrastructure, and `common` holds the fixtures they share
//! (the `spawn_app`-style harness, the database proxy, an own broker, the webhook receiver,
//! the Mosquitto and sidecar helpers). One binary links once instead of 24 times.

mod common;

mod actions;
mod actions_replicas;
mod activity;
mod auth;
mod bad_input;
mod broker_restart;
mod chain;
mod chaos;
mod console;
mod console_browser;
mod consumer_failures;
mod db_blackhole;
mod deploy_files;
mod dlq;
mod e2e;
mod hardening;
mod metrics;
mod mqtt;
mod mqtt_devices;
mod openapi;
mod operations;
mod process;
mod read_path;
mod retention;
mod retention_clock;
mod simulate;
mod slow_clients;
mod telemetry;
mod traces;
mod tsdb;
mod webhook_listen;
mod write_path;
