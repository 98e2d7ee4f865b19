//! The long-running processes (`serve`, `ingest`, `relay`, `worker`, `all`), start-up and
//! shutdown.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::{self, DirectPublisher, Topology};
use crate::amqp_ingest::Ingest;
use crate::config::{
    HttpConfig, IngestConfig, MetricsConfig, RelayConfig, StoreConfig, WorkerConfig, redact_url,
};
use crate::console::{self, ConsoleState};
use crate::db;
use crate::http::{self, AppState};
use crate::ledger::{EVENTS_QUEUE, JobKind};
use crate::metrics::metrics;
use crate::probes::{self, ProbesState};
use crate::relay::Relay;
use crate::worker::Worker;

pub use crate::config::Roles;

/// Connect to Postgres, waiting up to a minute for a server that is not up yet, and migrate
/// unless told not to: how the long-running processes start. A refusal that waiting cannot
/// fix (a wrong password, a role or a database that does not exist, a URL that does not
/// parse) fails at once, saying which setting to change.
pub async fn open_database(store: &StoreConfig) -> anyhow::Result<PgPool> {
    open_database_within(store, Duration::from_secs(60)).await
}

/// Connect to Postgres once, and migrate unless told not to: how a command (`migrate`,
/// `env`, `jobs`) starts. A server that does not answer fails it within seconds, with the
/// reason as the connection saw it ("connection refused"), the address and the setting.
pub async fn open_database_now(store: &StoreConfig) -> anyhow::Result<PgPool> {
    open_database_within(store, Duration::ZERO).await
}

async fn open_database_within(store: &StoreConfig, patience: Duration) -> anyhow::Result<PgPool> {
    let deadline = Instant::now() + patience;
    let mut backoff = crate::supervise::reconnect_backoff();
    let url = &store.database_url;
    let pool = loop {
        // One connection first, so a failure is reported as it is rather than as the
        // pool's timeout.
        let attempt = match first_connection(url).await {
            Ok(()) => db::connect(url, store.database_max_connections).await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(pool) => break pool,
            Err(e) if db::is_tls_failure(&e) => anyhow::bail!(
                "cannot connect to postgres at {} ({}) over TLS: {}. With sslmode=verify-full \
                 or verify-ca the server's certificate must be signed by the CA of sslrootcert \
                 in DATABASE_URL (or PGSSLROOTCERT), and with verify-full be for the host \
                 DATABASE_URL names; sslmode=require encrypts without checking",
                address(url),
                redact_url(url),
                reason(&e)
            ),
            Err(e) if db::is_permanent(&e) => anyhow::bail!(
                "postgres refused {}: {}. Set DATABASE_URL (or --database-url) to a role, \
                 password and database that exist: postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                redact_url(url),
                reason(&e)
            ),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(at = %address(url), error = %reason(&e), "postgres not reachable yet");
                tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
            }
            Err(e) => anyhow::bail!(
                "cannot connect to postgres at {} ({}){}: {}. Is it running? DATABASE_URL \
                 (or --database-url) says where it is",
                address(url),
                redact_url(url),
                if patience.is_zero() {
                    String::new()
                } else {
                    " after a minute".into()
                },
                reason(&e)
            ),
        }
    };
    if !store.no_migrate {
        db::migrate(&pool).await?;
        prepare_new_storage(&pool).await?;
    }
    Ok(pool)
}

/// The keys of the event-sized tables that gain the environment (`db::keys`): the sliced
/// tables' and the ledger's.
pub fn event_sized_keys() -> Vec<&'static db::keys::Key> {
    db::keys::SLICED
        .iter()
        .chain(crate::ledger::upkeep::KEYS.iter())
        .collect()
}

/// `storage partition`: the per-event tables sliced (`db::slices::partition`), then the
/// keys of the event-sized tables given the environment (`db::keys`), both online and
/// both going on where an interrupted run stopped.
pub async fn partition_storage(
    pool: &PgPool,
    margin: Duration,
) -> Result<db::slices::Partitioned, db::slices::PartitionError> {
    let how = db::slices::partition(pool, margin).await?;
    db::keys::key_by_environment(pool, &event_sized_keys()).await?;
    Ok(how)
}

/// A new installation's storage (no environment yet: `db::slices::slice_if_new`), sliced
/// and keyed at migrate. Returns whether it was new.
pub async fn prepare_new_storage(pool: &PgPool) -> Result<bool, db::slices::PartitionError> {
    if !db::slices::slice_if_new(pool).await? {
        return Ok(false);
    }
    db::keys::key_by_environment(pool, &event_sized_keys()).await?;
    Ok(true)
}

/// Open and close one connection to `url`, giving up after 5 s.
async fn first_connection(url: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let connect = sqlx::PgConnection::connect(url);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 5 s",
        ))),
    }
}

/// The `host:port` a Postgres URL names.
fn address(url: &str) -> String {
    use std::str::FromStr;
    match sqlx::postgres::PgConnectOptions::from_str(url) {
        Ok(o) => format!("{}:{}", o.get_host(), o.get_port()),
        Err(_) => "an address that does not parse".into(),
    }
}

/// Why a connection failed, as the server or the socket said it: a server's message
/// without the line of its source file that sqlx appends.
fn reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_string(),
        e => e.to_string(),
    }
}

/// Check that RabbitMQ takes this process's credentials. A refusal that waiting cannot fix
/// fails at once, saying which setting to change; a broker that is not up yet is left to
/// the roles, which keep trying.
pub async fn check_broker(store: &StoreConfig) -> anyhow::Result<()> {
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        amqp::connect(&store.amqp_url, "kongflow-check"),
    )
    .await;
    match attempt {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "checked".into()).await;
            Ok(())
        }
        Ok(Err(e)) if amqp::is_ca_file_error(&e) => anyhow::bail!("{e}"),
        Ok(Err(e)) if amqp::is_untrusted(&e) => anyhow::bail!(
            "rabbitmq at {} showed a TLS certificate this process does not trust: {e}. Set \
             AMQP_TLS_CA_FILE (or cacertfile in AMQP_URL) to the PEM file of the CA that \
             signed it, and name the host its certificate is for in AMQP_URL",
            redact_url(&store.amqp_url)
        ),
        Ok(Err(e)) if amqp::is_permanent(&e) => anyhow::bail!(
            "rabbitmq refused {}: {e}. Set AMQP_URL (or --amqp-url) to a user, password and \
             virtual host that exist",
            redact_url(&store.amqp_url)
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "rabbitmq not reachable yet; the roles keep trying");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("rabbitmq did not answer within 10 s; the roles keep trying");
            Ok(())
        }
    }
}

/// Claim `AMQP_PREFIX` on the broker for this database's installation (`amqp::owner`), or
/// refuse to start when another installation holds it. A broker that cannot be asked now
/// is left to the roles.
async fn claim_prefix(store: &StoreConfig, topology: &Topology) -> anyhow::Result<()> {
    let Some(install) = topology.install() else {
        return Ok(());
    };
    let claimed = async {
        let conn = amqp::connect(&store.amqp_url, "kongflow-claim").await?;
        let claim = amqp::owner::claim(&conn, topology, install).await;
        let _ = conn.close(200, "claimed".into()).await;
        claim
    };
    match tokio::time::timeout(Duration::from_secs(10), claimed).await {
        Ok(Ok(amqp::owner::Claim::Ours)) => Ok(()),
        Ok(Ok(amqp::owner::Claim::Taken(owner))) => anyhow::bail!(
            "AMQP_PREFIX {:?} on this broker belongs to another installation ({owner}; this \
             database's is {install}): the two would take each other's messages. Give this \
             installation a prefix of its own with AMQP_PREFIX (or --amqp-prefix), or a \
             virtual host of its own in AMQP_URL",
            topology.prefix()
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not claim AMQP_PREFIX on the broker now");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("the broker did not answer the prefix claim within 10 s");
            Ok(())
        }
    }
}

/// Declare the RabbitMQ topology once.
pub async fn declare_topology(store: &StoreConfig) -> anyhow::Result<()> {
    let conn = amqp::connect(&store.amqp_url, "kongflow-topology").await?;
    let channel = conn.create_channel().await?;
    store.topology().declare(&channel).await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// A token cancelled by SIGTERM or Ctrl-C. From then on the process has `deadline` to
/// drain: past it, it exits with status 1 whatever its tasks are doing, and RabbitMQ hands
/// the messages it held to other consumers. Signals are awaited on a thread and runtime of
/// their own, so a stuck thread of the main runtime can neither hide a signal nor hold the
/// process past its deadline.
pub fn shutdown_on_signal(deadline: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    std::thread::Builder::new()
        .name("kongflow-signals".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for signals");
            runtime.block_on(async {
                let ctrl_c = tokio::signal::ctrl_c();
                #[cfg(unix)]
                {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("install SIGTERM handler");
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                #[cfg(not(unix))]
                let _ = ctrl_c.await;
            });
            tracing::info!(
                deadline_ms = deadline.as_millis() as u64,
                "shutdown requested"
            );
            t.cancel();
            std::thread::sleep(deadline);
            tracing::error!(
                deadline_ms = deadline.as_millis() as u64,
                "drain deadline passed with work unfinished; exiting (SHUTDOWN_DEADLINE_MS sets it)"
            );
            std::process::exit(1);
        })
        .expect("spawn the signal thread");
    token
}

/// Everything a process needs to run its roles.
pub struct Process {
    pub pool: PgPool,
    pub topology: Topology,
    pub amqp_url: String,
    pub relay: RelayConfig,
    pub worker: WorkerConfig,
    pub ingest: IngestConfig,
    pub http: Option<tokio::net::TcpListener>,
    /// Timeouts and the in-flight bound of the HTTP API.
    pub http_config: HttpConfig,
    /// Where the process serves `/metrics`, `/healthz` and `/readyz` (`None`: no metrics
    /// served; an HTTP API serves the probes beside it anyway).
    pub metrics: Option<tokio::net::TcpListener>,
}

impl Process {
    /// Run the roles until `shutdown`; returns when every role has finished its work.
    pub async fn run(self, roles: Roles, shutdown: CancellationToken) -> anyhow::Result<()> {
        let shards = if roles.worker {
            self.worker
                .shards_of(self.topology.shard_count())
                .map_err(anyhow::Error::msg)?
        } else {
            (0..self.topology.shard_count()).collect()
        };
        metrics().touch_job_series(
            JobKind::ALL.iter().map(|k| (k.as_str(), EVENTS_QUEUE)),
            &shards,
        );
        if roles.relay {
            // The relay samples every shard's depth; its series exist from the start.
            for kind in JobKind::ALL {
                for shard in 0..self.topology.shard_count() {
                    metrics()
                        .work_queue_depth
                        .with_label_values(&[kind.as_str(), &shard.to_string()]);
                }
            }
        }
        let tracker = TaskTracker::new();
        let probes_state = ProbesState::new(
            self.pool.clone(),
            self.amqp_url.clone(),
            roles,
            shutdown.clone(),
        );
        // Metrics (and probes) on a listener of their own, never on the API's port; the
        // probes also beside the API.
        if let Some(listener) = self.metrics {
            tracker.spawn(probes::serve(
                listener,
                probes_state.clone(),
                shutdown.clone(),
            ));
        }
        let probe_routes = probes::health_router(probes_state.clone());
        tracker.spawn(probes::probe_readiness(probes_state.clone()));
        // Whatever commits jobs (ingest over HTTP or AMQP, workers) publishes them right
        // after its commit, on one connection per process; the relay takes what it cannot.
        let direct = DirectPublisher::new(
            self.amqp_url.clone(),
            self.topology.clone(),
            self.pool.clone(),
            self.relay.relay_confirm_timeout,
        );
        if roles.relay {
            let relay = Relay::new(self.pool.clone(), self.topology.clone(), self.relay);
            tracker.spawn(relay.run(self.amqp_url.clone(), shutdown.clone()));
        }
        if roles.ingest {
            let ingest = Ingest::new(self.pool.clone(), self.topology.clone(), self.ingest)
                .publishing(direct.clone());
            tracker.spawn(ingest.run(self.amqp_url.clone(), shutdown.clone()));
        }
        if roles.worker {
            let worker = Worker::new(self.pool.clone(), self.topology.clone(), self.worker)
                .publishing(direct.clone());
            tracker.spawn(worker.run(self.amqp_url.clone(), shutdown.clone()));
        }
        let http_task = match (roles.http, self.http) {
            (true, Some(listener)) => {
                let state = AppState::new(self.pool.clone())
                    .publishing(direct.clone())
                    .with_operator_token(self.http_config.operator_token.as_ref());
                // The console signs in with the operator token: its failed sign-ins and the
                // operator endpoints' failed tokens share one throttle.
                let console = console::router(
                    ConsoleState::new(
                        self.pool.clone(),
                        self.amqp_url.clone(),
                        self.topology.clone(),
                    )
                    .signing_in_with(
                        self.http_config.operator_token.as_ref(),
                        state.operator_throttle.clone(),
                    )
                    .sessions(
                        self.http_config.console_session_ttl,
                        self.http_config.console_secure_cookies,
                    )
                    .rate_limits_of(state.limiter.clone()),
                );
                let router = http::router(state, &self.http_config, probe_routes.merge(console));
                Some(tracker.spawn(http::serve(
                    listener,
                    router,
                    self.http_config.clone(),
                    shutdown.clone(),
                )))
            }
            (true, None) => anyhow::bail!("the http role needs a listener"),
            _ => None,
        };
        tracker.close();
        if let Some(task) = http_task {
            // An HTTP server that cannot serve ends the process.
            if let Err(e) = task.await? {
                shutdown.cancel();
                tracker.wait().await;
                direct.drain().await;
                return Err(e.into());
            }
        }
        tracker.wait().await;
        // Jobs committed by the last requests are published before the process exits.
        direct.drain().await;
        self.pool.close().await;
        Ok(())
    }
}

/// The tuning of every role; a process uses that of the roles it plays.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    pub relay: RelayConfig,
    pub worker: WorkerConfig,
    pub ingest: IngestConfig,
}

/// Start-up shared by `serve`, `ingest`, `relay`, `worker` and `all`.
pub async fn start(
    store: &StoreConfig,
    tuning: Tuning,
    http: Option<&HttpConfig>,
    metrics: Option<&MetricsConfig>,
) -> anyhow::Result<Process> {
    let open_files = raise_open_files_limit();
    let pool = open_database(store).await?;
    check_broker(store).await?;
    let topology = store
        .topology()
        .with_install(db::installation(&pool).await?);
    claim_prefix(store, &topology).await?;
    let http_listener = match http {
        Some(h) => Some(bind(h.http_addr, "HTTP_ADDR", "--http").await?),
        None => None,
    };
    let metrics_addr = metrics.map(|m| m.metrics_addr);
    let mut http_config = http.cloned().unwrap_or_default();
    if let Some(limit) = open_files {
        // Room beside the API's connections: the database pool, the broker, the metrics
        // listener's connections, webhooks of a worker in the same process, files.
        let reserve = 128
            + store.database_max_connections as u64
            + tuning.worker.webhook.webhook_concurrency as u64;
        let most = usize::try_from(limit.saturating_sub(reserve).max(16)).unwrap_or(usize::MAX);
        if http.is_some() && http_config.http_max_connections > most {
            tracing::warn!(
                open_files = limit,
                http_max_connections = most,
                "HTTP_MAX_CONNECTIONS lowered to stay below the open-files limit"
            );
            http_config.http_max_connections = most;
        }
    }
    let metrics = match metrics_addr {
        Some(addr) => Some(bind(addr, "METRICS_ADDR", "--metrics").await?),
        None => None,
    };
    Ok(Process {
        pool,
        topology,
        amqp_url: store.amqp_url.clone(),
        relay: tuning.relay,
        worker: tuning.worker,
        ingest: tuning.ingest,
        http: http_listener,
        http_config,
        metrics,
    })
}

/// Raise the soft limit of open files to the hard limit, so connections do not run the
/// process out of descriptors before its caps do; the limit now in force (`None` where it
/// cannot be read).
pub fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(open_files = limit, "open-files limit");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// Listen on `addr`, or say which address failed and how to choose another.
async fn bind(
    addr: std::net::SocketAddr,
    variable: &str,
    flag: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr}: {e}. Set another address with {variable} or {flag} \
             (port 0 picks a free one), or stop the process that holds it"
        )
    })
}
