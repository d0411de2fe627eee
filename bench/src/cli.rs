//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cornjacket-bench",
    about = "Benchmarks a running cornjacket platform against baselines measured in the same run"
)]
pub struct Args {
    /// Ingestion service base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingest_url: String,
    /// Query service base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub query_url: String,
    /// Console base URL.
    #[arg(long, default_value = "http://127.0.0.1:8085")]
    pub console_url: String,
    /// Event handler health base URL.
    #[arg(long, default_value = "http://127.0.0.1:8084")]
    pub eventhandler_url: String,
    /// The platform's database (the bench reads projections and the outbox, and owns schema `bench`).
    #[arg(long, env = "BENCH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Kafka-API bootstrap servers (the platform's broker).
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// The platform's topic prefix (CJ_KAFKA_TOPIC_PREFIX); bench-owned topics use it too.
    #[arg(long, default_value = "")]
    pub topic_prefix: String,
    /// PID of the platform process (for RSS and CPU).
    #[arg(long)]
    pub platform_pid: Option<u32>,
    /// When the platform process was started, in nanoseconds since the Unix epoch (for startup time).
    #[arg(long)]
    pub platform_started_ns: Option<u128>,
    /// How the platform was configured (recorded in the results).
    #[arg(long, default_value = "")]
    pub platform_config: String,
    /// A JWT sent as `Authorization: Bearer` with every HTTP request (CJ_AUTH_MODE=app).
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PID of the broker process (for CPU accounting).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Shorten every row to a few seconds (smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Only these rows (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Connections (closed-loop workers) for ingest-max, ingest-baseline and http-ceiling.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured duration of each closed-loop row (default 15s; --quick 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up before each measured window (default 2s; --quick 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// Events per request in batch-max.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Connections for batch-max.
    #[arg(long, default_value_t = 32)]
    pub batch_connections: usize,
    /// Rows per transaction in db-ceiling.
    #[arg(long, default_value_t = 100)]
    pub db_ceiling_rows: usize,
    /// Connections for db-ceiling.
    #[arg(long, default_value_t = 8)]
    pub db_ceiling_connections: usize,
    /// Measured duration of broker-baseline's throughput part (default 5s; --quick 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub broker_duration: Option<Duration>,
    /// Arrival rate of e2e-latency (events per second).
    #[arg(long, default_value_t = 1000.0)]
    pub e2e_rate: f64,
    /// Duration of e2e-latency (default 60s; --quick 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub e2e_duration: Option<Duration>,
    /// Rates tried by pipeline-max, ascending (events per second).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2000,5000,10000,15000,20000"
    )]
    pub pipeline_rates: Vec<f64>,
    /// Bisection steps pipeline-max adds between the best passing and the first failing rate.
    #[arg(long, default_value_t = 1)]
    pub pipeline_refine: u32,
    /// Duration of each pipeline-max step (default 20s; --quick 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub pipeline_step: Option<Duration>,
    /// A pipeline-max step passes when the outbox is empty and every event is in its projection
    /// within this long after the step's last answer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub drain_timeout: Duration,
    /// Most connections an open-loop row opens.
    #[arg(long, default_value_t = 64)]
    pub open_loop_connections: usize,
    /// Request rate of the query row.
    #[arg(long, default_value_t = 2000.0)]
    pub query_rate: f64,
    /// Duration of the query row (default 15s; --quick 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub query_duration: Option<Duration>,
    /// The broker the mqtt row's devices publish to: mqtt://user:password@host:port, or `off` to
    /// skip the row. Default: the local Mosquitto of `make infra-up` (development user cornjacket).
    #[arg(long, default_value = "mqtt://cornjacket:cornjacket@127.0.0.1:1883")]
    pub mqtt_url: String,
    /// Prepended to the devices' topics (`<prefix>devices/{id}/events`), to match the platform's
    /// CJ_MQTT_TOPIC of the run.
    #[arg(long, default_value = "")]
    pub mqtt_topic_prefix: String,
    /// Simulated devices of the mqtt row (one connection each, one publish in flight each).
    #[arg(long, default_value_t = 64)]
    pub mqtt_devices: usize,
    /// The action orchestrator's API base URL (anomaly-to-webhook creates its rule there).
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    pub actions_url: String,
    /// The action orchestrator's health base URL.
    #[arg(long, default_value = "http://127.0.0.1:8083")]
    pub actions_health_url: String,
    /// Python of the ai-inference sidecar's venv (`scripts/ai.sh venv` creates it).
    #[arg(long, default_value = ".infra/venv-ai/bin/python")]
    pub ai_python: PathBuf,
    /// The sidecar's source directory (its PYTHONPATH).
    #[arg(long, default_value = "ai-inference")]
    pub ai_dir: PathBuf,
    /// Bearer token (scope ingest:write) the sidecar submits ai.anomaly events with; default
    /// the bench's own token.
    #[arg(long, env = "BENCH_AI_TOKEN", hide_env_values = true)]
    pub ai_token: Option<String>,
    /// Outliers per second in anomaly-to-webhook (each on a device of its own).
    #[arg(long, default_value_t = 5.0)]
    pub anomaly_rate: f64,
    /// Measured duration of anomaly-to-webhook's outliers (default 20s; --quick 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub anomaly_duration: Option<Duration>,
    /// fetch.wait.max.ms of the broker round-trip consumer (the platform's consumers use
    /// CJ_KAFKA_FETCH_WAIT_MAX_MS, 10 by default).
    #[arg(long, default_value_t = 10)]
    pub rtt_fetch_wait_ms: u32,
    /// Directory for the JSON results (the last one given counts: scripts/bench.sh passes one).
    #[arg(long, default_value = "bench/results", overrides_with = "out")]
    pub out: PathBuf,
    /// Internal: serve the http-ceiling endpoint on this port and nothing else.
    #[arg(long, hide = true)]
    pub serve_ceiling: Option<u16>,
    /// Internal: delete the platform's and the bench's topics under --topic-prefix, then exit.
    #[arg(long, hide = true)]
    pub drop_topics: bool,
}

impl Args {
    pub fn warmup(&self) -> Duration {
        self.warmup
            .unwrap_or(Duration::from_secs(if self.quick { 1 } else { 2 }))
    }
    pub fn duration(&self) -> Duration {
        self.duration
            .unwrap_or(Duration::from_secs(if self.quick { 3 } else { 15 }))
    }
    pub fn broker_duration(&self) -> Duration {
        self.broker_duration
            .unwrap_or(Duration::from_secs(if self.quick { 2 } else { 5 }))
    }
    pub fn e2e_duration(&self) -> Duration {
        self.e2e_duration
            .unwrap_or(Duration::from_secs(if self.quick { 5 } else { 60 }))
    }
    pub fn pipeline_step(&self) -> Duration {
        self.pipeline_step
            .unwrap_or(Duration::from_secs(if self.quick { 3 } else { 20 }))
    }
    pub fn query_duration(&self) -> Duration {
        self.query_duration
            .unwrap_or(Duration::from_secs(if self.quick { 3 } else { 15 }))
    }
    pub fn anomaly_duration(&self) -> Duration {
        self.anomaly_duration
            .unwrap_or(Duration::from_secs(if self.quick { 5 } else { 20 }))
    }
    pub fn wants(&self, row: &str) -> bool {
        self.rows.is_empty() || self.rows.iter().any(|r| r == row)
    }
}

// ---------------------------------------------------------------------------------------------
