//! `kongflow-events`: the command line. Parses flags and hands over to the library.

use clap::{CommandFactory, Parser, Subcommand};
use kongflow_events::admin::{self, StateFilter};
use kongflow_events::app::{self, Roles, Tuning};
use kongflow_events::config::{
    self, HttpConfig, IngestConfig, LogConfig, LogFormat, MetricsConfig, RelayConfig,
    ShutdownConfig, StoreConfig, WorkerConfig,
};
use kongflow_events::tenants::{self, EnvironmentType};

#[derive(Parser)]
#[command(name = "kongflow-events", version, about = "An events queue service")]
struct Cli {
    #[command(flatten)]
    store: StoreConfig,
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Apply database migrations.
    Migrate,
    /// Declare the RabbitMQ exchanges and queues.
    Topology {
        /// Print them as a RabbitMQ definitions file (JSON) instead, for a broker to import
        /// at boot (`rabbitmq/definitions.json` is this output for the defaults).
        #[arg(long)]
        definitions: bool,
        /// The virtual host the definitions name.
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    #[command(flatten)]
    Process(ProcessCommand),
    /// Print every setting with its default: as an environment file, or as the Markdown
    /// table of docs/configuration.md.
    Config {
        #[arg(long)]
        markdown: bool,
    },
    /// Manage environments and their API keys.
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// See and steer the jobs of the ledger and the dead-letter queue.
    Jobs {
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// The storage layout: the time slices of the tables written per event.
    Storage {
        #[command(subcommand)]
        command: StorageCommand,
    },
    /// See an environment's events.
    Events {
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// An environment's events, newest first, a page at a time.
    List {
        /// The environment: <org>/<project>/<env>, or its id.
        #[arg(long)]
        environment: String,
        #[arg(long)]
        name: Option<String>,
        /// delayed, pending, delivered or cancelled.
        #[arg(long)]
        state: Option<kongflow_events::events::list::EventState>,
        /// At most 500.
        #[arg(long, default_value_t = kongflow_events::events::list::DEFAULT_LIMIT)]
        limit: i64,
        /// The cursor a previous page printed: only events after it.
        #[arg(long)]
        cursor: Option<String>,
    },
}

/// The long-running commands: each starts a process playing some roles.
// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ProcessCommand {
    /// Serve the HTTP API.
    Serve {
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        run: RunConfig,
    },
    /// Consume send-event requests from the ingest exchange and store them.
    Ingest {
        #[command(flatten)]
        ingest: IngestConfig,
        #[command(flatten)]
        run: RunConfig,
    },
    /// Publish jobs from the outbox to RabbitMQ; reconcile, retain and vacuum.
    Relay {
        #[command(flatten)]
        relay: RelayConfig,
        #[command(flatten)]
        run: RunConfig,
    },
    /// Consume and run jobs.
    Worker {
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        run: RunConfig,
    },
    /// HTTP API, AMQP ingest, relay and worker in one process.
    All {
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        ingest: IngestConfig,
        #[command(flatten)]
        relay: RelayConfig,
        #[command(flatten)]
        worker: WorkerConfig,
        #[command(flatten)]
        run: RunConfig,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Jobs in id order, a page at a time.
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        /// A state, or `failed` (retryable or discarded).
        #[arg(long)]
        state: Option<StateFilter>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// The cursor a previous page printed: only jobs after it.
        #[arg(long)]
        after: Option<i64>,
    },
    /// One job with its errors and attempts.
    Get { id: i64 },
    /// Make a job (or every job in a state, of a kind) available to run now; attempts and
    /// errors are kept.
    Retry {
        /// The job; or use --state (and --kind).
        #[arg(required_unless_present = "state", conflicts_with_all = ["state", "kind"])]
        id: Option<i64>,
        #[arg(long)]
        state: Option<StateFilter>,
        #[arg(long)]
        kind: Option<String>,
    },
    /// Cancel a job that is not final.
    Cancel { id: i64 },
    /// What sits in the dead-letter queue, with its reasons; `replay` retries their jobs.
    Dead {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(subcommand)]
        command: Option<DeadCommand>,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// Retry the job of every dead letter that names one, and remove those letters.
    Replay,
}

#[derive(Subcommand)]
enum StorageCommand {
    /// Slice event_records, job_runs and webhook_attempts by day, online (docs/operations.md,
    /// Storage): the tables as they are become the legacy slice, dropped by retention once
    /// its events are older than RETENTION_EVENTS_MS; then the keys of the tables written
    /// per event and of the job ledger gain the environment, online (also on tables sliced
    /// before). Run it once every process runs this build or a later one; run again, it
    /// goes on where it stopped, or does nothing.
    Partition {
        /// The cut-over is this far ahead: the steps before the swap (a scan of each table)
        /// must end within it, and the legacy slice takes the events stored until then.
        #[arg(long, default_value = "1h", value_parser = kongflow_events::config::parse_duration)]
        margin: std::time::Duration,
    },
    /// List the slices: each with its day (or legacy) and the time its ids end.
    Slices,
}

#[derive(Subcommand)]
enum EnvCommand {
    /// Create <org>/<project>/<env> (what is missing of it) and print a new API key last.
    Create {
        path: String,
        #[arg(long = "type", value_enum, default_value = "DEVELOPMENT")]
        env_type: EnvironmentType,
    },
    /// Delete <org>/<project>/<env> and everything of it: dispatchers, jobs, its API key,
    /// its events and runs (in batches), and its queued work (cancelled).
    Delete {
        path: String,
        /// Say yes: the deletion cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Show the limits of <org>/<project>/<env>, or set them.
    Limits {
        path: String,
        /// Due jobs of each kind the environment may have published and not yet final (its
        /// share of the workers); the rest wait in the outbox.
        #[arg(long, conflicts_with = "no_max_jobs_in_flight")]
        max_jobs_in_flight: Option<i32>,
        /// Lift that limit.
        #[arg(long)]
        no_max_jobs_in_flight: bool,
        /// Events per second the environment may send over HTTP; past it, `429` with
        /// `Retry-After`.
        #[arg(long, conflicts_with = "no_max_events_per_second")]
        max_events_per_second: Option<i32>,
        /// Lift that limit.
        #[arg(long)]
        no_max_events_per_second: bool,
    },
}

/// The markers around the generated table in docs/configuration.md.
#[cfg(test)]
const TABLE_BEGIN: &str =
    "<!-- The table is `kongflow-events config --markdown`; a test keeps it so. -->";
#[cfg(test)]
const TABLE_END: &str = "<!-- End of the generated table. -->";

/// What every long-running command takes besides its roles' tuning.
#[derive(clap::Args)]
struct RunConfig {
    #[command(flatten)]
    metrics: MetricsConfig,
    #[command(flatten)]
    stop: ShutdownConfig,
}

/// Start the process a long-running command describes (its roles, their tuning, its
/// listeners) and run it until a signal stops it.
async fn run_process(store: &StoreConfig, command: ProcessCommand) -> anyhow::Result<()> {
    use ProcessCommand::*;
    let (mut roles, mut tuning) = (Roles::NONE, Tuning::default());
    let (http, run) = match command {
        Serve { http, run } => {
            roles.http = true;
            (Some(http), run)
        }
        Ingest { ingest, run } => {
            (roles.ingest, tuning.ingest) = (true, ingest);
            (None, run)
        }
        Relay { relay, run } => {
            (roles.relay, tuning.relay) = (true, relay);
            (None, run)
        }
        Worker { worker, run } => {
            (roles.worker, tuning.worker) = (true, worker);
            (None, run)
        }
        All {
            http,
            ingest,
            relay,
            worker,
            run,
        } => {
            roles = Roles::ALL;
            tuning = Tuning {
                relay,
                worker,
                ingest,
            };
            (Some(http), run)
        }
    };
    let shutdown = app::shutdown_on_signal(run.stop.shutdown_deadline);
    let process = app::start(store, tuning, http.as_ref(), Some(&run.metrics)).await?;
    process.run(roles, shutdown).await
}

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&log.log_filter)
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

/// Runs the command; an error is printed as its chain of reasons on one line (no backtrace,
/// no source location) and the process exits with status 1.
#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    init_tracing(&cli.log);
    if let Err(e) = run(cli).await {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let store = cli.store.with_amqp_ca_file();
    match cli.command {
        Command::Process(command) => run_process(&store, command).await,
        Command::Migrate => {
            let pool = app::open_database_now(&StoreConfig {
                no_migrate: true,
                ..store
            })
            .await?;
            kongflow_events::db::migrate(&pool).await?;
            println!("migrations applied");
            if app::prepare_new_storage(&pool).await? {
                println!("a new installation: the tables written per event are sliced by day");
            }
            let newer = kongflow_events::db::newer_migrations(&pool).await?;
            if let (Some(first), Some(last)) = (newer.first(), newer.last()) {
                println!(
                    "the database also holds {} migration(s) of a later release ({first} to \
                     {last}), which this build does not need: it runs on them",
                    newer.len()
                );
            }
            Ok(())
        }
        Command::Topology { definitions, vhost } => {
            if definitions {
                let doc = store.topology().definitions(&vhost);
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                app::declare_topology(&store).await?;
                println!("topology declared (prefix {:?})", store.amqp_prefix);
            }
            Ok(())
        }
        Command::Config { markdown } => {
            let settings = config::reference(&Cli::command());
            if markdown {
                print!("{}", config::markdown(&settings));
            } else {
                print!("{}", config::env_file(&settings));
            }
            Ok(())
        }
        Command::Env { command } => env(&store, command).await,
        Command::Jobs { json, command } => jobs(&store, json, command).await,
        Command::Events { json, command } => events(&store, json, command).await,
        Command::Storage { command } => storage(&store, command).await,
    }
}

/// `storage partition`, `storage slices`.
async fn storage(store: &StoreConfig, command: StorageCommand) -> anyhow::Result<()> {
    use kongflow_events::db::slices;
    let pool = app::open_database_now(store).await?;
    match command {
        StorageCommand::Partition { margin } => {
            match app::partition_storage(&pool, margin).await? {
                slices::Partitioned::Already => println!("the tables are sliced already"),
                slices::Partitioned::Empty => {
                    println!("the tables were empty: sliced by day now")
                }
                slices::Partitioned::Legacy { cutover, took } => println!(
                    "sliced by day in {took:.1?}: the rows so far are the legacy slice, which \
                     holds the events stored until {} (cut-over id {cutover})",
                    slices::uuid_time(cutover).to_rfc3339()
                ),
            }
            let keys = app::event_sized_keys();
            let left =
                kongflow_events::db::keys::unkeyed(&mut *pool.acquire().await?, &keys).await?;
            anyhow::ensure!(
                left.is_empty(),
                "keys without the environment left: {left:?}"
            );
            println!("every key of the tables written per event holds the environment");
        }
        StorageCommand::Slices => {
            let mut conn = pool.acquire().await?;
            let all = slices::list(&mut conn).await?;
            if all.is_empty() {
                println!("the tables are not sliced (kongflow-events storage partition)");
            }
            for s in all {
                let day = s.day.map_or("legacy".to_string(), |d| d.to_string());
                println!("{day}\tends {}", s.ends().to_rfc3339());
            }
        }
    }
    Ok(())
}

/// `env create`, `env limits`, `env delete`.
async fn env(store: &StoreConfig, command: EnvCommand) -> anyhow::Result<()> {
    if let EnvCommand::Delete { path, yes: false } = &command {
        anyhow::bail!("deleting {path} cannot be undone: add --yes");
    }
    let pool = app::open_database_now(store).await?;
    match command {
        EnvCommand::Create { path, env_type } => {
            let created = tenants::create_environment(&pool, &path, env_type).await?;
            println!(
                "environment {path} ({}) id {}",
                env_type.as_str(),
                created.environment.id
            );
            println!("{}", created.api_key);
        }
        EnvCommand::Limits {
            path,
            max_jobs_in_flight,
            no_max_jobs_in_flight,
            max_events_per_second,
            no_max_events_per_second,
        } => {
            let change = |lift: bool, n: Option<i32>| if lift { Some(None) } else { n.map(Some) };
            let set = tenants::SetLimits {
                max_jobs_in_flight: change(no_max_jobs_in_flight, max_jobs_in_flight),
                max_events_per_second: change(no_max_events_per_second, max_events_per_second),
            };
            let Some(limits) = tenants::limits(&pool, &path, set).await? else {
                anyhow::bail!("no environment {path}");
            };
            let shown = |n: Option<i32>| n.map_or("none".to_string(), |n| n.to_string());
            println!(
                "environment {path}: max jobs in flight {}, max events per second {}",
                shown(limits.max_jobs_in_flight),
                shown(limits.max_events_per_second)
            );
        }
        EnvCommand::Delete { path, .. } => {
            let batch = config::MaintenanceConfig::default().retention_batch_size;
            let deleted = admin::delete_environment(&pool, &path, batch)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no environment {path}"))?;
            println!(
                "environment {path} ({}) deleted: {} events, {} runs, {} queued jobs cancelled",
                deleted.id, deleted.events, deleted.runs, deleted.jobs_cancelled
            );
        }
    }
    Ok(())
}

/// `events list`: a page of an environment's events, newest first.
async fn events(store: &StoreConfig, json: bool, command: EventsCommand) -> anyhow::Result<()> {
    use kongflow_events::events::list::{self, Cursor, EventFilter, ListedEvent};
    let EventsCommand::List {
        environment,
        name,
        state,
        limit,
        cursor,
    } = command;
    let pool = app::open_database_now(store).await?;
    let environment_id = match uuid::Uuid::parse_str(&environment) {
        Ok(id) => id,
        Err(_) => tenants::id_of(&pool, &environment)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no environment {environment}"))?,
    };
    let cursor = match cursor {
        Some(text) => Some(
            Cursor::decode(&text)
                .ok_or_else(|| anyhow::anyhow!("--cursor: not one a page printed"))?,
        ),
        None => None,
    };
    let filter = EventFilter {
        name,
        state,
        limit: limit.clamp(1, list::MAX_LIMIT),
        cursor,
        ..EventFilter::default()
    };
    let page = list::list_events(&pool, environment_id, &filter).await?;
    let now = page.now;
    let events: Vec<ListedEvent> = page
        .events
        .into_iter()
        .map(|e| ListedEvent::new(e, now))
        .collect();
    let next = page.next.map(|c| c.encode());
    if json {
        return print_json(&serde_json::json!({ "events": events, "next": next }));
    }
    print!("{}", admin::events_table(&events));
    if let Some(next) = next {
        println!("more: --cursor {next}");
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn jobs(store: &StoreConfig, json: bool, command: JobsCommand) -> anyhow::Result<()> {
    let pool = app::open_database_now(store).await?;
    match command {
        JobsCommand::List {
            queue,
            kind,
            state,
            limit,
            after,
        } => {
            let filter = admin::JobFilter {
                queue,
                kind,
                state,
                environment: None,
                limit: limit.clamp(1, 10_000),
                after,
            };
            let (jobs, next) = admin::list_jobs(&pool, &filter).await?;
            if json {
                return print_json(&serde_json::json!({ "jobs": jobs, "next": next }));
            }
            print!("{}", admin::jobs_table(&jobs));
            if let Some(next) = next {
                println!("more: --after {next}");
            }
        }
        JobsCommand::Get { id } => {
            let job = admin::get_job(&pool, id)
                .await?
                .ok_or(admin::Refusal::NotFound(id))?;
            if json {
                return print_json(&job);
            }
            print!("{}", admin::job_details(&job));
        }
        JobsCommand::Retry { id, state, kind } => {
            let ids = match (id, state) {
                (Some(id), _) => vec![admin::retry_job(&pool, id).await?.id],
                (None, Some(state)) => {
                    admin::retry_jobs(&pool, &admin::matching(state, kind.as_deref(), None)).await?
                }
                (None, None) => anyhow::bail!("give a job id or --state"),
            };
            if json {
                return print_json(&serde_json::json!({ "retried": ids }));
            }
            println!("retried {} job(s): {ids:?}", ids.len());
        }
        JobsCommand::Cancel { id } => {
            let job = admin::cancel_job(&pool, id).await?;
            if json {
                return print_json(&job);
            }
            println!("cancelled job {}", job.id);
        }
        JobsCommand::Dead { limit, command } => dead(store, &pool, json, limit, command).await?,
    }
    Ok(())
}

/// `jobs dead` and `jobs dead replay`.
async fn dead(
    store: &StoreConfig,
    pool: &sqlx::PgPool,
    json: bool,
    limit: usize,
    command: Option<DeadCommand>,
) -> anyhow::Result<()> {
    let conn = kongflow_events::amqp::connect(&store.amqp_url, "kongflow-jobs").await?;
    let topology = store.topology();
    let shown = match command {
        None => {
            let letters = admin::dead_letters(&conn, &topology, pool, limit).await?;
            if json {
                print_json(&letters)
            } else {
                print!("{}", admin::dead_table(&letters));
                Ok(())
            }
        }
        Some(DeadCommand::Replay) => {
            let report = admin::replay_dead(&conn, &topology, pool, limit).await?;
            if json {
                print_json(&report)
            } else {
                print!("{}", admin::replay_summary(&report));
                Ok(())
            }
        }
    };
    let _ = conn.close(200, "bye".into()).await;
    shown
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    /// docs/configuration.md's table of variables is `kongflow-events config --markdown`.
    #[test]
    fn the_documented_configuration_is_the_command_lines() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/configuration.md"
        ))
        .unwrap();
        let (begin, end) = (super::TABLE_BEGIN, super::TABLE_END);
        let start = doc.find(begin).expect("the table's opening marker") + begin.len();
        let len = doc[start..].find(end).expect("the table's closing marker");
        let documented = doc[start..start + len].trim();
        let settings = kongflow_events::config::reference(&super::Cli::command());
        let generated = kongflow_events::config::markdown(&settings);
        assert!(
            documented == generated.trim(),
            "docs/configuration.md's table differs from the command line's settings: replace \
             it with the output of `kongflow-events config --markdown`:\n{generated}"
        );
    }
}
