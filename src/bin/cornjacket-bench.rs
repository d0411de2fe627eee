//! `cornjacket-bench`: the platform's load generator and benchmark table (`make bench`).
//!
//! It drives a running platform (started by `scripts/bench.sh` on a fresh database) and measures,
//! in one run, the platform rows and the baselines they are compared with:
//!
//! * closed-loop rows (`ingest-max`, `batch-max`, `http-ceiling`, the database baselines): N
//!   workers, each sending and waiting in a loop on its own keep-alive connection;
//! * open-loop rows (`e2e-latency`, `pipeline-max`, `query`): a fixed arrival schedule (a tick
//!   every 1/rate), each request in its own task, latency counted from the *scheduled* send time,
//!   so a stalled server cannot hide its queue (coordinated-omission safe).
//!
//! HTTP is spoken by a minimal HTTP/1.1 keep-alive client written on tokio's `TcpStream`: the
//! generator shares the machine's cores with the platform, PostgreSQL and the broker, so it does
//! as little work per request as it can (one write and usually one read). Latencies go into HDR
//! histograms in microseconds. The table is printed as Markdown on stdout and written as JSON to
//! `<out>/<YYYY-MM-DD>.json` with the machine and the versions. Goals are reported, never
//! asserted: a missed goal does not change the exit code.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Every row, in the order of the table.
const ROWS: &[&str] = &[
    "ingest-max",
    "ingest-baseline",
    "http-ceiling",
    "db-ceiling",
    "batch-max",
    "e2e-latency",
    "pipeline-max",
    "query",
    "mqtt",
    "anomaly-to-webhook",
    "footprint",
    "broker-baseline",
];

/// A request that takes longer than this is counted as an error and its connection dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cornjacket-bench",
    about = "Benchmarks a running cornjacket platform against baselines measured in the same run"
)]
struct Args {
    /// Ingestion service base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    ingest_url: String,
    /// Query service base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    query_url: String,
    /// Event handler health base URL.
    #[arg(long, default_value = "http://127.0.0.1:8084")]
    eventhandler_url: String,
    /// The platform's database (the bench reads projections and the outbox, and owns schema `bench`).
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Kafka-API bootstrap servers (the platform's broker).
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// The platform's topic prefix (CJ_KAFKA_TOPIC_PREFIX); bench-owned topics use it too.
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// PID of the platform process (for RSS and CPU).
    #[arg(long)]
    platform_pid: Option<u32>,
    /// When the platform process was started, in nanoseconds since the Unix epoch (for startup time).
    #[arg(long)]
    platform_started_ns: Option<u128>,
    /// How the platform was configured (recorded in the results).
    #[arg(long, default_value = "")]
    platform_config: String,
    /// A JWT sent as `Authorization: Bearer` with every HTTP request (CJ_AUTH_MODE=app).
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PID of the broker process (for CPU accounting).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Shorten every row to a few seconds (smoke run).
    #[arg(long)]
    quick: bool,
    /// Only these rows (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// Connections (closed-loop workers) for ingest-max, ingest-baseline and http-ceiling.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured duration of each closed-loop row (default 15s; --quick 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Warm-up before each measured window (default 2s; --quick 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Events per request in batch-max.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Connections for batch-max.
    #[arg(long, default_value_t = 32)]
    batch_connections: usize,
    /// Rows per transaction in db-ceiling.
    #[arg(long, default_value_t = 100)]
    db_ceiling_rows: usize,
    /// Connections for db-ceiling.
    #[arg(long, default_value_t = 8)]
    db_ceiling_connections: usize,
    /// Measured duration of broker-baseline's throughput part (default 5s; --quick 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    broker_duration: Option<Duration>,
    /// Arrival rate of e2e-latency (events per second).
    #[arg(long, default_value_t = 1000.0)]
    e2e_rate: f64,
    /// Duration of e2e-latency (default 60s; --quick 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    e2e_duration: Option<Duration>,
    /// Rates tried by pipeline-max, ascending (events per second).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2000,5000,10000,15000,20000"
    )]
    pipeline_rates: Vec<f64>,
    /// Bisection steps pipeline-max adds between the best passing and the first failing rate.
    #[arg(long, default_value_t = 1)]
    pipeline_refine: u32,
    /// Duration of each pipeline-max step (default 20s; --quick 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pipeline_step: Option<Duration>,
    /// A pipeline-max step passes when the outbox is empty and every event is in its projection
    /// within this long after the step's last answer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    drain_timeout: Duration,
    /// Most connections an open-loop row opens.
    #[arg(long, default_value_t = 64)]
    open_loop_connections: usize,
    /// Request rate of the query row.
    #[arg(long, default_value_t = 2000.0)]
    query_rate: f64,
    /// Duration of the query row (default 15s; --quick 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    query_duration: Option<Duration>,
    /// The broker the mqtt row's devices publish to: mqtt://user:password@host:port, or `off` to
    /// skip the row. Default: the local Mosquitto of `make infra-up` (development user cornjacket).
    #[arg(long, default_value = "mqtt://cornjacket:cornjacket@127.0.0.1:1883")]
    mqtt_url: String,
    /// Prepended to the devices' topics (`<prefix>devices/{id}/events`), to match the platform's
    /// CJ_MQTT_TOPIC of the run.
    #[arg(long, default_value = "")]
    mqtt_topic_prefix: String,
    /// Simulated devices of the mqtt row (one connection each, one publish in flight each).
    #[arg(long, default_value_t = 64)]
    mqtt_devices: usize,
    /// The action orchestrator's API base URL (anomaly-to-webhook creates its rule there).
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    actions_url: String,
    /// The action orchestrator's health base URL.
    #[arg(long, default_value = "http://127.0.0.1:8083")]
    actions_health_url: String,
    /// Python of the ai-inference sidecar's venv (`scripts/ai.sh venv` creates it).
    #[arg(long, default_value = ".infra/venv-ai/bin/python")]
    ai_python: PathBuf,
    /// The sidecar's source directory (its PYTHONPATH).
    #[arg(long, default_value = "ai-inference")]
    ai_dir: PathBuf,
    /// Bearer token (scope ingest:write) the sidecar submits ai.anomaly events with; default
    /// the bench's own token.
    #[arg(long, env = "BENCH_AI_TOKEN", hide_env_values = true)]
    ai_token: Option<String>,
    /// Outliers per second in anomaly-to-webhook (each on a device of its own).
    #[arg(long, default_value_t = 5.0)]
    anomaly_rate: f64,
    /// Measured duration of anomaly-to-webhook's outliers (default 20s; --quick 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    anomaly_duration: Option<Duration>,
    /// fetch.wait.max.ms of the broker round-trip consumer (the platform's consumers use
    /// CJ_KAFKA_FETCH_WAIT_MAX_MS, 10 by default).
    #[arg(long, default_value_t = 10)]
    rtt_fetch_wait_ms: u32,
    /// Directory for the JSON results (the last one given counts: scripts/bench.sh passes one).
    #[arg(long, default_value = "bench/results", overrides_with = "out")]
    out: PathBuf,
    /// Internal: serve the http-ceiling endpoint on this port and nothing else.
    #[arg(long, hide = true)]
    serve_ceiling: Option<u16>,
    /// Internal: delete the platform's and the bench's topics under --topic-prefix, then exit.
    #[arg(long, hide = true)]
    drop_topics: bool,
}

impl Args {
    fn warmup(&self) -> Duration {
        self.warmup
            .unwrap_or(Duration::from_secs(if self.quick { 1 } else { 2 }))
    }
    fn duration(&self) -> Duration {
        self.duration
            .unwrap_or(Duration::from_secs(if self.quick { 3 } else { 15 }))
    }
    fn broker_duration(&self) -> Duration {
        self.broker_duration
            .unwrap_or(Duration::from_secs(if self.quick { 2 } else { 5 }))
    }
    fn e2e_duration(&self) -> Duration {
        self.e2e_duration
            .unwrap_or(Duration::from_secs(if self.quick { 5 } else { 60 }))
    }
    fn pipeline_step(&self) -> Duration {
        self.pipeline_step
            .unwrap_or(Duration::from_secs(if self.quick { 3 } else { 20 }))
    }
    fn query_duration(&self) -> Duration {
        self.query_duration
            .unwrap_or(Duration::from_secs(if self.quick { 3 } else { 15 }))
    }
    fn anomaly_duration(&self) -> Duration {
        self.anomaly_duration
            .unwrap_or(Duration::from_secs(if self.quick { 5 } else { 20 }))
    }
    fn wants(&self, row: &str) -> bool {
        self.rows.is_empty() || self.rows.iter().any(|r| r == row)
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client.

mod http {
    use super::*;

    pub struct Reply {
        pub status: u16,
        pub body: Option<Vec<u8>>,
        /// The server will close the connection after this answer.
        pub close: bool,
    }

    pub struct Conn {
        stream: TcpStream,
        buf: Vec<u8>,
        filled: usize,
    }

    fn bad(msg: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    impl Conn {
        pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Self {
                stream,
                buf: vec![0; 16 * 1024],
                filled: 0,
            })
        }

        async fn fill(&mut self) -> std::io::Result<()> {
            if self.filled == self.buf.len() {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
            let n = self.stream.read(&mut self.buf[self.filled..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.filled += n;
            Ok(())
        }

        async fn ensure(&mut self, upto: usize) -> std::io::Result<()> {
            while self.filled < upto {
                self.fill().await?;
            }
            Ok(())
        }

        fn consume(&mut self, n: usize) {
            self.buf.copy_within(n..self.filled, 0);
            self.filled -= n;
        }

        /// Sends one complete request (head and body) and reads its answer.
        pub async fn request(&mut self, req: &[u8], want_body: bool) -> std::io::Result<Reply> {
            self.stream.write_all(req).await?;
            let head_end = loop {
                if let Some(p) = find(&self.buf[..self.filled], b"\r\n\r\n") {
                    break p + 4;
                }
                self.fill().await?;
            };
            let (status, length, chunked, close) = {
                let head = std::str::from_utf8(&self.buf[..head_end])
                    .map_err(|_| bad("answer head is not UTF-8"))?;
                let mut lines = head.split("\r\n");
                let status: u16 = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("no status line"))?;
                let (mut length, mut chunked, mut close) = (None, false, false);
                for l in lines {
                    let Some((k, v)) = l.split_once(':') else {
                        continue;
                    };
                    let (k, v) = (k.trim(), v.trim());
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.parse::<usize>().ok();
                    } else if k.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = v.to_ascii_lowercase().contains("chunked");
                    } else if k.eq_ignore_ascii_case("connection") {
                        close = v.eq_ignore_ascii_case("close");
                    }
                }
                (status, length, chunked, close)
            };
            if chunked {
                let mut body = Vec::new();
                let mut pos = head_end;
                loop {
                    let line_end = loop {
                        if let Some(p) = find(&self.buf[pos..self.filled], b"\r\n") {
                            break pos + p;
                        }
                        self.fill().await?;
                    };
                    let size_text = std::str::from_utf8(&self.buf[pos..line_end])
                        .map_err(|_| bad("bad chunk size"))?;
                    let size_text = size_text.split(';').next().unwrap_or("").trim();
                    let size =
                        usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
                    pos = line_end + 2;
                    if size == 0 {
                        self.ensure(pos + 2).await?;
                        pos += 2;
                        break;
                    }
                    self.ensure(pos + size + 2).await?;
                    if want_body {
                        body.extend_from_slice(&self.buf[pos..pos + size]);
                    }
                    pos += size + 2;
                }
                self.consume(pos);
                return Ok(Reply {
                    status,
                    body: want_body.then_some(body),
                    close,
                });
            }
            match length {
                Some(n) => {
                    self.ensure(head_end + n).await?;
                    let body = want_body.then(|| self.buf[head_end..head_end + n].to_vec());
                    self.consume(head_end + n);
                    Ok(Reply {
                        status,
                        body,
                        close,
                    })
                }
                None => {
                    // No length: the body runs to the end of the connection.
                    while self.fill().await.is_ok() {}
                    let body = want_body.then(|| self.buf[head_end..self.filled].to_vec());
                    self.filled = 0;
                    Ok(Reply {
                        status,
                        body,
                        close: true,
                    })
                }
            }
        }
    }

    /// `Authorization: Bearer …` sent with every request, when the platform checks JWTs.
    pub static AUTHORIZATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

    /// Appends a complete request to `out`.
    pub fn request_bytes(
        out: &mut Vec<u8>,
        method: &str,
        host: &str,
        path: &str,
        body: Option<&[u8]>,
    ) {
        let _ = write!(out, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(token) = AUTHORIZATION.get() {
            let _ = write!(out, "Authorization: Bearer {token}\r\n");
        }
        match body {
            Some(b) => {
                let _ = write!(
                    out,
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                );
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(b"\r\n"),
        }
    }

    /// One GET on a fresh connection: (status, body).
    pub async fn get_once(
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut c = tokio::time::timeout(Duration::from_secs(2), Conn::connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let mut req = Vec::new();
        request_bytes(&mut req, "GET", host, path, None);
        let r = tokio::time::timeout(Duration::from_secs(5), c.request(&req, true))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok((r.status, r.body.unwrap_or_default()))
    }
}

/// `http://host:port` → (socket address, Host header value).
async fn target(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let host = rest.split('/').next().unwrap_or(rest).to_string();
    let addr = tokio::net::lookup_host(&host)
        .await?
        .next()
        .with_context(|| format!("{url}: no address"))?;
    Ok((addr, host))
}

// ---------------------------------------------------------------------------------------------
// Measurements.

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What a load run observed inside its measured window.
struct Load {
    hist: Histogram<u64>,
    /// Answers per status code.
    statuses: BTreeMap<u16, u64>,
    /// Successful (2xx) answers.
    ok: u64,
    /// Events accepted (a batch counts its accepted items).
    events: u64,
    /// Transport errors and timeouts.
    errors: u64,
    error_samples: Vec<String>,
    /// Open loop: ticks not sent because too many requests were already waiting.
    skipped: u64,
    /// The sequence numbers that were answered 2xx (when asked for).
    ok_seqs: Vec<u64>,
    window: Duration,
    connections: usize,
    /// Open loop: when the schedule ended, and when the last answer arrived.
    schedule_end: Option<Instant>,
    last_answer: Option<Instant>,
    /// Open loop: why sending stopped before the schedule ended.
    aborted: Option<String>,
}

impl Load {
    fn new() -> Self {
        Self {
            hist: histogram(),
            statuses: BTreeMap::new(),
            ok: 0,
            events: 0,
            errors: 0,
            error_samples: Vec::new(),
            skipped: 0,
            ok_seqs: Vec::new(),
            window: Duration::ZERO,
            connections: 0,
            schedule_end: None,
            last_answer: None,
            aborted: None,
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(e);
        }
    }

    fn merge(&mut self, o: Load) {
        let _ = self.hist.add(&o.hist);
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.ok += o.ok;
        self.events += o.events;
        self.errors += o.errors;
        for e in o.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(e);
            }
        }
        self.skipped += o.skipped;
        self.ok_seqs.extend(o.ok_seqs);
    }

    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Non-2xx answers and errors, e.g. `{"503": 12, "error": 1}`.
    fn failures(&self) -> BTreeMap<String, u64> {
        let mut m: BTreeMap<String, u64> = self
            .statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        if self.errors > 0 {
            m.insert("error".into(), self.errors);
        }
        if self.skipped > 0 {
            m.insert("not-sent".into(), self.skipped);
        }
        m
    }
}

/// Writes the complete request for a sequence number.
type BuildFn = Arc<dyn Fn(u64, &mut Vec<u8>) + Send + Sync>;
/// How many events a 2xx answer (its body when asked for) stands for.
type EventsFn = Arc<dyn Fn(Option<&[u8]>) -> u64 + Send + Sync>;

/// How a load run builds its requests and counts what they achieved.
#[derive(Clone)]
struct Workload {
    addr: SocketAddr,
    build: BuildFn,
    events: EventsFn,
    want_body: bool,
}

fn record_reply(
    load: &mut Load,
    w: &Workload,
    reply: &http::Reply,
    latency: Duration,
    seq: u64,
    keep: bool,
) {
    load.hist
        .saturating_record(latency.as_micros().max(1) as u64);
    *load.statuses.entry(reply.status).or_default() += 1;
    if (200..300).contains(&reply.status) {
        load.ok += 1;
        load.events += (w.events)(reply.body.as_deref());
        if keep {
            load.ok_seqs.push(seq);
        }
    }
}

/// Closed loop: `conns` workers, each on its own connection, send and wait until the end.
async fn closed_loop(w: &Workload, conns: usize, warmup: Duration, dur: Duration) -> Load {
    let start = Instant::now();
    let (mstart, mend) = (start + warmup, start + warmup + dur);
    let mut set = tokio::task::JoinSet::new();
    for wid in 0..conns {
        let w = w.clone();
        set.spawn(async move {
            let mut load = Load::new();
            let mut conn: Option<http::Conn> = None;
            let mut req = Vec::with_capacity(2048);
            let mut seq = wid as u64;
            loop {
                let now = Instant::now();
                if now >= mend {
                    break;
                }
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match http::Conn::connect(w.addr).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            if now >= mstart {
                                load.error(format!("connect: {e}"));
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                req.clear();
                (w.build)(seq, &mut req);
                seq += conns as u64;
                let t0 = Instant::now();
                let r = tokio::time::timeout(REQUEST_TIMEOUT, c.request(&req, w.want_body)).await;
                let t1 = Instant::now();
                let measured = t0 >= mstart && t1 <= mend;
                match r {
                    Ok(Ok(reply)) => {
                        if reply.close {
                            conn = None;
                        }
                        if measured {
                            record_reply(&mut load, &w, &reply, t1 - t0, seq, false);
                        }
                    }
                    Ok(Err(e)) => {
                        conn = None;
                        if measured {
                            load.error(e.to_string());
                        }
                    }
                    Err(_) => {
                        conn = None;
                        if measured {
                            load.error("timed out".into());
                        }
                    }
                }
            }
            load
        });
    }
    let mut total = Load::new();
    while let Some(r) = set.join_next().await {
        if let Ok(l) = r {
            total.merge(l);
        }
    }
    total.window = dur;
    total.connections = conns;
    total
}

struct OpenShared {
    pool: Mutex<Vec<http::Conn>>,
    slots: Semaphore,
    load: Mutex<Load>,
    waiting: AtomicU64,
    opened: AtomicU64,
}

/// Open loop: a request every 1/rate seconds, each in its own task on a pooled connection
/// (at most `max_conns`); latency runs from the scheduled send time. With `behind_limit`, sending
/// stops once the requests not yet answered stand for more than that much of the schedule.
async fn open_loop(
    w: &Workload,
    rate: f64,
    max_conns: usize,
    warmup: Duration,
    dur: Duration,
    keep_seqs: bool,
    behind_limit: Option<Duration>,
) -> Load {
    let shared = Arc::new(OpenShared {
        pool: Mutex::new(Vec::new()),
        slots: Semaphore::new(max_conns),
        load: Mutex::new(Load::new()),
        waiting: AtomicU64::new(0),
        opened: AtomicU64::new(0),
    });
    // More than ten seconds of arrivals already waiting: the server has stalled; stop piling up.
    let cap = (rate * 10.0).max(1000.0) as u64;
    let tracker = TaskTracker::new();
    let start = Instant::now() + Duration::from_millis(20);
    let mstart = start + warmup;
    let total = ((warmup + dur).as_secs_f64() * rate).round() as u64;
    let behind = behind_limit.map(|d| (d.as_secs_f64() * rate).max(1.0) as u64);
    let mut aborted = None;
    for seq in 0..total {
        let at = start + Duration::from_secs_f64(seq as f64 / rate);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        let measured = at >= mstart;
        if let (Some(limit), Some(max)) = (behind, behind_limit)
            && shared.waiting.load(Ordering::Relaxed) >= limit
        {
            aborted = Some(format!(
                "stopped after {:.1}s: {limit} requests unanswered (more than {:.1}s of arrivals)",
                (at - start).as_secs_f64(),
                max.as_secs_f64()
            ));
            break;
        }
        if shared.waiting.load(Ordering::Relaxed) >= cap {
            if measured {
                shared.load.lock().expect("load lock").skipped += 1;
            }
            continue;
        }
        shared.waiting.fetch_add(1, Ordering::Relaxed);
        let (s, w) = (shared.clone(), w.clone());
        tracker.spawn(async move {
            let permit = s.slots.acquire().await.expect("semaphore open");
            let pooled = s.pool.lock().expect("pool lock").pop();
            let conn = match pooled {
                Some(c) => Ok(c),
                None => {
                    s.opened.fetch_add(1, Ordering::Relaxed);
                    http::Conn::connect(w.addr).await
                }
            };
            let mut req = Vec::with_capacity(2048);
            (w.build)(seq, &mut req);
            let outcome = match conn {
                Err(e) => Err(format!("connect: {e}")),
                Ok(mut c) => {
                    match tokio::time::timeout(REQUEST_TIMEOUT, c.request(&req, w.want_body)).await
                    {
                        Ok(Ok(reply)) => {
                            if !reply.close {
                                s.pool.lock().expect("pool lock").push(c);
                            }
                            Ok(reply)
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_string()),
                    }
                }
            };
            drop(permit);
            let done = Instant::now();
            let latency = done.saturating_duration_since(at);
            s.waiting.fetch_sub(1, Ordering::Relaxed);
            if measured {
                let mut load = s.load.lock().expect("load lock");
                load.last_answer = Some(load.last_answer.map_or(done, |t| t.max(done)));
                match outcome {
                    Ok(reply) => record_reply(&mut load, &w, &reply, latency, seq, keep_seqs),
                    Err(e) => load.error(e),
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    let mut load = std::mem::replace(&mut *shared.load.lock().expect("load lock"), Load::new());
    load.window = dur;
    load.connections = shared.opened.load(Ordering::Relaxed) as usize;
    load.schedule_end = Some(mstart + dur);
    load.aborted = aborted;
    load
}

// ---------------------------------------------------------------------------------------------
// Request bodies.

/// A cheap deterministic pseudo-random number from a sequence number (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One `sensor.reading` request body without event_time (the platform sets it to ingested_at).
fn reading_body(out: &mut Vec<u8>, aggregate_id: &str, seq: u64) {
    let r = mix(seq);
    let _ = write!(
        out,
        r#"{{"event_type":"sensor.reading","aggregate_id":"{aggregate_id}","payload":{{"value":{}.{:02},"unit":"celsius"}}}}"#,
        r % 40,
        (r >> 8) % 100
    );
}

/// Device ids shared by the saturation rows (upserts of a bounded set of projections).
const DEVICES: u64 = 10_000;

fn device(seq: u64) -> String {
    format!("dev-{:05}", mix(seq ^ 0x5eed) % DEVICES)
}

fn single_ingest(
    addr: SocketAddr,
    host: String,
    agg: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> Workload {
    Workload {
        addr,
        build: Arc::new(move |seq, out| {
            let mut body = Vec::with_capacity(160);
            reading_body(&mut body, &agg(seq), seq);
            http::request_bytes(out, "POST", &host, "/api/v1/ingest", Some(&body));
        }),
        events: Arc::new(|_| 1),
        want_body: false,
    }
}

/// The envelope the platform would store for a reading, for the database and broker baselines.
fn envelope(seq: u64) -> (Uuid, String, String) {
    let event_id = Uuid::now_v7();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let agg = device(seq);
    let r = mix(seq);
    let trace = Uuid::now_v7().simple().to_string();
    let span = &Uuid::now_v7().simple().to_string()[16..];
    let json = format!(
        r#"{{"event_id":"{event_id}","event_type":"sensor.reading","aggregate_id":"{agg}","event_time":"{now}","ingested_at":"{now}","payload":{{"value":{}.{:02},"unit":"celsius"}},"metadata":{{"source":"http","traceparent":"00-{trace}-{span}-01","schema_version":1}}}}"#,
        r % 40,
        (r >> 8) % 100
    );
    (event_id, agg, json)
}

/// Envelopes (with their shard) for the database baselines, made before measuring so that the
/// generator's own work stays small; each insert still gets fresh outbox and event ids.
fn envelope_pool() -> Arc<Vec<(i16, String)>> {
    Arc::new(
        (0..4096u64)
            .map(|s| {
                let (_, agg, json) = envelope(s);
                (shard_of(&agg), json)
            })
            .collect(),
    )
}

/// The outbox shard of an aggregate (the platform's FNV-1a 32 modulo 16).
fn shard_of(aggregate_id: &str) -> i16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in aggregate_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 16) as i16
}

// ---------------------------------------------------------------------------------------------
// CPU and memory accounting from /proc.

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

fn proc_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// CPU ticks of every process with this command name (e.g. the PostgreSQL server and its
/// backends), by pid.
fn ticks_of(comm: &str) -> HashMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_comm(*pid).as_deref() == Some(comm))
        .filter_map(|pid| Some((pid, proc_ticks(pid)?)))
        .collect()
}

/// Ticks a group of processes (PostgreSQL) used between two marks: per process, so that a backend that exits in between
/// (a closed pool) does not make the sum go down. A backend's work after the first mark is lost
/// when it exits before the second; one started in between counts whole.
fn postgres_delta(a: &HashMap<u32, u64>, b: &HashMap<u32, u64>) -> u64 {
    b.iter()
        .map(|(pid, t)| t.saturating_sub(a.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

#[derive(Clone)]
struct CpuMark {
    at: Instant,
    machine: (u64, u64),
    platform: Option<u64>,
    bench: Option<u64>,
    postgres: HashMap<u32, u64>,
    mosquitto: HashMap<u32, u64>,
    broker: Option<u64>,
    sidecar: Option<u64>,
}

/// The ai-inference sidecar's pid while anomaly-to-webhook runs it (0: none), for the CPU split.
static SIDECAR_PID: AtomicU32 = AtomicU32::new(0);

fn cpu_mark(a: &Args) -> CpuMark {
    cpu_mark_of(a, a.platform_pid)
}

/// A mark where `server` (the platform, or the http-ceiling server) is the server process.
fn cpu_mark_of(a: &Args, server: Option<u32>) -> CpuMark {
    CpuMark {
        at: Instant::now(),
        machine: machine_ticks(),
        platform: server.and_then(proc_ticks),
        bench: proc_ticks(std::process::id()),
        postgres: ticks_of("postgres"),
        mosquitto: ticks_of("mosquitto"),
        broker: a.broker_pid.and_then(proc_ticks),
        sidecar: Some(SIDECAR_PID.load(Ordering::Relaxed))
            .filter(|p| *p != 0)
            .and_then(proc_ticks),
    }
}

/// CPU use between two marks in percent of one core (the machine has `cores` × 100 %).
fn cpu_use(a: &CpuMark, b: &CpuMark) -> Value {
    let secs = (b.at - a.at).as_secs_f64().max(1e-9);
    let pct = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => Some(((y.saturating_sub(x)) as f64 / TICKS / secs * 100.0).round()),
        _ => None,
    };
    let (busy, total) = (
        b.machine.0.saturating_sub(a.machine.0),
        b.machine.1.saturating_sub(a.machine.1),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let machine = (busy as f64 / (total.max(1)) as f64 * 100.0 * cores).round();
    let parts = [
        pct(a.platform, b.platform),
        pct(a.bench, b.bench),
        pct(Some(0), Some(postgres_delta(&a.postgres, &b.postgres))),
        pct(a.broker, b.broker),
        pct(Some(0), Some(postgres_delta(&a.mosquitto, &b.mosquitto))),
        pct(a.sidecar, b.sidecar),
    ];
    // Whatever else ran on the machine meanwhile (a build, another test run): a warning sign.
    let other = (machine - parts.iter().flatten().sum::<f64>())
        .max(0.0)
        .round();
    json!({
        "machine_busy_pct": machine,
        "platform_pct": parts[0],
        "bench_pct": parts[1],
        "postgres_pct": parts[2],
        "broker_pct": parts[3],
        "mosquitto_pct": parts[4],
        "sidecar_pct": parts[5],
        "other_pct": other,
    })
}

fn cpu_text(v: &Value) -> String {
    let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| format!("{x:.0}%"));
    let mut parts = vec![];
    for (k, label) in [
        ("platform_pct", "platform"),
        ("postgres_pct", "postgres"),
        ("broker_pct", "tansu"),
        ("mosquitto_pct", "mosquitto"),
        ("sidecar_pct", "ai sidecar"),
        ("bench_pct", "bench"),
        ("other_pct", "other (kernel, other processes)"),
        ("machine_busy_pct", "machine"),
    ] {
        // The MQTT broker only matters in the mqtt row, the sidecar in anomaly-to-webhook.
        if matches!(k, "mosquitto_pct" | "sidecar_pct")
            && v.get(k).and_then(Value::as_f64).unwrap_or(0.0) < 1.0
        {
            continue;
        }
        if let Some(x) = f(k) {
            parts.push(format!("{label} {x}"));
        }
    }
    format!(
        "CPU (of {}00%): {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        parts.join(", ")
    )
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Rows.

#[derive(Debug, Clone, Serialize)]
struct Row {
    row: String,
    measured: bool,
    /// Headline number and its unit (ev/s, req/s, msg/s, rows/s, MB ...).
    value: Option<f64>,
    unit: String,
    result: String,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
    goal: String,
    goal_met: Option<bool>,
    config: String,
    /// Non-2xx answers and transport errors in the measured window.
    failures: BTreeMap<String, u64>,
    /// Set when other processes took a large share of the CPU during the row.
    warning: Option<String>,
    details: Value,
}

impl Row {
    fn new(row: &str) -> Self {
        Self {
            row: row.to_string(),
            measured: true,
            value: None,
            unit: String::new(),
            result: String::new(),
            p50_us: None,
            p99_us: None,
            max_us: None,
            goal: String::new(),
            goal_met: None,
            config: String::new(),
            failures: BTreeMap::new(),
            warning: None,
            details: json!({}),
        }
    }

    fn not_measured(row: &str, why: &str, goal: &str) -> Self {
        let mut r = Self::new(row);
        r.measured = false;
        r.result = why.to_string();
        r.goal = goal.to_string();
        r
    }

    fn latency(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.p50_us = Some(h.value_at_quantile(0.5));
        self.p99_us = Some(h.value_at_quantile(0.99));
        self.max_us = Some(h.max());
    }

    fn rate(&mut self, v: f64, unit: &str) {
        self.value = Some(v);
        self.unit = unit.to_string();
        self.result = format!("{} {unit}", thousands(v));
    }

    fn failures_text(&self) -> String {
        if self.failures.is_empty() {
            "non-2xx/errors: 0".to_string()
        } else {
            let parts: Vec<String> = self
                .failures
                .iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect();
            format!("non-2xx/errors: {}", parts.join(" "))
        }
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn quantiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({ "p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "max": h.max() })
}

fn fmt_us(us: Option<u64>) -> String {
    match us {
        None => "—".to_string(),
        Some(u) if u < 1_000 => format!("{u} µs"),
        Some(u) if u < 10_000 => format!("{:.2} ms", u as f64 / 1000.0),
        Some(u) if u < 1_000_000 => format!("{:.1} ms", u as f64 / 1000.0),
        Some(u) => format!("{:.2} s", u as f64 / 1e6),
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!(
        "[bench {}] {}",
        chrono::Local::now().format("%H:%M:%S"),
        msg.as_ref()
    );
}

struct Ctx {
    a: Args,
    ingest: (SocketAddr, String),
    query: (SocketAddr, String),
    eventhandler: (SocketAddr, String),
    db: Option<PgPool>,
    run: String,
    rows: BTreeMap<String, Row>,
    /// VmHWM reset before ingest-max worked.
    startup: Value,
}

impl Ctx {
    fn db(&self) -> anyhow::Result<&PgPool> {
        self.db
            .as_ref()
            .context("this row needs --database-url (or BENCH_DATABASE_URL)")
    }

    async fn outbox_backlog(&self) -> Option<i64> {
        let db = self.db.as_ref()?;
        sqlx::query_scalar("SELECT count(*) FROM ingestion.outbox")
            .fetch_one(db)
            .await
            .ok()
    }

    async fn consumer_lag(&self) -> Option<i64> {
        let (addr, host) = &self.eventhandler;
        let (status, body) = http::get_once(*addr, host, "/health").await.ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&body).ok()?;
        v.pointer("/checks/consumer/lag").and_then(Value::as_i64)
    }

    async fn visible(&self, ids: &[String]) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM eventhandler.projections
             WHERE projection_type = 'sensor_state' AND aggregate_id = ANY($1)",
        )
        .bind(ids)
        .fetch_one(self.db()?)
        .await?)
    }

    /// Waits (up to `max`) until every id has its projection; returns how many are visible.
    async fn wait_visible(&self, ids: &[String], max: Duration) -> anyhow::Result<i64> {
        let deadline = Instant::now() + max;
        loop {
            let n = self.visible(ids).await?;
            if n as usize >= ids.len() || Instant::now() >= deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Brings the platform back to idle between rows: waits for the outbox to drain and, past
    /// `max`, truncates what is left (a bench database; the events are not needed), then waits
    /// for the consumer to catch up. Returns what it had to do, for the row's config.
    async fn settle(&self, max: Duration) -> String {
        let Some(db) = self.db.as_ref() else {
            return String::new();
        };
        let t0 = Instant::now();
        let mut note = String::new();
        loop {
            let n = self.outbox_backlog().await.unwrap_or(0);
            if n == 0 {
                break;
            }
            if t0.elapsed() >= max {
                log(format!(
                    "settle: {n} rows still in the outbox after {max:?}; truncating them"
                ));
                let _ = sqlx::query("TRUNCATE ingestion.outbox").execute(db).await;
                note = format!(
                    "outbox backlog of {n} truncated after {:.0}s",
                    max.as_secs_f64()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The consumer's lag is from librdkafka statistics (every 2 s): wait for a zero.
        let t1 = Instant::now();
        while t1.elapsed() < Duration::from_secs(20) {
            if self.consumer_lag().await.unwrap_or(0) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        note
    }
}

async fn wait_healthy(ctx: &mut Ctx) -> anyhow::Result<()> {
    let started = ctx.a.platform_started_ns;
    let spawn_age = |now: SystemTime| -> Option<f64> {
        let now_ns = now.duration_since(UNIX_EPOCH).ok()?.as_nanos();
        Some((now_ns.checked_sub(started?)?) as f64 / 1e9)
    };
    let t0 = Instant::now();
    let base = spawn_age(SystemTime::now());
    let targets = [
        ("ingestion", ctx.ingest.clone()),
        ("query", ctx.query.clone()),
        ("eventhandler", ctx.eventhandler.clone()),
    ];
    let mut first_200: Option<f64> = None;
    let mut all_healthy: Option<f64> = None;
    let deadline = Duration::from_secs(120);
    while t0.elapsed() < deadline {
        let mut codes = 0;
        let mut healthy = 0;
        for (_, (addr, host)) in &targets {
            if let Ok((200, body)) = http::get_once(*addr, host, "/health").await {
                codes += 1;
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if v.get("status").and_then(Value::as_str) == Some("healthy") {
                    healthy += 1;
                }
            }
        }
        let since = base.map(|b| b + t0.elapsed().as_secs_f64());
        if codes == targets.len() && first_200.is_none() {
            first_200 = Some(since.unwrap_or(f64::NAN));
        }
        if healthy == targets.len() {
            all_healthy = Some(since.unwrap_or(f64::NAN));
            break;
        }
        tokio::time::sleep(Duration::from_millis(if first_200.is_some() {
            50
        } else {
            5
        }))
        .await;
    }
    if first_200.is_none() {
        bail!("the platform did not answer 200 on every /health within {deadline:?}");
    }
    ctx.startup = json!({
        "all_health_200_s": first_200.filter(|x| x.is_finite()),
        "all_health_healthy_s": all_healthy.filter(|x| x.is_finite()),
        "measured_from_spawn": started.is_some(),
        "bench_first_poll_after_spawn_s": base,
    });
    log(format!("platform healthy: {}", ctx.startup));
    Ok(())
}

async fn row_http_ceiling(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = &ctx.a;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--serve-ceiling")
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the http-ceiling server")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let t0 = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            bail!("the http-ceiling server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host = format!("127.0.0.1:{port}");
    let w = single_ingest(addr, host, Arc::new(device));
    log(format!(
        "http-ceiling: {} connections, {:?}",
        a.connections,
        a.duration()
    ));
    let m0 = cpu_mark_of(a, Some(child.id()));
    let load = closed_loop(&w, a.connections, a.warmup(), a.duration()).await;
    let m1 = cpu_mark_of(a, Some(child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let mut r = Row::new("http-ceiling");
    r.rate(load.per_sec(load.ok), "req/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "closed loop, {} connections × {:.0}s (+{:.0}s warm-up); same single-event POST against an axum route in a child process of the bench (2-thread tokio runtime) answering 202 with a fixed body (its CPU is shown as 'platform'); {}; {}",
        load.connections,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        r.failures_text(),
        cpu_text(&cpu)
    );
    r.details = json!({ "cpu": cpu, "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

/// The ceiling endpoint: reads the body and answers 202 with a body shaped like ingest's.
async fn serve_ceiling(port: u16) -> anyhow::Result<()> {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/api/v1/ingest",
        post(|_body: axum::body::Bytes| async {
            (
                axum::http::StatusCode::ACCEPTED,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                r#"{"event_id":"0196a5b2-7c1e-7d3f-9a2b-3c4d5e6f7a8b","status":"accepted"}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn row_ingest_max(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(10)).await;
    let a = ctx.a.clone();
    let (addr, host) = ctx.ingest.clone();
    let w = single_ingest(addr, host, Arc::new(device));
    // Reset the platform's peak RSS so the footprint row reads the peak of this row.
    let hwm_reset = a
        .platform_pid
        .is_some_and(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok());
    let backlog0 = ctx.outbox_backlog().await;
    log(format!(
        "ingest-max: {} connections, {:?}",
        a.connections,
        a.duration()
    ));
    let m0 = cpu_mark(&a);
    let waits = sample_waits(ctx.db.clone(), a.warmup(), a.duration());
    let load = closed_loop(&w, a.connections, a.warmup(), a.duration()).await;
    let m1 = cpu_mark(&a);
    let waits = waits.await.unwrap_or_default();
    let backlog1 = ctx.outbox_backlog().await;
    let rss_peak = a.platform_pid.and_then(|p| status_kib(p, "VmHWM:"));
    let mut r = Row::new("ingest-max");
    let rate = load.per_sec(load.events);
    r.rate(rate, "ev/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    r.goal = "≥ 20,000 ev/s".into();
    r.goal_met = Some(rate >= 20_000.0);
    let cpu = cpu_use(&m0, &m1);
    // Rows the processor moved during the whole run (warm-up included) ≈ accepted − backlog growth.
    let total_secs = (a.warmup() + a.duration()).as_secs_f64();
    let drained = match (backlog0, backlog1) {
        (Some(b0), Some(b1)) => {
            let accepted_all = rate * total_secs; // approximation: warm-up at the same rate
            Some(((accepted_all - (b1 - b0) as f64) / total_secs).max(0.0))
        }
        _ => None,
    };
    r.config = format!(
        "closed loop, {} keep-alive connections × {:.0}s (+{:.0}s warm-up); sensor.reading over {} devices, ~110-byte body; full platform running (outbox processor, consumer); {}; outbox backlog {} → {} (processor moved ≈{} ev/s meanwhile); {}{}",
        load.connections,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        DEVICES,
        r.failures_text(),
        backlog0.map_or("?".into(), |b| b.to_string()),
        backlog1.map_or("?".into(), |b| b.to_string()),
        drained.map_or("?".into(), thousands),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({
        "cpu": cpu,
        "postgres_wait_events": waits,
        "outbox_backlog_before": backlog0,
        "outbox_backlog_after": backlog1,
        "processor_rate_estimate": drained,
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    ctx.startup["ingest_max_rss_peak_kib"] = json!(rss_peak);
    ctx.startup["rss_peak_reset_before_ingest_max"] = json!(hwm_reset);
    Ok(())
}

/// Samples what the platform's PostgreSQL sessions are doing (wait events), every 100 ms over
/// the measured window: a cheap profile of where the database time goes.
fn sample_waits(
    db: Option<PgPool>,
    warmup: Duration,
    dur: Duration,
) -> tokio::task::JoinHandle<BTreeMap<String, u64>> {
    tokio::spawn(async move {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let Some(db) = db else { return counts };
        tokio::time::sleep(warmup).await;
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS w, count(*)
                 FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'cornjacket'
                   AND state = 'active'
                 GROUP BY 1",
            )
            .fetch_all(&db)
            .await
            .unwrap_or_default();
            for (w, n) in rows {
                *counts.entry(w).or_default() += n as u64;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        counts
    })
}

async fn row_batch_max(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(10)).await;
    let a = ctx.a.clone();
    let (addr, host) = ctx.ingest.clone();
    let n = a.batch_size.max(1);
    let w = Workload {
        addr,
        build: Arc::new(move |seq, out| {
            let mut body = Vec::with_capacity(n * 120 + 16);
            body.extend_from_slice(br#"{"events":["#);
            for i in 0..n as u64 {
                if i > 0 {
                    body.push(b',');
                }
                let s = seq * n as u64 + i;
                reading_body(&mut body, &device(s), s);
            }
            body.extend_from_slice(b"]}");
            http::request_bytes(out, "POST", &host, "/api/v1/ingest/batch", Some(&body));
        }),
        events: Arc::new(|body| {
            // {"accepted": N, ...}: read N without parsing the whole answer.
            let Some(b) = body else { return 0 };
            let key = br#""accepted":"#;
            let Some(p) = b.windows(key.len()).position(|w| w == key) else {
                return 0;
            };
            b[p + key.len()..]
                .iter()
                .skip_while(|c| c.is_ascii_whitespace())
                .take_while(|c| c.is_ascii_digit())
                .fold(0u64, |acc, c| acc * 10 + u64::from(c - b'0'))
        }),
        want_body: true,
    };
    log(format!(
        "batch-max: {} connections, {n}-event batches, {:?}",
        a.batch_connections,
        a.duration()
    ));
    let backlog0 = ctx.outbox_backlog().await;
    let m0 = cpu_mark(&a);
    let load = closed_loop(&w, a.batch_connections, a.warmup(), a.duration()).await;
    let m1 = cpu_mark(&a);
    let backlog1 = ctx.outbox_backlog().await;
    let mut r = Row::new("batch-max");
    let rate = load.per_sec(load.events);
    r.rate(rate, "ev/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let rejected_items = (load.ok * n as u64).saturating_sub(load.events);
    if rejected_items > 0 {
        r.failures.insert("rejected-items".into(), rejected_items);
    }
    r.goal = "≥ 100,000 ev/s".into();
    r.goal_met = Some(rate >= 100_000.0);
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "closed loop, {} connections × {:.0}s (+{:.0}s warm-up); POST /api/v1/ingest/batch with {n} sensor.reading events (~{} KB body); {:.0} requests/s; latency per batch request; {}; outbox backlog {} → {}; {}{}",
        load.connections,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        (n * 110) / 1000,
        load.per_sec(load.ok),
        r.failures_text(),
        backlog0.map_or("?".into(), |b| b.to_string()),
        backlog1.map_or("?".into(), |b| b.to_string()),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({ "cpu": cpu, "requests_per_s": load.per_sec(load.ok), "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

/// Sends `ids` as sensor.reading events through the batch endpoint (100 per request).
async fn seed(ctx: &Ctx, ids: &[String]) -> anyhow::Result<()> {
    let (addr, host) = &ctx.ingest;
    let mut conn = http::Conn::connect(*addr).await?;
    for (k, chunk) in ids.chunks(100).enumerate() {
        let mut body = br#"{"events":["#.to_vec();
        for (i, id) in chunk.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            reading_body(&mut body, id, (k * 100 + i) as u64);
        }
        body.extend_from_slice(b"]}");
        let mut req = Vec::new();
        http::request_bytes(&mut req, "POST", host, "/api/v1/ingest/batch", Some(&body));
        let reply = conn.request(&req, false).await?;
        if reply.status != 202 {
            bail!("seeding answered {}", reply.status);
        }
    }
    Ok(())
}

async fn row_e2e(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(30)).await;
    let a = ctx.a.clone();
    let (addr, host) = ctx.ingest.clone();
    let run = ctx.run.clone();
    // Warm-up events get their own prefix so that only measured events are read back.
    let warm_n = (a.warmup().as_secs_f64() * a.e2e_rate).round() as u64;
    let id = move |seq: u64| {
        if seq < warm_n {
            format!("e2ew-{run}-{seq}")
        } else {
            format!("e2e-{run}-{seq}")
        }
    };
    let w = single_ingest(addr, host, Arc::new(id.clone()));
    log(format!(
        "e2e-latency: {} ev/s for {:?}",
        a.e2e_rate,
        a.e2e_duration()
    ));
    let m0 = cpu_mark(&a);
    let load = open_loop(
        &w,
        a.e2e_rate,
        a.open_loop_connections,
        a.warmup(),
        a.e2e_duration(),
        true,
        None,
    )
    .await;
    let m1 = cpu_mark(&a);
    let ids: Vec<String> = load.ok_seqs.iter().map(|s| id(*s)).collect();
    let visible = ctx.wait_visible(&ids, Duration::from_secs(30)).await?;
    let deltas: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (updated_at - last_event_timestamp)) * 1e6)::float8
         FROM eventhandler.projections
         WHERE projection_type = 'sensor_state' AND aggregate_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(ctx.db()?)
    .await?;
    let mut h = histogram();
    let mut negative = 0u64;
    for d in &deltas {
        if *d < 0.0 {
            negative += 1;
        }
        h.saturating_record(d.max(1.0) as u64);
    }
    // Where the time goes: event_store.stored_at is now() of the outbox processor's claim
    // transaction, which splits the path in two (best effort: skipped if the query fails).
    let stages: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT (extract(epoch FROM (e.stored_at - e.ingested_at)) * 1e6)::float8,
                (extract(epoch FROM (p.updated_at - e.stored_at)) * 1e6)::float8
         FROM eventhandler.projections p
         JOIN ingestion.event_store e ON e.event_id = p.last_event_id
         WHERE p.projection_type = 'sensor_state' AND p.aggregate_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(ctx.db()?)
    .await
    .unwrap_or_default();
    let (mut to_claim, mut to_projection) = (histogram(), histogram());
    for (a, b) in &stages {
        to_claim.saturating_record(a.max(1.0) as u64);
        to_projection.saturating_record(b.max(1.0) as u64);
    }
    let stage_text = if stages.is_empty() {
        String::new()
    } else {
        format!(
            "; stages p50/p99: ingested_at → processor claim transaction (event_store.stored_at) {}/{}, claim → projection upsert {}/{}",
            fmt_us(Some(to_claim.value_at_quantile(0.5))),
            fmt_us(Some(to_claim.value_at_quantile(0.99))),
            fmt_us(Some(to_projection.value_at_quantile(0.5))),
            fmt_us(Some(to_projection.value_at_quantile(0.99))),
        )
    };
    let mut r = Row::new("e2e-latency");
    r.latency(&h);
    r.value = r.p99_us.map(|u| u as f64 / 1000.0);
    r.unit = "ms p99".into();
    r.result = format!(
        "{} of {} events visible",
        thousands(visible as f64),
        thousands(ids.len() as f64)
    );
    r.failures = load.failures();
    if (visible as usize) < ids.len() {
        r.failures.insert(
            "not-visible-after-30s".into(),
            (ids.len() - visible as usize) as u64,
        );
    }
    r.goal = "p99 ≤ 100 ms".into();
    r.goal_met = r
        .p99_us
        .map(|p| p <= 100_000 && visible as usize == ids.len());
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "open loop {} ev/s × {:.0}s (+{:.0}s warm-up, excluded), ≤{} connections ({} opened); sensor.reading without event_time, a distinct aggregate_id each; latency = projections.updated_at (now(): the start of the upsert's transaction, so its statement and commit are not included) − last_event_timestamp (= ingested_at, set before the outbox commit), read in the database; HTTP 202 latency p50 {} p99 {} max {}{stage_text}; {}{}; {}{}",
        a.e2e_rate,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        a.open_loop_connections,
        load.connections,
        fmt_us(Some(load.hist.value_at_quantile(0.5))),
        fmt_us(Some(load.hist.value_at_quantile(0.99))),
        fmt_us(Some(load.hist.max())),
        r.failures_text(),
        if negative > 0 {
            format!(" ({negative} negative deltas counted as 0)")
        } else {
            String::new()
        },
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({
        "cpu": cpu,
        "sent_ok": ids.len(),
        "visible": visible,
        "stage_ingested_to_claim_us": quantiles(&to_claim),
        "stage_claim_to_projection_us": quantiles(&to_projection),
        "http_p50_us": load.hist.value_at_quantile(0.5),
        "http_p99_us": load.hist.value_at_quantile(0.99),
        "http_max_us": load.hist.max(),
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

async fn row_query(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let ids: Vec<String> = (0..1000).map(|i| format!("q-{}-{i:04}", ctx.run)).collect();
    seed(ctx, &ids).await?;
    let visible = ctx.wait_visible(&ids, Duration::from_secs(30)).await?;
    if (visible as usize) < ids.len() {
        bail!(
            "only {visible} of {} seeded projections became visible",
            ids.len()
        );
    }
    let settle = ctx.settle(Duration::from_secs(30)).await;
    let (addr, host) = ctx.query.clone();
    let ids = Arc::new(ids);
    let w = Workload {
        addr,
        build: {
            let ids = ids.clone();
            Arc::new(move |seq, out| {
                let id = &ids[(mix(seq) % ids.len() as u64) as usize];
                let path = format!("/api/v1/query/projections/sensor_state/{id}");
                http::request_bytes(out, "GET", &host, &path, None);
            })
        },
        events: Arc::new(|_| 1),
        want_body: false,
    };
    log(format!(
        "query: {} req/s for {:?}",
        a.query_rate,
        a.query_duration()
    ));
    let m0 = cpu_mark(&a);
    let load = open_loop(
        &w,
        a.query_rate,
        a.open_loop_connections,
        a.warmup(),
        a.query_duration(),
        false,
        None,
    )
    .await;
    let m1 = cpu_mark(&a);
    let mut r = Row::new("query");
    r.rate(load.per_sec(load.ok), "req/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    r.goal = "p99 ≤ 5 ms".into();
    r.goal_met = r.p99_us.map(|p| p <= 5_000 && r.failures.is_empty());
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "open loop {} req/s × {:.0}s (+{:.0}s warm-up), ≤{} connections ({} opened); GET /api/v1/query/projections/sensor_state/{{id}} over 1,000 seeded devices, idle pipeline; {}; {}{}",
        a.query_rate,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        a.open_loop_connections,
        load.connections,
        r.failures_text(),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({ "cpu": cpu, "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

async fn row_pipeline(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let step = a.pipeline_step();
    let mut best: Option<f64> = None;
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut best_hist: Option<Histogram<u64>> = None;
    // The given rates in order; after the first failing one, `--pipeline-refine` bisection steps
    // between the best passing rate and the lowest failing one (rounded to 500 ev/s).
    let mut queue: std::collections::VecDeque<f64> = a.pipeline_rates.iter().copied().collect();
    let mut refine_left = a.pipeline_refine;
    let mut failed_at: Option<f64> = None;
    let mut k = 0usize;
    while let Some(rate) = queue.pop_front() {
        k += 1;
        let settle = ctx.settle(Duration::from_secs(30)).await;
        if !settle.is_empty() {
            notes.push(settle);
        }
        let run = ctx.run.clone();
        let id = move |seq: u64| format!("p{k}-{run}-{seq}");
        let (addr, host) = ctx.ingest.clone();
        let w = single_ingest(addr, host, Arc::new(id.clone()));
        log(format!("pipeline-max: step {rate} ev/s for {step:?}"));
        // Sample the outbox backlog and the consumer's lag once a second during the step.
        let stop = Arc::new(tokio::sync::Notify::new());
        let sampler = {
            let (db, eh, stop) = (ctx.db.clone(), ctx.eventhandler.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut max_backlog, mut max_lag) = (0i64, 0i64);
                loop {
                    if let Some(db) = &db
                        && let Ok(n) =
                            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ingestion.outbox")
                                .fetch_one(db)
                                .await
                    {
                        max_backlog = max_backlog.max(n);
                    }
                    if let Ok((200, body)) = http::get_once(eh.0, &eh.1, "/health").await {
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        if let Some(l) = v.pointer("/checks/consumer/lag").and_then(Value::as_i64) {
                            max_lag = max_lag.max(l);
                        }
                    }
                    tokio::select! {
                        _ = stop.notified() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                (max_backlog, max_lag)
            })
        };
        let m0 = cpu_mark(&a);
        // Ingestion more than the drain allowance behind its schedule: the step has failed.
        let load = open_loop(
            &w,
            rate,
            a.open_loop_connections,
            Duration::ZERO,
            step,
            true,
            Some(a.drain_timeout),
        )
        .await;
        let m1 = cpu_mark(&a);
        stop.notify_one();
        let (max_backlog, max_lag) = sampler.await.unwrap_or((-1, -1));
        // Drained: the outbox is empty and the last events sent (which cover every shard and
        // partition) are in their projections; per-shard and per-partition order then means
        // everything before them is too. Counted from the end of the schedule, so a slow ingest
        // counts against the step as much as a slow pipeline.
        let mut seqs = load.ok_seqs.clone();
        seqs.sort_unstable();
        let tail: Vec<String> = seqs.iter().rev().take(200).map(|s| id(*s)).collect();
        let sched_end = load.schedule_end.unwrap_or_else(Instant::now);
        let answered_after = load
            .last_answer
            .map(|t| t.saturating_duration_since(sched_end));
        let mut drain: Option<Duration> = None;
        let mut backlog_at_end = None;
        let give_up =
            Instant::now() + Duration::from_secs(if load.aborted.is_some() { 0 } else { 20 });
        loop {
            let backlog = ctx.outbox_backlog().await.unwrap_or(-1);
            backlog_at_end.get_or_insert(backlog);
            if backlog == 0 && ctx.visible(&tail).await? as usize == tail.len() {
                drain = Some(sched_end.elapsed());
                break;
            }
            if Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let achieved = load.ok as f64
            / load
                .last_answer
                .map_or(step, |t| t.saturating_duration_since(sched_end) + step)
                .as_secs_f64()
                .max(1e-9);
        let clean = load.failures().is_empty() && load.aborted.is_none();
        let drained = drain.is_some_and(|d| d <= a.drain_timeout);
        // Ingestion itself must keep the pace: 202s per second (until the last answer) ≥ 95%.
        let kept_pace = achieved >= rate * 0.95;
        let pass = clean && drained && kept_pace;
        for (k2, v) in load.failures() {
            *failures.entry(k2).or_default() += v;
        }
        let cpu = cpu_use(&m0, &m1);
        steps.push(json!({
            "rate": rate,
            "achieved": achieved,
            "pass": pass,
            "http_p50_us": load.hist.value_at_quantile(0.5),
            "http_p99_us": load.hist.value_at_quantile(0.99),
            "http_max_us": load.hist.max(),
            "failures": load.failures(),
            "max_outbox_backlog": max_backlog,
            "outbox_backlog_at_end": backlog_at_end,
            "max_consumer_lag": max_lag,
            "drain_s": drain.map(|d| d.as_secs_f64()),
            "last_answer_after_schedule_s": answered_after.map(|d| d.as_secs_f64()),
            "aborted": load.aborted,
            "connections_opened": load.connections,
            "cpu": cpu,
        }));
        log(format!(
            "pipeline-max: {rate} ev/s → achieved {achieved:.0}, backlog max {max_backlog}, lag max {max_lag}, drain {drain:?}{}: {}",
            load.aborted
                .as_deref()
                .map(|a| format!(", {a}"))
                .unwrap_or_default(),
            if pass { "pass" } else { "FAIL" }
        ));
        if pass {
            best = Some(rate);
            best_hist = Some(load.hist.clone());
        } else {
            failed_at = Some(failed_at.map_or(rate, |f: f64| f.min(rate)));
            queue.clear();
        }
        if queue.is_empty()
            && refine_left > 0
            && let (Some(lo), Some(hi)) = (best, failed_at)
        {
            let mid = ((lo + hi) / 2.0 / 500.0).round() * 500.0;
            if mid > lo && mid < hi {
                refine_left -= 1;
                queue.push_back(mid);
            }
        }
    }
    let mut r = Row::new("pipeline-max");
    match best {
        Some(b) => r.rate(b, "ev/s"),
        None => {
            r.value = Some(0.0);
            r.unit = "ev/s".into();
            r.result = format!(
                "< {} ev/s",
                thousands(a.pipeline_rates.first().copied().unwrap_or(0.0))
            );
        }
    }
    if let Some(h) = &best_hist {
        r.latency(h);
    }
    r.failures = failures;
    r.goal = "≥ 10,000 ev/s".into();
    r.goal_met = Some(best.unwrap_or(0.0) >= 10_000.0);
    let step_text: Vec<String> = steps
        .iter()
        .map(|s| {
            format!(
                "{} {} (got {}, backlog max {}, lag max {}, drain {})",
                thousands(s["rate"].as_f64().unwrap_or(0.0)),
                if s["pass"].as_bool() == Some(true) {
                    "✓"
                } else {
                    "✗"
                },
                thousands(s["achieved"].as_f64().unwrap_or(0.0)),
                s["max_outbox_backlog"],
                s["max_consumer_lag"],
                match (s["drain_s"].as_f64(), s["aborted"].is_null()) {
                    (Some(d), _) => format!("{d:.2}s"),
                    (None, true) => ">20s".to_string(),
                    (None, false) => "ingest fell behind, step stopped".to_string(),
                }
            )
        })
        .collect();
    r.config = format!(
        "open loop single-event ingest, steps of {:.0}s (the given rates in order until one fails, then {} bisection step(s)), ≤{} connections, a distinct aggregate_id per event; a step passes when every request got 202, at ≥95% of the rate, and, within {:.0}s of the end of its schedule, the outbox is empty and the step's last 200 events are in projections (a step stops early when unanswered requests exceed that much of the schedule); 'got' = 202s per second until the last answer; p50/p99/max are the HTTP latencies of the best step; steps: {}{}",
        step.as_secs_f64(),
        a.pipeline_refine,
        a.open_loop_connections,
        a.drain_timeout.as_secs_f64(),
        step_text.join("; "),
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        }
    );
    r.details = json!({ "steps": steps });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

/// A bench-owned copy of the outbox's shape (columns, defaults, constraints, indexes; without
/// the NOTIFY trigger), emptied before each database row.
async fn bench_table(db: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CREATE SCHEMA IF NOT EXISTS bench")
        .execute(db)
        .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench.outbox (LIKE ingestion.outbox INCLUDING ALL)")
        .execute(db)
        .await?;
    sqlx::query("TRUNCATE bench.outbox").execute(db).await?;
    Ok(())
}

/// Closed loop of database workers; each call of `op` inserts rows and returns how many.
async fn db_loop<F, Fut>(conns: usize, warmup: Duration, dur: Duration, op: F) -> Load
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>> + Send,
{
    let start = Instant::now();
    let (mstart, mend) = (start + warmup, start + warmup + dur);
    let mut set = tokio::task::JoinSet::new();
    for wid in 0..conns {
        let op = op.clone();
        set.spawn(async move {
            let mut load = Load::new();
            let mut seq = wid as u64;
            while Instant::now() < mend {
                let t0 = Instant::now();
                let r = op(seq).await;
                seq += conns as u64;
                let t1 = Instant::now();
                if t0 >= mstart && t1 <= mend {
                    match r {
                        Ok(n) => {
                            load.hist
                                .saturating_record((t1 - t0).as_micros().max(1) as u64);
                            load.ok += 1;
                            load.events += n;
                        }
                        Err(e) => load.error(e.to_string()),
                    }
                }
            }
            load
        });
    }
    let mut total = Load::new();
    while let Some(r) = set.join_next().await {
        if let Ok(l) = r {
            total.merge(l);
        }
    }
    total.window = dur;
    total.connections = conns;
    total
}

async fn db_pool(ctx: &Ctx, conns: usize) -> anyhow::Result<PgPool> {
    let url = ctx.a.database_url.clone().context("needs --database-url")?;
    let pool = PgPoolOptions::new()
        .max_connections(conns as u32)
        .min_connections(conns as u32)
        .connect(&url)
        .await?;
    // Open every connection before measuring.
    let mut held = Vec::new();
    for _ in 0..conns {
        held.push(pool.acquire().await?);
    }
    drop(held);
    Ok(pool)
}

async fn row_ingest_baseline(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(5)).await;
    let a = ctx.a.clone();
    let conns = a.connections;
    let pool = db_pool(ctx, conns).await?;
    bench_table(&pool).await?;
    log(format!(
        "ingest-baseline: {conns} connections, {:?}",
        a.duration()
    ));
    let rows = envelope_pool();
    let m0 = cpu_mark(&a);
    let p = pool.clone();
    let load = db_loop(conns, a.warmup(), a.duration(), move |seq| {
        let (p, rows) = (p.clone(), rows.clone());
        async move {
            let (shard, json) = &rows[(seq % rows.len() as u64) as usize];
            sqlx::query(
                "INSERT INTO bench.outbox (shard, event_id, event_payload)
                 VALUES ($1, $2, $3::jsonb)",
            )
            .bind(*shard)
            .bind(Uuid::now_v7())
            .bind(json.as_str())
            .execute(&p)
            .await
            .map(|r| r.rows_affected())
        }
    })
    .await;
    let m1 = cpu_mark(&a);
    pool.close().await;
    let mut r = Row::new("ingest-baseline");
    let rate = load.per_sec(load.events);
    r.rate(rate, "rows/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "{conns} connections × {:.0}s (+{:.0}s warm-up), each looping one autocommit INSERT (one row, one commit, prepared) into bench.outbox (LIKE ingestion.outbox INCLUDING ALL: same columns and indexes, no NOTIFY trigger), envelope JSON ~357 bytes (4,096 made beforehand, fresh ids per row), synchronous_commit on; {}; {}{}",
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        r.failures_text(),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({ "cpu": cpu, "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

async fn row_db_ceiling(ctx: &mut Ctx) -> anyhow::Result<()> {
    let settle = ctx.settle(Duration::from_secs(5)).await;
    let a = ctx.a.clone();
    let conns = a.db_ceiling_connections;
    let rows = a.db_ceiling_rows.max(1);
    let pool = db_pool(ctx, conns).await?;
    bench_table(&pool).await?;
    log(format!(
        "db-ceiling: {conns} connections, {rows}-row transactions, {:?}",
        a.duration()
    ));
    let pool_rows = envelope_pool();
    let m0 = cpu_mark(&a);
    let p = pool.clone();
    let load = db_loop(conns, a.warmup(), a.duration(), move |seq| {
        let (p, pool_rows) = (p.clone(), pool_rows.clone());
        async move {
            let (mut shards, mut eids, mut payloads) = (
                Vec::with_capacity(rows),
                Vec::with_capacity(rows),
                Vec::with_capacity(rows),
            );
            for i in 0..rows as u64 {
                let (shard, json) =
                    &pool_rows[((seq * rows as u64 + i) % pool_rows.len() as u64) as usize];
                shards.push(*shard);
                eids.push(Uuid::now_v7());
                payloads.push(json.as_str());
            }
            sqlx::query(
                "INSERT INTO bench.outbox (shard, event_id, event_payload)
                 SELECT u.shard, u.eid, u.payload::jsonb
                 FROM UNNEST($1::int2[], $2::uuid[], $3::text[]) AS u(shard, eid, payload)",
            )
            .bind(&shards)
            .bind(&eids)
            .bind(&payloads)
            .execute(&p)
            .await
            .map(|r| r.rows_affected())
        }
    })
    .await;
    let m1 = cpu_mark(&a);
    pool.close().await;
    let mut r = Row::new("db-ceiling");
    r.rate(load.per_sec(load.events), "rows/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.config = format!(
        "{conns} connections × {:.0}s (+{:.0}s warm-up), each looping one {rows}-row INSERT … SELECT FROM UNNEST (one statement, one commit) into bench.outbox, the same rows as ingest-baseline; latency per transaction; {}; {}{}",
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        r.failures_text(),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({ "cpu": cpu, "transactions_per_s": load.per_sec(load.ok), "errors": load.error_samples });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

fn kafka_base(brokers: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "cornjacket-bench");
    c
}

async fn row_broker_baseline(ctx: &mut Ctx) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let settle = ctx.settle(Duration::from_secs(5)).await;
    let a = ctx.a.clone();
    let topic = format!("{}bench-broker-baseline", a.topic_prefix);
    let brokers = a.kafka_brokers.clone();
    let admin: AdminClient<DefaultClientContext> = {
        let c = kafka_base(&brokers);
        tokio::task::spawn_blocking(move || c.create()).await??
    };
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?
    {
        if let Err((t, e)) = r
            && e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            bail!("creating {t}: {e}");
        }
    }
    // The platform's producer settings (src/infra/bus.rs): acks=all, idempotence, its default
    // linger (CJ_KAFKA_PRODUCER_LINGER_MS).
    let linger = platform_defaults().kafka.linger_ms;
    let producer: FutureProducer = {
        let mut c = kafka_base(&brokers);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger.to_string())
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", "10000");
        tokio::task::spawn_blocking(move || c.create::<FutureProducer>()).await??
    };
    let messages: Arc<Vec<(String, String)>> = Arc::new(
        (0..4096u64)
            .map(|s| {
                let (_, agg, json) = envelope(s);
                (agg, json)
            })
            .collect(),
    );
    let size = messages.iter().map(|m| m.1.len()).sum::<usize>() / messages.len();

    // (1) Windowed throughput: up to 10,000 messages in flight.
    // Short: every message stays in an in-memory broker's RAM, and the rate settles in seconds.
    let dur = a.broker_duration();
    log(format!("broker-baseline: {dur:?}"));
    let m0 = cpu_mark(&a);
    let start = Instant::now();
    let (mstart, mend) = (start + a.warmup(), start + a.warmup() + dur);
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut load = Load::new();
    let mut seq = 0u64;
    use futures::StreamExt;
    loop {
        let now = Instant::now();
        if now >= mend && inflight.is_empty() {
            break;
        }
        while now < mend && inflight.len() < 10_000 {
            let (agg, json) = &messages[(seq % messages.len() as u64) as usize];
            let rec = FutureRecord::to(&topic)
                .key(agg.as_str())
                .payload(json.as_str());
            match producer.send_result(rec) {
                Ok(f) => {
                    let t0 = Instant::now();
                    inflight.push(async move { (t0, f.await) });
                    seq += 1;
                }
                Err(_) => break, // local queue full: wait for deliveries
            }
        }
        if let Some((t0, res)) = inflight.next().await {
            let t1 = Instant::now();
            if t0 >= mstart && t1 <= mend {
                match res {
                    Ok(Ok(_)) => {
                        load.ok += 1;
                        load.hist
                            .saturating_record((t1 - t0).as_micros().max(1) as u64);
                    }
                    Ok(Err((e, _))) => load.error(e.to_string()),
                    Err(_) => load.error("canceled".into()),
                }
            }
        }
    }
    let m1 = cpu_mark(&a);
    load.window = dur;

    // (2) The outbox processor's pattern: 4 workers, each publishing 100 and awaiting all acks.
    let pattern_dur = Duration::from_secs(if a.quick { 2 } else { 5 });
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + pattern_dur;
    let mut set = tokio::task::JoinSet::new();
    for wid in 0..4u64 {
        let (producer, topic, messages, done) = (
            producer.clone(),
            topic.clone(),
            messages.clone(),
            done.clone(),
        );
        set.spawn(async move {
            let mut s = wid * 100_000;
            while Instant::now() < end {
                let mut fs = Vec::with_capacity(100);
                for _ in 0..100 {
                    let (agg, json) = &messages[(s % messages.len() as u64) as usize];
                    s += 1;
                    let rec = FutureRecord::to(&topic)
                        .key(agg.as_str())
                        .payload(json.as_str());
                    if let Ok(f) = producer.send_result(rec) {
                        fs.push(f);
                    }
                }
                for f in fs {
                    if let Ok(Ok(_)) = f.await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let pattern_rate = done.load(Ordering::Relaxed) as f64 / pattern_dur.as_secs_f64();

    // (3) The broker's share of e2e-latency: produce → consume at 1,000 msg/s with the event
    // handler's consumer settings.
    let rtt_dur = Duration::from_secs(if a.quick { 3 } else { 8 });
    let rtt = match broker_round_trip(
        &brokers,
        &topic,
        &producer,
        &messages,
        rtt_dur,
        a.rtt_fetch_wait_ms,
    )
    .await
    {
        Ok(h) => h,
        Err(e) => {
            log(format!("broker-baseline: round trip not measured: {e:#}"));
            histogram()
        }
    };
    let _ = admin.delete_topics(&[&topic], &opts).await;

    let mut r = Row::new("broker-baseline");
    r.rate(load.per_sec(load.ok), "msg/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    let cpu = cpu_use(&m0, &m1);
    r.goal = "reference for publish cost".into();
    r.config = format!(
        "rdkafka {} FutureProducer, acks=all, enable.idempotence=true, linger.ms={}, batch.num.messages=10000 (the platform's producer settings), ≤10,000 in flight, {:.0}s (+{:.0}s warm-up), bench-owned topic {topic} (3 partitions), key = aggregate_id, {size}-byte envelope JSON; latency send→ack; the processor's pattern (4 workers × 100-message batches, each awaiting all acks): {} msg/s; produce → consume round trip at 1,000 msg/s for {:.0}s with consumer fetch.wait.max.ms={} (the platform's consumers use {}): p50 {} p99 {} max {}; {}; {}{}",
        rdkafka::util::get_rdkafka_version().1,
        linger,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        thousands(pattern_rate),
        rtt_dur.as_secs_f64(),
        a.rtt_fetch_wait_ms,
        platform_defaults().kafka.fetch_wait_max_ms,
        fmt_us((!rtt.is_empty()).then(|| rtt.value_at_quantile(0.5))),
        fmt_us((!rtt.is_empty()).then(|| rtt.value_at_quantile(0.99))),
        fmt_us((!rtt.is_empty()).then(|| rtt.max())),
        r.failures_text(),
        cpu_text(&cpu),
        if settle.is_empty() {
            String::new()
        } else {
            format!("; before: {settle}")
        }
    );
    r.details = json!({
        "cpu": cpu,
        "message_bytes": size,
        "processor_pattern_msg_per_s": pattern_rate,
        "round_trip_1000_per_s_us": quantiles(&rtt),
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

/// Produces at 1,000 msg/s and consumes the same partitions with the event handler's consumer
/// settings; returns the produce → receive latencies.
async fn broker_round_trip(
    brokers: &str,
    topic: &str,
    producer: &rdkafka::producer::FutureProducer,
    messages: &Arc<Vec<(String, String)>>,
    dur: Duration,
    fetch_wait_ms: u32,
) -> anyhow::Result<Histogram<u64>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    use rdkafka::{Message, Offset, TopicPartitionList};

    let consumer: StreamConsumer = {
        let mut c = kafka_base(brokers);
        c.set("group.id", format!("{topic}.rtt"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("fetch.wait.max.ms", fetch_wait_ms.to_string());
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || -> anyhow::Result<StreamConsumer> {
            let consumer: StreamConsumer = c.create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..3 {
                tpl.add_partition_offset(&topic, p, Offset::End)?;
            }
            consumer.assign(&tpl)?;
            Ok(consumer)
        })
        .await??
    };
    let origin = Instant::now();
    let reader = tokio::spawn(async move {
        let mut h = histogram();
        let deadline = tokio::time::Instant::now() + dur + Duration::from_secs(3);
        while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, consumer.recv()).await {
            let sent = m
                .headers()
                .and_then(|hs| hs.iter().find(|h| h.key == "sent_us"))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
            if let Some(sent) = sent {
                let now = origin.elapsed().as_micros() as u64;
                h.saturating_record(now.saturating_sub(sent).max(1));
            }
        }
        h
    });
    // Let the consumer's first fetch reach the broker before producing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let total = dur.as_millis() as u64;
    let mut acks = Vec::with_capacity(total as usize);
    for seq in 0..total {
        let at = start + Duration::from_millis(seq);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        let (agg, json) = &messages[(seq % messages.len() as u64) as usize];
        let sent = origin.elapsed().as_micros().to_string();
        let rec = FutureRecord::to(topic)
            .key(agg.as_str())
            .payload(json.as_str())
            .headers(OwnedHeaders::new().insert(Header {
                key: "sent_us",
                value: Some(sent.as_str()),
            }));
        if let Ok(f) = producer.send_result(rec) {
            acks.push(f);
        }
    }
    for f in acks {
        let _ = f.await;
    }
    Ok(reader.await?)
}

/// Deletes every topic whose name starts with `--topic-prefix` (the run's own, `bench<epoch>.`).
async fn drop_topics(a: &Args) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let p = a.topic_prefix.clone();
    if p.is_empty() {
        bail!("--drop-topics needs a --topic-prefix");
    }
    let c = kafka_base(&a.kafka_brokers);
    let admin: AdminClient<DefaultClientContext> =
        tokio::task::spawn_blocking(move || c.create()).await??;
    let names: Vec<String> = {
        let admin = &admin;
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .context("listing topics")?;
        md.topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| n.starts_with(&p))
            .collect()
    };
    if names.is_empty() {
        return Ok(());
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.delete_topics(&refs, &opts).await? {
        if let Err((t, e)) = r {
            log(format!("could not delete topic {t}: {e}"));
        }
    }
    log(format!("deleted {} topic(s) named {p}*", names.len()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// MQTT (3.1.1, QoS 1), enough to publish from simulated devices.

mod mqtt {
    use super::*;

    fn remaining_length(out: &mut Vec<u8>, mut n: usize) {
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                break;
            }
        }
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    pub struct Url {
        pub host: String,
        pub user: Option<String>,
        pub password: Option<String>,
    }

    pub fn parse(url: &str) -> anyhow::Result<Url> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .context("--mqtt-url must look like mqtt://user:password@host:port")?;
        let (creds, host) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        let (user, password) = match creds.map(|c| c.split_once(':')) {
            Some(Some((u, p))) => (Some(u.to_string()), Some(p.to_string())),
            Some(None) => (creds.map(str::to_string), None),
            None => (None, None),
        };
        Ok(Url {
            host: host.trim_end_matches('/').to_string(),
            user,
            password,
        })
    }

    pub async fn connect(u: &Url, client_id: &str) -> anyhow::Result<TcpStream> {
        let mut s = TcpStream::connect(&u.host).await?;
        s.set_nodelay(true)?;
        let mut var = Vec::new();
        string(&mut var, b"MQTT");
        var.push(4);
        let mut flags = 0x02; // clean session
        if u.user.is_some() {
            flags |= 0x80;
        }
        if u.password.is_some() {
            flags |= 0x40;
        }
        var.push(flags);
        var.extend_from_slice(&60u16.to_be_bytes());
        string(&mut var, client_id.as_bytes());
        if let Some(user) = &u.user {
            string(&mut var, user.as_bytes());
        }
        if let Some(p) = &u.password {
            string(&mut var, p.as_bytes());
        }
        let mut pkt = vec![0x10];
        remaining_length(&mut pkt, var.len());
        pkt.extend_from_slice(&var);
        s.write_all(&pkt).await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        if ack[0] != 0x20 || ack[3] != 0 {
            bail!("MQTT CONNACK refused (code {})", ack[3]);
        }
        Ok(s)
    }

    /// Publishes with QoS 1 and waits for the PUBACK.
    pub async fn publish(
        s: &mut TcpStream,
        topic: &str,
        id: u16,
        payload: &[u8],
        buf: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        buf.clear();
        buf.push(0x32);
        remaining_length(buf, 2 + topic.len() + 2 + payload.len());
        string(buf, topic.as_bytes());
        buf.extend_from_slice(&id.to_be_bytes());
        buf.extend_from_slice(payload);
        s.write_all(buf).await?;
        loop {
            let mut head = [0u8; 2];
            s.read_exact(&mut head).await?;
            let mut rest = vec![0u8; head[1] as usize];
            s.read_exact(&mut rest).await?;
            if head[0] == 0x40 && rest.len() == 2 && u16::from_be_bytes([rest[0], rest[1]]) == id {
                return Ok(());
            }
        }
    }
}

async fn row_mqtt(ctx: &mut Ctx) -> anyhow::Result<()> {
    const GOAL: &str = "≥ 10,000 msg/s";
    let a = ctx.a.clone();
    if a.mqtt_url == "off" {
        ctx.rows.insert(
            "mqtt".into(),
            Row::not_measured("mqtt", "not measured: skipped (--mqtt-url off)", GOAL),
        );
        return Ok(());
    }
    let u = Arc::new(mqtt::parse(&a.mqtt_url)?);
    let reachable = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&u.host)).await;
    if !matches!(reachable, Ok(Ok(_))) {
        let why = format!(
            "not measured: no MQTT broker answers on {} (make infra-up starts Mosquitto; --mqtt-url points elsewhere)",
            u.host
        );
        ctx.rows
            .insert("mqtt".into(), Row::not_measured("mqtt", &why, GOAL));
        return Ok(());
    }
    let run = ctx.run.clone();
    let devices = a.mqtt_devices.max(1);
    log(format!("mqtt: {devices} devices, {:?}", a.duration()));
    let start = Instant::now();
    let (mstart, mend) = (start + a.warmup(), start + a.warmup() + a.duration());
    let m0 = cpu_mark(&a);
    let mut set = tokio::task::JoinSet::new();
    // Sent (a PUBLISH written) and acknowledged by the broker (its PUBACK read).
    let sent = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    for d in 0..devices {
        let (u, run, prefix) = (u.clone(), run.clone(), a.mqtt_topic_prefix.clone());
        let (published, sent) = (published.clone(), sent.clone());
        set.spawn(async move {
            let mut load = Load::new();
            let device = format!("mq-{run}-{d:04}");
            let topic = format!("{prefix}devices/{device}/events");
            let mut s = match mqtt::connect(&u, &format!("cjbench-{run}-{d}")).await {
                Ok(s) => s,
                Err(e) => {
                    load.error(e.to_string());
                    return load;
                }
            };
            let mut buf = Vec::new();
            let mut id: u16 = 0;
            let mut seq = d as u64;
            while Instant::now() < mend {
                id = id.wrapping_add(1).max(1);
                let r = mix(seq);
                seq += devices as u64;
                let payload = format!(
                    r#"{{"event_type":"sensor.reading","payload":{{"value":{}.{:02},"unit":"celsius"}}}}"#,
                    r % 40,
                    (r >> 8) % 100
                );
                let t0 = Instant::now();
                sent.fetch_add(1, Ordering::Relaxed);
                let res = tokio::time::timeout(REQUEST_TIMEOUT, mqtt::publish(&mut s, &topic, id, payload.as_bytes(), &mut buf)).await;
                let t1 = Instant::now();
                let measured = t0 >= mstart && t1 <= mend;
                match res {
                    Ok(Ok(())) => {
                        published.fetch_add(1, Ordering::Relaxed);
                        if measured {
                            load.ok += 1;
                            load.hist.saturating_record((t1 - t0).as_micros().max(1) as u64);
                        }
                    }
                    Ok(Err(e)) => {
                        load.error(e.to_string());
                        break;
                    }
                    Err(_) => {
                        load.error("timed out".into());
                        break;
                    }
                }
            }
            load
        });
    }
    let mut load = Load::new();
    while let Some(l) = set.join_next().await {
        if let Ok(l) = l {
            load.merge(l);
        }
    }
    load.window = a.duration();
    let m1 = cpu_mark(&a);
    let cpu = cpu_use(&m0, &m1);
    // Whether the platform took them in: events from these devices in the outbox and event store,
    // counted until all are there or the count stops growing for 15 s (at most 180 s).
    let published = published.load(Ordering::Relaxed) as i64;
    let sent = sent.load(Ordering::Relaxed) as i64;
    let last_publish = Instant::now();
    let count = || async {
        let db = ctx.db.as_ref()?;
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM ingestion.outbox
                     WHERE event_payload->>'aggregate_id' LIKE 'mq-' || $1 || '-%')
                  + (SELECT count(*) FROM ingestion.event_store
                     WHERE aggregate_id LIKE 'mq-' || $1 || '-%')",
        )
        .bind(&run)
        .fetch_one(db)
        .await
        .ok()
    };
    let (mut ingested, mut grew_at) = (count().await, Instant::now());
    // Patient: the broker may acknowledge faster than the platform takes in, and then holds the
    // difference in the platform's session; the platform drains it at its own pace, and each
    // count (a scan of the outbox) takes seconds once it is large. Stopping early would count
    // messages still queued at the broker as never taken in.
    while ingested.is_some_and(|n| n < published)
        && grew_at.elapsed() < Duration::from_secs(15)
        && last_publish.elapsed() < Duration::from_secs(180)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = count().await;
        if n > ingested {
            grew_at = Instant::now();
        }
        ingested = n;
    }
    let caught_up = ingested
        .filter(|n| *n >= published)
        .map(|_| last_publish.elapsed());
    // Both rates over the whole publishing time (warm-up included, as the counts are): what the
    // broker acknowledged, and what the platform had taken in by the time it caught up (or by
    // the last count).
    let publishing = (last_publish - start).as_secs_f64().max(1e-9);
    let acked_rate = published as f64 / publishing;
    let taken_rate = ingested.map(|n| {
        n as f64
            / (last_publish - start + caught_up.unwrap_or(last_publish.elapsed()))
                .as_secs_f64()
                .max(1e-9)
    });
    let mut r = Row::new("mqtt");
    r.rate(load.per_sec(load.ok), "msg/s");
    r.latency(&load.hist);
    r.failures = load.failures();
    r.goal = GOAL.into();
    r.config = format!(
        "{devices} simulated devices, one connection each, QoS 1 publish to {}devices/{{id}}/events on the broker at {} with one PUBACK awaited at a time, {:.0}s (+{:.0}s warm-up); the rate counts broker PUBACKs; sent {}, acknowledged by the broker {} ({:.0} msg/s), taken in by the platform {} ({} msg/s; warm-up included; counted in its outbox + event store){}; {}; {}",
        a.mqtt_topic_prefix,
        u.host,
        load.window.as_secs_f64(),
        a.warmup().as_secs_f64(),
        thousands(sent as f64),
        thousands(published as f64),
        acked_rate,
        ingested.map_or("?".into(), |n| thousands(n as f64)),
        taken_rate.map_or("?".into(), |r| format!("{r:.0}")),
        match caught_up {
            Some(d) => format!(
                ", all of them {:.1}s after the last publish",
                d.as_secs_f64()
            ),
            None => " (the count stopped growing)".to_string(),
        },
        r.failures_text(),
        cpu_text(&cpu)
    );
    // Taken in must equal acknowledged: a PUBACKed message the platform never got is a loss.
    r.goal_met =
        Some(load.per_sec(load.ok) >= 10_000.0 && ingested.is_some_and(|n| n >= published));
    r.details = json!({
        "sent": sent,
        "published": published,
        "acknowledged_per_s": acked_rate,
        "platform_ingested_per_s": taken_rate,
        "platform_ingested": ingested,
        "platform_caught_up_after_s": caught_up.map(|d| d.as_secs_f64()),
        "cpu": cpu,
        "errors": load.error_samples,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// anomaly-to-webhook: the ai-inference sidecar, the action orchestrator and a webhook receiver.

/// An in-process webhook receiver: records every call (arrival time, headers, body) and answers
/// 200; the Standard Webhooks signature is checked afterwards, off the measured path.
mod hook {
    use super::*;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    pub struct Call {
        pub at: Instant,
        /// Wall clock in microseconds since the epoch (compared with PostgreSQL's timestamps).
        pub wall_us: i64,
        pub headers: HeaderMap,
        pub body: Bytes,
    }

    impl Call {
        pub fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or(Value::Null)
        }
    }

    type Calls = Arc<Mutex<Vec<Call>>>;

    pub struct Receiver {
        pub addr: SocketAddr,
        calls: Calls,
        server: tokio::task::JoinHandle<()>,
    }

    impl Receiver {
        pub async fn start() -> anyhow::Result<Self> {
            let calls: Calls = Arc::default();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let app = axum::Router::new()
                .route("/{*path}", axum::routing::post(record))
                .with_state(calls.clone());
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Ok(Self {
                addr,
                calls,
                server,
            })
        }

        pub fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        pub fn count(&self) -> usize {
            self.calls.lock().expect("calls lock").len()
        }

        /// How many calls there are, and the `payload.source_event_id` of those from index
        /// `from` on.
        pub fn sources_from(&self, from: usize) -> (usize, Vec<String>) {
            let calls = self.calls.lock().expect("calls lock");
            let sources = calls
                .iter()
                .skip(from)
                .filter_map(|c| {
                    let v: Value = serde_json::from_slice(&c.body).ok()?;
                    Some(v.pointer("/payload/source_event_id")?.as_str()?.to_string())
                })
                .collect();
            (calls.len(), sources)
        }

        pub fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().expect("calls lock"))
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    async fn record(State(calls): State<Calls>, headers: HeaderMap, body: Bytes) -> StatusCode {
        let at = Instant::now();
        let wall_us = chrono::Utc::now().timestamp_micros();
        calls.lock().expect("calls lock").push(Call {
            at,
            wall_us,
            headers,
            body,
        });
        StatusCode::OK
    }

    /// Standard Webhooks verification as a receiver does it, written from the specification:
    /// `webhook-signature` holds space-separated `v1,<base64>` entries, one of which must be
    /// HMAC-SHA256(base64-decoded secret after `whsec_`, "{webhook-id}.{webhook-timestamp}.{body}"),
    /// and the timestamp must be within 5 minutes of the arrival.
    pub fn verify(secret: &str, c: &Call) -> bool {
        let Some(key) = secret
            .strip_prefix("whsec_")
            .and_then(|k| B64.decode(k).ok())
        else {
            return false;
        };
        let h = |n: &str| c.headers.get(n).and_then(|v| v.to_str().ok());
        let (Some(id), Some(ts), Some(sigs)) = (
            h("webhook-id"),
            h("webhook-timestamp"),
            h("webhook-signature"),
        ) else {
            return false;
        };
        let Ok(t) = ts.parse::<i64>() else {
            return false;
        };
        if (c.wall_us / 1_000_000 - t).abs() > 300 {
            return false;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&c.body);
        sigs.split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b| B64.decode(b).ok())
            .any(|sig| mac.clone().verify_slice(&sig).is_ok())
    }
}

/// The ai-inference sidecar as `scripts/ai.sh run` starts it, configured for the run: the
/// platform's database, broker and topic prefix, a consumer group and a port of its own.
struct Sidecar {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
    group: String,
}

impl Sidecar {
    fn start(
        a: &Args,
        python: &std::path::Path,
        dir: &std::path::Path,
        run: &str,
    ) -> anyhow::Result<Self> {
        let db_url = a
            .database_url
            .as_deref()
            .context("anomaly-to-webhook needs --database-url")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let group = if a.topic_prefix.is_empty() {
            format!("cjbench-{run}-ai-inference")
        } else {
            format!("{}ai-inference", a.topic_prefix)
        };
        let log = std::env::temp_dir().join(format!("cjbench-ai-{run}.log"));
        let out = std::fs::File::create(&log)?;
        let token = a
            .ai_token
            .clone()
            .filter(|t| !t.is_empty())
            .or_else(|| http::AUTHORIZATION.get().cloned());
        let mut cmd = tokio::process::Command::new(python);
        cmd.args(["-m", "ai_inference"])
            // Not the repository: the sidecar reads a .env in its working directory.
            .current_dir(std::env::temp_dir())
            .env("PYTHONPATH", dir)
            .env("CJ_AI_DATABASE_URL", db_url)
            .env("CJ_KAFKA_BROKERS", &a.kafka_brokers)
            .env("CJ_KAFKA_TOPIC_PREFIX", &a.topic_prefix)
            .env("CJ_AI_CONSUMER_GROUP", &group)
            .env("CJ_AI_SESSION_TIMEOUT_MS", "6000")
            .env("CJ_AI_PORT", port.to_string())
            .env("CJ_AI_INGEST_URL", &a.ingest_url)
            .env("CJ_LOG_FORMAT", "text")
            .env("CJ_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        if let Some(t) = token {
            cmd.env("CJ_AI_INGEST_TOKEN", t);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the sidecar ({})", python.display()))?;
        SIDECAR_PID.store(child.id().unwrap_or(0), Ordering::Relaxed);
        Ok(Self {
            child,
            port,
            log,
            group,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join(" / ")
    }

    /// Waits until `/health` answers 200 (migrated, consumer in its group, database answering).
    async fn wait_healthy(
        &mut self,
        client: &reqwest::Client,
        max: Duration,
    ) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the sidecar exited ({status}); {}: {}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            if let Ok(r) = client.get(self.url("/health")).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if t0.elapsed() > max {
                bail!(
                    "the sidecar was not healthy within {max:?}; {}: {}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM (it commits and exits), SIGKILL after 10 s.
    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
        SIDECAR_PID.store(0, Ordering::Relaxed);
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        SIDECAR_PID.store(0, Ordering::Relaxed);
    }
}

const ANOMALY_ROW: &str = "anomaly-to-webhook";
const ANOMALY_GOAL: &str = "p99 ≤ 250 ms";

/// An outlier as sent: its device index, schedule, and the answer.
struct Outlier {
    index: usize,
    scheduled: Instant,
    status: Option<u16>,
    error: Option<String>,
    accepted: Option<Instant>,
    event_id: Option<String>,
}

fn percentiles_text(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "—".into();
    }
    format!(
        "{}/{}",
        fmt_us(Some(h.value_at_quantile(0.5))),
        fmt_us(Some(h.value_at_quantile(0.99)))
    )
}

async fn row_anomaly(ctx: &mut Ctx) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let cwd = std::env::current_dir()?;
    let (python, dir) = (cwd.join(&a.ai_python), cwd.join(&a.ai_dir));
    if !python.exists() {
        let why = format!(
            "not measured: the ai-inference sidecar's venv is missing ({}); create it with scripts/ai.sh venv (scripts/bench.sh runs it)",
            a.ai_python.display()
        );
        ctx.rows.insert(
            ANOMALY_ROW.into(),
            Row::not_measured(ANOMALY_ROW, &why, ANOMALY_GOAL),
        );
        return Ok(());
    }
    if !dir.join("ai_inference").is_dir() {
        let why = format!(
            "not measured: no ai-inference sidecar at {} (--ai-dir)",
            a.ai_dir.display()
        );
        ctx.rows.insert(
            ANOMALY_ROW.into(),
            Row::not_measured(ANOMALY_ROW, &why, ANOMALY_GOAL),
        );
        return Ok(());
    }
    let settle = ctx.settle(Duration::from_secs(30)).await;
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let token = http::AUTHORIZATION.get().cloned();
    let auth = |rb: reqwest::RequestBuilder| match &token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };

    // The receiver and a rule on ai.anomaly that calls it, without dedup.
    let receiver = hook::Receiver::start().await?;
    let rules_url = format!("{}/api/v1/actions/rules", a.actions_url);
    let rule = json!({
        "name": format!("cornjacket-bench {}", ctx.run),
        "event_type": "ai.anomaly",
        "dedup_window_s": 0,
        "webhook": { "url": receiver.url("/anomaly") },
    });
    let created = match auth(client.post(&rules_url)).json(&rule).send().await {
        Err(e) if e.is_connect() => {
            let why = format!(
                "not measured: the action orchestrator does not answer on {} (cornjacket serve runs it; --actions-url)",
                a.actions_url
            );
            ctx.rows.insert(
                ANOMALY_ROW.into(),
                Row::not_measured(ANOMALY_ROW, &why, ANOMALY_GOAL),
            );
            return Ok(());
        }
        r => r.context("creating the rule")?,
    };
    let status = created.status();
    let body: Value = created.json().await.unwrap_or(Value::Null);
    if status != 201 {
        bail!("creating the rule on {rules_url}: {status} {body}");
    }
    let (Some(rule_id), Some(secret)) = (
        body["rule_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok()),
        body.pointer("/webhook/secret")
            .and_then(Value::as_str)
            .map(str::to_string),
    ) else {
        bail!("the rule's answer has no rule_id or webhook.secret: {body}");
    };

    let result = match Sidecar::start(&a, &python, &dir, &ctx.run) {
        Ok(mut sidecar) => {
            let result = anomaly_measure(
                ctx,
                &client,
                &receiver,
                &mut sidecar,
                rule_id,
                &secret,
                &settle,
            )
            .await;
            sidecar.stop().await;
            if result.is_ok() {
                let _ = std::fs::remove_file(&sidecar.log);
            }
            result
        }
        Err(e) => Err(e),
    };
    // The rule goes, so later rows do not evaluate it for every event.
    let _ = auth(client.delete(format!("{rules_url}/{rule_id}")))
        .send()
        .await;
    result
}

async fn anomaly_measure(
    ctx: &mut Ctx,
    client: &reqwest::Client,
    receiver: &hook::Receiver,
    sidecar: &mut Sidecar,
    rule_id: Uuid,
    secret: &str,
    settle: &str,
) -> anyhow::Result<()> {
    let a = ctx.a.clone();
    let token = http::AUTHORIZATION.get().cloned();
    let auth = |rb: reqwest::RequestBuilder| match &token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let t_start = Instant::now();
    sidecar
        .wait_healthy(client, Duration::from_secs(90))
        .await?;
    let sidecar_start_s = t_start.elapsed().as_secs_f64();
    let model: Value = match client.get(sidecar.url("/model")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let warmup = model["warmup"].as_u64().unwrap_or(30) as usize;
    let threshold = model["threshold"].as_f64().unwrap_or(4.0);

    // One outlier per device, each the first after its warm-up: an outlier is learned only
    // clipped to mean ± threshold·σ, but it still widens σ, so a device is never reused.
    let rate = a.anomaly_rate.max(0.1);
    let n_warm = (a.warmup().as_secs_f64() * rate).round() as usize;
    let n_measured = ((a.anomaly_duration().as_secs_f64() * rate).round() as usize).max(1);
    let devices = n_warm + n_measured;
    let readings = warmup + 2;
    let device = |d: usize| format!("anom-{}-{d:04}", ctx.run);
    log(format!(
        "{}: sidecar healthy after {sidecar_start_s:.1}s; warming up {devices} devices with {readings} readings each",
        "anomaly-to-webhook"
    ));

    // Normal readings, deterministic, within ±0.5 of 20 (σ ≈ 0.29), in batches of 100.
    let batch_url = format!("{}/api/v1/ingest/batch", a.ingest_url);
    let all: Vec<Value> = (0..readings)
        .flat_map(|i| {
            (0..devices).map(move |d| (d, 20.0 + ((i * 37 + d * 11) % 100) as f64 / 100.0 - 0.5))
        })
        .map(|(d, v)| {
            json!({"event_type": "sensor.reading", "aggregate_id": device(d),
                   "payload": {"value": v, "unit": "celsius"}})
        })
        .collect();
    let t_warm = Instant::now();
    for chunk in all.chunks(100) {
        let r = auth(client.post(&batch_url))
            .json(&json!({ "events": chunk }))
            .send()
            .await
            .context("warm-up batch")?;
        let status = r.status();
        if status != 202 {
            let body = r.text().await.unwrap_or_default();
            bail!("warm-up batch answered {status}: {body}");
        }
    }
    let db = ctx.db()?.clone();
    let prefix = format!("anom-{}-%", ctx.run);
    let scored = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*), count(*) FILTER (WHERE is_anomaly) FROM ai.inference_results
             WHERE device_id LIKE $1",
        )
        .bind(&prefix)
        .fetch_one(&db)
        .await
        .ok()
    };
    let (mut done, mut grew) = ((0i64, 0i64), Instant::now());
    while (done.0 as usize) < all.len() {
        if grew.elapsed() > Duration::from_secs(30) {
            bail!(
                "the sidecar scored only {} of {} warm-up readings (no progress for 30 s); {}: {}",
                done.0,
                all.len(),
                sidecar.log.display(),
                sidecar.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(n) = scored().await
            && n.0 > done.0
        {
            (done, grew) = (n, Instant::now());
        }
    }
    let warm_s = t_warm.elapsed().as_secs_f64();
    let false_alarms = done.1;
    log(format!(
        "anomaly-to-webhook: {} warm-up readings scored in {warm_s:.1}s ({false_alarms} flagged)",
        all.len()
    ));
    // The pipeline idle again (projections, time series), and the action orchestrator's consumer
    // in its group, before the first outlier.
    let settle_after = ctx.settle(Duration::from_secs(10)).await;
    let health_url = format!("{}/health", a.actions_health_url);
    let t_h = Instant::now();
    let mut actions_healthy = false;
    while t_h.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = client.get(&health_url).send().await
            && let Ok(v) = r.json::<Value>().await
            && v["status"] == "healthy"
        {
            actions_healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = receiver.count();

    // Outliers, open loop: one every 1/rate seconds, each on its own task.
    log(format!(
        "anomaly-to-webhook: {devices} outliers at {rate}/s ({n_warm} warm-up)"
    ));
    let ingest_url = format!("{}/api/v1/ingest", a.ingest_url);
    let m0 = cpu_mark(&a);
    let start = Instant::now() + Duration::from_millis(20);
    let mut set = tokio::task::JoinSet::new();
    for k in 0..devices {
        let at = start + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let rb = auth(client.post(&ingest_url)).json(&json!({
            "event_type": "sensor.reading", "aggregate_id": device(k),
            "payload": {"value": 80.0, "unit": "celsius"}}));
        set.spawn(async move {
            let mut o = Outlier {
                index: k,
                scheduled: at,
                status: None,
                error: None,
                accepted: None,
                event_id: None,
            };
            match rb.send().await {
                Ok(r) => {
                    let t = Instant::now();
                    o.status = Some(r.status().as_u16());
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    if o.status == Some(202) {
                        o.accepted = Some(t);
                        o.event_id = v["event_id"].as_str().map(str::to_string);
                    }
                }
                Err(e) => o.error = Some(e.to_string()),
            }
            o
        });
    }
    let mut sent: Vec<Outlier> = Vec::with_capacity(devices);
    while let Some(o) = set.join_next().await {
        sent.push(o?);
    }
    sent.sort_by_key(|o| o.index);
    let ids: HashMap<String, usize> = sent
        .iter()
        .filter_map(|o| Some((o.event_id.clone()?, o.index)))
        .collect();

    // Wait for a webhook per accepted outlier: up to 30 s after the last one was sent.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut seen, mut arrived) = (before, std::collections::HashSet::new());
    while arrived.len() < ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (total, new) = receiver.sources_from(seen);
        seen = total;
        arrived.extend(new.into_iter().filter(|s| ids.contains_key(s)));
    }
    let m1 = cpu_mark(&a);
    // Late duplicates, if any, arrive within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = receiver.take();

    // The first call per outlier counts; later ones are duplicates.
    let mut first: HashMap<&str, usize> = HashMap::new();
    let (mut duplicates, mut unexpected, mut bad_signature) = (0u64, 0u64, 0u64);
    for (i, c) in calls.iter().enumerate() {
        if !hook::verify(secret, c) {
            bad_signature += 1;
        }
        let v = c.json();
        let source = v
            .pointer("/payload/source_event_id")
            .and_then(Value::as_str)
            .and_then(|s| ids.get_key_value(s));
        match source {
            Some((s, _)) if v["event_type"] == "ai.anomaly" => {
                if first.contains_key(s.as_str()) {
                    duplicates += 1;
                } else {
                    first.insert(s.as_str(), i);
                }
            }
            _ => unexpected += 1,
        }
    }

    let (mut h, mut h_sent, mut h_accept) = (histogram(), histogram(), histogram());
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost = 0u64;
    let mut lost_measured = 0u64;
    let mut delivered_measured = 0u64;
    let mut wall_of: HashMap<Uuid, i64> = HashMap::new();
    let mut errors: Vec<String> = Vec::new();
    for o in &sent {
        let measured = o.index >= n_warm;
        if let Some(e) = &o.error {
            *failures.entry("error".into()).or_default() += 1;
            if errors.len() < 5 {
                errors.push(format!("outlier {}: {e}", o.index));
            }
            continue;
        }
        if let Some(s) = o.status.filter(|s| *s != 202) {
            *failures.entry(s.to_string()).or_default() += 1;
            continue;
        }
        let (Some(id), Some(acc)) = (&o.event_id, o.accepted) else {
            continue;
        };
        if measured {
            h_accept.saturating_record((acc - o.scheduled).as_micros().max(1) as u64);
        }
        match first.get(id.as_str()) {
            Some(&i) => {
                let c = &calls[i];
                if let Ok(u) = Uuid::parse_str(id) {
                    wall_of.insert(u, c.wall_us);
                }
                if measured {
                    delivered_measured += 1;
                    h.saturating_record(
                        c.at.saturating_duration_since(acc).as_micros().max(1) as u64
                    );
                    h_sent.saturating_record(
                        c.at.saturating_duration_since(o.scheduled)
                            .as_micros()
                            .max(1) as u64,
                    );
                }
            }
            None => {
                lost += 1;
                if measured {
                    lost_measured += 1;
                }
            }
        }
    }
    let accepted_measured = sent
        .iter()
        .filter(|o| o.index >= n_warm && o.accepted.is_some())
        .count();

    // Where the time goes, from the stored timestamps (the same machine clock): the reading's
    // ingested_at, the sidecar's scoring transaction (ai.inference_results.created_at), the
    // ai.anomaly's ingested_at (accepted by the API) and stored_at (the outbox processor's claim),
    // the delivery's created_at (recorded by the action orchestrator), the webhook's arrival.
    let measured_ids: Vec<Uuid> = sent
        .iter()
        .filter(|o| o.index >= n_warm)
        .filter_map(|o| Uuid::parse_str(o.event_id.as_deref()?).ok())
        .collect();
    type Stamps = (
        Uuid,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let stamps: Vec<Stamps> = sqlx::query_as(
        "SELECT r.event_id,
                (extract(epoch FROM r.ingested_at) * 1e6)::float8,
                (extract(epoch FROM ir.created_at) * 1e6)::float8,
                (extract(epoch FROM an.ingested_at) * 1e6)::float8,
                (extract(epoch FROM an.stored_at) * 1e6)::float8,
                (extract(epoch FROM d.created_at) * 1e6)::float8
         FROM ingestion.event_store r
         LEFT JOIN ai.inference_results ir ON ir.event_id = r.event_id
         LEFT JOIN ingestion.event_store an
                ON an.event_type = 'ai.anomaly'
               AND an.payload->>'source_event_id' = r.event_id::text
         LEFT JOIN actions.deliveries d ON d.event_id = an.event_id AND d.rule_id = $2
         WHERE r.event_id = ANY($1)",
    )
    .bind(&measured_ids)
    .bind(rule_id)
    .fetch_all(&db)
    .await
    .unwrap_or_else(|e| {
        log(format!("anomaly-to-webhook: stage breakdown skipped: {e}"));
        Vec::new()
    });
    let mut stages: Vec<Histogram<u64>> = (0..5).map(|_| histogram()).collect();
    for (id, ingested, scored, accepted, stored, recorded) in &stamps {
        let hook_at = wall_of.get(id).map(|w| *w as f64);
        let points = [*ingested, *scored, *accepted, *stored, *recorded, hook_at];
        for (s, hist) in stages.iter_mut().enumerate() {
            if let (Some(x), Some(y)) = (points[s], points[s + 1]) {
                hist.saturating_record((y - x).max(1.0) as u64);
            }
        }
    }
    const STAGES: [&str; 5] = [
        "reading ingested → scored by the sidecar",
        "→ ai.anomaly accepted by the API",
        "→ in the event store (processor claim)",
        "→ delivery recorded by the action orchestrator",
        "→ webhook received",
    ];
    let stage_text: Vec<String> = STAGES
        .iter()
        .zip(&stages)
        .map(|(name, h)| format!("{name} {}", percentiles_text(h)))
        .collect();

    let mut r = Row::new(ANOMALY_ROW);
    r.latency(&h);
    r.value = r.p99_us.map(|u| u as f64 / 1000.0);
    r.unit = "ms p99".into();
    r.result = format!(
        "{} of {} outliers → signed webhook, {lost} lost",
        thousands(delivered_measured as f64),
        thousands(n_measured as f64)
    );
    if lost > 0 {
        failures.insert("lost".into(), lost);
    }
    if duplicates > 0 {
        failures.insert("duplicate-webhook".into(), duplicates);
    }
    if unexpected > 0 {
        failures.insert("unexpected-webhook".into(), unexpected);
    }
    if bad_signature > 0 {
        failures.insert("bad-signature".into(), bad_signature);
    }
    if false_alarms > 0 {
        failures.insert("normal-reading-flagged".into(), false_alarms as u64);
    }
    r.failures = failures;
    r.goal = ANOMALY_GOAL.into();
    r.goal_met = r.p99_us.map(|p| {
        p <= 250_000
            && lost == 0
            && bad_signature == 0
            && accepted_measured == n_measured
            && delivered_measured as usize == n_measured
    });
    let cpu = cpu_use(&m0, &m1);
    let mut notes = Vec::new();
    if !settle.is_empty() {
        notes.push(format!("before: {settle}"));
    }
    if !settle_after.is_empty() {
        notes.push(format!("after the warm-up: {settle_after}"));
    }
    if !actions_healthy {
        notes.push(
            "the action orchestrator's /health was not \"healthy\" within 30 s of the warm-up"
                .into(),
        );
    }
    r.config = format!(
        "{devices} devices warmed up with {readings} normal readings each (20 ± 0.5; batches of 100; the sidecar flags a reading after {warmup} and above {threshold}σ), scored in {warm_s:.1}s; then one outlier (80.0, ≈200σ) per device, each the device's first, open loop {rate}/s × {:.0}s (+{:.0}s warm-up, excluded from the histogram, checked for loss); latency = the reading's 202 answer → the webhook request at the bench's receiver (axum on 127.0.0.1, answers 200); every call's Standard Webhooks signature verified afterwards (HMAC-SHA256 with the rule's whsec_ secret, timestamp within 5 min); rule on ai.anomaly, no condition, dedup_window_s 0; sidecar: {} -m ai_inference (ai-inference/, defaults but its own port, consumer group {}, the run's database, broker and topic prefix; started for this row, healthy after {sidecar_start_s:.1}s, stopped after it); send → webhook p50/p99 {}; send → 202 p50/p99 {}; stages p50/p99: {}; {}; {}{}",
        a.anomaly_duration().as_secs_f64(),
        a.warmup().as_secs_f64(),
        a.ai_python.display(),
        sidecar.group,
        percentiles_text(&h_sent),
        percentiles_text(&h_accept),
        stage_text.join(", "),
        r.failures_text(),
        cpu_text(&cpu),
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        }
    );
    let stage_json: Vec<Value> = STAGES
        .iter()
        .zip(&stages)
        .map(|(name, h)| json!({ "stage": name, "us": quantiles(h) }))
        .collect();
    r.details = json!({
        "cpu": cpu,
        "devices": devices,
        "warmup_readings_per_device": readings,
        "sidecar_model": model,
        "sidecar_healthy_after_s": sidecar_start_s,
        "warmup_scored_s": warm_s,
        "outliers_sent": sent.len(),
        "outliers_measured": n_measured,
        "accepted_measured": accepted_measured,
        "delivered_measured": delivered_measured,
        "lost": lost,
        "lost_measured": lost_measured,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "bad_signature": bad_signature,
        "webhook_calls": calls.len(),
        "send_to_webhook_us": quantiles(&h_sent),
        "send_to_202_us": quantiles(&h_accept),
        "stages": stage_json,
        "errors": errors,
    });
    ctx.rows.insert(r.row.clone(), r);
    Ok(())
}

fn row_footprint(ctx: &mut Ctx) {
    let mut r = Row::new("footprint");
    let startup = ctx.startup["all_health_200_s"].as_f64();
    let healthy = ctx.startup["all_health_healthy_s"].as_f64();
    let (rss_kib, source) = match ctx.startup["ingest_max_rss_peak_kib"].as_u64() {
        Some(k) if ctx.startup["rss_peak_reset_before_ingest_max"] == json!(true) => {
            (Some(k), "peak (VmHWM) during ingest-max")
        }
        Some(k) => (
            Some(k),
            "peak (VmHWM) since process start, read after ingest-max (reset not possible)",
        ),
        None => (
            ctx.a.platform_pid.and_then(|p| status_kib(p, "VmHWM:")),
            "peak (VmHWM) since process start (ingest-max not run)",
        ),
    };
    let mb = rss_kib.map(|k| k as f64 / 1024.0);
    r.value = mb;
    r.unit = "MB".into();
    r.result = format!(
        "RSS {} · start {}",
        mb.map_or("?".into(), |m| format!("{m:.0} MB")),
        startup.map_or("?".into(), |s| format!("{s:.2} s"))
    );
    r.goal = "≤ 150 MB; ≤ 2 s".into();
    r.goal_met = match (mb, startup) {
        (Some(m), Some(s)) => Some(m <= 150.0 && s <= 2.0),
        _ => None,
    };
    r.config = format!(
        "RSS: {source} of the platform process (pid {}); start: from spawn (fresh database: migrations included) until /health answers 200 on 8080, 8081 and 8084, polled every 5 ms; all three reporting \"healthy\" (consumer partitions assigned): {}",
        ctx.a.platform_pid.map_or("?".into(), |p| p.to_string()),
        healthy.map_or("?".into(), |s| format!("{s:.2} s"))
    );
    r.details = ctx.startup.clone();
    ctx.rows.insert(r.row.clone(), r);
}

// ---------------------------------------------------------------------------------------------
// References between rows, the table and the JSON file.

fn cross_references(rows: &mut BTreeMap<String, Row>) {
    let val = |rows: &BTreeMap<String, Row>, k: &str| rows.get(k).and_then(|r| r.value);
    let ingest = val(rows, "ingest-max");
    if let (Some(i), Some(r)) = (ingest, rows.get_mut("ingest-baseline"))
        && let Some(b) = r.value
    {
        let x = i / b.max(1e-9);
        r.goal = format!("reference: ingest-max ≥ 2× it → {x:.2}×");
        r.goal_met = Some(x >= 2.0);
    } else if let Some(r) = rows.get_mut("ingest-baseline") {
        r.goal = "reference: ingest-max ≥ 2× it".into();
    }
    if let (Some(i), Some(r)) = (ingest, rows.get_mut("http-ceiling"))
        && let Some(c) = r.value
    {
        let x = i / c.max(1e-9) * 100.0;
        r.goal = format!("reference: ingest-max ≥ 25% of it → {x:.0}%");
        r.goal_met = Some(x >= 25.0);
    } else if let Some(r) = rows.get_mut("http-ceiling") {
        r.goal = "reference: ingest-max ≥ 25% of it".into();
    }
    let batch = val(rows, "batch-max");
    if let (Some(b), Some(r)) = (batch, rows.get_mut("db-ceiling"))
        && let Some(c) = r.value
    {
        r.goal = format!(
            "reference for batch-max → batch-max is {:.0}% of it",
            b / c.max(1e-9) * 100.0
        );
    } else if let Some(r) = rows.get_mut("db-ceiling") {
        r.goal = "reference for batch-max".into();
    }
}

/// Other processes above this share of the CPU (percent of one core) during a row make it suspect.
const BUSY_OTHER_PCT: f64 = 25.0;

/// Marks rows during which something else used the machine (the bench shares it).
fn flag_busy(rows: &mut BTreeMap<String, Row>) {
    for r in rows.values_mut() {
        let mut cpus: Vec<&Value> = vec![&r.details["cpu"]];
        if let Some(steps) = r.details["steps"].as_array() {
            cpus.extend(steps.iter().map(|s| &s["cpu"]));
        }
        let other = cpus
            .iter()
            .filter_map(|c| c["other_pct"].as_f64())
            .fold(0.0, f64::max);
        if other > BUSY_OTHER_PCT {
            r.warning = Some(format!(
                "other processes used {other:.0}% CPU during this row: not representative"
            ));
        }
    }
}

fn markdown(rows: &BTreeMap<String, Row>) -> String {
    let mut s = String::new();
    s.push_str("| row | result | p50 | p99 | max | goal | config |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for name in ROWS {
        let Some(r) = rows.get(*name) else { continue };
        let goal = match r.goal_met {
            Some(true) => format!("{} ✓", r.goal),
            Some(false) => format!("{} ✗", r.goal),
            None => r.goal.clone(),
        };
        let cell = |t: &str| t.replace('|', "\\|");
        let result = match &r.warning {
            Some(w) => format!("{} ⚠ {w}", r.result),
            None => r.result.clone(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.row,
            cell(&result),
            fmt_us(r.p50_us),
            fmt_us(r.p99_us),
            fmt_us(r.max_us),
            cell(&goal),
            cell(&r.config)
        );
    }
    s
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    })
}

async fn machine(ctx: &Ctx) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string());
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    });
    let pg: Option<String> = match ctx.db.as_ref() {
        Some(db) => sqlx::query_scalar("SELECT version()")
            .fetch_one(db)
            .await
            .ok(),
        None => None,
    };
    let pg_settings: Option<Vec<(String, String)>> = match ctx.db.as_ref() {
        Some(db) => sqlx::query_as(
            "SELECT name, setting FROM pg_settings WHERE name IN
             ('shared_buffers','synchronous_commit','fsync','wal_sync_method','max_connections',
              'commit_delay','wal_buffers','max_wal_size','full_page_writes')",
        )
        .fetch_all(db)
        .await
        .ok(),
        None => None,
    };
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "memory_mib": mem_kib.map(|k| k / 1024),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "versions": {
            "rustc": command_output("rustc", &["--version"]),
            "postgresql": pg,
            "tansu": command_output("tansu", &["--version"]),
            "librdkafka": rdkafka::util::get_rdkafka_version().1,
            "cornjacket": env!("CARGO_PKG_VERSION"),
            "git_commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        },
        "postgresql_settings": pg_settings.map(|v| v.into_iter().collect::<HashMap<_, _>>()),
    })
}

async fn run(a: Args) -> anyhow::Result<()> {
    if let Some(t) = a.token.as_ref().filter(|t| !t.is_empty()) {
        let _ = http::AUTHORIZATION.set(t.trim().to_string());
    }
    let db = match &a.database_url {
        Some(url) => Some(
            PgPoolOptions::new()
                .max_connections(4)
                .connect(url)
                .await
                .context("connecting to the bench database")?,
        ),
        None => None,
    };
    let mut ctx = Ctx {
        ingest: target(&a.ingest_url).await?,
        query: target(&a.query_url).await?,
        eventhandler: target(&a.eventhandler_url).await?,
        run: format!(
            "{:x}",
            SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs()
        ),
        a,
        db,
        rows: BTreeMap::new(),
        startup: json!({}),
    };
    for r in &ctx.a.rows {
        if !ROWS.contains(&r.as_str()) {
            bail!("unknown row '{r}'; rows: {}", ROWS.join(", "));
        }
    }
    let began = chrono::Local::now();
    wait_healthy(&mut ctx).await?;
    // The machine should be otherwise idle: measure what else runs for a second, and say so.
    let m0 = cpu_mark(&ctx.a);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_check = cpu_use(&m0, &cpu_mark(&ctx.a));
    let other_before = idle_check["other_pct"].as_f64().unwrap_or(0.0);
    if other_before > 15.0 {
        log(format!(
            "warning: other processes use {other_before:.0}% CPU (of {}00%) before the run; results will be low",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ));
    }
    // The broker's memory: an in-memory Tansu keeps everything it was sent and slows down as it grows.
    let broker_rss_mib = ctx
        .a
        .broker_pid
        .and_then(|p| status_kib(p, "VmRSS:"))
        .map(|k| k / 1024);
    let bench_start = Instant::now();

    // Run order: rows that want an idle pipeline first, then the saturation rows (which leave a
    // backlog that is drained or truncated before each following row), the broker last.
    // anomaly-to-webhook comes first of all: its sidecar reads sensor-events from the earliest
    // offset, so it starts while that topic is still empty.
    type RowFn = for<'c> fn(
        &'c mut Ctx,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = anyhow::Result<()>> + 'c>,
    >;
    let order: &[(&str, RowFn)] = &[
        ("anomaly-to-webhook", |c| Box::pin(row_anomaly(c))),
        ("http-ceiling", |c| Box::pin(row_http_ceiling(c))),
        ("e2e-latency", |c| Box::pin(row_e2e(c))),
        ("query", |c| Box::pin(row_query(c))),
        ("pipeline-max", |c| Box::pin(row_pipeline(c))),
        ("ingest-max", |c| Box::pin(row_ingest_max(c))),
        ("ingest-baseline", |c| Box::pin(row_ingest_baseline(c))),
        ("db-ceiling", |c| Box::pin(row_db_ceiling(c))),
        ("batch-max", |c| Box::pin(row_batch_max(c))),
        ("broker-baseline", |c| Box::pin(row_broker_baseline(c))),
        ("mqtt", |c| Box::pin(row_mqtt(c))),
    ];
    for (name, f) in order {
        if !ctx.a.wants(name) {
            continue;
        }
        let t = Instant::now();
        if let Err(e) = f(&mut ctx).await {
            log(format!("{name}: failed: {e:#}"));
            let mut r = Row::not_measured(name, &format!("failed: {e:#}"), "");
            r.measured = false;
            ctx.rows.insert(name.to_string(), r);
        }
        log(format!("{name}: done in {:.1}s", t.elapsed().as_secs_f64()));
    }
    if ctx.a.wants("footprint") {
        row_footprint(&mut ctx);
    }
    cross_references(&mut ctx.rows);
    flag_busy(&mut ctx.rows);

    let machine = machine(&ctx).await;
    let table = markdown(&ctx.rows);
    let v = &machine["versions"];
    let header = format!(
        "cornjacket bench — {} — {} cores ({}), {} MiB RAM — {}; {}; tansu {}; librdkafka {}; commit {}{}",
        began.format("%Y-%m-%d %H:%M %Z"),
        machine["cores"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_mib"],
        v["rustc"].as_str().unwrap_or("rustc ?"),
        v["postgresql"]
            .as_str()
            .and_then(|s| s.split(" on ").next())
            .unwrap_or("PostgreSQL ?"),
        v["tansu"].as_str().unwrap_or("?"),
        v["librdkafka"].as_str().unwrap_or("?"),
        v["git_commit"].as_str().unwrap_or("?"),
        if ctx.a.quick {
            " — QUICK (smoke) run"
        } else {
            ""
        }
    );
    let platform = if ctx.a.platform_config.is_empty() {
        String::new()
    } else {
        format!("\nPlatform: {}\n", ctx.a.platform_config)
    };
    println!("\n{header}\n{platform}\n{table}");

    let rows: Vec<&Row> = ROWS.iter().filter_map(|n| ctx.rows.get(*n)).collect();
    let result = json!({
        "date": began.to_rfc3339(),
        "quick": ctx.a.quick,
        "elapsed_s": bench_start.elapsed().as_secs_f64(),
        "machine": machine,
        "cpu_before_run": idle_check,
        "broker_rss_mib_at_start": broker_rss_mib,
        "platform_config": ctx.a.platform_config,
        "args": format!("{:?}", std::env::args().skip(1).collect::<Vec<_>>()),
        "rows": rows,
        "markdown": table,
    });
    std::fs::create_dir_all(&ctx.a.out)?;
    // A run of some rows, or a smoke run, does not replace the day's full run.
    let mut name = began.format("%Y-%m-%d").to_string();
    if !ctx.a.rows.is_empty() {
        let mut rows: Vec<&str> = ROWS.iter().copied().filter(|r| ctx.a.wants(r)).collect();
        rows.dedup();
        name = format!("{name}-{}", rows.join("+"));
    }
    if ctx.a.quick {
        name.push_str("-quick");
    }
    let path = ctx.a.out.join(format!("{name}.json"));
    let mut f = std::fs::File::create(&path)?;
    f.write_all(serde_json::to_string_pretty(&result)?.as_bytes())?;
    f.write_all(b"\n")?;
    log(format!("results written to {}", path.display()));
    Ok(())
}

/// The platform's configuration defaults, which rows quote.
fn platform_defaults() -> cornjacket::config::Config {
    cornjacket::config::Config::from_map(&Default::default()).expect("defaults are valid")
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let r = if let Some(port) = a.serve_ceiling {
        serve_ceiling(port).await
    } else if a.drop_topics {
        drop_topics(&a).await
    } else {
        run(a).await
    };
    if let Err(e) = r {
        eprintln!("cornjacket-bench: {e:#}");
        std::process::exit(1);
    }
}
