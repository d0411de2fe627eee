//! Time series and anomalies (SPEC §8, §9): bucketed aggregates of `tsdb.sensor_readings`
//! (`time_bucket` with TimescaleDB, `date_bin` without; both aligned to the Unix epoch so the
//! answer is the same on either) and the AI sidecar's scores from `ai.inference_results`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use super::QueryState;
use super::error::QueryError;
use crate::envelope::format_time;
use crate::infra::extract::query::{Int, Time};
use crate::infra::extract::{Path, Query};

crate::infra::http::routes! {
    /// Every route this module serves, for the OpenAPI agreement test.
    pub const ROUTES;
    pub fn router() -> Router<QueryState> {
        get "/api/v1/query/timeseries/{device_id}" => timeseries;
        get "/api/v1/query/anomalies" => anomalies;
    }
}

/// More buckets than this in one answer is a mistake (or an attack), not a chart.
const MAX_BUCKETS: i64 = 10_000;
const MIN_BUCKET: Duration = Duration::from_secs(1);
const MAX_BUCKET: Duration = Duration::from_secs(86_400);

/// A bucket width as the client wrote it (the answer echoes it) and as a duration.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct Bucket {
    text: String,
    width: Duration,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            text: "1m".into(),
            width: Duration::from_secs(60),
        }
    }
}

impl TryFrom<String> for Bucket {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match humantime::parse_duration(&text) {
            Ok(width)
                if (MIN_BUCKET..=MAX_BUCKET).contains(&width) && width.subsec_nanos() == 0 =>
            {
                Ok(Bucket { text, width })
            }
            _ => Err(format!(
                "must be a whole number of seconds from 1s to 1d (30s, 1m, 5m, 1h), got '{text}'"
            )),
        }
    }
}

/// An aggregate over one bucket's readings.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(try_from = "String")]
enum Agg {
    #[default]
    Avg,
    Min,
    Max,
    Count,
    Last,
}

impl TryFrom<String> for Agg {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        Ok(match v.as_str() {
            "avg" => Agg::Avg,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "count" => Agg::Count,
            "last" => Agg::Last,
            _ => return Err(format!("must be avg, min, max, count or last, got '{v}'")),
        })
    }
}

impl Agg {
    fn name(self) -> &'static str {
        match self {
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Count => "count",
            Agg::Last => "last",
        }
    }

    /// The aggregate's SQL over one bucket's readings. `last` breaks ties by event_id so the
    /// answer never depends on physical row order.
    fn sql(self) -> &'static str {
        match self {
            Agg::Avg => "avg(value)",
            Agg::Min => "min(value)",
            Agg::Max => "max(value)",
            Agg::Count => "count(*)::float8",
            Agg::Last => "(array_agg(value ORDER BY time DESC, event_id DESC))[1]",
        }
    }
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeseriesParams {
    from: Option<Time>,
    to: Option<Time>,
    #[serde(default)]
    bucket: Bucket,
    #[serde(default)]
    agg: Agg,
}

#[tracing::instrument(skip_all, fields(device_id = %device))]
async fn timeseries(
    State(s): State<QueryState>,
    Path(device): Path<String>,
    Query(q): Query<TimeseriesParams>,
) -> Result<Json<Value>, QueryError> {
    let (bucket, agg) = (q.bucket, q.agg);
    let to = q.to.map_or_else(|| s.clock.now(), |Time(t)| t);
    let from = match q.from {
        Some(Time(f)) => f,
        None => to - chrono::Duration::hours(1),
    };
    if from >= to {
        return Err(QueryError::BadRequest("from must be before to".into()));
    }
    let secs = bucket.width.as_secs() as i64;
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
        "SELECT {bin} AS bucket, {} AS value, count(*) AS n
         FROM tsdb.sensor_readings
         WHERE device_id = $1 AND time >= $3 AND time < $4
         GROUP BY 1 ORDER BY 1",
        agg.sql()
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
        "bucket": bucket.text,
        "bucket_seconds": secs,
        "agg": agg.name(),
        "points": points,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnomaliesParams {
    device_id: Option<String>,
    since: Option<Time>,
    #[serde(default)]
    limit: Int<1, 1000, 100>,
    #[serde(default)]
    include_normal: bool,
}

#[tracing::instrument(skip_all)]
async fn anomalies(
    State(s): State<QueryState>,
    Query(q): Query<AnomaliesParams>,
) -> Result<Json<Value>, QueryError> {
    let Int(limit) = q.limit;
    let since = q
        .since
        .map_or_else(|| s.clock.now() - chrono::Duration::hours(24), |Time(t)| t);
    let rows = sqlx::query(
        "SELECT event_id, device_id, time, value, score, is_anomaly, model, model_version
         FROM ai.inference_results
         WHERE ($1::text IS NULL OR device_id = $1) AND time >= $2 AND ($3 OR is_anomaly)
         ORDER BY time DESC, event_id DESC
         LIMIT $4",
    )
    .bind(&q.device_id)
    .bind(since)
    .bind(q.include_normal)
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
