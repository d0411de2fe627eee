//! Dead letters (SPEC §7): one contract for every consumer of the platform.
//!
//! Each consumer keeps its dead letters in a table of one shape in its own schema
//! (`eventhandler.dlq`, `tsdb.dlq`, `actions.dlq`, and the Python sidecar's `ai.dlq`), written by
//! the consume loop in the transaction of the batch ([`insert`]). An [`Owner`] — a consumer, its
//! table and how its entries are replayed — lists, replays and discards them; the CLI
//! (`cornjacket dlq …`) and each consumer service's HTTP API (`/api/v1/dlq/{consumer}/…`) both
//! go through it.
//!
//! Replaying re-runs the consumer on the stored message. The platform's own consumers do it in
//! process with their [`Sink`] (decode, apply — both idempotent, so a replay that is cut off
//! after applying and before being marked can simply run again). The sidecar's model runs
//! only in Python: for it a replay is requested (`status = 'replaying'`) and the sidecar's
//! replay worker performs it and sets the outcome (ai-inference/README.md).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rdkafka::Message;
use rdkafka::message::{OwnedMessage, Timestamp};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::infra::bus::message::Resend;
use crate::infra::consume::{Poison, Sink};

/// Where a dead letter is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case", try_from = "String")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Status {
    Pending,
    /// A replay was requested from a consumer that performs it itself (the sidecar).
    Replaying,
    Replayed,
    Discarded,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Pending,
        Status::Replaying,
        Status::Replayed,
        Status::Discarded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Replaying => "replaying",
            Status::Replayed => "replayed",
            Status::Discarded => "discarded",
        }
    }

    /// The status of that name; the error says what follows the word "status".
    fn named(s: &str) -> Result<Self, String> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("must be pending, replaying, replayed or discarded, got '{s}'"))
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Status::named(s).map_err(|why| format!("status {why}"))
    }
}

/// A status as a query parameter gives it.
impl TryFrom<String> for Status {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Status::named(&s)
    }
}

/// The columns every dead-letter table has, in [`Entry`]'s order.
pub const COLUMNS: &str = "dlq_id, consumer, event_id, event_type, aggregate_id, event_payload, \
     raw_payload, error_message, failed_at, retry_count, status, topic, \"partition\", \"offset\", \
     updated_at";

/// One dead letter as the CLI and the APIs show it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub dlq_id: Uuid,
    pub consumer: String,
    pub event_id: Option<Uuid>,
    pub event_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_payload: Option<Value>,
    pub raw_payload: Option<String>,
    pub error_message: String,
    #[serde(serialize_with = "time")]
    pub failed_at: DateTime<Utc>,
    pub retry_count: i32,
    pub status: Status,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    #[serde(serialize_with = "time")]
    pub updated_at: DateTime<Utc>,
}

fn time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::envelope::format_time(t))
}

/// What became of a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// The consumer took it (or had nothing to do with it): the entry is now `replayed`.
    Replayed,
    /// The consumer refused it again: still `pending`, with the new error.
    StillFailing(String),
    /// Asked of a consumer that replays by itself: the entry is `replaying` until it has.
    Requested,
    /// No pending entry with that id.
    NotPending,
}

/// How an owner's entries are replayed.
#[derive(Clone)]
pub enum Replay {
    /// By the platform, with the consumer's own sink.
    InProcess(Arc<dyn Replayer>),
    /// By the consumer's own process, which watches for `replaying` entries.
    Requested,
}

/// Re-runs a consumer on one stored message: `Ok(Err(why))` when it refuses it.
pub trait Replayer: Send + Sync {
    fn replay<'a>(
        &'a self,
        m: &'a OwnedMessage,
    ) -> BoxFuture<'a, Result<Result<(), String>, sqlx::Error>>;
}

impl<S: Sink> Replayer for S {
    fn replay<'a>(
        &'a self,
        m: &'a OwnedMessage,
    ) -> BoxFuture<'a, Result<Result<(), String>, sqlx::Error>> {
        Box::pin(async move {
            match self.decode(m) {
                Err(Poison::Undecodable(e) | Poison::Refused(e)) => Ok(Err(e)),
                Ok(None) => Ok(Ok(())),
                Ok(Some(item)) => self.apply(std::slice::from_ref(&item), &[]).await.map(Ok),
            }
        })
    }
}

/// A consumer's dead letters: who it is (`name`, the path segment of its API), its table, and
/// how its entries are replayed.
#[derive(Clone)]
pub struct Owner {
    pub name: &'static str,
    pub table: &'static str,
    pub pool: PgPool,
    pub replay: Replay,
}

impl Owner {
    /// Entries by failure time, optionally of one status.
    pub async fn list(
        &self,
        status: Option<Status>,
        limit: i64,
    ) -> Result<Vec<Entry>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM {} WHERE ($1::text IS NULL OR status = $1)
             ORDER BY failed_at, dlq_id LIMIT $2",
            self.table
        ))
        .bind(status.map(Status::as_str))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    pub async fn get(&self, dlq_id: Uuid) -> Result<Option<Entry>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM {} WHERE dlq_id = $1",
            self.table
        ))
        .bind(dlq_id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Entries per `(consumer, status)`, for the `cj_dlq_entries` gauge.
    pub async fn sizes(&self) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT consumer, status, count(*) FROM {} GROUP BY 1, 2",
            self.table
        ))
        .fetch_all(&self.pool)
        .await
    }

    pub async fn pending_ids(&self) -> Result<Vec<Uuid>, sqlx::Error> {
        sqlx::query_scalar(&format!(
            "SELECT dlq_id FROM {} WHERE status = 'pending' ORDER BY failed_at, dlq_id",
            self.table
        ))
        .fetch_all(&self.pool)
        .await
    }

    /// Marks a pending entry `discarded`; false when there was no such pending entry.
    pub async fn discard(&self, dlq_id: Uuid) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(&format!(
            "UPDATE {} SET status = 'discarded', updated_at = now()
             WHERE dlq_id = $1 AND status = 'pending'",
            self.table
        ))
        .bind(dlq_id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Replays a pending entry (see the module comment). The entry stays locked while its
    /// consumer runs, so two replays of one entry never apply it twice at once.
    pub async fn replay(&self, dlq_id: Uuid) -> Result<ReplayOutcome, sqlx::Error> {
        let replayer = match &self.replay {
            Replay::Requested => {
                let r = sqlx::query(&format!(
                    "UPDATE {} SET status = 'replaying', updated_at = now()
                     WHERE dlq_id = $1 AND status = 'pending'",
                    self.table
                ))
                .bind(dlq_id)
                .execute(&self.pool)
                .await?;
                return Ok(if r.rows_affected() == 1 {
                    ReplayOutcome::Requested
                } else {
                    ReplayOutcome::NotPending
                });
            }
            Replay::InProcess(r) => r.clone(),
        };
        let mut tx = self.pool.begin().await?;
        let entry: Option<Entry> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM {} WHERE dlq_id = $1 AND status = 'pending' FOR UPDATE",
            self.table
        ))
        .bind(dlq_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(entry) = entry else {
            return Ok(ReplayOutcome::NotPending);
        };
        let outcome = match message_of(&entry) {
            None => Err("the payload is not JSON; correct event_payload before replaying".into()),
            Some(m) => replayer.replay(&m).await?,
        };
        let table = self.table;
        match &outcome {
            Ok(()) => {
                sqlx::query(&format!(
                    "UPDATE {table} SET status = 'replayed', updated_at = now() WHERE dlq_id = $1"
                ))
                .bind(dlq_id)
                .execute(&mut *tx)
                .await?
            }
            Err(e) => {
                sqlx::query(&format!(
                    "UPDATE {table}
                     SET error_message = $2, retry_count = retry_count + 1, updated_at = now()
                     WHERE dlq_id = $1"
                ))
                .bind(dlq_id)
                .bind(e)
                .execute(&mut *tx)
                .await?
            }
        };
        tx.commit().await?;
        Ok(match outcome {
            Ok(()) => ReplayOutcome::Replayed,
            Err(e) => ReplayOutcome::StillFailing(e),
        })
    }
}

/// The message an entry came from, as its consumer would receive it again: the stored envelope
/// (an operator may have corrected it), its key and source position, marked as a replay.
fn message_of(e: &Entry) -> Option<OwnedMessage> {
    let payload = e.event_payload.as_ref()?.to_string().into_bytes();
    let headers = Resend::DeadLetter.headers();
    Some(OwnedMessage::new(
        Some(payload),
        e.aggregate_id.clone().map(String::into_bytes),
        e.topic.clone().unwrap_or_default(),
        Timestamp::NotAvailable,
        e.partition.unwrap_or(-1),
        e.offset.unwrap_or(-1),
        Some(headers),
    ))
}

/// A message that could not be handled, on its way to a DLQ.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub consumer: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    pub error: String,
    pub retries: i32,
}

impl DeadLetter {
    pub fn of(group: &str, m: &OwnedMessage, error: String, retries: i32) -> Self {
        Self {
            consumer: group.to_string(),
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            payload: m.payload().map(<[u8]>::to_vec),
            error,
            retries,
        }
    }
}

/// Records dead letters in `table` (a service's `<schema>.dlq`); a redelivered message already
/// recorded is not recorded twice.
pub async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    table: &'static str,
    letters: &[DeadLetter],
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table}
            (dlq_id, consumer, event_id, event_type, aggregate_id, event_payload, raw_payload,
             error_message, retry_count, topic, \"partition\", \"offset\")
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (consumer, topic, \"partition\", \"offset\") DO NOTHING"
    );
    for d in letters {
        let raw = d.payload.as_deref().unwrap_or_default();
        // PostgreSQL refuses NUL in text and jsonb: such a payload is kept as escaped text, so
        // recording a dead letter can never fail on its content.
        let text = String::from_utf8_lossy(raw);
        let json: Option<Value> = if text.contains("\\u0000") || text.contains('\0') {
            None
        } else {
            serde_json::from_slice(raw).ok()
        };
        let text = json.is_none().then(|| text.replace('\0', "\\0"));
        let field = |k: &str| {
            json.as_ref()
                .and_then(|j| j.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let event_id = field("event_id").and_then(|s| Uuid::parse_str(&s).ok());
        sqlx::query(&sql)
            .bind(Uuid::now_v7())
            .bind(&d.consumer)
            .bind(event_id)
            .bind(field("event_type"))
            .bind(field("aggregate_id"))
            .bind(&json)
            .bind(text)
            .bind(&d.error)
            .bind(d.retries)
            .bind(&d.topic)
            .bind(d.partition)
            .bind(d.offset)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The DLQ API of a consumer service (`/api/v1/dlq/{consumer}/…`, scope `dlq:admin`), served on
/// its health port for every consumer published on that port's board.
pub mod api {
    use axum::Json;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use serde::Deserialize;
    use serde_json::json;
    use uuid::Uuid;

    use super::{Owner, ReplayOutcome, Status};
    use crate::infra::extract::{Path, Query, Rejection, Rejects};
    use crate::infra::http::{self, DbFailure, HealthBoard, error_body};

    crate::infra::http::routes! {
        /// Every route of the DLQ API.
        pub const ROUTES;
        pub fn router() -> Router<DlqState> {
            get "/api/v1/dlq/{consumer}" => list;
            get "/api/v1/dlq/{consumer}/{dlq_id}" => one;
            post "/api/v1/dlq/{consumer}/{dlq_id}/replay" => replay;
            post "/api/v1/dlq/{consumer}/{dlq_id}/discard" => discard;
        }
    }

    /// The consumer serving the port, and the board where the consumers sharing it publish
    /// theirs.
    #[derive(Clone)]
    pub struct DlqState {
        pub own: Owner,
        pub board: HealthBoard,
        pub port: u16,
    }

    #[derive(Debug, thiserror::Error)]
    pub enum DlqError {
        #[error("{0}")]
        BadRequest(String),
        #[error("no consumer '{0}' on this port")]
        NoConsumer(String),
        #[error("no dead letter {0}")]
        NotFound(Uuid),
        #[error("dead letter {0} is {1}, not pending")]
        NotPending(Uuid, &'static str),
        #[error("still failing: {0}")]
        StillFailing(String),
        /// Also while the consumer's table does not exist yet (its service has not migrated).
        #[error("the database is unavailable")]
        Unavailable,
        #[error(transparent)]
        Internal(sqlx::Error),
        #[error("{}", .0.message)]
        Rejected(Rejection),
    }

    impl From<sqlx::Error> for DlqError {
        fn from(e: sqlx::Error) -> Self {
            match DbFailure::of(e) {
                DbFailure::Unavailable | DbFailure::NotMigrated => DlqError::Unavailable,
                DbFailure::Internal(e) => DlqError::Internal(e),
            }
        }
    }

    impl From<Rejection> for DlqError {
        fn from(r: Rejection) -> Self {
            DlqError::Rejected(r)
        }
    }

    impl IntoResponse for DlqError {
        fn into_response(self) -> Response {
            let status = match &self {
                DlqError::BadRequest(_) => StatusCode::BAD_REQUEST,
                DlqError::NoConsumer(_) | DlqError::NotFound(_) => StatusCode::NOT_FOUND,
                DlqError::NotPending(..) => StatusCode::CONFLICT,
                DlqError::StillFailing(_) => StatusCode::UNPROCESSABLE_ENTITY,
                DlqError::Rejected(r) => r.status,
                DlqError::Unavailable => return http::unavailable(self.to_string()),
                DlqError::Internal(e) => return http::internal("DLQ request failed.", e),
            };
            error_body(status, self.to_string(), json!([]))
        }
    }

    impl Rejects for DlqState {
        type Error = DlqError;
    }

    fn owner(s: &DlqState, consumer: &str) -> Result<Owner, DlqError> {
        if s.own.name == consumer {
            return Ok(s.own.clone());
        }
        s.board
            .dead_letters(s.port, consumer)
            .ok_or_else(|| DlqError::NoConsumer(consumer.to_string()))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ListParams {
        status: Option<Status>,
        limit: Option<i64>,
    }

    async fn list(
        State(s): State<DlqState>,
        Path(consumer): Path<String>,
        Query(q): Query<ListParams>,
    ) -> Result<Json<serde_json::Value>, DlqError> {
        let o = owner(&s, &consumer)?;
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(DlqError::BadRequest(format!(
                "limit must be between 1 and 1000, got {limit}"
            )));
        }
        let entries = o.list(q.status, limit).await?;
        Ok(Json(
            json!({ "consumer": o.name, "entries": entries, "limit": limit }),
        ))
    }

    async fn one(
        State(s): State<DlqState>,
        Path((consumer, id)): Path<(String, Uuid)>,
    ) -> Result<Json<super::Entry>, DlqError> {
        let o = owner(&s, &consumer)?;
        o.get(id).await?.map(Json).ok_or(DlqError::NotFound(id))
    }

    /// Why an entry could not be acted on: it does not exist, or it is not pending.
    async fn not_pending(o: &Owner, id: Uuid) -> DlqError {
        match o.get(id).await {
            Ok(Some(e)) => DlqError::NotPending(id, e.status.as_str()),
            Ok(None) => DlqError::NotFound(id),
            Err(e) => e.into(),
        }
    }

    async fn replay(
        State(s): State<DlqState>,
        Path((consumer, id)): Path<(String, Uuid)>,
    ) -> Result<Response, DlqError> {
        let o = owner(&s, &consumer)?;
        match o.replay(id).await? {
            ReplayOutcome::Replayed => {
                Ok(Json(json!({ "dlq_id": id, "status": "replayed" })).into_response())
            }
            ReplayOutcome::Requested => Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "dlq_id": id, "status": "replaying" })),
            )
                .into_response()),
            ReplayOutcome::StillFailing(e) => Err(DlqError::StillFailing(e)),
            ReplayOutcome::NotPending => Err(not_pending(&o, id).await),
        }
    }

    async fn discard(
        State(s): State<DlqState>,
        Path((consumer, id)): Path<(String, Uuid)>,
    ) -> Result<Json<serde_json::Value>, DlqError> {
        let o = owner(&s, &consumer)?;
        if o.discard(id).await? {
            Ok(Json(json!({ "dlq_id": id, "status": "discarded" })))
        } else {
            Err(not_pending(&o, id).await)
        }
    }
}
