//! `kongflow-events`: the command line. Parses flags and hands over to the library.

use clap::{Parser, Subcommand};
use kongflow_events::app::{self, Roles};
use kongflow_events::config::{HttpConfig, RelayConfig, StoreConfig, WorkerConfig};
use kongflow_events::db::environments::{self, EnvironmentType};

#[derive(Parser)]
#[command(name = "kongflow-events", version, about = "An events queue service")]
struct Cli {
    #[command(flatten)]
    store: StoreConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations.
    Migrate,
    /// Declare the RabbitMQ exchanges and queues.
    Topology,
    /// Serve the HTTP API.
    Serve {
        #[command(flatten)]
        http: HttpConfig,
    },
    /// Publish jobs from the outbox to RabbitMQ.
    Relay {
        #[command(flatten)]
        relay: RelayConfig,
    },
    /// Consume and run jobs.
    Worker {
        #[command(flatten)]
        worker: WorkerConfig,
    },
    /// HTTP API, relay and worker in one process.
    All {
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        relay: RelayConfig,
        #[command(flatten)]
        worker: WorkerConfig,
    },
    /// Manage environments and their API keys.
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
}

#[derive(Subcommand)]
enum EnvCommand {
    /// Create <org>/<project>/<env> (what is missing of it) and print a new API key last.
    Create {
        path: String,
        #[arg(long = "type", value_enum, default_value = "DEVELOPMENT")]
        env_type: EnvironmentType,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    let store = cli.store;
    match cli.command {
        Command::Migrate => {
            let pool = app::open_database(&StoreConfig {
                no_migrate: true,
                ..store
            })
            .await?;
            kongflow_events::db::migrate(&pool).await?;
            println!("migrations applied");
        }
        Command::Topology => {
            app::declare_topology(&store).await?;
            println!("topology declared (prefix {:?})", store.amqp_prefix);
        }
        Command::Serve { http } => {
            let shutdown = app::shutdown_on_signal();
            let p = app::start(
                &store,
                RelayConfig::default(),
                WorkerConfig::default(),
                Some(&http),
            )
            .await?;
            let roles = Roles {
                http: true,
                relay: false,
                worker: false,
            };
            p.run(roles, shutdown).await?;
        }
        Command::Relay { relay } => {
            let shutdown = app::shutdown_on_signal();
            let p = app::start(&store, relay, WorkerConfig::default(), None).await?;
            let roles = Roles {
                http: false,
                relay: true,
                worker: false,
            };
            p.run(roles, shutdown).await?;
        }
        Command::Worker { worker } => {
            let shutdown = app::shutdown_on_signal();
            let p = app::start(&store, RelayConfig::default(), worker, None).await?;
            let roles = Roles {
                http: false,
                relay: false,
                worker: true,
            };
            p.run(roles, shutdown).await?;
        }
        Command::All {
            http,
            relay,
            worker,
        } => {
            let shutdown = app::shutdown_on_signal();
            let p = app::start(&store, relay, worker, Some(&http)).await?;
            p.run(Roles::ALL, shutdown).await?;
        }
        Command::Env {
            command: EnvCommand::Create { path, env_type },
        } => {
            let pool = app::open_database(&store).await?;
            let created = environments::create_environment(&pool, &path, env_type).await?;
            println!(
                "environment {path} ({}) id {}",
                env_type.as_str(),
                created.environment.id
            );
            println!("{}", created.api_key);
        }
    }
    Ok(())
}
