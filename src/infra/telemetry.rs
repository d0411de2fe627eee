//! Logs (JSON or text), traces (OpenTelemetry, exported over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and the Prometheus metrics registry, set up once per
//! process.
//!
//! Tracing follows one event end to end (SPEC §13): the HTTP request's span (continuing the
//! client's `traceparent`), its outbox insert, the processor's publish (whose context travels as
//! the bus header `traceparent`), each consumer's handling, and each webhook call (which sends its
//! own context on). Per-event spans are created only while traces are exported, so the hot paths
//! pay nothing when they are not.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::PrometheusHandle;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};
use crate::envelope::trace;

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();
static TRACES: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the log subscriber, and trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; a
/// second call (tests) is a no-op.
pub fn init_logging(config: &Config) {
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => match otlp_provider() {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!(
                    "cornjacket: traces disabled: could not set up OTLP export to {endpoint}: {e}"
                );
                None
            }
        },
        _ => None,
    };
    init_with_traces(config, provider);
}

/// OTLP over HTTP/protobuf; the exporter reads the standard `OTEL_EXPORTER_OTLP_*` variables.
/// Batches are sent from the tokio runtime.
fn otlp_provider() -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let batch =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(resource())
        .build())
}

/// The resource every span carries (`OTEL_SERVICE_NAME` overrides the service name).
pub fn resource() -> opentelemetry_sdk::Resource {
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "cornjacket".to_string());
    opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build()
}

/// Installs logs and, with a provider, the OpenTelemetry layer (tests pass one with an in-memory
/// exporter). Log filtering (`CJ_LOG_LEVEL`) applies to logs only: spans of the platform are
/// exported whatever the log level.
pub fn init_with_traces(config: &Config, provider: Option<SdkTracerProvider>) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_filter(filter).boxed(),
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("cornjacket"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("cornjacket", tracing::Level::INFO),
            )
    });
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && let Some(p) = provider {
        let _ = PROVIDER.set(p);
        TRACES.store(true, Ordering::Release);
    }
}

/// Whether spans are exported (per-event spans are created only then).
pub fn traces_on() -> bool {
    TRACES.load(Ordering::Acquire)
}

/// Sends the spans still buffered and stops export (at shutdown).
pub fn shutdown_traces() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.force_flush() {
            tracing::warn!(error = %e, "Could not flush traces.");
        }
        let _ = p.shutdown();
    }
}

/// Sends the spans still buffered, keeping export on (tests read them after this).
pub fn flush_traces() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

/// The trace context of a W3C `traceparent`, when it is a valid one.
pub fn context_of(traceparent: Option<&str>) -> Option<opentelemetry::Context> {
    let tp = traceparent?;
    let carrier = HashMap::from([(trace::HEADER.to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` naming a span (so what follows it becomes its child); `None` when traces
/// are off or the span is disabled.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !traces_on() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| trace::format(sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// A span for one event's step, continuing the event's trace; disabled (free) when traces are
/// off.
pub fn event_span(name: &'static str, traceparent: Option<&str>, event_id: &str) -> tracing::Span {
    if !traces_on() {
        return tracing::Span::none();
    }
    with_parent(
        tracing::info_span!("event", otel.name = name, event_id = event_id),
        traceparent,
    )
}

/// Makes `span` continue the trace of `traceparent` (when valid).
pub fn with_parent(span: tracing::Span, traceparent: Option<&str>) -> tracing::Span {
    if let Some(cx) = context_of(traceparent) {
        let _ = span.set_parent(cx);
    }
    span
}

/// The process-wide metrics registry, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let recorder = super::metrics_catalogue::builder().build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is installed (a test binary); that one keeps working.
        if metrics::set_global_recorder(recorder).is_ok() {
            super::metrics_catalogue::describe();
        }
        handle
    })
}

pub fn render_metrics() -> String {
    metrics_handle().render()
}

/// Counts requests by route and status and records their latency; when traces are on, runs the
/// request in a span that continues the client's `traceparent`.
pub async fn http_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    // A label from the request must stay bounded: any method outside the standard ones is one.
    let method = match *req.method() {
        axum::http::Method::GET
        | axum::http::Method::POST
        | axum::http::Method::PUT
        | axum::http::Method::PATCH
        | axum::http::Method::DELETE
        | axum::http::Method::HEAD
        | axum::http::Method::OPTIONS => req.method().to_string(),
        _ => "other".to_string(),
    };
    let resp = if traces_on() {
        let span = tracing::info_span!(
            "http",
            otel.name = format!("{method} {route}"),
            otel.kind = "server",
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let parent = req
            .headers()
            .get(trace::HEADER)
            .and_then(|v| v.to_str().ok());
        if let Some(cx) = context_of(parent) {
            let _ = span.set_parent(cx);
        }
        if let Some(tp) = traceparent_of(&span)
            && let Some(id) = trace::trace_id_of(&tp)
        {
            // Log lines of the request carry its trace id.
            span.record("trace_id", id);
        }
        let resp = next.run(req).instrument(span.clone()).await;
        span.record("http.response.status_code", resp.status().as_u16());
        resp
    } else {
        next.run(req).await
    };
    let status = resp.status().as_u16().to_string();
    metrics::counter!("cj_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status).increment(1);
    metrics::histogram!("cj_http_request_duration_seconds", "route" => route, "method" => method)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// A progress bar with rate and ETA for the maintenance commands (replay, rebuild); hidden when
/// the output is not a terminal.
pub fn progress_bar(total: u64, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} events  {per_sec}  eta {eta}",
        )
        .expect("static template"),
    );
    b
}
