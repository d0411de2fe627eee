//! The command line: `serve`, `migrate`, `dlq`.

use clap::{Parser, Subcommand};
use uuid::Uuid;

use crate::config::Config;
use crate::infra::{db, telemetry};
use crate::services::Service;
use crate::services::eventhandler::store;

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
    /// Inspect and act on the event handler's dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MigratableService {
    Ingestion,
    Eventhandler,
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// List dead letters as JSON lines.
    List {
        #[arg(long)]
        consumer: Option<String>,
        /// pending, replayed or discarded.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Re-run the handler on a pending dead letter (or all of them).
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
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cornjacket: {e}");
            return 2;
        }
    };
    telemetry::init_logging(&config);
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
            let targets: Vec<(&str, &db::Migrations)> = match service {
                Some(MigratableService::Ingestion) => vec![("ingestion", &db::INGESTION)],
                Some(MigratableService::Eventhandler) => vec![("eventhandler", &db::EVENTHANDLER)],
                None => vec![
                    ("ingestion", &db::INGESTION),
                    ("eventhandler", &db::EVENTHANDLER),
                ],
            };
            for (name, m) in targets {
                match db::migrate(config.database_url(name), m).await {
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
        Command::Dlq { action } => match dlq(&config, action).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("cornjacket: {e:#}");
                1
            }
        },
    }
}

async fn dlq(config: &Config, action: DlqAction) -> anyhow::Result<i32> {
    let pool = db::lazy_pool(config.database_url("eventhandler"), config, 2)?;
    match action {
        DlqAction::List {
            consumer,
            status,
            limit,
        } => {
            for e in store::list_dlq(&pool, consumer.as_deref(), status.as_deref(), limit).await? {
                println!("{}", serde_json::to_string(&e)?);
            }
            Ok(0)
        }
        DlqAction::Replay { id, all } => {
            let ids = if all {
                store::pending_ids(&pool).await?
            } else {
                id.into_iter().collect()
            };
            let mut failed = 0;
            for id in ids {
                match store::replay(&pool, id).await? {
                    store::ReplayOutcome::Replayed => println!("{id}: replayed"),
                    store::ReplayOutcome::StillFailing(e) => {
                        failed += 1;
                        println!("{id}: still failing: {e}");
                    }
                    store::ReplayOutcome::NotPending => {
                        failed += 1;
                        println!("{id}: no pending dead letter with this id");
                    }
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        DlqAction::Discard { id } => {
            if store::discard(&pool, id).await? {
                println!("{id}: discarded");
                Ok(0)
            } else {
                println!("{id}: no pending dead letter with this id");
                Ok(1)
            }
        }
    }
}
