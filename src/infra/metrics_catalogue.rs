//! Every metric the platform exports, with its type and HELP text, described once when the
//! registry is installed (the exporter then writes `# HELP` and `# TYPE` for each), and the
//! buckets of the histograms that do not measure seconds.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

use Kind::{Counter, Gauge, Histogram};

/// (name, type, help). A test checks that every metric the sources record is here.
pub const METRICS: &[(&str, Kind, &str)] = &[
    (
        "cj_build_info",
        Gauge,
        "Always 1; the labels name the running build (version, commit).",
    ),
    (
        "cj_auth_denied_total",
        Counter,
        "Requests refused by authentication or authorization, by reason.",
    ),
    (
        "cj_bus_recoveries_total",
        Counter,
        "Times the outbox processor found the bus had lost published events and republished them.",
    ),
    (
        "cj_bus_republished_total",
        Counter,
        "Events republished from the event store after the bus lost them.",
    ),
    (
        "cj_consumer_applied_total",
        Counter,
        "Messages a consumer applied to its store, by consumer.",
    ),
    (
        "cj_consumer_blocked_total",
        Counter,
        "Times a consumer stopped to wait for its database (an outage, not bad input).",
    ),
    (
        "cj_consumer_lag",
        Gauge,
        "Messages a consumer group is behind the end of a partition, by group, topic and partition.",
    ),
    (
        "cj_db_connections_dropped_total",
        Counter,
        "Database connections closed by the watchdog after the server stopped answering.",
    ),
    (
        "cj_dlq_entries",
        Gauge,
        "Dead letters held per consumer and status.",
    ),
    (
        "cj_dlq_written_total",
        Counter,
        "Messages written to a consumer's dead-letter table.",
    ),
    (
        "cj_event_store_partitions",
        Gauge,
        "Monthly partitions of the event store.",
    ),
    (
        "cj_events_accepted_total",
        Counter,
        "Events accepted (durable in the outbox), by source.",
    ),
    (
        "cj_events_skipped_total",
        Counter,
        "Events a consumer skipped as not its own (other event types), by consumer.",
    ),
    (
        "cj_http_header_timeouts_total",
        Counter,
        "Connections closed because their request headers did not arrive in time.",
    ),
    (
        "cj_http_open_connections",
        Gauge,
        "HTTP connections open, by port.",
    ),
    (
        "cj_http_rate_limited_total",
        Counter,
        "Requests refused by the per-client rate limit.",
    ),
    (
        "cj_http_request_duration_seconds",
        Histogram,
        "HTTP request latency, by route and status.",
    ),
    (
        "cj_http_requests_total",
        Counter,
        "HTTP requests answered, by route and status.",
    ),
    (
        "cj_ingest_rejected_total",
        Counter,
        "Events refused at the door, by reason.",
    ),
    (
        "cj_mqtt_disconnects_total",
        Counter,
        "Times the MQTT subscriber lost its broker connection.",
    ),
    (
        "cj_mqtt_messages_total",
        Counter,
        "MQTT messages taken in, by outcome.",
    ),
    (
        "cj_outbox_backlog",
        Gauge,
        "Rows waiting in the outbox (sampled).",
    ),
    (
        "cj_outbox_group_commit_rows",
        Histogram,
        "Rows written per group commit of the ingestion writer.",
    ),
    (
        "cj_outbox_listen_reconnects_total",
        Counter,
        "Times the outbox processor re-established its LISTEN connection.",
    ),
    (
        "cj_outbox_oldest_age_seconds",
        Gauge,
        "Age of the oldest row in the outbox (sampled).",
    ),
    (
        "cj_outbox_over_retry_limit",
        Gauge,
        "Outbox rows past the retry limit (sampled).",
    ),
    (
        "cj_outbox_publish_failures_total",
        Counter,
        "Outbox publish batches the broker did not acknowledge.",
    ),
    (
        "cj_outbox_publish_seconds",
        Histogram,
        "Time from a batch's publish to every acknowledgement.",
    ),
    (
        "cj_outbox_published_total",
        Counter,
        "Events published to the bus and moved to the event store.",
    ),
    (
        "cj_outbox_quarantined",
        Gauge,
        "Outbox rows in quarantine (sampled).",
    ),
    (
        "cj_outbox_quarantined_total",
        Counter,
        "Outbox rows moved to quarantine.",
    ),
    (
        "cj_projection_updates_total",
        Counter,
        "Projection rows written by the event handler.",
    ),
    (
        "cj_retention_clock_skew_seconds",
        Gauge,
        "Host clock minus database clock at the last retention round, by job.",
    ),
    (
        "cj_retention_partitions_dropped_total",
        Counter,
        "Partitions dropped by retention, by job.",
    ),
    (
        "cj_retention_removed_total",
        Counter,
        "Rows removed by retention, by job.",
    ),
    (
        "cj_retention_runs_refused_total",
        Counter,
        "Retention rounds refused because the clocks disagreed, by job.",
    ),
    (
        "cj_device_transitions_total",
        Counter,
        "device.inactive and device.active events put into the outbox, by event_type.",
    ),
    (
        "cj_tsdb_readings_written_total",
        Counter,
        "Raw time-series rows (one per quantity of a reading) written by the tsdb-writer.",
    ),
    (
        "cj_webhook_attempts_total",
        Counter,
        "Webhook calls made, by outcome.",
    ),
    (
        "cj_webhook_breaker_opened_total",
        Counter,
        "Times an endpoint's circuit breaker opened.",
    ),
    (
        "cj_webhook_deliveries_due",
        Gauge,
        "Webhook deliveries due now (sampled).",
    ),
    (
        "cj_webhook_deliveries_recorded_total",
        Counter,
        "Webhook deliveries recorded by the orchestrator, by status.",
    ),
    (
        "cj_webhook_deliveries_total",
        Counter,
        "Webhook deliveries reaching a state (circuit_open counts each parking), by status.",
    ),
    (
        "cj_webhook_duration_seconds",
        Histogram,
        "Webhook call latency.",
    ),
    (
        "cj_webhook_endpoints_not_closed",
        Gauge,
        "Webhook endpoints whose breaker is open or half-open (sampled).",
    ),
    (
        "cj_webhook_rules_disabled_total",
        Counter,
        "Rules the platform disabled itself, by reason (a receiver's 410 Gone).",
    ),
];

/// Seconds buckets for latencies, the default.
pub const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Row counts of a group commit: one to the writer's largest batch.
pub const ROWS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
];

/// The builder with the buckets each histogram needs.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(SECONDS)
        .expect("static buckets are valid")
        .set_buckets_for_metric(Matcher::Full("cj_outbox_group_commit_rows".into()), ROWS)
        .expect("static buckets are valid")
}

/// Describes every metric to the installed recorder and sets `cj_build_info`.
pub fn describe() {
    for (name, kind, help) in METRICS {
        let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
        match (kind, unit) {
            (Counter, _) => describe_counter!(*name, *help),
            (Gauge, Some(u)) => describe_gauge!(*name, u, *help),
            (Gauge, None) => describe_gauge!(*name, *help),
            (Histogram, Some(u)) => describe_histogram!(*name, u, *help),
            (Histogram, None) => describe_histogram!(*name, *help),
        }
    }
    metrics::gauge!(
        "cj_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        // Set by build.rs: the build's CORNJACKET_BUILD_COMMIT, else `git rev-parse`, else "unknown".
        "commit" => env!("CORNJACKET_BUILD_COMMIT"),
    )
    .set(1.0);
}
