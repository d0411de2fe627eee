//! The consumer services: the event handler, the tsdb-writer and the action orchestrator.

use std::time::Duration;

use super::ConfigError;
use super::bus::Topics;
use super::vars::{Vars, parse_duration};

/// SPEC §7: a poison message is retried immediately, after 1 s and after 2 s.
const POISON_DELAYS: [Duration; 3] = [
    Duration::from_secs(0),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

fn all_topics(topics: &Topics) -> Vec<String> {
    topics.all().iter().map(|t| t.to_string()).collect()
}

#[derive(Debug, Clone)]
pub struct EventHandlerConfig {
    /// `CJ_EVENTHANDLER_CONSUMER_GROUP` (default `event-handler`).
    pub consumer_group: String,
    /// `CJ_EVENTHANDLER_TOPICS`: comma-separated; default the three platform topics.
    pub topics: Vec<String>,
    /// `CJ_EVENTHANDLER_RETRY_DELAYS`: delays before each retry of a poison message (`0s,1s,2s`).
    pub retry_delays: Vec<Duration>,
    /// `CJ_EVENTHANDLER_MAX_BATCH`: messages applied per database transaction.
    pub max_batch: usize,
}

impl EventHandlerConfig {
    pub(super) fn parse(v: &Vars, topics: &Topics) -> Result<Self, ConfigError> {
        let (all_topics, poison_delays) = (all_topics(topics), POISON_DELAYS);
        Ok(EventHandlerConfig {
            consumer_group: v.string("CJ_EVENTHANDLER_CONSUMER_GROUP", "event-handler"),
            topics: v.list("CJ_EVENTHANDLER_TOPICS", &all_topics)?,
            retry_delays: v.durations("CJ_EVENTHANDLER_RETRY_DELAYS", &poison_delays)?,
            max_batch: v.ranged("CJ_EVENTHANDLER_MAX_BATCH", 500, 1, 100_000)?,
        })
    }
}

/// The time-series writer (SPEC §9): a consumer of `sensor-events` into `tsdb.sensor_readings`.
#[derive(Debug, Clone)]
pub struct TsdbConfig {
    /// `CJ_TSDB_CONSUMER_GROUP` (default `tsdb-writer`).
    pub consumer_group: String,
    /// `CJ_TSDB_TOPICS`: comma-separated; default the prefixed `sensor-events`.
    pub topics: Vec<String>,
    /// `CJ_TSDB_RETRY_DELAYS`: delays before each retry of a poison message (`0s,1s,2s`).
    pub retry_delays: Vec<Duration>,
    /// `CJ_TSDB_MAX_BATCH`: readings inserted per database transaction.
    pub max_batch: usize,
}

impl TsdbConfig {
    pub(super) fn parse(v: &Vars, topics: &Topics) -> Result<Self, ConfigError> {
        let poison_delays = POISON_DELAYS;
        Ok(TsdbConfig {
            consumer_group: v.string("CJ_TSDB_CONSUMER_GROUP", "tsdb-writer"),
            topics: v.list("CJ_TSDB_TOPICS", std::slice::from_ref(&topics.sensor))?,
            retry_delays: v.durations("CJ_TSDB_RETRY_DELAYS", &poison_delays)?,
            max_batch: v.ranged("CJ_TSDB_MAX_BATCH", 1000, 1, 100_000)?,
        })
    }
}

/// The action orchestrator (SPEC §10): rules, the consumer that records deliveries, and the
/// delivery worker with its retry schedule, rate limit, dedup window and circuit breaker.
#[derive(Debug, Clone)]
pub struct ActionsConfig {
    /// `CJ_ACTIONS_CONSUMER_GROUP` (default `action-orchestrator`).
    pub consumer_group: String,
    /// `CJ_ACTIONS_TOPICS`: comma-separated; default the three platform topics.
    pub topics: Vec<String>,
    /// `CJ_ACTIONS_CONSUMER_RETRY_DELAYS`: retries of a message that cannot be recorded (`0s,1s,2s`).
    pub consumer_retry_delays: Vec<Duration>,
    /// `CJ_ACTIONS_RETRY_DELAYS`: the wait before each webhook retry (`1s,2s,4s,8s,16s`); one
    /// attempt plus one per delay, then `failed`.
    pub retry_delays: Vec<Duration>,
    /// `CJ_ACTIONS_WEBHOOK_TIMEOUT`: per-request timeout when a rule sets none (30s).
    pub webhook_timeout: Duration,
    /// `CJ_ACTIONS_RATE_LIMIT`: deliveries per period across all endpoints, `N/period`
    /// (`10/1m`); `0` disables the limit.
    pub rate_limit: Option<(u32, Duration)>,
    /// `CJ_ACTIONS_DEDUP_WINDOW`: a rule's dedup window when it sets none (5m; 0s disables).
    pub dedup_window: Duration,
    /// `CJ_ACTIONS_BREAKER_THRESHOLD`: consecutive failures that open an endpoint's breaker (5).
    pub breaker_threshold: u32,
    /// `CJ_ACTIONS_BREAKER_COOLDOWN`: how long an open breaker short-circuits calls (5m).
    pub breaker_cooldown: Duration,
    /// `CJ_ACTIONS_WORKERS`: deliveries in flight at once in this process (1–256).
    pub workers: usize,
    /// `CJ_ACTIONS_POLL_INTERVAL`: how often the delivery worker looks for due deliveries when
    /// nothing woke it (1s).
    pub poll_interval: Duration,
    /// `CJ_ACTIONS_CLAIM_TIMEOUT`: a claimed delivery whose worker vanished is retried after this
    /// (must exceed the longest webhook timeout; 2m).
    pub claim_timeout: Duration,
    /// `CJ_ACTIONS_STALL_AFTER`: `/health` is degraded when deliveries have been due this long
    /// while none moved (2m; at least three rate-limit intervals, so a slow legitimate limit
    /// is not a stall).
    pub stall_after: Duration,
    /// `CJ_ACTIONS_ALLOW_PRIVATE_TARGETS`: let webhooks reach loopback, private and link-local
    /// addresses (default false: a rule cannot be used to probe the platform's own network).
    pub allow_private_targets: bool,
    /// `CJ_ACTIONS_PROXY`: an `http://` or `https://` proxy for webhook calls (default none:
    /// the environment's `HTTP_PROXY`/`HTTPS_PROXY` are ignored, so a variable meant for
    /// something else cannot send signed payloads through a third party).
    pub proxy: Option<String>,
}

impl ActionsConfig {
    pub(super) fn parse(v: &Vars, topics: &Topics) -> Result<Self, ConfigError> {
        let (all_topics, poison_delays) = (all_topics(topics), POISON_DELAYS);
        let rate_limit = match v.raw(&["CJ_ACTIONS_RATE_LIMIT"]) {
            None => Some((10, Duration::from_secs(60))),
            Some((_, r)) if r == "0" => None,
            Some((var, r)) => {
                let parsed = r.split_once('/').and_then(|(n, p)| {
                    let n = n.trim().parse::<u32>().ok().filter(|n| *n > 0)?;
                    let p = parse_duration(p.trim()).filter(|p| !p.is_zero())?;
                    Some((n, p))
                });
                Some(parsed.ok_or_else(|| {
                    Vars::err(&var, &r, "N/period such as 10/1m (or 0 for no limit)")
                })?)
            }
        };
        Ok(ActionsConfig {
            consumer_group: v.string("CJ_ACTIONS_CONSUMER_GROUP", "action-orchestrator"),
            topics: v.list("CJ_ACTIONS_TOPICS", &all_topics)?,
            consumer_retry_delays: v
                .durations("CJ_ACTIONS_CONSUMER_RETRY_DELAYS", &poison_delays)?,
            retry_delays: v.durations(
                "CJ_ACTIONS_RETRY_DELAYS",
                &[1, 2, 4, 8, 16].map(Duration::from_secs),
            )?,
            webhook_timeout: v
                .positive_duration("CJ_ACTIONS_WEBHOOK_TIMEOUT", Duration::from_secs(30))?,
            rate_limit,
            dedup_window: v.duration("CJ_ACTIONS_DEDUP_WINDOW", Duration::from_secs(300))?,
            breaker_threshold: v.ranged("CJ_ACTIONS_BREAKER_THRESHOLD", 5, 1, 1_000_000)?,
            breaker_cooldown: v
                .duration("CJ_ACTIONS_BREAKER_COOLDOWN", Duration::from_secs(300))?,
            workers: v.ranged("CJ_ACTIONS_WORKERS", 8, 1, 256)?,
            poll_interval: v
                .positive_duration("CJ_ACTIONS_POLL_INTERVAL", Duration::from_secs(1))?,
            claim_timeout: v
                .positive_duration("CJ_ACTIONS_CLAIM_TIMEOUT", Duration::from_secs(120))?,
            stall_after: v.positive_duration("CJ_ACTIONS_STALL_AFTER", Duration::from_secs(120))?,
            allow_private_targets: v.bool("CJ_ACTIONS_ALLOW_PRIVATE_TARGETS", false)?,
            proxy: match v.raw(&["CJ_ACTIONS_PROXY"]) {
                None => None,
                Some((var, p)) => match reqwest::Url::parse(&p) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Some(p),
                    _ => return Err(Vars::err(&var, &p, "an http:// or https:// proxy URL")),
                },
            },
        })
    }
}
