//! Time series and anomalies (SPEC §8, §9): bucketed aggregates of a device's quantities, read
//! from the tsdb-writer's rollups where they serve and from `tsdb.sensor_readings` at the edges
//! (`date_bin`, aligned to the Unix epoch), and the AI sidecar's scores from
//! `ai.inference_results`.

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
use crate::envelope::catalogue::{MAX_QUANTITIES, is_quantity_key};
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
}

/// Which rows answer a time-series query.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
enum SourceParam {
    /// The coarsest rollup that fits, raw rows for the edges (the default).
    #[default]
    Auto,
    /// Raw rows only: the same answer, read the slow way (for comparison and checks).
    Raw,
}

impl TryFrom<String> for SourceParam {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        match v.as_str() {
            "auto" => Ok(SourceParam::Auto),
            "raw" => Ok(SourceParam::Raw),
            _ => Err(format!("must be auto or raw, got '{v}'")),
        }
    }
}

/// `key=temperature,humidity`: the quantities to answer for (all of the device's by default).
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct Keys(Vec<String>);

impl TryFrom<String> for Keys {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        let mut keys: Vec<String> = Vec::new();
        for k in v.split(',') {
            if !is_quantity_key(k) {
                return Err(format!(
                    "must be quantity names separated by commas (letters, digits, '_', '.', '-', a letter first), got '{}'",
                    v.chars().take(80).collect::<String>()
                ));
            }
            if !keys.iter().any(|x| x == k) {
                keys.push(k.to_string());
            }
        }
        if keys.len() > MAX_QUANTITIES {
            return Err(format!(
                "names {} quantities; at most {MAX_QUANTITIES}",
                keys.len()
            ));
        }
        Ok(Keys(keys))
    }
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
    key: Option<Keys>,
    #[serde(default)]
    source: SourceParam,
}

/// A table that holds partial aggregates of a device's readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Raw,
    Minute,
    Hour,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Minute => "rollup_1m",
            Source::Hour => "rollup_1h",
        }
    }

    /// Its rows as partial aggregates `(key, t, n, sum, min, max, last_t, last_e, last_v)`
    /// of the device `$1` and keys `$2`, over `[lo, hi)` at the given parameter numbers.
    fn partials(self, lo: usize, hi: usize) -> String {
        let (table, cols, time) = match self {
            Source::Raw => (
                "tsdb.sensor_readings",
                "key, time, 1::bigint, value, value, value, time, event_id, value",
                "time",
            ),
            Source::Minute => ("tsdb.sensor_rollups_1m", ROLLUP_COLUMNS, "bucket"),
            Source::Hour => ("tsdb.sensor_rollups_1h", ROLLUP_COLUMNS, "bucket"),
        };
        format!(
            "SELECT {cols} FROM {table}
             WHERE device_id = $1 AND key = ANY($2) AND {time} >= ${lo} AND {time} < ${hi}"
        )
    }
}

const ROLLUP_COLUMNS: &str =
    "key, bucket, count, sum, min, max, last_time, last_event_id, last_value";

/// Epoch-aligned rounding of a time to a multiple of `secs`.
fn floor_to(t: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    let s = t.timestamp().div_euclid(secs) * secs;
    DateTime::from_timestamp(s, 0).expect("a time rounded down is a time")
}

fn ceil_to(t: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    let f = floor_to(t, secs);
    if f == t {
        f
    } else {
        f + chrono::Duration::seconds(secs)
    }
}

/// Which source reads which part of `[from, to)`: the coarsest rollup whose slices nest in the
/// buckets reads the whole slices it can, the next finer one the whole slices at the edges,
/// and raw rows what is left. Every bucket then holds exactly the readings it would over raw
/// rows alone (while the raw rows are kept; after that, what the rollups still hold).
fn plan(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket_secs: i64,
    source: SourceParam,
) -> Vec<(Source, DateTime<Utc>, DateTime<Utc>)> {
    let mut parts = Vec::new();
    let levels: &[(Source, i64)] = match source {
        SourceParam::Raw => &[],
        SourceParam::Auto => &[(Source::Hour, 3600), (Source::Minute, 60)],
    };
    // The not yet covered ranges, refined level by level.
    let mut open = vec![(from, to)];
    for &(src, width) in levels {
        if bucket_secs % width != 0 {
            continue;
        }
        let mut rest = Vec::new();
        for (lo, hi) in open {
            let (a, b) = (ceil_to(lo, width), floor_to(hi, width));
            if a < b {
                parts.push((src, a, b));
                if lo < a {
                    rest.push((lo, a));
                }
                if b < hi {
                    rest.push((b, hi));
                }
            } else {
                rest.push((lo, hi));
            }
        }
        open = rest;
    }
    parts.extend(open.into_iter().map(|(lo, hi)| (Source::Raw, lo, hi)));
    parts
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
    let keys = match q.key {
        Some(Keys(k)) => k,
        None => device_keys(&s, &device, from, to).await?,
    };
    let parts = plan(from, to, secs, q.source);
    let mut union = Vec::with_capacity(parts.len());
    for (i, (src, _, _)) in parts.iter().enumerate() {
        union.push(src.partials(4 + 2 * i, 5 + 2 * i));
    }
    let sql = format!(
        "SELECT key, date_bin(make_interval(secs => $3), t, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS bucket,
                sum(n)::bigint AS n, sum(s) AS s, min(lo) AS lo, max(hi) AS hi,
                (array_agg(last_v ORDER BY last_t DESC, last_e DESC))[1] AS last
         FROM ({}) AS p(key, t, n, s, lo, hi, last_t, last_e, last_v)
         GROUP BY 1, 2 ORDER BY 1, 2",
        union.join(" UNION ALL ")
    );
    let mut query = sqlx::query(&sql)
        .bind(&device)
        .bind(&keys)
        .bind(secs as f64);
    for (_, lo, hi) in &parts {
        query = query.bind(*lo).bind(*hi);
    }
    let rows = if keys.is_empty() {
        Vec::new()
    } else {
        query.fetch_all(&s.pool).await?
    };
    let mut series: Vec<(String, Vec<Value>)> = Vec::new();
    for r in &rows {
        let key: String = r.get("key");
        let n: i64 = r.get("n");
        let value = match agg {
            Agg::Avg => r.get::<Option<f64>, _>("s").map(|s| s / n as f64),
            Agg::Min => r.get("lo"),
            Agg::Max => r.get("hi"),
            Agg::Count => Some(n as f64),
            Agg::Last => r.get("last"),
        };
        let point = json!({
            "time": format_time(&r.get::<DateTime<Utc>, _>("bucket")),
            "value": value,
            "count": n,
        });
        match series.last_mut() {
            Some((k, points)) if *k == key => points.push(point),
            _ => series.push((key, vec![point])),
        }
    }
    // Every key asked for has a series, empty or not, in the order asked.
    let series: Vec<Value> = keys
        .iter()
        .map(|k| {
            let points = series
                .iter()
                .find(|(key, _)| key == k)
                .map_or_else(Vec::new, |(_, p)| p.clone());
            json!({ "key": k, "points": points })
        })
        .collect();
    let mut sources: Vec<&str> = Vec::new();
    for (src, _, _) in &parts {
        if !sources.contains(&src.name()) {
            sources.push(src.name());
        }
    }
    let mut answer = json!({
        "device_id": device,
        "from": format_time(&from),
        "to": format_time(&to),
        "bucket": bucket.text,
        "bucket_seconds": secs,
        "agg": agg.name(),
        "sources": sources,
    });
    // One series (one key asked, or a device of one quantity) also answers as `points`, the
    // shape of this route before readings had several quantities.
    if series.len() <= 1 {
        answer["points"] = series.first().map_or(json!([]), |s| s["points"].clone());
    }
    answer["series"] = Value::Array(series);
    Ok(Json(answer))
}

/// The quantities a device reported between `from` and `to`, by name. Read from the hourly
/// rollup (a row per key and hour) and the last two hours' raw rows, which a late write to the
/// rollup could not yet cover, instead of every raw row of the range.
async fn device_keys(
    s: &QueryState,
    device: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<String>, QueryError> {
    let keys = sqlx::query_scalar(
        "SELECT key FROM tsdb.sensor_rollups_1h
         WHERE device_id = $1 AND bucket >= $2 AND bucket < $3
         UNION
         SELECT DISTINCT key FROM tsdb.sensor_readings
         WHERE device_id = $1 AND time >= greatest($4, $3 - interval '2 hours') AND time < $3
         ORDER BY 1
         LIMIT 1000",
    )
    .bind(device)
    .bind(floor_to(from, 3600))
    .bind(to)
    .bind(from)
    .fetch_all(&s.pool)
    .await?;
    Ok(keys)
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
        "SELECT event_id, device_id, key, time, value, score, is_anomaly, model, model_version
         FROM ai.inference_results
         WHERE ($1::text IS NULL OR device_id = $1) AND time >= $2 AND ($3 OR is_anomaly)
         ORDER BY time DESC, event_id DESC, key
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
                "key": r.get::<String, _>("key"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn names(p: &[(Source, DateTime<Utc>, DateTime<Utc>)]) -> Vec<(&str, String, String)> {
        p.iter()
            .map(|(s, a, b)| (s.name(), format_time(a), format_time(b)))
            .collect()
    }

    /// The parts tile [from, to) exactly, each with the coarsest source whose slices fit.
    #[test]
    fn hours_inside_minutes_at_the_edges_raw_at_the_very_edges() {
        let (from, to) = (t("2026-01-01T10:20:30Z"), t("2026-01-01T14:05:10Z"));
        let p = plan(from, to, 3600, SourceParam::Auto);
        let mut got = names(&p);
        got.sort_by(|a, b| a.1.cmp(&b.1));
        let z = |s: &str| format_time(&t(s));
        assert_eq!(
            got,
            [
                ("raw", z("2026-01-01T10:20:30Z"), z("2026-01-01T10:21:00Z")),
                (
                    "rollup_1m",
                    z("2026-01-01T10:21:00Z"),
                    z("2026-01-01T11:00:00Z")
                ),
                (
                    "rollup_1h",
                    z("2026-01-01T11:00:00Z"),
                    z("2026-01-01T14:00:00Z")
                ),
                (
                    "rollup_1m",
                    z("2026-01-01T14:00:00Z"),
                    z("2026-01-01T14:05:00Z")
                ),
                ("raw", z("2026-01-01T14:05:00Z"), z("2026-01-01T14:05:10Z")),
            ]
        );
        // A bucket the hour's slices do not nest in uses minutes; seconds use raw rows.
        let p = plan(from, to, 300, SourceParam::Auto);
        assert!(p.iter().all(|(s, _, _)| *s != Source::Hour));
        let p = plan(from, to, 90, SourceParam::Auto);
        assert!(p.iter().all(|(s, _, _)| *s == Source::Raw));
        assert_eq!(names(&plan(from, to, 3600, SourceParam::Raw)).len(), 1);
        // Aligned ends need no raw rows at all.
        let p = plan(
            t("2026-01-01T00:00:00Z"),
            t("2026-01-31T00:00:00Z"),
            3600,
            SourceParam::Auto,
        );
        assert_eq!(
            names(&p),
            [(
                "rollup_1h",
                z("2026-01-01T00:00:00Z"),
                z("2026-01-31T00:00:00Z")
            )]
        );
    }

    #[test]
    fn keys_are_quantity_names() {
        assert_eq!(Keys::try_from("a,b,a".to_string()).unwrap().0, ["a", "b"]);
        assert!(Keys::try_from("a,,b".to_string()).is_err());
        assert!(Keys::try_from("a;drop".to_string()).is_err());
        let many = (0..33)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(Keys::try_from(many).is_err());
    }
}
