//! Group commit of accepted events into the outbox.
//!
//! Requests hand their events to one collector; while earlier commits are in flight, new
//! arrivals queue up and the next commit takes all of them in one multi-row INSERT. At low load a
//! request commits alone at once; under load the batches grow by themselves. No fixed delay is
//! added, and `synchronous_commit` stays on: a client is answered only after its row is durable.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
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
    /// The client chose the event_id: a repeat of it is recognised and never stored twice.
    pub client_event_id: bool,
    /// An `Idempotency-Key` header value, scoped to the envelope's subject.
    pub idempotency_key: Option<String>,
    /// What the client asked for, to tell a retry (same fingerprint) from a reuse of its id or key
    /// for something else (see [`fingerprint`]).
    pub fingerprint: [u8; 32],
}

impl Pending {
    /// `body` is the request as the client sent it (which fields it set).
    pub fn new(envelope: Envelope, body: &Value, idempotency_key: Option<String>) -> Self {
        let client_event_id = body.get("event_id").is_some_and(|v| !v.is_null());
        let time_given = body.get("event_time").is_some_and(|v| !v.is_null());
        let fingerprint = fingerprint(&envelope, time_given);
        Self {
            envelope,
            client_event_id,
            idempotency_key,
            fingerprint,
        }
    }

    fn subject(&self) -> &str {
        self.envelope.metadata.subject.as_deref().unwrap_or("")
    }
}

/// SHA-256 of what identifies a submission: its type, aggregate, payload and, when the client
/// gave one, its event time (as an instant, so `+02:00` and `Z` spellings agree). The event_id is
/// left out on purpose: a client that resends what it was answered, now with the event_id it was
/// given, is retrying, not sending something new. serde_json's map is ordered by key, so the JSON
/// below is canonical whatever order the client wrote its fields in.
pub fn fingerprint(e: &Envelope, event_time_given: bool) -> [u8; 32] {
    let canonical = serde_json::json!({
        "t": e.event_type,
        "a": e.aggregate_id,
        "p": e.payload,
        "e": event_time_given.then(|| crate::envelope::format_time(&e.event_time)),
    });
    Sha256::digest(canonical.to_string().as_bytes()).into()
}

/// What became of one submitted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now, or a retry of an event stored before: the event_id the client should see.
    Accepted(Uuid),
    /// The event_id or Idempotency-Key was already used for a different event; nothing stored.
    Conflict(Conflict),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error("event_id {0} was already accepted with a different body")]
    EventId(Uuid),
    #[error("the Idempotency-Key was already used with a different body (for event {0})")]
    IdempotencyKey(Uuid),
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
    /// The shards the job writes, one bit each.
    shards: u16,
    reply: oneshot::Sender<Result<Vec<Outcome>, WriteError>>,
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
            busy: Mutex::new(0),
            freed: Notify::new(),
        });
        tracker.spawn(collect(ctx, rx, max_rows, concurrency, tracker.clone()));
        Self { tx }
    }

    /// Commits the events, in order, and says per event what became of it. Events submitted
    /// earlier (an earlier call that has returned or is still waiting) are committed before
    /// later ones of the same shard, so the outbox order of an aggregate is submission order.
    pub async fn submit(&self, events: Vec<Pending>) -> Result<Vec<Outcome>, WriteError> {
        self.send(events).await?.wait().await
    }

    /// Hands the events to the collector and returns at once with a ticket for the outcome:
    /// a caller that must keep an order (MQTT's arrival order) sends one message after the
    /// other and waits for the tickets concurrently. (Sending from concurrent futures instead
    /// would let tokio's cooperative budget swap two neighbours.)
    pub async fn send(&self, events: Vec<Pending>) -> Result<Ticket, WriteError> {
        let (reply, rx) = oneshot::channel();
        let shards = events
            .iter()
            .fold(0u16, |m, p| m | 1 << shard_of(&p.envelope.aggregate_id));
        self.tx
            .send(Job {
                events,
                shards,
                reply,
            })
            .await
            .map_err(|_| WriteError::Unavailable)?;
        Ok(Ticket(rx))
    }
}

/// The outcome of events handed to [`Writer::send`].
pub struct Ticket(oneshot::Receiver<Result<Vec<Outcome>, WriteError>>);

impl Ticket {
    pub async fn wait(self) -> Result<Vec<Outcome>, WriteError> {
        self.0.await.map_err(|_| WriteError::Unavailable)?
    }
}

struct CommitCtx {
    pool: PgPool,
    wakers: Wakers,
    pacer: NotifyPacer,
    /// Shards with a commit in flight, one bit each.
    busy: Mutex<u16>,
    /// Signalled whenever a commit finishes and frees its shards.
    freed: Notify,
}

impl CommitCtx {
    fn busy(&self) -> u16 {
        *self.busy.lock().expect("busy lock")
    }
}

/// Takes jobs in arrival order and commits them in group commits. Commits run concurrently only
/// when they write disjoint shards: a job that shares a shard with a commit in flight waits for
/// it (and every later job waits behind it), because two concurrent transactions on one shard
/// could commit in either order, and the outbox order of a shard is its commit order.
async fn collect(
    ctx: Arc<CommitCtx>,
    mut rx: mpsc::Receiver<Job>,
    max_rows: usize,
    concurrency: usize,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut held: Option<Job> = None;
    loop {
        // Take a commit slot first: while all are busy, arrivals accumulate into the next batch.
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let first = match held.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => break,
            },
        };
        // Wait until the first job's shards are free (registering before checking, so that a
        // commit finishing in between is not missed).
        loop {
            let freed = ctx.freed.notified();
            if ctx.busy() & first.shards == 0 {
                break;
            }
            freed.await;
        }
        let mut rows = first.events.len();
        let mut mask = first.shards;
        let mut jobs = vec![first];
        while rows < max_rows {
            match rx.try_recv() {
                Ok(j) if ctx.busy() & j.shards == 0 => {
                    rows += j.events.len();
                    mask |= j.shards;
                    jobs.push(j);
                }
                Ok(j) => {
                    held = Some(j);
                    break;
                }
                Err(_) => break,
            }
        }
        *ctx.busy.lock().expect("busy lock") |= mask;
        metrics::histogram!("cj_outbox_group_commit_rows").record(rows as f64);
        let ctx = ctx.clone();
        tracker.spawn(async move {
            commit_jobs(&ctx, jobs).await;
            *ctx.busy.lock().expect("busy lock") &= !mask;
            ctx.freed.notify_waiters();
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
        Ok(outcomes) => {
            ctx.wakers.wake_all();
            let mut outcomes = outcomes.into_iter();
            for (n, reply) in shape {
                let _ = reply.send(Ok(outcomes.by_ref().take(n).collect()));
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

/// How often a commit may carry a NOTIFY. PostgreSQL serialises committing transactions that
/// NOTIFY (one global queue lock, held through the WAL flush), so notifying on every group commit
/// would serialise the commits themselves; in-process processors are woken directly instead.
const NOTIFY_EVERY: Duration = Duration::from_millis(5);

/// (subject, Idempotency-Key).
type KeyOf = (String, String);

/// Where one event stands while a group commit is settled.
#[derive(Clone, Copy)]
enum Plan {
    New,
    /// A repeat of an earlier event of this group commit (same key or client event_id).
    Follows(usize),
    Done,
}

async fn write(
    pool: &PgPool,
    events: &[Pending],
    notify: bool,
) -> Result<Vec<Outcome>, WriteError> {
    let mut out: Vec<Outcome> = events
        .iter()
        .map(|p| Outcome::Accepted(p.envelope.event_id))
        .collect();
    if !events
        .iter()
        .any(|p| p.idempotency_key.is_some() || p.client_event_id)
    {
        // The common case, one round trip: ids the platform drew itself (UUID v7) are new, and
        // the function's implicit transaction commits the rows (and the NOTIFY, when due).
        append(pool, events.iter().collect(), notify).await?;
        return Ok(out);
    }

    let mut tx = pool.begin().await?;
    let shards: Vec<i16> = events
        .iter()
        .map(|p| shard_of(&p.envelope.aggregate_id))
        .collect();
    // The shard locks before any row lock, as ingestion.append takes them, so no two writers
    // can deadlock on a key or an event id.
    sqlx::query("SELECT ingestion.lock_shards($1)")
        .bind(&shards)
        .execute(&mut *tx)
        .await?;

    // Repeats inside this group commit follow their first occurrence.
    let mut plan = vec![Plan::New; events.len()];
    let mut first_key: HashMap<(&str, &str), usize> = HashMap::new();
    let mut first_id: HashMap<Uuid, usize> = HashMap::new();
    for (i, p) in events.iter().enumerate() {
        if let Some(k) = &p.idempotency_key {
            if let Some(&f) = first_key.get(&(p.subject(), k.as_str())) {
                plan[i] = Plan::Follows(f);
                continue;
            }
            first_key.insert((p.subject(), k.as_str()), i);
        }
        if p.client_event_id {
            if let Some(&f) = first_id.get(&p.envelope.event_id) {
                plan[i] = Plan::Follows(f);
                continue;
            }
            first_id.insert(p.envelope.event_id, i);
        }
    }

    // Keys: one already taken answers with its event (same body) or conflicts.
    let keyed: Vec<usize> = (0..events.len())
        .filter(|&i| matches!(plan[i], Plan::New) && events[i].idempotency_key.is_some())
        .collect();
    let mut claimed_key = HashSet::new();
    if !keyed.is_empty() {
        let subjects: Vec<&str> = keyed.iter().map(|&i| events[i].subject()).collect();
        let keys: Vec<&str> = keyed
            .iter()
            .map(|&i| events[i].idempotency_key.as_deref().unwrap_or_default())
            .collect();
        let ids: Vec<Uuid> = keyed.iter().map(|&i| events[i].envelope.event_id).collect();
        let hashes: Vec<&[u8]> = keyed.iter().map(|&i| &events[i].fingerprint[..]).collect();
        let claimed: Vec<(String, String)> = sqlx::query_as(
            "INSERT INTO ingestion.idempotency_keys (subject, key, event_id, body_hash)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::bytea[])
             ON CONFLICT (subject, key) DO NOTHING RETURNING subject, key",
        )
        .bind(&subjects)
        .bind(&keys)
        .bind(&ids)
        .bind(&hashes)
        .fetch_all(&mut *tx)
        .await?;
        claimed_key.extend(claimed);
        let taken: Vec<usize> = keyed
            .iter()
            .copied()
            .filter(|&i| {
                !claimed_key.contains(&(
                    events[i].subject().to_string(),
                    events[i].idempotency_key.clone().unwrap_or_default(),
                ))
            })
            .collect();
        if !taken.is_empty() {
            let existing: HashMap<KeyOf, (Uuid, Option<Vec<u8>>)> =
                sqlx::query_as::<_, (String, String, Uuid, Option<Vec<u8>>)>(
                    "SELECT k.subject, k.key, k.event_id, k.body_hash
                     FROM ingestion.idempotency_keys k
                     JOIN UNNEST($1::text[], $2::text[]) AS u(subject, key)
                       ON k.subject = u.subject AND k.key = u.key",
                )
                .bind(
                    taken
                        .iter()
                        .map(|&i| events[i].subject())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    taken
                        .iter()
                        .map(|&i| events[i].idempotency_key.as_deref().unwrap_or_default())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|(s, k, id, h)| ((s, k), (id, h)))
                .collect();
            for i in taken {
                let k = (
                    events[i].subject().to_string(),
                    events[i].idempotency_key.clone().unwrap_or_default(),
                );
                let Some((id, hash)) = existing.get(&k) else {
                    // Trimmed by retention between the two statements: a key that is gone
                    // cannot answer; refuse rather than guess.
                    return Err(WriteError::Failed(sqlx::Error::RowNotFound));
                };
                out[i] = if hash.as_deref().is_none_or(|h| h == events[i].fingerprint) {
                    Outcome::Accepted(*id)
                } else {
                    Outcome::Conflict(Conflict::IdempotencyKey(*id))
                };
                plan[i] = Plan::Done;
            }
        }
    }

    // Client-chosen event ids: one already accepted (by the client or the platform) is a retry
    // (same body) or a conflict.
    let chosen: Vec<usize> = (0..events.len())
        .filter(|&i| matches!(plan[i], Plan::New) && events[i].client_event_id)
        .collect();
    if !chosen.is_empty() {
        let ids: Vec<Uuid> = chosen
            .iter()
            .map(|&i| events[i].envelope.event_id)
            .collect();
        let hashes: Vec<&[u8]> = chosen.iter().map(|&i| &events[i].fingerprint[..]).collect();
        let claimed: HashSet<Uuid> = sqlx::query_scalar(
            "INSERT INTO ingestion.event_ids (event_id, body_hash)
             SELECT * FROM UNNEST($1::uuid[], $2::bytea[])
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        )
        .bind(&ids)
        .bind(&hashes)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let taken: Vec<Uuid> = ids
            .iter()
            .copied()
            .filter(|i| !claimed.contains(i))
            .collect();
        if !taken.is_empty() {
            let existing: HashMap<Uuid, Option<Vec<u8>>> = sqlx::query_as(
                "SELECT event_id, body_hash FROM ingestion.event_ids WHERE event_id = ANY($1)",
            )
            .bind(&taken)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            let mut released = (Vec::new(), Vec::new());
            for &i in &chosen {
                let Some(hash) = existing.get(&events[i].envelope.event_id) else {
                    continue;
                };
                plan[i] = Plan::Done;
                if hash.as_deref().is_none_or(|h| h == events[i].fingerprint) {
                    continue; // a retry: answered with its own id, nothing stored
                }
                out[i] = Outcome::Conflict(Conflict::EventId(events[i].envelope.event_id));
                // A key claimed above for this refused event is given back.
                if let Some(k) = &events[i].idempotency_key {
                    released.0.push(events[i].subject());
                    released.1.push(k.as_str());
                }
            }
            if !released.0.is_empty() {
                sqlx::query(
                    "DELETE FROM ingestion.idempotency_keys k
                     USING UNNEST($1::text[], $2::text[]) AS u(subject, key)
                     WHERE k.subject = u.subject AND k.key = u.key",
                )
                .bind(&released.0)
                .bind(&released.1)
                .execute(&mut *tx)
                .await?;
            }
        }
    }

    for i in 0..events.len() {
        if let Plan::Follows(f) = plan[i] {
            let same = events[i].fingerprint == events[f].fingerprint;
            out[i] = match (&out[f], same) {
                (Outcome::Accepted(id), true) => Outcome::Accepted(*id),
                (Outcome::Accepted(id), false) => Outcome::Conflict(
                    if events[i].idempotency_key.is_some()
                        && events[i].idempotency_key == events[f].idempotency_key
                    {
                        Conflict::IdempotencyKey(*id)
                    } else {
                        Conflict::EventId(*id)
                    },
                ),
                (c @ Outcome::Conflict(_), _) => c.clone(),
            };
        }
    }
    let new: Vec<&Pending> = (0..events.len())
        .filter(|&i| matches!(plan[i], Plan::New))
        .map(|i| &events[i])
        .collect();
    append(&mut *tx, new, notify).await?;
    tx.commit().await?;
    Ok(out)
}

async fn append<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    rows: Vec<&Pending>,
    notify: bool,
) -> Result<(), WriteError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut shards = Vec::with_capacity(n);
    let mut event_ids = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut hashes: Vec<&[u8]> = Vec::with_capacity(n);
    for p in rows {
        shards.push(shard_of(&p.envelope.aggregate_id));
        event_ids.push(p.envelope.event_id);
        payloads.push(p.envelope.to_json());
        hashes.push(&p.fingerprint[..]);
    }
    sqlx::query("SELECT ingestion.append($1, $2, $3, $4, $5)")
        .bind(&shards)
        .bind(&event_ids)
        .bind(&payloads)
        .bind(&hashes)
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
