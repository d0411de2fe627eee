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
use tokio::sync::{Notify, mpsc, oneshot};
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
    /// Not stored: its part of a batch could not be committed (the database was unavailable)
    /// while other parts were. Retrying it is safe.
    Unavailable,
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

/// One job's events bound for one lane: their positions in the job, and the events.
struct Part {
    job: Arc<JobState>,
    at: Vec<usize>,
    events: Vec<Pending>,
}

/// A submitted job while its parts commit.
struct JobState {
    /// Global submission order (see [`Writer::send`]).
    seq: u64,
    /// The lanes it has parts in.
    lanes: Vec<usize>,
    /// Parts not committed (or failed) yet.
    left: std::sync::atomic::AtomicUsize,
    outcomes: Mutex<Vec<Option<Result<Outcome, WriteError>>>>,
    reply: Mutex<Option<oneshot::Sender<Answer>>>,
}

/// Per event of a job, what became of it.
type Answer = Vec<Result<Outcome, WriteError>>;

/// The handle requests use; cloning is cheap. The lanes stop when every handle is dropped,
/// which is after the HTTP server has drained, so no accepted request is cut off.
///
/// Shards are divided among `concurrency` lanes (`shard % lanes`); each lane commits its queue
/// one group commit after the other, and the lanes run concurrently. A shard is in one lane
/// only, so two commits that write one shard never run at once in this process, and its
/// outbox order is its submission order. A job (a batch request) is split by lane and
/// answered when all its parts are committed; answers go out in submission order among jobs
/// that share a lane, so no later request of an aggregate is answered before an earlier one.
#[derive(Clone)]
pub struct Writer {
    inner: Arc<WriterInner>,
}

struct WriterInner {
    /// Unbounded, so that handing a job over never waits: a job registered for answering but
    /// cancelled before all its parts were sent would hold back every later answer. The
    /// request limits (HTTP connections, MQTT in-flight window, request timeout) bound it.
    lanes: Vec<mpsc::UnboundedSender<Part>>,
    /// Held while a job's parts are handed to the lanes, so that every lane sees jobs in one
    /// global order.
    order: Mutex<u64>,
    release: Mutex<Release>,
}

/// Jobs waiting to be answered, per lane in submission order.
#[derive(Default)]
struct Release {
    queues: Vec<std::collections::VecDeque<u64>>,
    done: HashMap<u64, Arc<JobState>>,
}

impl Writer {
    /// `seen` notes the devices whose readings each commit stored (see `activity`).
    pub fn spawn(
        pool: PgPool,
        max_rows: usize,
        concurrency: usize,
        wakers: Wakers,
        seen: super::activity::Seen,
        tracker: &TaskTracker,
    ) -> Self {
        let ctx = Arc::new(CommitCtx {
            pool,
            wakers,
            seen,
            pacer: NotifyPacer(Mutex::new(None)),
        });
        let mut lanes = Vec::with_capacity(concurrency);
        let mut receivers = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let (tx, rx) = mpsc::unbounded_channel();
            lanes.push(tx);
            receivers.push(rx);
        }
        let inner = Arc::new(WriterInner {
            lanes,
            order: Mutex::new(0),
            release: Mutex::new(Release {
                queues: vec![Default::default(); concurrency],
                done: HashMap::new(),
            }),
        });
        for rx in receivers {
            // The lane holds the writer's inner state only weakly, so dropping every handle
            // closes the lanes' channels and they stop.
            tracker.spawn(lane(ctx.clone(), Arc::downgrade(&inner), rx, max_rows));
        }
        Self { inner }
    }

    /// Commits the events, in order, and says per event what became of it. Events submitted
    /// earlier (an earlier call that has returned or is still waiting) are committed before
    /// later ones of the same shard, so the outbox order of an aggregate is submission order.
    pub async fn submit(&self, events: Vec<Pending>) -> Result<Vec<Outcome>, WriteError> {
        self.send(events).await?.wait().await
    }

    /// Hands the events to the lanes and returns at once with a ticket for the outcome: a
    /// caller that must keep an order (MQTT's arrival order) sends one message after the other
    /// and waits for the tickets concurrently. (Sending from concurrent futures instead would
    /// let tokio's cooperative budget swap two neighbours.)
    pub async fn send(&self, events: Vec<Pending>) -> Result<Ticket, WriteError> {
        let (reply, rx) = oneshot::channel();
        let n = events.len();
        if n == 0 {
            // No part would ever answer it.
            let _ = reply.send(Vec::new());
            return Ok(Ticket(rx));
        }
        let l = self.inner.lanes.len();
        let mut parts: Vec<(Vec<usize>, Vec<Pending>)> =
            (0..l).map(|_| Default::default()).collect();
        for (i, p) in events.into_iter().enumerate() {
            let lane = shard_of(&p.envelope.aggregate_id) as usize % l;
            parts[lane].0.push(i);
            parts[lane].1.push(p);
        }
        let lanes: Vec<usize> = (0..l).filter(|i| !parts[*i].0.is_empty()).collect();
        // No await from here on (see `WriterInner::lanes`).
        let mut order = self.inner.order.lock().expect("order lock");
        *order += 1;
        let job = Arc::new(JobState {
            seq: *order,
            lanes: lanes.clone(),
            left: std::sync::atomic::AtomicUsize::new(lanes.len()),
            outcomes: Mutex::new((0..n).map(|_| None).collect()),
            reply: Mutex::new(Some(reply)),
        });
        {
            let mut r = self.inner.release.lock().expect("release lock");
            for &lane in &lanes {
                r.queues[lane].push_back(job.seq);
            }
        }
        for lane in lanes {
            let (at, events) = std::mem::take(&mut parts[lane]);
            let part = Part {
                job: job.clone(),
                at,
                events,
            };
            if self.inner.lanes[lane].send(part).is_err() {
                return Err(WriteError::Unavailable);
            }
        }
        drop(order);
        Ok(Ticket(rx))
    }
}

/// The outcome of events handed to [`Writer::send`].
pub struct Ticket(oneshot::Receiver<Answer>);

impl Ticket {
    /// Per event, what became of it; an error when no event could be committed. When only
    /// some lanes failed, their events are [`Outcome::Unavailable`] (the others are stored).
    pub async fn wait(self) -> Result<Vec<Outcome>, WriteError> {
        let results = self.0.await.map_err(|_| WriteError::Unavailable)?;
        if !results.is_empty() && results.iter().all(|r| r.is_err()) {
            return Err(results
                .into_iter()
                .find_map(|r| r.err())
                .unwrap_or(WriteError::Unavailable));
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Outcome::Unavailable))
            .collect())
    }
}

struct CommitCtx {
    pool: PgPool,
    wakers: Wakers,
    seen: super::activity::Seen,
    pacer: NotifyPacer,
}

/// One lane: takes its parts in order and commits them in group commits, one at a time;
/// whatever queued while a commit was in flight goes into the next one.
async fn lane(
    ctx: Arc<CommitCtx>,
    writer: std::sync::Weak<WriterInner>,
    mut rx: mpsc::UnboundedReceiver<Part>,
    max_rows: usize,
) {
    while let Some(first) = rx.recv().await {
        let mut rows = first.events.len();
        let mut parts = vec![first];
        while rows < max_rows {
            match rx.try_recv() {
                Ok(p) => {
                    rows += p.events.len();
                    parts.push(p);
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("cj_outbox_group_commit_rows").record(rows as f64);
        let done = commit_parts(&ctx, parts).await;
        if let Some(w) = writer.upgrade() {
            release(&w, done);
        } else {
            // No handle is left to order the answers: answer each finished job as it is.
            for job in done {
                answer(&job);
            }
        }
    }
}

/// Commits the parts of one group commit and records their outcomes; returns the jobs whose
/// last part this was.
async fn commit_parts(ctx: &CommitCtx, parts: Vec<Part>) -> Vec<Arc<JobState>> {
    let mut events = Vec::new();
    let mut shape = Vec::with_capacity(parts.len());
    for p in parts {
        events.extend(p.events);
        shape.push((p.job, p.at));
    }
    let result = write(&ctx.pool, &events, ctx.pacer.due()).await;
    let mut outcomes = match result {
        Ok(outcomes) => {
            ctx.wakers.wake_all();
            ctx.seen.record(&events, &outcomes);
            outcomes.into_iter().map(Ok).collect::<Vec<_>>()
        }
        Err(e) => {
            let unavailable = matches!(e, WriteError::Unavailable);
            if !unavailable {
                tracing::error!(error = %e, "Outbox group commit failed.");
            }
            (0..events.len())
                .map(|_| {
                    Err(if unavailable {
                        WriteError::Unavailable
                    } else {
                        WriteError::Failed(sqlx::Error::Protocol("outbox write failed".into()))
                    })
                })
                .collect()
        }
    }
    .into_iter();
    let mut finished = Vec::new();
    for (job, at) in shape {
        {
            let mut o = job.outcomes.lock().expect("outcomes lock");
            for i in at {
                o[i] = outcomes.next();
            }
        }
        if job.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            finished.push(job);
        }
    }
    finished
}

/// Answers finished jobs in submission order among jobs that share a lane: a job goes out once
/// it is first in every lane it has parts in.
fn release(w: &WriterInner, finished: Vec<Arc<JobState>>) {
    let mut r = w.release.lock().expect("release lock");
    for job in finished {
        r.done.insert(job.seq, job);
    }
    loop {
        let ready: Vec<u64> = r
            .queues
            .iter()
            .filter_map(|q| q.front().copied())
            .filter(|seq| {
                r.done
                    .get(seq)
                    .is_some_and(|job| job.lanes.iter().all(|&l| r.queues[l].front() == Some(seq)))
            })
            .collect();
        if ready.is_empty() {
            break;
        }
        for seq in ready {
            let Some(job) = r.done.remove(&seq) else {
                continue;
            };
            for &l in &job.lanes {
                r.queues[l].pop_front();
            }
            answer(&job);
        }
    }
}

fn answer(job: &JobState) {
    let outcomes = std::mem::take(&mut *job.outcomes.lock().expect("outcomes lock"));
    if let Some(reply) = job.reply.lock().expect("reply lock").take() {
        let _ = reply.send(
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or(Err(WriteError::Unavailable)))
                .collect(),
        );
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
                (other, _) => other.clone(),
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
