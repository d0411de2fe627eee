//! The global send rate: a GCRA bucket in one row (`actions.rate_limit`), so every instance
//! draws from the same budget and a restart does not refill it.
//!
//! Slots are taken in the same transaction that claims the deliveries they are for, and only as
//! many as are free now: a worker never holds a claim while it waits for a slot (a wait that
//! could outlive the claim, have it taken over and waste the slot — with enough workers
//! cluster-wide, delivery slowed to a trickle that way). When no slot is free, nothing is
//! claimed and the loop sleeps until one is.

use std::time::Duration;

use sqlx::{Postgres, Transaction};

/// What the bucket allows right now.
pub(super) struct Slots {
    /// Slots free now (at most the number asked for).
    pub free: usize,
    /// When none is: how long until the next one is.
    pub next_in: Duration,
}

/// The GCRA parameters of `n` per `period`: the emission interval and the burst tolerance.
fn gcra(n: u32, period: Duration) -> (f64, f64) {
    let interval = period.as_secs_f64() / f64::from(n);
    (interval, interval * f64::from(n.saturating_sub(1)))
}

/// Locks the bucket for the transaction and says how many of `want` slots are free now.
/// `None` limit: all of them.
pub(super) async fn available(
    tx: &mut Transaction<'_, Postgres>,
    limit: Option<(u32, Duration)>,
    want: usize,
) -> Result<Slots, sqlx::Error> {
    let Some((n, period)) = limit else {
        return Ok(Slots {
            free: want,
            next_in: Duration::ZERO,
        });
    };
    let (interval, tolerance) = gcra(n, period);
    // The k-th slot from now conforms when max(tat, now) + (k-1)·interval - tolerance <= now.
    let (free, next_in): (i64, f64) = sqlx::query_as(
        "SELECT greatest(0, floor((extract(epoch FROM now() - greatest(tat, now())) + $2) / $1) + 1)::int8,
                greatest(0, extract(epoch FROM greatest(tat, now()) - now()) - $2)::float8
         FROM actions.rate_limit WHERE id FOR UPDATE",
    )
    .bind(interval)
    .bind(tolerance)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Slots {
        free: (free.max(0) as usize).min(want),
        next_in: Duration::from_secs_f64(next_in.max(0.0) + 0.001),
    })
}

/// Spends `k` slots (the deliveries just claimed), in the transaction that claimed them.
pub(super) async fn spend(
    tx: &mut Transaction<'_, Postgres>,
    limit: Option<(u32, Duration)>,
    k: usize,
) -> Result<(), sqlx::Error> {
    let Some((n, period)) = limit else {
        return Ok(());
    };
    if k == 0 {
        return Ok(());
    }
    let (interval, _) = gcra(n, period);
    sqlx::query(
        "UPDATE actions.rate_limit
         SET tat = greatest(tat, now()) + make_interval(secs => $1)
         WHERE id",
    )
    .bind(interval * k as f64)
    .execute(&mut **tx)
    .await
    .map(|_| ())
}
