//! Time series and anomalies (SPEC §8, §9): bucketed aggregates of `tsdb.sensor_readings`
//! (`time_bucket` with TimescaleDB, `date_bin` without; both aligned to the Unix epoch so the
//! answer is the same on either) and the AI sidecar's scores from `ai.inference_results`.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use super::QueryState;
use super::api::{Params, int_param, only_known, time_param};
use super::error::QueryError;
use crate::envelope::format_time;
use crate::infra::extract::{Path, Query};

pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/query/timeseries/{device_id}"),
    ("get", "/api/v1/query/anomalies"),
];

/// More buckets than this in one answer is a mistake (or an attack), not a chart.
const MAX_BUCKETS: i64 = 10_000;
const MIN_BUCKET: Duration = Duration::from_secs(1);
const MAX_BUCKET: Duration = Duration::from_secs(86_400);

pub fn router() -> Router<QueryState> {
    Router::new()
        .route("/api/v1/query/timeseries/{device_id}", get(timeseries))
        .route("/api/v1/query/anomalies", get(anomalies))
}

/// The aggregate's SQL over one bucket's readings. `last` breaks ties by event_id so the
/// answer never depends on physical row order.
fn aggregate(agg: &str) -> Option<&'static str> {
    Some(match agg {
        "avg" => "avg(value)",
        "min" => "min(value)",
        "max" => "max(value)",
        "count" => "count(*)::float8",
        "last" => "(array_agg(value ORDER BY time DESC, event_id DESC))[1]",
        _ => return None,
    })
}

async fn has_timescale(s: &QueryState) -> Result<bool, QueryError> {
    s.timescale
        .get_or_try_init(|| async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
            )
            .fetch_one(&s.pool)
            .await
        })
        .await
        .copied()
        .map_err(QueryError::from)
}

#[tracing::instrument(skip_all, fields(device_id = %device))]
async fn timeseries(
    State(s): State<QueryState>,
    Path(device): Path<String>,
    Query(q): Params,
) -> Result<Json<Value>, QueryError> {
    only_known(&q, &["from", "to", "bucket", "agg"])?;
    let bucket_text = q.get("bucket").map(String::as_str).unwrap_or("1m");
    let bucket = humantime::parse_duration(bucket_text)
        .ok()
        .filter(|b| {
            (MIN_BUCKET..=MAX_BUCKET).contains(b) && b.subsec_nanos() == 0
        })
        .ok_or_else(|| {
            QueryError::BadRequest(format!(
                "bucket must be a whole number of seconds from 1s to 1d (30s, 1m, 5m, 1h), got '{bucket_text}'"
            ))
        })?;
    let agg_name = q.get("agg").map(String::as_str).unwrap_or("avg");
    let agg = aggregate(agg_name).ok_or_else(|| {
        QueryError::BadRequest(format!(
            "agg must be avg, min, max, count or last, got '{agg_name}'"
        ))
    })?;
    let to = time_param(&q, "to")?.unwrap_or_else(|| s.clock.now());
    let from = match time_param(&q, "from")? {
        Some(f) => f,
        None => to - chrono::Duration::hours(1),
    };
    if from >= to {
        return Err(QueryError::BadRequest("from must be before to".into()));
    }
    let secs = bucket.as_secs() as i64;
    let span = (to - from).num_seconds();
    if span / secs > MAX_BUCKETS {
        return Err(QueryError::BadRequest(format!(
            "{} buckets requested; at most {MAX_BUCKETS} per request: widen the bucket or narrow from/to",
            span / secs
        )));
    }
    let bin = if has_timescale(&s).await? {
        "time_bucket(make_interval(secs => $2), time, TIMESTAMPTZ '1970-01-01 00:00:00+00')"
    } else {
        "date_bin(make_interval(secs => $2), time, TIMESTAMPTZ '1970-01-01 00:00:00+00')"
    };
    let rows = sqlx::query(&format!(
        "SELECT {bin} AS bucket, {agg} AS value, count(*) AS n
         FROM tsdb.sensor_readings
         WHERE device_id = $1 AND time >= $3 AND time < $4
         GROUP BY 1 ORDER BY 1"
    ))
    .bind(&device)
    .bind(secs as f64)
    .bind(from)
    .bind(to)
    .fetch_all(&s.pool)
    .await?;
    let points: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "time": format_time(&r.get::<DateTime<Utc>, _>("bucket")),
                "value": r.get::<Option<f64>, _>("value"),
                "count": r.get::<i64, _>("n"),
            })
        })
        .collect();
    Ok(Json(json!({
        "device_id": device,
        "from": format_time(&from),
        "to": format_time(&to),
        "bucket": bucket_text,
        "bucket_seconds": secs,
        "agg": agg_name,
        "points": points,
    })))
}

#[tracing::instrument(skip_all)]
async fn anomalies(
    State(s): State<QueryState>,
    Query(q): Params,
) -> Result<Json<Value>, QueryError> {
    only_known(&q, &["device_id", "since", "limit", "include_normal"])?;
    let limit = int_param(&q, "limit", 100, 1, 1000)?;
    let since =
        time_param(&q, "since")?.unwrap_or_else(|| s.clock.now() - chrono::Duration::hours(24));
    let include_normal = match q.get("include_normal").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(QueryError::BadRequest(format!(
                "include_normal must be true or false, got '{v}'"
            )));
        }
    };
    let rows = sqlx::query(
        "SELECT event_id, device_id, time, value, score, is_anomaly, model, model_version
         FROM ai.inference_results
         WHERE ($1::text IS NULL OR device_id = $1) AND time >= $2 AND ($3 OR is_anomaly)
         ORDER BY time DESC, event_id DESC
         LIMIT $4",
    )
    .bind(q.get("device_id"))
    .bind(since)
    .bind(include_normal)
    .bind(limit)
    .fetch_all(&s.pool)
    .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "event_id": r.get::<Uuid, _>("event_id"),
                "device_id": r.get::<String, _>("device_id"),
                "time": format_time(&r.get::<DateTime<Utc>, _>("time")),
                "value": r.get::<f64, _>("value"),
                "score": r.get::<f64, _>("score"),
                "is_anomaly": r.get::<bool, _>("is_anomaly"),
                "model": r.get::<String, _>("model"),
                "model_version": r.get::<String, _>("model_version"),
            })
        })
        .collect();
    Ok(Json(json!({ "anomalies": items, "limit": limit })))
}
