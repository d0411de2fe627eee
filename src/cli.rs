//! The command line: `serve`, `migrate`, `dlq`, `outbox`, `replay`, `projections`, `retention`,
//! `token`, `devices`, `simulate`, `actions recover` (re-send failed webhook deliveries) and `webhook listen`
//! (a local receiver that verifies and prints webhooks, for development).

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use uuid::Uuid;

use crate::config::Config;
use crate::infra::webhook_signature::Secret;
use crate::infra::{auth, db, dlq, telemetry};
use crate::services::Service;
use crate::services::eventhandler::rebuild;
use crate::services::ingestion::{devices, quarantine, replay};

#[derive(Parser, Debug)]
#[command(name = "cornjacket", version, about = "Cornjacket event platform", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the platform's services (all by default), each on its own port.
    Serve {
        /// Comma-separated subset to run, e.g. `ingestion,query`.
        #[arg(long, value_delimiter = ',', value_enum)]
        services: Vec<Service>,
    },
    /// Apply database migrations (every service's by default) and exit.
    Migrate {
        /// Only this service's schema.
        #[arg(long, value_enum)]
        service: Option<MigratableService>,
    },
    /// Inspect and act on every consumer's dead letters (event handler, tsdb-writer, action orchestrator, ai-inference).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// The ingestion outbox: its quarantine of rows that could never move.
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Republish events from the event store to their topics (refills a bus that lost them).
    Replay {
        /// Events whose event_time is at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        since: chrono::DateTime<chrono::Utc>,
        /// ... and before this one.
        #[arg(long, value_parser = parse_time)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long)]
        aggregate: Option<String>,
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Count what would be sent, send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Read-model maintenance.
    Projections {
        #[command(subcommand)]
        action: ProjectionsAction,
    },
    /// Data retention (SPEC §13).
    Retention {
        #[command(subcommand)]
        action: RetentionAction,
    },
    /// MQTT device identities at the broker: each device logs in with its device id as the
    /// username and may publish only devices/<id>/events and read only devices/<id>/errors.
    Devices {
        #[command(subcommand)]
        action: DevicesAction,
    },
    /// Webhook deliveries of the action orchestrator.
    Actions {
        #[command(subcommand)]
        action: ActionsAction,
    },
    /// Webhook tools for development.
    Webhook {
        #[command(subcommand)]
        action: WebhookAction,
    },
    /// Simulated sensors sending realistic readings (HTTP or MQTT) with occasional outliers,
    /// so the console has devices, charts and anomalies to show.
    Simulate(crate::simulate::SimulateArgs),
    /// Mint a development JWT (HS256, from CJ_JWT_SECRET) and print it.
    Token {
        /// The subject (`sub`), e.g. a device or service name.
        #[arg(long)]
        sub: String,
        /// Scopes, comma- or space-separated: ingest:write, query:read, actions:admin.
        #[arg(long, default_value = "ingest:write query:read")]
        scopes: String,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum DevicesAction {
    /// Provision a device; without --password one is generated and printed (only this once).
    Add {
        device_id: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// The provisioned device ids, one a line.
    List,
    /// Delete a device (the broker disconnects it if connected).
    Remove { device_id: String },
    /// Give a device a new password; without --password one is generated and printed.
    Rotate {
        device_id: String,
        #[arg(long)]
        password: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ActionsAction {
    /// Send again every delivery recorded since a time that ended failed or circuit_open, with a
    /// fresh retry schedule (running it twice re-sends nothing twice).
    Recover {
        /// Deliveries recorded at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        since: chrono::DateTime<chrono::Utc>,
        /// Only this rule's.
        #[arg(long)]
        rule: Option<Uuid>,
    },
}

#[derive(Subcommand, Debug)]
pub enum WebhookAction {
    /// Receive webhooks on loopback, verify their Standard Webhooks signatures and print them:
    /// 204 when verified, 401 when not, 400 without the webhook headers.
    Listen {
        /// Where to listen.
        #[arg(default_value = "127.0.0.1:9000")]
        addr: SocketAddr,
        /// A rule's secret (whsec_…); repeat it (or separate with commas) to accept any of
        /// several, as during a rotation.
        #[arg(
            long = "secret",
            value_name = "WHSEC",
            env = "CJ_WEBHOOK_SECRET",
            hide_env_values = true,
            required = true,
            value_delimiter = ',',
            value_parser = parse_secret
        )]
        secrets: Vec<Secret>,
    },
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    s.parse().map_err(|e| format!("{e}"))
}

#[derive(Subcommand, Debug)]
pub enum ProjectionsAction {
    /// Recompute projections from the event store, without the bus.
    Rebuild {
        /// Only this projection type (sensor_state, user_session).
        #[arg(long = "type")]
        projection_type: Option<String>,
        /// Count what would be read, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RetentionAction {
    /// Run the retention jobs of the ingestion and event handler schemas once (even when
    /// CJ_RETENTION_ENABLED=false) and print what they removed.
    Run {
        /// Print what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| format!("'{s}' is not an RFC 3339 time such as 2026-11-23T10:00:00Z"))
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MigratableService {
    Ingestion,
    Eventhandler,
    Tsdb,
    Actions,
}

impl From<MigratableService> for Service {
    fn from(s: MigratableService) -> Self {
        match s {
            MigratableService::Ingestion => Service::Ingestion,
            MigratableService::Eventhandler => Service::Eventhandler,
            MigratableService::Tsdb => Service::Tsdb,
            MigratableService::Actions => Service::Actions,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum OutboxAction {
    /// Rows the processor quarantined (each alone, with the error that no retry could fix).
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum QuarantineAction {
    /// List quarantined rows as JSON lines, oldest first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Put a quarantined row (or all of them) back at the end of its shard of the outbox.
    Requeue {
        #[arg(required_unless_present = "all")]
        seq: Option<i64>,
        #[arg(long, conflicts_with = "seq")]
        all: bool,
    },
    /// Drop a quarantined row for good (its event never reaches the event store or the bus).
    Discard { seq: i64 },
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// List every consumer's dead letters as JSON lines.
    List {
        /// Only this consumer's: eventhandler, tsdb, actions, ai, or a consumer group.
        #[arg(long)]
        consumer: Option<String>,
        /// pending, replaying, replayed or discarded.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Re-run its consumer on a pending dead letter (or on all of them, of every consumer).
    Replay {
        #[arg(required_unless_present = "all")]
        id: Option<Uuid>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Mark a pending dead letter as discarded.
    Discard { id: Uuid },
}

/// Runs the command line; returns the process exit code.
pub async fn main() -> i32 {
    let cli = Cli::parse();
    // A receiver needs none of the platform's configuration, and a half-configured checkout
    // (a bad .env) must not keep it from starting.
    if let Command::Webhook {
        action: WebhookAction::Listen { addr, secrets },
    } = cli.command
    {
        return report(
            crate::webhook_listen::run(addr, secrets)
                .await
                .map(|()| 0)
                .map_err(Into::into),
        );
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cornjacket: {e}");
            return 2;
        }
    };
    telemetry::init_logging(&config);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    match cli.command {
        Command::Serve { services } => {
            let services = if services.is_empty() {
                Service::ALL.to_vec()
            } else {
                services
            };
            crate::supervisor::serve(config, &services).await
        }
        Command::Migrate { service } => {
            let targets: Vec<(Service, &db::Migrations)> = match service {
                Some(s) => Vec::from([Service::from(s)]),
                None => Service::ALL.to_vec(),
            }
            .into_iter()
            .filter_map(|s| s.migrations().map(|m| (s, m)))
            .collect();
            for (service, m) in targets {
                let name = m.schema;
                match db::migrate(config.database_url(service), m).await {
                    Ok(r) => println!(
                        "{name}: {} migration(s) applied",
                        r.applied_migrations().len()
                    ),
                    Err(e) => {
                        eprintln!("cornjacket: {name}: {e}");
                        return 1;
                    }
                }
            }
            0
        }
        Command::Token { sub, scopes, ttl } => token(&config, &sub, &scopes, ttl),
        Command::Simulate(args) => match crate::simulate::run(&config, args).await {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("cornjacket: {e}");
                1
            }
        },
        Command::Actions {
            action: ActionsAction::Recover { since, rule },
        } => report(recover_cmd(&config, since, rule).await),
        Command::Webhook { .. } => unreachable!("served before the configuration is read"),
        Command::Devices { action } => report(devices_cmd(&config, action).await),
        Command::Replay {
            since,
            until,
            aggregate,
            event_type,
            dry_run,
        } => {
            let filter = replay::ReplayFilter {
                since: Some(since),
                until,
                aggregate_id: aggregate,
                event_type,
            };
            report(replay_cmd(&config, &filter, dry_run).await)
        }
        Command::Projections {
            action:
                ProjectionsAction::Rebuild {
                    projection_type,
                    dry_run,
                },
        } => report(rebuild_cmd(&config, projection_type.as_deref(), dry_run).await),
        Command::Retention {
            action: RetentionAction::Run { dry_run },
        } => report(retention_cmd(&config, dry_run).await),
        Command::Outbox {
            action: OutboxAction::Quarantine { action },
        } => match quarantine_cmd(&config, action).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("cornjacket: {e:#}");
                1
            }
        },
        Command::Dlq { action } => match dlq(&config, action).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("cornjacket: {e:#}");
                1
            }
        },
    }
}

async fn devices_cmd(config: &Config, action: DevicesAction) -> anyhow::Result<i32> {
    let Some(mqtt) = &config.mqtt else {
        anyhow::bail!("MQTT is off (CJ_MQTT_URL=off): set CJ_MQTT_URL to the broker");
    };
    let mut admin = devices::Admin::connect(mqtt).await?;
    match action {
        DevicesAction::Add {
            device_id,
            password,
        } => {
            let generated = password.is_none();
            let password = password.unwrap_or_else(devices::generate_password);
            admin.add(&device_id, &password).await?;
            println!(
                "device {device_id} added: MQTT username {device_id}, publishes to devices/{device_id}/events"
            );
            if generated {
                println!("password: {password}");
                eprintln!("(shown only now: store it on the device)");
            }
        }
        DevicesAction::List => {
            for id in admin.list().await? {
                println!("{id}");
            }
        }
        DevicesAction::Remove { device_id } => {
            admin.remove(&device_id).await?;
            println!("device {device_id} removed");
        }
        DevicesAction::Rotate {
            device_id,
            password,
        } => {
            let generated = password.is_none();
            let password = password.unwrap_or_else(devices::generate_password);
            admin.rotate(&device_id, &password).await?;
            println!("device {device_id}: password changed");
            if generated {
                println!("password: {password}");
                eprintln!("(shown only now: store it on the device)");
            }
        }
    }
    Ok(0)
}

fn report(r: anyhow::Result<i32>) -> i32 {
    r.unwrap_or_else(|e| {
        eprintln!("cornjacket: {e:#}");
        1
    })
}

async fn recover_cmd(
    config: &Config,
    since: chrono::DateTime<chrono::Utc>,
    rule: Option<Uuid>,
) -> anyhow::Result<i32> {
    let pool = db::lazy_pool(config.database_url(Service::Actions), config, 2)?;
    let n = crate::services::actions::recover(&pool, since, rule).await?;
    println!("requeued {n} deliveries");
    Ok(0)
}

async fn replay_cmd(
    config: &Config,
    f: &replay::ReplayFilter,
    dry_run: bool,
) -> anyhow::Result<i32> {
    let pool = db::lazy_pool(config.database_url(Service::Ingestion), config, 2)?;
    if dry_run {
        println!(
            "{} event(s) would be republished",
            replay::count(&pool, f).await?
        );
        return Ok(0);
    }
    let sent = replay::replay(
        &pool,
        &config.kafka,
        f,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    )
    .await?;
    println!("{sent} event(s) republished");
    Ok(0)
}

async fn rebuild_cmd(
    config: &Config,
    projection: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<i32> {
    if let Some(p) = projection
        && !crate::envelope::PROJECTION_TYPES.contains(&p)
    {
        anyhow::bail!(
            "unknown projection type '{p}'; known: {}",
            crate::envelope::PROJECTION_TYPES.join(", ")
        );
    }
    let events = db::lazy_pool(config.database_url(Service::Ingestion), config, 2)?;
    if dry_run {
        println!(
            "{} event(s) would be read",
            rebuild::count(&events, projection).await?
        );
        return Ok(0);
    }
    let projections = db::lazy_pool(config.database_url(Service::Eventhandler), config, 2)?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (read, refused) = rebuild::rebuild(&events, &projections, projection, progress).await?;
    println!("{read} event(s) read, {refused} refused by their handler");
    Ok(0)
}

async fn retention_cmd(config: &Config, dry_run: bool) -> anyhow::Result<i32> {
    use crate::services::{eventhandler, ingestion};
    let now = crate::envelope::Clock::now(&crate::envelope::SystemClock);
    let never = tokio_util::sync::CancellationToken::new();
    let verb = |done: &'static str| {
        if dry_run {
            format!("would be {done}")
        } else {
            done.to_string()
        }
    };
    let events = db::lazy_pool(config.database_url(Service::Ingestion), config, 2)?;
    let projections = db::lazy_pool(config.database_url(Service::Eventhandler), config, 2)?;
    // The services' guard: no cutoff from a host clock the database disagrees with.
    for (job, pool) in [("ingestion", &events), ("eventhandler", &projections)] {
        let guard = crate::infra::clock_guard::ClockGuard {
            job,
            clock: std::sync::Arc::new(crate::envelope::SystemClock),
            max_skew: config.retention.max_clock_skew,
            state: Default::default(),
        };
        if guard.now(pool).await.is_none() {
            anyhow::bail!(guard.state.refusal().unwrap_or_else(|| format!(
                "retention does not run: the {job} database's clock could not be read"
            )));
        }
    }
    let r = ingestion::retention::enforce(&events, now, config.retention.events, dry_run, &never)
        .await?;
    for name in &r.created {
        println!(
            "ingestion.event_store: partition {name} {}",
            verb("created")
        );
    }
    for p in &r.dropped {
        let rows = if p.rows_estimate >= 0 {
            format!(", about {} rows", p.rows_estimate)
        } else {
            String::new()
        };
        println!(
            "ingestion.event_store: partition {} (day {}{rows}) {}",
            p.name,
            p.day,
            verb("dropped")
        );
    }
    let eh = eventhandler::retention::enforce(
        &projections,
        now,
        config.retention.projections,
        dry_run,
        &never,
    )
    .await?;
    for (table, n) in r.rows.iter().chain(&eh.rows) {
        println!("{table}: {n} row(s) {}", verb("deleted"));
    }
    Ok(0)
}

fn token(config: &Config, sub: &str, scopes: &str, ttl: std::time::Duration) -> i32 {
    use secrecy::ExposeSecret;
    let Some(secret) = &config.auth.jwt_secret else {
        eprintln!(
            "cornjacket: minting a token needs CJ_JWT_SECRET (the HS256 key the platform verifies with)"
        );
        return 2;
    };
    let scopes: Vec<String> = scopes
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(bad) = scopes.iter().find(|s| !auth::SCOPES.contains(&s.as_str())) {
        eprintln!(
            "cornjacket: unknown scope '{bad}'; known: {}",
            auth::SCOPES.join(", ")
        );
        return 2;
    }
    match auth::mint(secret.expose_secret(), sub, &scopes, ttl, &config.auth) {
        Ok(t) => {
            println!("{t}");
            0
        }
        Err(e) => {
            eprintln!("cornjacket: {e}");
            1
        }
    }
}

async fn quarantine_cmd(config: &Config, action: QuarantineAction) -> anyhow::Result<i32> {
    let pool = db::lazy_pool(config.database_url(Service::Ingestion), config, 2)?;
    match action {
        QuarantineAction::List { limit } => {
            for row in quarantine::list(&pool, limit).await? {
                println!("{}", serde_json::to_string(&row)?);
            }
            Ok(0)
        }
        QuarantineAction::Requeue { seq, all } => {
            let seqs = if all {
                quarantine::seqs(&pool).await?
            } else {
                seq.into_iter().collect()
            };
            let mut missing = 0;
            for seq in seqs {
                if quarantine::requeue(&pool, seq).await? {
                    println!("{seq}: requeued");
                } else {
                    missing += 1;
                    println!("{seq}: no quarantined row with this seq");
                }
            }
            Ok(if missing > 0 { 1 } else { 0 })
        }
        QuarantineAction::Discard { seq } => {
            if quarantine::discard(&pool, seq).await? {
                println!("{seq}: discarded");
                Ok(0)
            } else {
                println!("{seq}: no quarantined row with this seq");
                Ok(1)
            }
        }
    }
}

/// Every consumer's dead letters. The sidecar's `ai.dlq` is read through the query service's
/// database, which holds the read side of every schema.
fn dead_letter_owners(config: &Config) -> anyhow::Result<Vec<dlq::Owner>> {
    let pool = |service| db::lazy_pool(config.database_url(service), config, 2);
    Ok(vec![
        crate::services::eventhandler::dead_letters(
            &config.eventhandler,
            pool(Service::Eventhandler)?,
        ),
        crate::services::tsdb::dead_letters(pool(Service::Tsdb)?),
        crate::services::actions::dead_letters(&config.actions, pool(Service::Actions)?),
        dlq::Owner {
            name: "ai",
            table: "ai.dlq",
            pool: pool(Service::Query)?,
            replay: dlq::Replay::Requested,
        },
    ])
}

/// `None` for a consumer whose service has not migrated yet: it has no dead letters.
fn unless_missing<T>(r: Result<T, sqlx::Error>) -> Result<Option<T>, sqlx::Error> {
    match r {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(None),
        other => other.map(Some),
    }
}

/// The owner of the dead letter `id`.
async fn owner_of(owners: &[dlq::Owner], id: Uuid) -> anyhow::Result<Option<&dlq::Owner>> {
    for o in owners {
        if unless_missing(o.get(id).await)?.flatten().is_some() {
            return Ok(Some(o));
        }
    }
    Ok(None)
}

async fn dlq(config: &Config, action: DlqAction) -> anyhow::Result<i32> {
    let owners = dead_letter_owners(config)?;
    match action {
        DlqAction::List {
            consumer,
            status,
            limit,
        } => {
            let status = status
                .map(|s| s.parse::<dlq::Status>())
                .transpose()
                .map_err(anyhow::Error::msg)?;
            for o in &owners {
                let Some(entries) = unless_missing(o.list(status, limit).await)? else {
                    continue;
                };
                // `--consumer` names a consumer (eventhandler, tsdb, actions, ai) or its group.
                for e in entries.into_iter().filter(|e| {
                    consumer
                        .as_deref()
                        .is_none_or(|c| c == o.name || c == e.consumer)
                }) {
                    println!("{}", serde_json::to_string(&e)?);
                }
            }
            Ok(0)
        }
        DlqAction::Replay { id, all } => {
            let mut targets = Vec::new();
            if all {
                for o in &owners {
                    for id in unless_missing(o.pending_ids().await)?.unwrap_or_default() {
                        targets.push((o, id));
                    }
                }
            } else if let Some(id) = id {
                match owner_of(&owners, id).await? {
                    Some(o) => targets.push((o, id)),
                    None => {
                        println!("{id}: no pending dead letter with this id");
                        return Ok(1);
                    }
                }
            }
            let mut failed = 0;
            for (o, id) in targets {
                let outcome = match o.replay(id).await? {
                    dlq::ReplayOutcome::Requested => wait_for_replay(o, id).await?,
                    other => other,
                };
                match outcome {
                    dlq::ReplayOutcome::Replayed => println!("{id}: replayed ({})", o.name),
                    dlq::ReplayOutcome::StillFailing(e) => {
                        failed += 1;
                        println!("{id}: still failing: {e}");
                    }
                    dlq::ReplayOutcome::Requested => {
                        failed += 1;
                        println!(
                            "{id}: replay requested; {} has not performed it yet (is it running?)",
                            o.name
                        );
                    }
                    dlq::ReplayOutcome::NotPending => {
                        failed += 1;
                        println!("{id}: no pending dead letter with this id");
                    }
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        DlqAction::Discard { id } => {
            let discarded = match owner_of(&owners, id).await? {
                Some(o) => o.discard(id).await?,
                None => false,
            };
            if discarded {
                println!("{id}: discarded");
                Ok(0)
            } else {
                println!("{id}: no pending dead letter with this id");
                Ok(1)
            }
        }
    }
}

/// Waits (up to 30 s) for a consumer that replays by itself to settle a requested replay.
async fn wait_for_replay(o: &dlq::Owner, id: Uuid) -> anyhow::Result<dlq::ReplayOutcome> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        match o.get(id).await?.map(|e| (e.status, e.error_message)) {
            Some((dlq::Status::Replayed, _)) => return Ok(dlq::ReplayOutcome::Replayed),
            Some((dlq::Status::Pending, e)) => return Ok(dlq::ReplayOutcome::StillFailing(e)),
            Some((dlq::Status::Replaying, _)) => continue,
            _ => return Ok(dlq::ReplayOutcome::NotPending),
        }
    }
    Ok(dlq::ReplayOutcome::Requested)
}
