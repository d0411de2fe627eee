//! Starts the enabled services under one root cancellation token (STYLE §1–§3).
//!
//! Every listener is bound before anything runs, so a port clash fails the whole process at
//! once. Any service's fatal error cancels the others; the process drains within the configured
//! deadline and exits non-zero. SIGTERM/SIGINT drain and exit 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::envelope::{Clock, SystemClock};
use crate::infra::db;
use crate::services::{self, Service, ServiceContext};

/// A running platform: where it listens and how to stop it.
pub struct Platform {
    /// Each service's main port (absent for a service sharing another's port).
    pub addrs: HashMap<Service, SocketAddr>,
    /// Separate health ports (the action orchestrator's).
    pub health_addrs: HashMap<Service, SocketAddr>,
    pub shutdown: CancellationToken,
    tasks: JoinSet<(Service, anyhow::Result<()>)>,
    config: Arc<Config>,
}

/// Binds every enabled service's port, then starts them. A bind failure is returned before any
/// service runs.
pub async fn start(
    config: Config,
    enabled: &[Service],
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Platform> {
    let config = Arc::new(config);
    // Install the metrics recorder before any service records: until it exists, counters and
    // gauges go nowhere (it used to appear with the first /metrics scrape).
    crate::infra::telemetry::metrics_handle();
    let auth = crate::infra::auth::Auth::from_config(&config.auth, services::scope_rules())
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut bound = Vec::new();
    // In a fixed order, so the event handler (not the tsdb-writer) serves their shared port
    // whatever order `--services` names them in.
    let mut enabled = enabled.to_vec();
    enabled.sort_by_key(|s| Service::ALL.iter().position(|a| a == s));
    enabled.dedup();
    for &svc in &enabled {
        // See `Service::health_only` for who shares a port.
        let port = svc.port(&config);
        let shares = svc.health_only()
            && port != 0
            && enabled
                .iter()
                .take_while(|s| **s != svc)
                .any(|s| s.health_only() && s.port(&config) == port);
        let listener = if shares {
            None
        } else {
            Some(bind(&config, svc, port).await?)
        };
        let health = match svc.health_port(&config) {
            Some(p) => Some(bind(&config, svc, p).await?),
            None => None,
        };
        bound.push((svc, listener, health));
    }

    let shutdown = CancellationToken::new();
    let mut addrs = HashMap::new();
    let mut health_addrs = HashMap::new();
    let mut tasks = JoinSet::new();
    let board = crate::infra::http::HealthBoard::default();
    let common = Arc::new(config.common());
    for (svc, listener, health_listener) in bound {
        if let Some(l) = &listener {
            addrs.insert(svc, l.local_addr()?);
        }
        if let Some(l) = &health_listener {
            health_addrs.insert(svc, l.local_addr()?);
        }
        let max = config.db_max_connections;
        let token = shutdown.child_token();
        let url = svc.database_url(&config);
        let ctx = ServiceContext {
            db: db::lazy_pool(url, &config, max)?,
            db_url: secrecy::SecretString::from(url.to_string()),
            port: svc.port(&config),
            common: common.clone(),
            config: (),
            listener,
            health_listener,
            board: board.clone(),
            shutdown: token.clone(),
            clock: clock.clone(),
            auth: auth.clone(),
            jobs: crate::infra::jobs::Jobs::new(token),
        };
        let root = shutdown.clone();
        let (ingestion, eventhandler, tsdb, actions, console) = (
            config.ingestion_section(),
            config.eventhandler.clone(),
            config.tsdb.clone(),
            config.actions.clone(),
            {
                // The console is last in `Service::ALL`: every other service of this process
                // is bound by now.
                let mut c = config.console.clone();
                let port = |svc: Service| addrs.get(&svc).map(|a: &SocketAddr| a.port());
                c.resolve_local(
                    &config.ports,
                    crate::config::LocalPorts {
                        ingestion: port(Service::Ingestion),
                        query: port(Service::Query),
                        actions: port(Service::Actions),
                        actions_health: health_addrs
                            .get(&Service::Actions)
                            .map(|a: &SocketAddr| a.port()),
                        // A tsdb-writer sharing the event handler's port has no address of its own.
                        eventhandler_health: port(Service::Eventhandler).or(port(Service::Tsdb)),
                        tsdb_health: port(Service::Tsdb).or(port(Service::Eventhandler)),
                    },
                );
                c
            },
        );
        tasks.spawn(async move {
            let r = match svc {
                Service::Ingestion => services::ingestion::run(ctx.with(ingestion)).await,
                Service::Eventhandler => services::eventhandler::run(ctx.with(eventhandler)).await,
                Service::Tsdb => services::tsdb::run(ctx.with(tsdb)).await,
                Service::Query => services::query::run(ctx).await,
                Service::Actions => services::actions::run(ctx.with(actions)).await,
                Service::Console => services::console::run(ctx.with(console)).await,
            };
            // Whatever ended a service — error or unexpected return — ends the process.
            root.cancel();
            (svc, r)
        });
    }
    Ok(Platform {
        addrs,
        health_addrs,
        shutdown,
        tasks,
        config,
    })
}

async fn bind(config: &Config, svc: Service, port: u16) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(config.bind_addr, port);
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{} could not bind port {addr}", svc.name()))
}

impl Platform {
    /// Waits for every service to finish; false when any failed or the drain deadline passed.
    /// The deadline runs from the moment shutdown begins (a signal or a failure), so a service
    /// stuck on a silent network peer cannot keep the process alive.
    pub async fn wait(mut self) -> bool {
        let mut ok = true;
        let deadline = self.config.shutdown_timeout;
        let token = self.shutdown.clone();
        let hard_stop = async move {
            token.cancelled().await;
            tokio::time::sleep(deadline).await;
        };
        tokio::pin!(hard_stop);
        loop {
            let joined = tokio::select! {
                j = self.tasks.join_next() => match j {
                    Some(j) => j,
                    None => break,
                },
                _ = &mut hard_stop => {
                    tracing::error!(?deadline, "Services did not stop before the deadline; exiting anyway.");
                    self.tasks.abort_all();
                    return false;
                }
            };
            match joined {
                Ok((svc, Ok(()))) if self.shutdown.is_cancelled() => {
                    tracing::info!(service = svc.name(), "Service stopped.");
                }
                Ok((svc, Ok(()))) => {
                    tracing::error!(service = svc.name(), "Service ended unexpectedly.");
                    ok = false;
                }
                Ok((svc, Err(e))) => {
                    tracing::error!(service = svc.name(), error = ?e, "Service failed; shutting down.");
                    ok = false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "Service task panicked; shutting down.");
                    ok = false;
                }
            }
            self.shutdown.cancel();
        }
        ok
    }
}

/// `cornjacket serve`: run until a signal or a failure. Returns the process exit code.
pub async fn serve(config: Config, enabled: &[Service]) -> i32 {
    let platform = match start(config, enabled, Arc::new(SystemClock)).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Startup failed.");
            eprintln!("cornjacket: startup failed: {e:#}");
            return 1;
        }
    };
    let mut ports: Vec<_> = platform
        .addrs
        .iter()
        .chain(platform.health_addrs.iter())
        .collect();
    ports.sort_by_key(|(_, a)| a.port());
    for (svc, addr) in ports {
        tracing::info!(service = svc.name(), %addr, "Service port.");
        eprintln!("cornjacket: {:<13} http://{addr}/health", svc.name());
    }
    let token = platform.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Signal received; draining.");
        token.cancel();
    });
    let ok = platform.wait().await;
    // Spans of the drain itself are exported too.
    crate::infra::telemetry::shutdown_traces();
    if ok { 0 } else { 1 }
}

/// SIGTERM or SIGINT, whichever comes first (also `cornjacket webhook listen`'s stop).
pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
