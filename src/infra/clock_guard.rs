//! Retention never trusts a host clock that disagrees with the database's.
//!
//! A retention job computes its cutoff from the host's clock and compares it with timestamps
//! the database wrote (`updated_at DEFAULT now()`) or the platform stamped. A host clock a day
//! ahead would delete a day of data that is still within its window; one behind keeps too much.
//! So before each round a job reads the database's `clock_timestamp()` and, when the two differ
//! by more than `CJ_RETENTION_MAX_CLOCK_SKEW`, removes nothing that round, says so in a WARN line
//! with both times, reports `/health` degraded and moves `cj_retention_runs_refused_total`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use sqlx::PgPool;

use super::http::{Check, Status};
use crate::envelope::{Clock, format_time};

/// The last refusal of a service's retention job, for its `/health`.
#[derive(Default)]
pub struct ClockSkew(Mutex<Option<Refusal>>);

#[derive(Debug, Clone)]
struct Refusal {
    host: DateTime<Utc>,
    database: DateTime<Utc>,
    max: Duration,
}

impl Refusal {
    /// Host minus database, in seconds: positive when the host is ahead.
    fn skew_seconds(&self) -> f64 {
        (self.host - self.database).as_seconds_f64()
    }

    fn sentence(&self) -> String {
        let skew = self.skew_seconds();
        let side = if skew > 0.0 { "ahead of" } else { "behind" };
        format!(
            "retention does not run: the host clock ({}) is {:.0}s {side} the database's ({}), \
             more than CJ_RETENTION_MAX_CLOCK_SKEW ({}s)",
            format_time(&self.host),
            skew.abs(),
            format_time(&self.database),
            self.max.as_secs()
        )
    }
}

impl ClockSkew {
    /// The `retention` line of `/health`: degraded while the clocks disagree, absent otherwise.
    pub fn check(&self) -> Option<Check> {
        let refusal = self.0.lock().expect("clock skew lock").clone()?;
        Some(Check::new(
            Status::Degraded,
            json!({
                "refused": refusal.sentence(),
                "host_time": format_time(&refusal.host),
                "database_time": format_time(&refusal.database),
                "skew_seconds": refusal.skew_seconds(),
                "max_skew_seconds": refusal.max.as_secs_f64(),
            }),
        ))
    }

    /// Why the last round was refused, while it stands.
    pub fn refusal(&self) -> Option<String> {
        self.0
            .lock()
            .expect("clock skew lock")
            .as_ref()
            .map(Refusal::sentence)
    }

    fn set(&self, refusal: Option<Refusal>) -> Option<Refusal> {
        std::mem::replace(&mut *self.0.lock().expect("clock skew lock"), refusal)
    }
}

/// What one retention job reads its time from, and the bound it holds that time to.
#[derive(Clone)]
pub struct ClockGuard {
    /// The job's name in logs and metric labels (the owning service).
    pub job: &'static str,
    pub clock: Arc<dyn Clock>,
    /// `CJ_RETENTION_MAX_CLOCK_SKEW`.
    pub max_skew: Duration,
    /// Where the verdict is kept for `/health`.
    pub state: Arc<ClockSkew>,
}

impl ClockGuard {
    /// A retention job's loop: a round at once, then one every `every` until shutdown; each
    /// round runs `round` at the time [`ClockGuard::now`] trusts, or not at all.
    pub async fn rounds<F, Fut>(
        &self,
        pool: &PgPool,
        every: Duration,
        shutdown: &tokio_util::sync::CancellationToken,
        mut round: F,
    ) where
        F: FnMut(DateTime<Utc>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            if let Some(now) = self.now(pool).await {
                round(now).await;
            }
            if shutdown
                .run_until_cancelled(tokio::time::sleep(every))
                .await
                .is_none()
            {
                return;
            }
        }
    }

    /// The host time a round may run at, or None when the round must not remove anything:
    /// the clocks disagree beyond the bound, or the database's clock cannot be read (then the
    /// round's own statements would fail too; the next round retries).
    pub async fn now(&self, pool: &PgPool) -> Option<DateTime<Utc>> {
        let host = self.clock.now();
        let sent = Instant::now();
        let database: DateTime<Utc> = match sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(pool)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(job = self.job, error = %e, "Retention could not read the database clock; this round removes nothing.");
                return None;
            }
        };
        // The database read its clock somewhere within the round trip: compare with its middle.
        let half_trip = TimeDelta::from_std(sent.elapsed() / 2).unwrap_or_default();
        let refusal = Refusal {
            host: host + half_trip,
            database,
            max: self.max_skew,
        };
        let skew = refusal.skew_seconds();
        metrics::gauge!("cj_retention_clock_skew_seconds", "job" => self.job).set(skew);
        if skew.abs() <= self.max_skew.as_secs_f64() {
            if self.state.set(None).is_some() {
                tracing::info!(
                    job = self.job,
                    skew_seconds = skew,
                    "The host clock agrees with the database's again; retention runs."
                );
            }
            return Some(host);
        }
        metrics::counter!("cj_retention_runs_refused_total", "job" => self.job).increment(1);
        tracing::warn!(
            job = self.job,
            host_time = %format_time(&refusal.host),
            database_time = %format_time(&refusal.database),
            skew_seconds = skew,
            max_skew_seconds = self.max_skew.as_secs_f64(),
            "Retention refused to run: the host clock disagrees with the database's by more than CJ_RETENTION_MAX_CLOCK_SKEW, so a cutoff computed from it could remove data still within its window; nothing is removed until the clocks agree."
        );
        self.state.set(Some(refusal));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_both_times_the_direction_and_the_bound() {
        let database = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let r = Refusal {
            host: database + TimeDelta::seconds(3600),
            database,
            max: Duration::from_secs(60),
        };
        assert_eq!(r.skew_seconds(), 3600.0);
        let s = r.sentence();
        assert!(s.contains("3600s ahead of"), "{s}");
        assert!(s.contains(&format_time(&database)), "{s}");
        assert!(s.contains(&format_time(&r.host)), "{s}");
        assert!(s.contains("CJ_RETENTION_MAX_CLOCK_SKEW (60s)"), "{s}");
        let behind = Refusal {
            host: database - TimeDelta::seconds(90),
            ..r
        };
        assert!(behind.sentence().contains("90s behind"));

        let state = ClockSkew::default();
        assert!(
            state.check().is_none(),
            "nothing to report before a refusal"
        );
        state.set(Some(behind));
        let c = state.check().unwrap();
        assert_eq!(c.status, Status::Degraded);
        assert_eq!(c.detail["skew_seconds"], -90.0);
    }
}
