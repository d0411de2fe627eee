//! Test harness (STYLE §11): real PostgreSQL, the real Kafka-API broker, services in-process on
//! port 0, a fresh database and unique topic and group names per test.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

pub mod mosquitto;
pub mod sidecar;
pub mod webhook;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use cornjacket::config::Config;
use cornjacket::envelope::{Clock, SystemClock};
use cornjacket::services::Service;
use cornjacket::supervisor::{self, Platform};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

pub fn admin_url() -> String {
    std::env::var("CJ_TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://cornjacket:cornjacket@127.0.0.1:5432/cornjacket?sslmode=disable".into()
    })
}

pub fn brokers() -> String {
    std::env::var("CJ_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The port of the shared test MQTT broker (`CJ_TEST_MQTT_URL`, default 1883).
pub fn mqtt_port() -> u16 {
    std::env::var("CJ_TEST_MQTT_URL")
        .ok()
        .and_then(|u| {
            u.rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
        })
        .unwrap_or(1883)
}

/// A short unique name for databases, topics and groups.
pub fn unique(prefix: &str) -> String {
    let id = Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[id.len() - 12..])
}

/// A unique topic prefix that carries its creation time, so later runs can delete what earlier
/// runs left on the shared broker (Tansu keeps topics in memory).
/// The host's clock, for what tests stamp or compare with real time (names, cut-offs, token
/// times); the platform itself reads time only through its injected clock.
#[allow(
    clippy::disallowed_methods,
    reason = "tests compare with the real time the platform's system clock also reads"
)]
pub fn wall_clock() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

pub fn topic_prefix() -> String {
    format!(
        "t{}_{}.",
        wall_clock().timestamp(),
        unique("").to_lowercase()
    )
}

/// Deletes test topics older than an hour from the shared broker; once per test process.
#[allow(
    clippy::disallowed_methods,
    reason = "the harness is an outside client of the bus: it reads, writes and deletes topics raw"
)]
pub async fn delete_stale_topics() {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let stale: Vec<String> = tokio::task::spawn_blocking(|| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .ok()?;
        let md = c.fetch_metadata(None, Duration::from_secs(5)).ok()?;
        let cutoff = wall_clock().timestamp() - 3600;
        Some(
            md.topics()
                .iter()
                .map(|t| t.name().to_string())
                .filter(|n| {
                    n.strip_prefix('t')
                        .and_then(|r| r.split('_').next())
                        .and_then(|ts| ts.parse::<i64>().ok())
                        .is_some_and(|ts| ts < cutoff)
                })
                .collect(),
        )
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default();
    if stale.is_empty() {
        return;
    }
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        match ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
        {
            Ok(a) => a,
            Err(_) => return,
        };
    let names: Vec<&str> = stale.iter().map(String::as_str).collect();
    for chunk in names.chunks(100) {
        let _ = admin
            .delete_topics(chunk, &rdkafka::admin::AdminOptions::new())
            .await;
    }
}

/// A fresh database for one test. Old ones from earlier runs are dropped when older than a day.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!(
            "cjtest_{}_{}",
            wall_clock().timestamp(),
            unique("").to_lowercase()
        );
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("test PostgreSQL reachable (run `make infra-up`)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'cjtest\\_%'
             AND split_part(datname, '_', 2)::bigint < extract(epoch from now())::bigint - 86400",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap_or_default();
        for db in stale {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(&mut admin)
                .await;
        }
        let url = with_db(&admin_url(), &name);
        Self { name, url }
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url).await.expect("connect test db")
    }
}

/// Replaces the database name in a postgres URL.
pub fn with_db(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let cut = base.rfind('/').expect("url has a path");
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{db}{q}", &base[..cut])
}

/// Replaces host:port in a postgres URL (to route through a proxy).
pub fn with_host(url: &str, hostport: &str) -> String {
    let at = url.rfind('@').expect("url has credentials");
    let rest = &url[at + 1..];
    let slash = rest.find('/').expect("url has a path");
    format!("{}@{hostport}{}", &url[..at], &rest[slash..])
}

/// Configuration for one test: ports 0, its database, unique topics and consumer group.
pub fn test_env(db_url: &str, topic_prefix: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for (k, v) in [
        ("CJ_DATABASE_URL", db_url.to_string()),
        ("CJ_KAFKA_BROKERS", brokers()),
        ("CJ_KAFKA_TOPIC_PREFIX", topic_prefix.to_string()),
        ("CJ_KAFKA_PARTITIONS", "3".into()),
        ("CJ_INGESTION_PORT", "0".into()),
        ("CJ_QUERY_PORT", "0".into()),
        ("CJ_EVENTHANDLER_HEALTH_PORT", "0".into()),
        ("CJ_ACTIONS_PORT", "0".into()),
        ("CJ_ACTIONS_HEALTH_PORT", "0".into()),
        ("CJ_CONSOLE_PORT", "0".into()),
        (
            "CJ_EVENTHANDLER_CONSUMER_GROUP",
            format!("{topic_prefix}event-handler"),
        ),
        (
            "CJ_TSDB_CONSUMER_GROUP",
            format!("{topic_prefix}tsdb-writer"),
        ),
        (
            "CJ_ACTIONS_CONSUMER_GROUP",
            format!("{topic_prefix}action-orchestrator"),
        ),
        ("CJ_OUTBOX_POLL_INTERVAL", "1s".into()),
        // Webhook tests that exercise the limit set it; elsewhere 10/min would only slow them.
        ("CJ_ACTIONS_RATE_LIMIT", "0".into()),
        // In-test receivers listen on loopback.
        ("CJ_ACTIONS_ALLOW_PRIVATE_TARGETS", "true".into()),
        ("CJ_DB_MAX_CONNECTIONS", "8".into()),
        ("CJ_SHUTDOWN_TIMEOUT", "15s".into()),
        ("CJ_LOG_LEVEL", "warn".into()),
        ("CJ_LOG_FORMAT", "text".into()),
        // MQTT tests switch it on with their own topics; elsewhere it would only add noise.
        ("CJ_MQTT_URL", "off".into()),
        // Authentication has its own tests; elsewhere requests go unauthenticated.
        ("CJ_AUTH_MODE", "off".into()),
    ] {
        m.insert(k.to_string(), v);
    }
    m
}

pub struct TestApp {
    pub db: TestDb,
    pub prefix: String,
    pub config: Config,
    pub platform: Option<Platform>,
    pub addrs: HashMap<Service, SocketAddr>,
    /// Separate health ports (the action orchestrator's 8083).
    pub health_addrs: HashMap<Service, SocketAddr>,
    pub http: reqwest::Client,
}

impl TestApp {
    /// Starts the chosen services against a fresh database and unique topics.
    pub async fn spawn(services: &[Service]) -> Self {
        Self::spawn_with(services, |_| {}).await
    }

    pub async fn spawn_with(
        services: &[Service],
        tweak: impl FnOnce(&mut HashMap<String, String>),
    ) -> Self {
        let db = TestDb::new().await;
        let prefix = topic_prefix();
        let mut env = test_env(&db.url, &prefix);
        tweak(&mut env);
        Self::start(db, prefix, env, services).await
    }

    pub async fn start(
        db: TestDb,
        prefix: String,
        env: HashMap<String, String>,
        services: &[Service],
    ) -> Self {
        Self::start_with_clock(db, prefix, env, services, Arc::new(SystemClock)).await
    }

    /// Like [`TestApp::start`], with the services reading time from `clock` (a `FixedClock`
    /// lets a test ingest "in the past" or move time forward).
    pub async fn start_with_clock(
        db: TestDb,
        prefix: String,
        env: HashMap<String, String>,
        services: &[Service],
        clock: Arc<dyn Clock>,
    ) -> Self {
        delete_stale_topics().await;
        let config = Config::from_map(&env).expect("test config is valid");
        cornjacket::infra::telemetry::init_logging(&config);
        let platform = supervisor::start(config.clone(), services, clock)
            .await
            .expect("platform starts");
        let addrs = platform.addrs.clone();
        let health_addrs = platform.health_addrs.clone();
        Self {
            db,
            prefix,
            config,
            platform: Some(platform),
            addrs,
            health_addrs,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self, svc: Service, path: &str) -> String {
        format!("http://{}{path}", self.addrs[&svc])
    }

    /// A URL on a service's separate health port.
    pub fn health_url(&self, svc: Service, path: &str) -> String {
        format!("http://{}{path}", self.health_addrs[&svc])
    }

    /// POSTs one event to /api/v1/ingest and returns (status, body).
    pub async fn ingest(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(self.url(Service::Ingestion, "/api/v1/ingest"))
            .json(&body)
            .send()
            .await
            .expect("ingest request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POSTs `events` to /api/v1/ingest/batch, 500 per request, and asserts each request got
    /// 202 with every event accepted.
    pub async fn ingest_batch(&self, events: Vec<serde_json::Value>) {
        for chunk in events.chunks(500) {
            let r = self
                .http
                .post(self.url(Service::Ingestion, "/api/v1/ingest/batch"))
                .json(&serde_json::json!({ "events": chunk }))
                .send()
                .await
                .expect("batch request");
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            assert_eq!(status, 202, "{body}");
            assert!(body.contains("\"rejected\":0"), "{body}");
        }
    }

    /// Waits until ingestion accepts writes (migrations applied).
    pub async fn wait_ready(&self) {
        let url = self.url(Service::Ingestion, "/health");
        eventually(Duration::from_secs(30), || async {
            let r = self.http.get(&url).send().await.ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            v["checks"].get("outbox").map(|_| ())
        })
        .await;
    }

    pub async fn pool(&self) -> PgPool {
        self.db.pool().await
    }

    pub fn topic(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Stops the services gracefully; true when they all stopped cleanly.
    pub async fn stop(&mut self) -> bool {
        let p = self.platform.take().expect("running");
        p.shutdown.cancel();
        p.wait().await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(p) = &self.platform {
            p.shutdown.cancel();
        }
    }
}

/// `SELECT count(*)` of a table.
pub async fn count_rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("count {table}: {e}"))
}

/// The `metadata.subject` of the first stored event, once one is stored.
pub async fn stored_subject(pool: &PgPool) -> serde_json::Value {
    eventually(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, serde_json::Value>(
            "SELECT metadata->'subject' FROM ingestion.event_store LIMIT 1",
        )
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
    })
    .await
}

/// Polls `f` until it yields Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A record read back from the bus.
#[derive(Debug, Clone)]
pub struct BusRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: serde_json::Value,
    pub headers: HashMap<String, String>,
}

/// Reads every record of the topics from the beginning until `want` records arrived or the
/// deadline passed (no consumer group: partitions are assigned directly).
pub async fn read_topics(topics: &[String], want: usize, timeout: Duration) -> Vec<BusRecord> {
    read_topics_from(&brokers(), topics, want, timeout).await
}

pub async fn read_topics_from(
    brokers: &str,
    topics: &[String],
    want: usize,
    timeout: Duration,
) -> Vec<BusRecord> {
    read_topics_until(brokers, topics, timeout, move |recs| recs.len() >= want).await
}

/// Reads from the beginning until `done` holds for what was read, or the deadline passes.
#[allow(
    clippy::disallowed_methods,
    reason = "the harness is an outside client of the bus: it reads, writes and deletes topics raw"
)]
pub async fn read_topics_until(
    brokers: &str,
    topics: &[String],
    timeout: Duration,
    done: impl Fn(&[BusRecord]) -> bool + Send + 'static,
) -> Vec<BusRecord> {
    let topics = topics.to_vec();
    let brokers = brokers.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("test consumer");
        let mut tpl = TopicPartitionList::new();
        for t in &topics {
            let md = consumer
                .fetch_metadata(Some(t), Duration::from_secs(5))
                .expect("metadata");
            for mt in md.topics() {
                for p in mt.partitions() {
                    tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                        .unwrap();
                }
            }
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(BusRecord {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: serde_json::from_slice(m.payload().unwrap_or_default())
                        .unwrap_or(serde_json::Value::Null),
                    headers,
                });
            }
        }
        out
    })
    .await
    .unwrap()
}

/// Produces raw bytes straight to a topic (to inject poison).
#[allow(
    clippy::disallowed_methods,
    reason = "the harness is an outside client of the bus: it reads, writes and deletes topics raw"
)]
pub async fn produce_raw(topic: &str, key: &str, payload: &[u8]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    p.send(
        FutureRecord::to(topic).key(key).payload(payload),
        Duration::from_secs(10),
    )
    .await
    .expect("produce");
}

/// A TCP proxy that can be cut (all connections dropped, new ones refused) and restored, or
/// blackholed, to simulate a database going away without touching the shared server.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    _alive: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyMode {
    Up,
    Cut,
    Blackhole,
}

impl Proxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(ProxyMode::Up);
        let target = target.to_string();
        let alive = Arc::new(AtomicBool::new(true));
        tokio::spawn(async move {
            let mut closed = rx.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    // The proxy was dropped.
                    _ = closed.wait_for(|_| false) => break,
                };
                let Ok((inbound, _)) = accepted else {
                    break;
                };
                let mut rx = rx.clone();
                let target = target.clone();
                let now = *rx.borrow();
                match now {
                    ProxyMode::Cut => continue,
                    ProxyMode::Blackhole => {
                        tokio::spawn(async move {
                            let _held = inbound;
                            let _ = rx.wait_for(|m| *m == ProxyMode::Cut).await;
                        });
                        continue;
                    }
                    ProxyMode::Up => {}
                }
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut ri, &mut wo) => return,
                        _ = tokio::io::copy(&mut ro, &mut wi) => return,
                        _ = rx.wait_for(|m| *m != ProxyMode::Up) => {}
                    }
                    if *rx.borrow() == ProxyMode::Blackhole {
                        // Both sockets stay open, and nothing crosses any more: not after a
                        // restore either, as after a failover or a firewall that lost the flow.
                        let _ = rx.wait_for(|m| *m == ProxyMode::Cut).await;
                    }
                });
            }
        });
        Self {
            addr,
            mode,
            _alive: alive,
        }
    }

    pub fn cut(&self) {
        self.mode.send_replace(ProxyMode::Cut);
    }

    /// From now on no byte crosses any connection, old or new, and none is closed: a database
    /// host that vanished, or a firewall that silently drops its packets. New connections are
    /// accepted and then hang.
    pub fn blackhole(&self) {
        self.mode.send_replace(ProxyMode::Blackhole);
    }

    /// Lets new connections through again; connections blackholed before stay open and silent
    /// until the proxy is cut or dropped, so only a client that gives up on them recovers.
    pub fn restore(&self) {
        self.mode.send_replace(ProxyMode::Up);
    }

    pub fn is_up(&self) -> bool {
        *self.mode.borrow() == ProxyMode::Up
    }
}

/// A test-owned Tansu broker on its own port, so a test can stop and restart "the broker"
/// without disturbing the shared one.
pub struct OwnBroker {
    pub port: u16,
    child: Option<Child>,
}

impl OwnBroker {
    pub fn start() -> Self {
        let port = free_port();
        let mut b = Self { port, child: None };
        b.restart();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let bin = std::env::var("CJ_TEST_TANSU").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            let p = format!("{home}/.cargo/bin/tansu");
            if std::path::Path::new(&p).exists() {
                p
            } else {
                "tansu".into()
            }
        });
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(bin)
            .args(tansu_args(&url))
            // Tansu reads a .env in its working directory; keep it away from the project's.
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu binary (make infra-up installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "own broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The command line the infra script uses for Tansu, with the listener moved.
fn tansu_args(url: &str) -> Vec<String> {
    vec![
        "broker".into(),
        "--cluster-id".into(),
        "cornjacket-test".into(),
        "--listener-url".into(),
        url.into(),
        "--advertised-listener-url".into(),
        url.into(),
        "--storage-engine".into(),
        "memory://tansu/".into(),
    ]
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `cornjacket` binary built for this test run.
pub fn binary() -> String {
    env!("CARGO_BIN_EXE_cornjacket").to_string()
}

/// Runs a `cornjacket` subcommand against a test app's database and topics (nothing else from
/// the environment); returns whether it succeeded and what it printed.
pub fn cli(app: &TestApp, args: &[&str]) -> (bool, String) {
    let out = cornjacket()
        .args(args)
        .env_clear()
        .env("CJ_DATABASE_URL", &app.db.url)
        .env("CJ_KAFKA_BROKERS", brokers())
        .env("CJ_KAFKA_TOPIC_PREFIX", &app.prefix)
        .env("CJ_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// [`cli`] that must succeed; returns what it printed.
pub fn cli_ok(app: &TestApp, args: &[&str]) -> String {
    let (ok, text) = cli(app, args);
    assert!(ok, "{text}");
    text
}

/// A command for the binary, run outside the checkout so a developer's `.env` (which `make run`
/// writes) cannot change what the test configures.
pub fn cornjacket() -> Command {
    let mut c = Command::new(binary());
    c.current_dir(std::env::temp_dir());
    c
}

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: HashMap<String, String>,
    pub value: f64,
}

/// Scrapes a service port's `/metrics`.
pub async fn scrape(app: &TestApp, svc: Service) -> Vec<Sample> {
    let r = app
        .http
        .get(app.url(svc, "/metrics"))
        .send()
        .await
        .expect("metrics request");
    assert_eq!(r.status(), 200);
    parse_metrics(&r.text().await.expect("metrics body"))
}

/// Parses `name{label="value",...} 1.5` lines; comments and blank lines are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().expect("sample value is a number");
        let (name, mut rest) = series.split_once('{').unwrap_or((series, ""));
        let mut labels = HashMap::new();
        while let Some((key, after)) = rest.split_once("=\"") {
            let mut val = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, e)) => val.push(e),
                        None => {}
                    },
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => val.push(c),
                }
            }
            labels.insert(key.trim_start_matches(',').to_string(), val);
            rest = &after[end..];
        }
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The sum of the samples named `name` whose labels include `labels`; 0 when there are none
/// (a counter not yet touched is absent).
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Consumers that retry a poison message at once and then 50 ms later, so it is dead-lettered
/// within a test's patience.
pub fn fast_consumer_retries(e: &mut HashMap<String, String>) {
    for k in [
        "CJ_EVENTHANDLER_RETRY_DELAYS",
        "CJ_TSDB_RETRY_DELAYS",
        "CJ_ACTIONS_CONSUMER_RETRY_DELAYS",
    ] {
        e.insert(k.into(), "0s,50ms".into());
    }
}

/// Puts a reading whose value is not a number ("hot") on the app's sensor topic and waits for
/// the tsdb-writer to dead-letter it; returns (its dlq_id, its event_id). With `fixed`, the
/// stored payload is then corrected to 19.5, so a replay succeeds.
pub async fn tsdb_dead_letter(app: &TestApp, device: &str, fixed: bool) -> (Uuid, Uuid) {
    let event_id = Uuid::now_v7();
    let hot = serde_json::json!({"event_id": event_id, "event_type": "sensor.reading",
        "aggregate_id": device, "event_time": "2026-01-01T00:00:00Z",
        "ingested_at": "2026-01-01T00:00:00Z", "payload": {"value": "hot", "unit": "c"},
        "metadata": {"source": "http", "schema_version": 1}});
    produce_raw(
        &app.topic("sensor-events"),
        device,
        hot.to_string().as_bytes(),
    )
    .await;
    let pool = app.pool().await;
    let dlq_id: Uuid = eventually(Duration::from_secs(60), || async {
        sqlx::query_scalar("SELECT dlq_id FROM tsdb.dlq WHERE status = 'pending'")
            .fetch_optional(&pool)
            .await
            .ok()?
    })
    .await;
    if fixed {
        fix_tsdb_dead_letter(&pool, dlq_id).await;
    }
    (dlq_id, event_id)
}

/// Corrects a [`tsdb_dead_letter`]'s value to 19.5.
pub async fn fix_tsdb_dead_letter(pool: &PgPool, dlq_id: Uuid) {
    sqlx::query(
        "UPDATE tsdb.dlq SET event_payload = jsonb_set(event_payload, '{payload,value}', '19.5')
          WHERE dlq_id = $1",
    )
    .bind(dlq_id)
    .execute(pool)
    .await
    .unwrap();
}
