//! `cornjacket simulate`: a fleet of simulated sensors sending realistic readings to a running
//! platform over HTTP or MQTT, with occasional outliers, so that a first `make run` has devices,
//! charts and anomalies to show within a minute.
//!
//! Each device reports `temperature` (a slow daily-like wave around its own base, plus noise) and
//! `humidity` (a random walk kept in range). An outlier is a reading many standard deviations
//! off; it is sent only after the device's first [`WARMUP`] readings, because the sidecar's model
//! scores nothing before its warm-up and an outlier there would teach it a wrong spread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::config::Config;

/// Readings a device sends before it may send an outlier: above the sidecar's warm-up (30).
pub const WARMUP: u64 = 40;
/// Requests (HTTP) or unacknowledged publishes (MQTT) in flight at once.
const IN_FLIGHT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Http,
    Mqtt,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// How many devices (named <prefix>0001, <prefix>0002, …).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub devices: u32,
    /// Readings per second over all devices.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// The share of readings (after each device's warm-up) that are outliers, 0 to 1.
    #[arg(long, default_value_t = 0.02)]
    pub outliers: f64,
    /// Stop after this long (e.g. 30s, 10m); without it and --count, run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many readings.
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, value_enum, default_value = "http")]
    pub transport: Transport,
    /// Ingestion's base URL (HTTP); by default this machine's ingestion port.
    #[arg(long)]
    pub url: Option<String>,
    /// A bearer token with `ingest:write` (HTTP); by default one is minted from CJ_JWT_SECRET
    /// when authentication is on.
    #[arg(long)]
    pub token: Option<String>,
    /// The devices' id prefix.
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// A seed, for the same readings on every run.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// What a run did, printed as it goes and at the end.
#[derive(Default)]
pub struct Tally {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub outliers: AtomicU64,
    /// Sends repeated after a 429, a 503 or a lost connection.
    pub retried: AtomicU64,
}

impl Tally {
    fn line(&self) -> String {
        format!(
            "{} sent, {} accepted, {} refused, {} failed, {} outliers, {} retries",
            self.sent.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.outliers.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "the platform is not answering at {url}: {message} (is it running? `make run` starts it)"
    )]
    Unreachable { url: String, message: String },
    #[error("no reading was accepted: {0}")]
    NothingAccepted(String),
}

/// One simulated device: its own base, wave and noise.
struct Device {
    id: String,
    base: f64,
    amplitude: f64,
    period_s: f64,
    phase: f64,
    noise: f64,
    humidity: f64,
    sent: u64,
}

impl Device {
    fn new(id: String, rng: &mut StdRng) -> Self {
        Self {
            id,
            base: rng.random_range(18.0..26.0),
            amplitude: rng.random_range(0.5..2.5),
            period_s: rng.random_range(300.0..1800.0),
            phase: rng.random_range(0.0..std::f64::consts::TAU),
            noise: rng.random_range(0.05..0.3),
            humidity: rng.random_range(35.0..55.0),
            sent: 0,
        }
    }

    /// The next reading at `t` seconds into the run, and whether it is an outlier.
    fn reading(&mut self, t: f64, outliers: f64, rng: &mut StdRng) -> (Value, bool) {
        self.sent += 1;
        let wave = self.amplitude * (std::f64::consts::TAU * t / self.period_s + self.phase).sin();
        // A normal variate from two uniforms (Box–Muller): rand_distr for one call is not worth
        // a dependency.
        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
        let gauss = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let mut temperature = self.base + wave + self.noise * gauss;
        let outlier = self.sent > WARMUP && rng.random_bool(outliers.clamp(0.0, 1.0));
        if outlier {
            // Far outside anything the wave and the noise produce, either way.
            let off = (self.amplitude + self.noise) * rng.random_range(6.0..10.0);
            temperature += if rng.random_bool(0.5) { off } else { -off };
        }
        self.humidity = (self.humidity + rng.random_range(-0.5..0.5)).clamp(20.0, 80.0);
        let payload = json!({
            "values": {
                "temperature": (temperature * 100.0).round() / 100.0,
                "humidity": (self.humidity * 10.0).round() / 10.0,
            },
            "units": {"temperature": "celsius", "humidity": "percent"},
        });
        (payload, outlier)
    }
}

enum Sender {
    Http {
        client: reqwest::Client,
        url: String,
        token: Option<String>,
    },
    Mqtt {
        client: rumqttc::AsyncClient,
        /// `CJ_MQTT_TOPIC` without its share group: the device's id replaces its `+`.
        filter: String,
    },
}

/// Where the platform listens for a device: the subscription filter with the device id for its
/// `+` segment (`$share/cornjacket/devices/+/events` → `devices/sim-0001/events`).
pub fn device_topic(filter: &str, device: &str) -> String {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    };
    filter
        .split('/')
        .map(|seg| if seg == "+" { device } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// Runs the simulation until `--count`, `--duration` or Ctrl-C; prints progress every five
/// seconds and a summary at the end.
pub async fn run(config: &Config, args: SimulateArgs) -> Result<Arc<Tally>, SimulateError> {
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 100_000.0) {
        return Err(SimulateError::Usage(format!(
            "--rate {}: expected readings per second, above 0 and at most 100000",
            args.rate
        )));
    }
    if !(0.0..=1.0).contains(&args.outliers) {
        return Err(SimulateError::Usage(format!(
            "--outliers {}: expected a share between 0 and 1",
            args.outliers
        )));
    }
    let mut rng = match args.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_os_rng(),
    };
    let mut devices: Vec<Device> = (1..=args.devices)
        .map(|i| Device::new(format!("{}{i:04}", args.prefix), &mut rng))
        .collect();
    let tally = Arc::new(Tally::default());
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let (sender, target, pump) = connect(config, &args, &tally, &slots).await?;
    let sender = Arc::new(sender);
    println!(
        "simulate: {} devices ({}0001…), {} readings/s over {}, {:.1}% outliers after {} readings each; Ctrl-C stops",
        args.devices,
        args.prefix,
        args.rate,
        target,
        args.outliers * 100.0,
        WARMUP,
    );

    // Readings are sent in ticks of at least 10 ms, so a high rate is a few readings a tick
    // rather than a timer per reading.
    let tick = Duration::from_secs_f64((1.0 / args.rate).max(0.010));
    let per_tick = args.rate * tick.as_secs_f64();
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let (mut budget, mut next, mut total) = (0.0_f64, 0_usize, 0_u64);
    let mut probed = false;
    'run: loop {
        tokio::select! {
            _ = timer.tick() => {}
            _ = report.tick() => {
                let secs = started.elapsed().as_secs_f64();
                println!("simulate: {} ({:.1}/s)", tally.line(), tally.sent.load(Ordering::Relaxed) as f64 / secs);
                continue;
            }
            _ = &mut ctrl_c => break,
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        budget += per_tick;
        while budget >= 1.0 {
            budget -= 1.0;
            if args.count.is_some_and(|c| total >= c) {
                break 'run;
            }
            let t = started.elapsed().as_secs_f64();
            let n = devices.len();
            let device = &mut devices[next];
            next = (next + 1) % n;
            let (payload, outlier) = device.reading(t, args.outliers, &mut rng);
            let id = device.id.clone();
            total += 1;
            tally.sent.fetch_add(1, Ordering::Relaxed);
            if outlier {
                tally.outliers.fetch_add(1, Ordering::Relaxed);
            }
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            // The first reading is sent alone, so a platform that is not running is one clear
            // message rather than a screen of failures.
            if !probed {
                probed = true;
                send(&sender, &tally, &id, payload, Some(permit), false).await;
                if tally.failed.load(Ordering::Relaxed) > 0
                    && let Sender::Http { url, .. } = &*sender
                {
                    return Err(SimulateError::Unreachable {
                        url: url.clone(),
                        message: "connection failed".into(),
                    });
                }
                continue;
            }
            let sender = sender.clone();
            let tally = tally.clone();
            tokio::spawn(
                async move { send(&sender, &tally, &id, payload, Some(permit), true).await },
            );
        }
    }
    // Wait for what is in flight (every permit back), but not for ever on a broker gone away.
    if tokio::time::timeout(
        Duration::from_secs(30),
        slots.acquire_many(IN_FLIGHT as u32),
    )
    .await
    .is_err()
    {
        eprintln!("simulate: gave up waiting for the last answers after 30 s");
    }
    if let Some(pump) = pump {
        if let Sender::Mqtt { client, .. } = &*sender {
            let _ = client.disconnect().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
    }
    println!("simulate: done: {}", tally.line());
    if tally.accepted.load(Ordering::Relaxed) == 0 && tally.sent.load(Ordering::Relaxed) > 0 {
        return Err(SimulateError::NothingAccepted(tally.line()));
    }
    Ok(tally)
}

type Connected = (Sender, String, Option<tokio::task::JoinHandle<()>>);

async fn connect(
    config: &Config,
    args: &SimulateArgs,
    tally: &Arc<Tally>,
    slots: &Arc<Semaphore>,
) -> Result<Connected, SimulateError> {
    match args.transport {
        Transport::Http => {
            let base = args.url.clone().unwrap_or_else(|| {
                let host = match config.bind_addr {
                    std::net::IpAddr::V4(a) if a.is_unspecified() => "127.0.0.1".to_string(),
                    std::net::IpAddr::V6(a) if a.is_unspecified() => "[::1]".to_string(),
                    std::net::IpAddr::V6(a) => format!("[{a}]"),
                    a => a.to_string(),
                };
                format!("http://{host}:{}", config.ports.ingestion)
            });
            let token = match (&args.token, &config.auth.jwt_secret) {
                (Some(t), _) => Some(t.clone()),
                (None, _) if config.auth.mode == crate::config::AuthMode::Off => None,
                (None, Some(secret)) => {
                    use secrecy::ExposeSecret;
                    Some(
                        crate::infra::auth::mint(
                            secret.expose_secret(),
                            "simulator",
                            &["ingest:write".to_string()],
                            Duration::from_secs(24 * 3600),
                            &config.auth,
                        )
                        .map_err(|e| SimulateError::Usage(e.to_string()))?,
                    )
                }
                (None, None) => {
                    return Err(SimulateError::Usage(
                        "authentication is on: pass --token, or set CJ_JWT_SECRET to mint one"
                            .into(),
                    ));
                }
            };
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| SimulateError::Usage(e.to_string()))?;
            let url = format!("{}/api/v1/ingest", base.trim_end_matches('/'));
            Ok((
                Sender::Http {
                    client,
                    url: url.clone(),
                    token,
                },
                url,
                None,
            ))
        }
        Transport::Mqtt => {
            use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
            let Some(cfg) = &config.mqtt else {
                return Err(SimulateError::Usage(
                    "--transport mqtt needs CJ_MQTT_URL (it is off)".into(),
                ));
            };
            let id = format!("cornjacket-simulate-{}", uuid::Uuid::now_v7().simple());
            let mut opts = MqttOptions::new(id, cfg.host.clone(), cfg.port);
            opts.set_keep_alive(Duration::from_secs(15))
                .set_inflight(IN_FLIGHT as u16)
                .set_credentials(cfg.username.clone(), cfg.password_exposed());
            let (client, mut events) = AsyncClient::new(opts, IN_FLIGHT * 2);
            // Refusals are explained on each device's errors topic, which this development user
            // may read for every device.
            let filter = device_topic(&cfg.topic, "+");
            let errors = match filter.rsplit_once('/') {
                Some((base, _)) => format!("{base}/errors"),
                None => "errors".into(),
            };
            client
                .subscribe(errors, QoS::AtLeastOnce)
                .await
                .map_err(|e| SimulateError::Usage(e.to_string()))?;
            let target = format!("mqtt://{}:{} as {}", cfg.host, cfg.port, cfg.username);
            let (tally, slots) = (tally.clone(), slots.clone());
            // The first event tells whether the broker let us in.
            let (ready_tx, ready) = tokio::sync::oneshot::channel::<Result<(), String>>();
            let pump = tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if let Some(t) = ready_tx.take() {
                                let _ = t.send(Ok(()));
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            tally.accepted.fetch_add(1, Ordering::Relaxed);
                            slots.add_permits(1);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            eprintln!(
                                "simulate: refused on {}: {}",
                                p.topic,
                                String::from_utf8_lossy(&p.payload)
                            );
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(t) = ready_tx.take() {
                                let _ = t.send(Err(e.to_string()));
                                return;
                            }
                            eprintln!("simulate: MQTT connection: {e}; reconnecting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
            match tokio::time::timeout(Duration::from_secs(10), ready).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(message))) => {
                    return Err(SimulateError::Unreachable {
                        url: target,
                        message,
                    });
                }
                _ => {
                    return Err(SimulateError::Unreachable {
                        url: target,
                        message: "no answer within 10 s".into(),
                    });
                }
            }
            Ok((Sender::Mqtt { client, filter }, target, Some(pump)))
        }
    }
}

/// Why one HTTP send did not succeed.
#[derive(Debug)]
struct SendFailure {
    /// A 429, a 503 or a transport error: the platform asked to come back, or was not there.
    retryable: bool,
    transport: bool,
    /// The server's `Retry-After`, when it gave one.
    after: Option<Duration>,
    message: String,
}

async fn post_once(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> Result<(), SendFailure> {
    let mut req = client.post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let status = r.status();
            let after = r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = r.text().await.unwrap_or_default();
            Err(SendFailure {
                retryable: matches!(status.as_u16(), 429 | 503),
                transport: false,
                after,
                message: format!("{status}: {text}"),
            })
        }
        Err(e) => Err(SendFailure {
            retryable: true,
            transport: true,
            after: None,
            message: e.to_string(),
        }),
    }
}

/// Sends one reading. An HTTP permit is released when the answer arrives; an MQTT one when the
/// broker acknowledges the publish (in the event loop), so both bound what is in flight. Over
/// HTTP a 429, a 503 (a platform starting or shedding load) or a lost connection is retried
/// with backoff, honouring `Retry-After`, as a device would: readings are not dropped for it.
async fn send(
    sender: &Sender,
    tally: &Tally,
    device: &str,
    payload: Value,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    retry: bool,
) {
    use backon::{ExponentialBuilder, Retryable};
    match sender {
        Sender::Http { client, url, token } => {
            let body = json!({
                "event_type": "sensor.reading",
                "aggregate_id": device,
                "payload": payload,
            });
            let backoff = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(10)
                .with_jitter();
            let outcome = (|| post_once(client, url, token.as_deref(), &body))
                .retry(backoff)
                // Without `retry` (the first reading) a platform that is not there is told at once.
                .when(|e: &SendFailure| e.retryable && (retry || !e.transport))
                .adjust(|e: &SendFailure, next| next.map(|d| e.after.unwrap_or(d)))
                .notify(|_, _| {
                    tally.retried.fetch_add(1, Ordering::Relaxed);
                })
                .await;
            match outcome {
                Ok(()) => {
                    tally.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.transport => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("simulate: {device}: {}", e.message);
                }
                Err(e) => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    eprintln!("simulate: {device}: {}", e.message);
                }
            }
            drop(permit);
        }
        Sender::Mqtt { client, filter } => {
            let body = json!({"event_type": "sensor.reading", "payload": payload});
            let topic = device_topic(filter, device);
            match client
                .publish(
                    topic,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    body.to_string().into_bytes(),
                )
                .await
            {
                // The event loop gives the permit back on its PubAck.
                Ok(()) => {
                    if let Some(p) = permit {
                        p.forget();
                    }
                }
                Err(e) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("simulate: {device}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_publishes_where_the_platform_subscribes() {
        assert_eq!(
            device_topic("$share/cornjacket/devices/+/events", "sim-0001"),
            "devices/sim-0001/events"
        );
        assert_eq!(
            device_topic("t1/devices/+/events", "x"),
            "t1/devices/x/events"
        );
    }

    #[test]
    fn outliers_come_only_after_the_warm_up_and_stand_out() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut d = Device::new("d".into(), &mut rng);
        let mut normal = Vec::new();
        let mut odd = Vec::new();
        for i in 0..2000 {
            let (p, outlier) = d.reading(i as f64, 0.05, &mut rng);
            let t = p["values"]["temperature"].as_f64().unwrap();
            assert!(
                !(outlier && i < WARMUP as usize),
                "outlier in warm-up at {i}"
            );
            if outlier { odd.push(t) } else { normal.push(t) }
        }
        assert!(odd.len() > 40 && odd.len() < 160, "{}", odd.len());
        let mean = normal.iter().sum::<f64>() / normal.len() as f64;
        let sd =
            (normal.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / normal.len() as f64).sqrt();
        for v in odd {
            assert!(
                (v - mean).abs() > 3.0 * sd,
                "{v} within 3 sd of {mean}±{sd}"
            );
        }
    }
}
