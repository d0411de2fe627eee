//! The watched wire between a pool and PostgreSQL.
//!
//! A database that stops answering without closing its connections — a host that died, a
//! firewall or NAT that lost its state, a proxy whose upstream vanished — leaves every statement
//! in flight on them waiting for a reply that never comes. Nothing else ends that wait: sqlx 0.8
//! gives no access to its sockets (no keepalive, no read timeout) and bounds no statement on the
//! client, the services run their statements on the pool directly, and sqlx's own ping of a
//! connection given back to the pool waits just as long while holding a pool slot, so after a
//! while the pool is empty for good. `statement_timeout` cannot help: the server never sees the
//! statement, or its answer never arrives.
//!
//! So sqlx connects to a [`Relay`] on a Unix socket, and the relay to the server over TCP. It
//! copies bytes both ways and drops both ends once the server has been silent for the response
//! deadline after the client last sent something. The deadline exceeds `statement_timeout`, the
//! longest a healthy server stays silent before answering (with the rows or with the timeout
//! error), so a live server is never cut off. Dropping the pair fails sqlx's read at once: the
//! connection is discarded and its caller gets an I/O error — "unavailable", a 503 or a retry.
//!
//! TCP keepalive and `TCP_USER_TIMEOUT` on the relay's socket also find a dead host, even during
//! a long statement, but only when nothing between answers for it: a proxy or pooler in the path
//! answers keepalive probes itself, which is why the deadline is the part that always works. A
//! server that stops in the middle of a reply, after its first bytes, is not caught by the
//! deadline (the client sent nothing since); keepalive is what catches that, on a direct path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How the relay watches its connections.
#[derive(Debug, Clone, Copy)]
pub struct Wire {
    /// The server's longest silence after the client sent something.
    pub response: Duration,
    /// Idle time before TCP keepalive probes; also sets their interval and `TCP_USER_TIMEOUT`.
    pub keepalive: Duration,
    /// The longest a TCP connect may take (the pool gives up on its side after the acquire timeout).
    pub connect: Duration,
}

/// A relay's Unix socket, in a directory of its own; the accept loop stops and the directory is
/// removed when it is dropped (with the pool that holds it).
pub struct Relay {
    dir: PathBuf,
    stop: CancellationToken,
    /// Locked while the relay lives (and by the kernel until the process is gone), so a later
    /// process can tell a directory left by a killed one from a live one.
    _owner: std::fs::File,
}

impl Relay {
    /// Binds `<tmp>/cornjacket-db-<pid>-<n>/.s.PGSQL.<port>` (the name sqlx connects to for a
    /// socket directory and a port) and relays each connection to `host:port`. Needs a runtime.
    pub fn start(host: &str, port: u16, wire: Wire) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        // The listener registers with, and the accept loop runs on, the caller's runtime.
        let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| remove_abandoned(&std::env::temp_dir()));
        // Only this user may connect: the socket reaches the database with this host's address.
        let dir = loop {
            let dir = std::env::temp_dir().join(format!(
                "{PREFIX}{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                // A process with the same pid had it (one killed, or in another pid namespace).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let owner = std::fs::File::create(dir.join(OWNER))?;
        owner.try_lock().map_err(std::io::Error::other)?;
        let relay = Self {
            dir,
            stop: CancellationToken::new(),
            _owner: owner,
        };
        let listener = UnixListener::bind(relay.dir.join(format!(".s.PGSQL.{port}")))?;
        let target: Arc<str> = Arc::from(host);
        runtime.spawn(accept(listener, target, port, wire, relay.stop.clone()));
        Ok(relay)
    }

    /// The socket directory, for `PgConnectOptions::socket`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const PREFIX: &str = "cornjacket-db-";
const OWNER: &str = "owner.lock";

/// Removes the relay directories of processes that were killed before they could (their owner
/// lock is free). A directory younger than a minute is left alone: its relay may be starting.
fn remove_abandoned(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PREFIX));
        let settled = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(60));
        if !ours || !settled {
            continue;
        }
        if let Ok(lock) = std::fs::File::open(path.join(OWNER))
            && lock.try_lock().is_ok()
        {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

async fn accept(
    listener: UnixListener,
    host: Arc<str>,
    port: u16,
    wire: Wire,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, _)) => {
                tokio::spawn(relay(client, host.clone(), port, wire));
            }
            Err(e) => {
                // Out of file descriptors, typically: the pool's connect fails and is retried.
                tracing::warn!(error = %e, "Database relay could not accept a connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn relay(client: UnixStream, host: Arc<str>, port: u16, wire: Wire) {
    let server = match tokio::time::timeout(wire.connect, TcpStream::connect((&*host, port))).await
    {
        Ok(Ok(s)) => s,
        // Closing the client's end fails its connect at once.
        Ok(Err(e)) => {
            tracing::debug!(%host, port, error = %e, "Database connect failed.");
            return;
        }
        Err(_) => {
            tracing::debug!(%host, port, "Database connect timed out.");
            return;
        }
    };
    if let Err(e) = tune(&server, wire.keepalive) {
        tracing::debug!(error = %e, "Could not set TCP keepalive on a database connection.");
    }
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let start = Instant::now();
    // When the client last sent something the server has not answered yet: milliseconds since
    // `start`, plus one; 0 while nothing is awaited.
    let awaited = AtomicU64::new(0);
    let sent = Notify::new();

    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from_client.read(&mut buf).await?;
            if n == 0 {
                return to_server.shutdown().await;
            }
            // Before writing: a write the server no longer reads counts as waiting, too.
            awaited.store(start.elapsed().as_millis() as u64 + 1, Ordering::Release);
            sent.notify_one();
            to_server.write_all(&buf[..n]).await?;
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from_server.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            awaited.store(0, Ordering::Release);
            to_client.write_all(&buf[..n]).await?;
        }
    };
    let watch = async {
        loop {
            let since = awaited.load(Ordering::Acquire);
            if since == 0 {
                sent.notified().await;
                continue;
            }
            tokio::time::sleep_until(start + Duration::from_millis(since - 1) + wire.response)
                .await;
            if awaited.load(Ordering::Acquire) == since {
                return;
            }
        }
    };
    tokio::select! {
        r = upstream => if let Err(e) = r {
            tracing::debug!(error = %e, "Database relay: client side closed.");
        },
        r = downstream => if let Err(e) = r {
            tracing::debug!(error = %e, "Database relay: server side closed.");
        },
        () = watch => {
            metrics::counter!("cj_db_connections_dropped_total").increment(1);
            tracing::warn!(%host, port, deadline = ?wire.response, "The database did not answer in time; dropping the connection.");
        }
    }
}

/// Keepalive probes after `idle`, every third of it, three of them; and a connection whose sent
/// data stays unacknowledged for as long is given up (Linux `TCP_USER_TIMEOUT`; without it the
/// kernel retransmits for about 15 minutes).
fn tune(stream: &TcpStream, idle: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let interval = (idle / 3).max(Duration::from_secs(1));
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let keepalive = keepalive.with_retries(3);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(idle + interval * 3))?;
    Ok(())
}
