//! Group commit of accepted events into the outbox.
//!
//! Requests hand their events to one collector; while earlier commits are in flight, new
//! arrivals queue up and the next commit takes all of them in one multi-row INSERT. At low load a
//! request commits alone at once; under load the batches grow by themselves. No fixed delay is
//! added, and `synchronous_commit` stays on: a client is answered only after its row is durable.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::infra::db;

/// Number of ordering shards of the outbox; fixed because it is stored in every row.
pub const SHARDS: i16 = 16;

/// The shard of an aggregate: every event of one aggregate lands in the same shard, which one
/// processor worker drains at a time, so per-aggregate order survives several workers and hosts.
pub fn shard_of(aggregate_id: &str) -> i16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in aggregate_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % SHARDS as u32) as i16
}

/// Wakes the outbox processor workers of this process; each keeps a permit until it next waits.
#[derive(Clone, Default)]
pub struct Wakers(Arc<Vec<Arc<Notify>>>);

impl Wakers {
    pub fn new(n: usize) -> Self {
        Self(Arc::new((0..n).map(|_| Arc::new(Notify::new())).collect()))
    }
    pub fn get(&self, i: usize) -> Arc<Notify> {
        self.0[i].clone()
    }
    pub fn wake_all(&self) {
        self.0.iter().for_each(|w| w.notify_one());
    }
}

/// Decides which commits carry a NOTIFY (see [`NOTIFY_EVERY`]).
struct NotifyPacer(Mutex<Option<Instant>>);

impl NotifyPacer {
    fn due(&self) -> bool {
        let mut last = self.0.lock().expect("pacer lock");
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < NOTIFY_EVERY => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

/// An event ready for the outbox.
pub struct Pending {
    pub envelope: Envelope,
    /// The client chose the event_id: a repeat of it, concurrent or late, stores nothing.
    pub client_event_id: bool,
    /// An `Idempotency-Key` header value.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the database is unavailable")]
    Unavailable,
    #[error("outbox write failed: {0}")]
    Failed(#[source] sqlx::Error),
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        if db::is_unavailable(&e) {
            WriteError::Unavailable
        } else {
            WriteError::Failed(e)
        }
    }
}

struct Job {
    events: Vec<Pending>,
    reply: oneshot::Sender<Result<Vec<Uuid>, WriteError>>,
}

/// The handle requests use; cloning is cheap. The collector stops when every handle is dropped,
/// which is after the HTTP server has drained, so no accepted request is cut off.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    pub fn spawn(
        pool: PgPool,
        max_rows: usize,
        concurrency: usize,
        wakers: Wakers,
        tracker: &TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(16_384);
        let ctx = Arc::new(CommitCtx {
            pool,
            wakers,
            pacer: NotifyPacer(Mutex::new(None)),
        });
        tracker.spawn(collect(ctx, rx, max_rows, concurrency, tracker.clone()));
        Self { tx }
    }

    /// Commits the events and returns, per event, the event_id the client should see (the
    /// original one for an idempotent repeat).
    pub async fn submit(&self, events: Vec<Pending>) -> Result<Vec<Uuid>, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { events, reply })
            .await
            .map_err(|_| WriteError::Unavailable)?;
        rx.await.map_err(|_| WriteError::Unavailable)?
    }
}

struct CommitCtx {
    pool: PgPool,
    wakers: Wakers,
    pacer: NotifyPacer,
}

async fn collect(
    ctx: Arc<CommitCtx>,
    mut rx: mpsc::Receiver<Job>,
    max_rows: usize,
    concurrency: usize,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        // Take a commit slot first: while all are busy, arrivals accumulate into the next batch.
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let Some(first) = rx.recv().await else { break };
        let mut rows = first.events.len();
        let mut jobs = vec![first];
        while rows < max_rows {
            match rx.try_recv() {
                Ok(j) => {
                    rows += j.events.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("cj_outbox_group_commit_rows").record(rows as f64);
        let ctx = ctx.clone();
        tracker.spawn(async move {
            commit_jobs(&ctx, jobs).await;
            drop(permit);
        });
    }
}

async fn commit_jobs(ctx: &CommitCtx, jobs: Vec<Job>) {
    let (events, shape): (Vec<Pending>, Vec<(usize, oneshot::Sender<_>)>) = {
        let mut events = Vec::new();
        let mut shape = Vec::with_capacity(jobs.len());
        for j in jobs {
            shape.push((j.events.len(), j.reply));
            events.extend(j.events);
        }
        (events, shape)
    };
    let result = write(&ctx.pool, &events, ctx.pacer.due()).await;
    match result {
        Ok(ids) => {
            ctx.wakers.wake_all();
            let mut ids = ids.into_iter();
            for (n, reply) in shape {
                let _ = reply.send(Ok(ids.by_ref().take(n).collect()));
            }
        }
        Err(e) => {
            let unavailable = matches!(e, WriteError::Unavailable);
            if !unavailable {
                tracing::error!(error = %e, "Outbox group commit failed.");
            }
            for (_, reply) in shape {
                let _ = reply.send(Err(if unavailable {
                    WriteError::Unavailable
                } else {
                    WriteError::Failed(sqlx::Error::Protocol("outbox write failed".into()))
                }));
            }
        }
    }
}

/// One statement: client-chosen ids claim their row in `client_event_ids` first, and only rows
/// that are new there (or whose id the platform chose) reach the outbox. The `notify` variant also
/// NOTIFYs other processes' processors, inside the same transaction.
const INSERT_OUTBOX: &str = "
    WITH u AS (
        SELECT * FROM UNNEST($1::uuid[], $2::int2[], $3::uuid[], $4::text[], $5::bool[])
            AS u(outbox_id, shard, event_id, payload, client_id)
    ), claimed AS (
        INSERT INTO ingestion.client_event_ids (event_id)
        SELECT DISTINCT event_id FROM u WHERE client_id
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
    )
    , ins AS (
        INSERT INTO ingestion.outbox (outbox_id, shard, event_id, event_payload)
        SELECT u.outbox_id, u.shard, u.event_id, u.payload::jsonb
        FROM u
        WHERE NOT u.client_id OR u.event_id IN (SELECT event_id FROM claimed)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT CASE WHEN $6 THEN pg_notify('cj_outbox', '') END";

/// How often a commit may carry a NOTIFY. PostgreSQL serialises committing transactions that
/// NOTIFY (one global queue lock, held through the WAL flush), so notifying on every group commit
/// would serialise the commits themselves; in-process processors are woken directly instead.
const NOTIFY_EVERY: Duration = Duration::from_millis(5);

async fn write(pool: &PgPool, events: &[Pending], notify: bool) -> Result<Vec<Uuid>, WriteError> {
    let mut answer: Vec<Uuid> = events.iter().map(|p| p.envelope.event_id).collect();
    let keyed = events.iter().any(|p| p.idempotency_key.is_some());
    if !keyed {
        // The common case is one statement: its implicit transaction commits the rows (and the
        // NOTIFY, when due) together.
        insert_rows(pool, events.iter().collect(), notify).await?;
        return Ok(answer);
    }

    let mut tx = pool.begin().await?;
    // First occurrence of each key claims it; later ones in the same batch repeat it.
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    for (i, p) in events.iter().enumerate() {
        if let Some(k) = &p.idempotency_key {
            first_of.entry(k.as_str()).or_insert(i);
        }
    }
    let keys: Vec<String> = first_of.keys().map(|k| k.to_string()).collect();
    let ids: Vec<Uuid> = first_of.values().map(|&i| answer[i]).collect();
    let claimed: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO ingestion.idempotency_keys (key, event_id)
         SELECT * FROM UNNEST($1::text[], $2::uuid[])
         ON CONFLICT (key) DO NOTHING RETURNING key",
    )
    .bind(&keys)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let taken: Vec<String> = keys
        .iter()
        .filter(|k| !claimed.contains(*k))
        .cloned()
        .collect();
    let existing: HashMap<String, Uuid> = if taken.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (String, Uuid)>(
            "SELECT key, event_id FROM ingestion.idempotency_keys WHERE key = ANY($1)",
        )
        .bind(&taken)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };
    let mut rows = Vec::with_capacity(events.len());
    for (i, p) in events.iter().enumerate() {
        match &p.idempotency_key {
            None => rows.push(p),
            Some(k) => {
                if let Some(id) = existing.get(k) {
                    answer[i] = *id;
                } else if first_of[k.as_str()] == i {
                    rows.push(p);
                } else {
                    answer[i] = answer[first_of[k.as_str()]];
                }
            }
        }
    }
    insert_rows(&mut *tx, rows, notify).await?;
    tx.commit().await?;
    Ok(answer)
}

async fn insert_rows<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    rows: Vec<&Pending>,
    notify: bool,
) -> Result<(), WriteError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut outbox_ids = Vec::with_capacity(n);
    let mut shards = Vec::with_capacity(n);
    let mut event_ids = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut checks = Vec::with_capacity(n);
    for p in rows {
        outbox_ids.push(Uuid::now_v7());
        shards.push(shard_of(&p.envelope.aggregate_id));
        event_ids.push(p.envelope.event_id);
        payloads.push(p.envelope.to_json());
        checks.push(p.client_event_id);
    }
    sqlx::query(INSERT_OUTBOX)
        .bind(&outbox_ids)
        .bind(&shards)
        .bind(&event_ids)
        .bind(&payloads)
        .bind(&checks)
        .bind(notify)
        .execute(exec)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_in_range() {
        assert_eq!(shard_of("device-001"), shard_of("device-001"));
        let mut seen = HashSet::new();
        for i in 0..1000 {
            let s = shard_of(&format!("device-{i}"));
            assert!((0..SHARDS).contains(&s));
            seen.insert(s);
        }
        assert_eq!(
            seen.len(),
            SHARDS as usize,
            "aggregates spread over every shard"
        );
    }
}
