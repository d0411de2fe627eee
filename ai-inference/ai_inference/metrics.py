"""Prometheus metrics (SPEC §13), in a registry of the service's own so tests can build several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "cj_ai_messages",
            "Bus messages handled, by outcome (scored, redelivered, skipped, dead_lettered).",
            ["outcome"],
            registry=r,
        )
        # Per quantity: a reading with several keys counts once per key.
        self.scored = Counter(
            "cj_ai_readings_scored", "Sensor reading quantities scored and learned (one per key).", registry=r
        )
        self.anomalies = Counter(
            "cj_ai_anomalies", "Quantities scored as anomalous (one ai.anomaly event each).", registry=r
        )
        self.dlq = Counter("cj_ai_dlq", "Messages dead-lettered, by reason.", ["reason"], registry=r)
        self.dlq_replays = Counter(
            "cj_ai_dlq_replays",
            "Dead letters replayed, by outcome (replayed; failed: pending again with the new error; "
            "deferred: an outage, left 'replaying' for a later round).",
            ["outcome"],
            registry=r,
        )
        self.ingest = Counter(
            "cj_ai_ingest_submissions",
            "ai.anomaly submissions to the ingestion API, by HTTP status (or 'error').",
            ["status"],
            registry=r,
        )
        self.lag = Gauge(
            "cj_ai_consumer_lag", "Messages behind the end of the assigned partitions.", registry=r
        )
        self.assigned = Gauge(
            "cj_ai_partitions_assigned", "Partitions assigned to this consumer.", registry=r
        )
        self.latency = Histogram(
            "cj_ai_processing_seconds",
            "From taking a reading off the bus to its result (and anomaly) being durable.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
