//! Load runs: closed loops (N workers, each on its own connection) and open loops (a fixed
//! arrival schedule, latency from the scheduled send time), and what they observed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::http;
use crate::http::REQUEST_TIMEOUT;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What a load run observed inside its measured window.
pub struct Load {
    pub hist: Histogram<u64>,
    /// Answers per status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Successful (2xx) answers.
    pub ok: u64,
    /// Events accepted (a batch counts its accepted items).
    pub events: u64,
    /// Transport errors and timeouts.
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Open loop: ticks not sent because too many requests were already waiting.
    pub skipped: u64,
    /// The sequence numbers that were answered 2xx (when asked for).
    pub ok_seqs: Vec<u64>,
    pub window: Duration,
    pub connections: usize,
    /// Open loop: when the schedule ended, and when the last answer arrived.
    pub schedule_end: Option<Instant>,
    pub last_answer: Option<Instant>,
    /// Open loop: why sending stopped before the schedule ended.
    pub aborted: Option<String>,
}

impl Load {
    pub fn new() -> Self {
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

    pub fn error(&mut self, e: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(e);
        }
    }

    pub fn merge(&mut self, o: Load) {
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

    pub fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Non-2xx answers and errors, e.g. `{"503": 12, "error": 1}`.
    pub fn failures(&self) -> BTreeMap<String, u64> {
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
pub type BuildFn = Arc<dyn Fn(u64, &mut Vec<u8>) + Send + Sync>;
/// How many events a 2xx answer (its body when asked for) stands for.
pub type EventsFn = Arc<dyn Fn(Option<&[u8]>) -> u64 + Send + Sync>;

/// How a load run builds its requests and counts what they achieved.
#[derive(Clone)]
pub struct Workload {
    pub addr: SocketAddr,
    pub build: BuildFn,
    pub events: EventsFn,
    pub want_body: bool,
}

pub fn record_reply(
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
pub async fn closed_loop(w: &Workload, conns: usize, warmup: Duration, dur: Duration) -> Load {
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

pub struct OpenShared {
    pool: Mutex<Vec<http::Conn>>,
    slots: Semaphore,
    load: Mutex<Load>,
    waiting: AtomicU64,
    opened: AtomicU64,
}

/// Open loop: a request every 1/rate seconds, each in its own task on a pooled connection
/// (at most `max_conns`); latency runs from the scheduled send time. With `behind_limit`, sending
/// stops once the requests not yet answered stand for more than that much of the schedule.
pub async fn open_loop(
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
