//! Cornjacket: an event platform for IoT and security streams (see SPEC.md and README.md).
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod envelope;
pub mod infra;
pub mod services;
pub mod simulate;
pub mod supervisor;
pub mod webhook_listen;
