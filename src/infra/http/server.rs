//! Serving a router on a bound listener: graceful shutdown, and the limits that keep slow or idle
//! clients from holding a port (`CJ_HTTP_*`; in `app` auth mode nothing in front of the platform
//! enforces any).
//!
//! This is axum::serve's loop (hyper-util's auto builder: HTTP/1.1 and h2c), which exposes none of
//! them, plus:
//! - a connection limit: a slot of a semaphore is taken before each accept and held by the
//!   connection, so past the limit new clients wait in the listen backlog;
//! - per connection, the phase it is in and a timer for that phase's limit: the headers of a
//!   request (from the connection opening, or from the request's first byte), and keep-alive
//!   idleness between requests. hyper's own header timeout runs from when it starts waiting for
//!   a request, so on a keep-alive connection it is the idle limit too; but a gateway keeps idle
//!   upstream connections longer (Traefik: 90 s) than a client should take to send its headers;
//! - a deadline on each request body, answered with 408.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error_body;
use crate::config::HttpLimits;
use crate::infra::telemetry;

/// Serves a router on an already-bound listener until `shutdown` fires, then drains in-flight
/// requests (bounded by `drain`).
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: HttpLimits,
    drain: Duration,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(service = name, %addr, "Listening.");
    // The metrics layer outermost, so it counts the 408s.
    let router = router
        .layer(axum::middleware::from_fn_with_state(
            limits.body_timeout,
            body_deadline,
        ))
        .layer(axum::middleware::from_fn(telemetry::http_metrics));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Finished connections are reaped as they go (an empty set disables this branch).
            Some(_) = connections.join_next() => {}
            (stream, peer, slot) = accept(&listener, &slots) => {
                connections.spawn(connection(
                    name,
                    stream,
                    peer,
                    router.clone(),
                    limits,
                    shutdown.clone(),
                    slot,
                ));
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            service = name,
            "HTTP drain deadline passed; closing open connections."
        );
        connections.abort_all();
    }
    Ok(())
}

/// The next connection, once a slot is free. Cancel-safe: a slot taken for an accept that is
/// cancelled goes back.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let slot = slots.clone().acquire_owned().await.expect("never closed");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => return (stream, peer, slot),
            // The client gave up before we got to it: nothing to do.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => {}
            // Out of file descriptors, typically: wait for some to close.
            Err(e) => {
                tracing::error!(error = %e, "Could not accept a connection; retrying in 1 s.");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn connection(
    name: &'static str,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let open = metrics::gauge!("cj_http_open_connections", "service" => name);
    open.increment(1.0);
    let phase = Arc::new(Phase::new());
    let io = TokioIo::new(Watched {
        io: stream,
        phase: phase.clone(),
        first_read: true,
        h2: false,
    });
    let service = Tracked {
        router,
        peer,
        phase: phase.clone(),
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut shutting_down = false;
    // When this connection was asked to close for idleness.
    let mut closing: Option<Instant> = None;
    loop {
        let due = match closing {
            // A response the client does not read keeps a graceful close waiting.
            Some(asked) => Some(asked + limits.header_timeout),
            None => phase.due(&limits),
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error.");
                }
                break;
            }
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = phase.changed.notified() => {}
            _ = sleep_until(due) => {
                if closing.is_some() {
                    break;
                }
                match phase.expired(&limits) {
                    Some(Expired::Headers) => {
                        metrics::counter!("cj_http_header_timeouts_total", "service" => name)
                            .increment(1);
                        tracing::debug!(%peer, "Request headers too slow; closing the connection.");
                        break;
                    }
                    Some(Expired::Idle) => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    None => {}
                }
            }
        }
    }
    open.decrement(1.0);
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Where a connection is: which limit applies, from when.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Waiting for a request's headers to be complete, since the connection opened or the
    /// request's first byte arrived.
    Headers(Instant),
    /// Requests being handled (their bodies have their own deadline).
    Busy(usize),
    /// Keep-alive, no request since.
    Idle(Instant),
}

enum Expired {
    Headers,
    Idle,
}

/// A connection's state, moved by its reads and its requests; the connection task waits on
/// `changed` to re-arm its timer.
struct Phase {
    stage: Mutex<Stage>,
    changed: Notify,
}

impl Phase {
    fn new() -> Self {
        Self {
            stage: Mutex::new(Stage::Headers(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn set(&self, f: impl FnOnce(Stage) -> Stage) {
        let mut s = self.stage.lock().expect("phase lock");
        *s = f(*s);
        drop(s);
        self.changed.notify_one();
    }

    fn bytes_arrived(&self) {
        let mut s = self.stage.lock().expect("phase lock");
        if let Stage::Idle(_) = *s {
            *s = Stage::Headers(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.set(|s| match s {
            Stage::Busy(n) => Stage::Busy(n + 1),
            _ => Stage::Busy(1),
        });
    }

    fn request_ended(&self) {
        self.set(|s| match s {
            Stage::Busy(n) if n > 1 => Stage::Busy(n - 1),
            _ => Stage::Idle(Instant::now()),
        });
    }

    fn due(&self, limits: &HttpLimits) -> Option<Instant> {
        match *self.stage.lock().expect("phase lock") {
            Stage::Headers(since) => Some(since + limits.header_timeout),
            Stage::Idle(since) => Some(since + limits.idle_timeout),
            Stage::Busy(_) => None,
        }
    }

    fn expired(&self, limits: &HttpLimits) -> Option<Expired> {
        let now = Instant::now();
        match *self.stage.lock().expect("phase lock") {
            Stage::Headers(since) if now >= since + limits.header_timeout => Some(Expired::Headers),
            Stage::Idle(since) if now >= since + limits.idle_timeout => Some(Expired::Idle),
            _ => None,
        }
    }
}

/// The connection's socket, reporting the first byte after an idle spell (the start of the next
/// request's headers).
struct Watched {
    io: TcpStream,
    phase: Arc<Phase>,
    first_read: bool,
    /// h2 frames (pings, window updates) flow between requests: only requests count there.
    h2: bool,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            if this.first_read {
                this.first_read = false;
                // The h2c preface; no HTTP/1 method is PRI.
                this.h2 = read.starts_with(b"PRI ");
            }
            if !this.h2 {
                this.phase.bytes_arrived();
            }
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The router for one connection: adds the peer address (`ConnectInfo`, read by the per-client
/// rate limit) and marks each request's start and end.
#[derive(Clone)]
struct Tracked {
    router: Router,
    peer: SocketAddr,
    phase: Arc<Phase>,
}

impl tower::Service<hyper::Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let handling = Handling::new(self.phase.clone());
        let call = tower::ServiceExt::oneshot(self.router.clone(), req.map(Body::new));
        Box::pin(async move {
            let r = call.await;
            drop(handling);
            r
        })
    }
}

/// A request in progress; dropped when its response is ready or hyper gave up on it.
struct Handling(Arc<Phase>);

impl Handling {
    fn new(phase: Arc<Phase>) -> Self {
        phase.request_started();
        Self(phase)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// Middleware: a request whose body did not arrive within `limit` of its headers is answered
/// 408, and the connection closed (the rest of the body will not be read).
async fn body_deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(DeadlineBody {
            body,
            deadline: Box::pin(tokio::time::sleep(limit)),
            expired: expired.clone(),
        })
    });
    let response = next.run(req).await;
    if !expired.load(Ordering::Acquire) {
        return response;
    }
    let mut r = error_body(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body did not arrive within {}",
            humantime::format_duration(limit)
        ),
        json!([]),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

struct DeadlineBody {
    body: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
