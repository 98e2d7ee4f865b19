//! Configuration: one typed struct per concern, read from flags and the environment.

use std::net::SocketAddr;
use std::time::Duration;

/// Every default of the configuration, defined once: the flags' defaults and the
/// `Default` implementations both read them.
pub mod defaults {
    pub const DELAY_LEAD_MS: u64 = 250;
    pub const SHARD_COUNT: u16 = 1;
    pub const DATABASE_MAX_CONNECTIONS: u32 = 16;
    pub const KONGFLOW_NO_MIGRATE: bool = false;
    pub const RELAY_BATCH_SIZE: i64 = 200;
    pub const RELAY_CONCURRENCY: usize = 2;
    pub const RELAY_POLL_INTERVAL_MS: u64 = 1000;
    pub const RELAY_CONFIRM_TIMEOUT_MS: u64 = 10_000;
    pub const RECONCILE_INTERVAL_MS: u64 = 60_000;
    pub const RECONCILE_MARGIN_MS: u64 = 300_000;
    pub const RETENTION_INTERVAL_MS: u64 = 60_000;
    pub const RETENTION_COMPLETED_MS: u64 = 86_400_000;
    pub const RETENTION_DISCARDED_MS: u64 = 604_800_000;
    pub const RETENTION_BATCH_SIZE: i64 = 1_000;
    /// 30 days.
    pub const RETENTION_EVENTS_MS: u64 = 2_592_000_000;
    pub const VACUUM_INTERVAL_MS: u64 = 60_000;
    pub const INGEST_CONCURRENCY: usize = 2;
    pub const INGEST_PREFETCH: u16 = 1000;
    pub const INGEST_BATCH_SIZE: usize = 500;
    pub const WORKER_CONCURRENCY: usize = 1;
    pub const WORKER_PREFETCH: u16 = 200;
    pub const WORKER_BATCH_SIZE: usize = 100;
    pub const RETRY_BASE_MS: u64 = 1000;
    pub const RETRY_MAX_MS: u64 = 3_600_000;
    pub const WEBHOOK_TIMEOUT_MS: u64 = 10_000;
    pub const WEBHOOK_CONNECT_TIMEOUT_MS: u64 = 3_000;
    pub const WEBHOOK_CONCURRENCY: usize = 64;
    pub const WEBHOOK_CONCURRENCY_PER_ENVIRONMENT: usize = 16;
    pub const HTTP_HEADER_TIMEOUT_MS: u64 = 10_000;
    pub const HTTP_REQUEST_TIMEOUT_MS: u64 = 30_000;
    pub const HTTP_MAX_IN_FLIGHT: usize = 256;
    pub const HTTP_BODY_TIMEOUT_MS: u64 = 5_000;
    pub const HTTP_MAX_CONNECTIONS: usize = 1024;
    pub const METRICS_ADDR: &str = "127.0.0.1:9464";
    pub const SHUTDOWN_DEADLINE_MS: u64 = 20_000;
    pub const HTTP_ADDR: &str = "127.0.0.1:3030";
}

/// RabbitMQ's queue types this service can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

/// Most shards a deployment may have.
pub const MAX_SHARDS: u16 = 256;

/// Where the stores are. Shared by every command. Its `Debug` hides the passwords of the
/// URLs, and `--help` does not print their values from the environment.
#[derive(Clone, clap::Args)]
pub struct StoreConfig {
    /// Postgres connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://localhost/kongflow"
    )]
    pub database_url: String,

    /// RabbitMQ connection string.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name, so several deployments (or tests) can share
    /// one RabbitMQ virtual host.
    #[arg(long, env = "AMQP_PREFIX", default_value = "kongflow")]
    pub amqp_prefix: String,

    /// If set, queues are declared with this `x-expires` (milliseconds) and exchanges as
    /// auto-delete, so a short-lived deployment (a test, a preview) leaves nothing behind.
    #[arg(long, env = "AMQP_QUEUE_EXPIRES_MS")]
    pub amqp_queue_expires_ms: Option<u32>,

    /// The type of every queue this service declares: `classic` (the default: one node
    /// holds each queue) or `quorum` (replicated over a cluster's nodes; see the README for
    /// which to pick). Every process must agree, and a queue's type cannot change in place.
    #[arg(long, env = "AMQP_QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub amqp_queue_type: QueueType,

    /// How many shards the work queues are split into, by a stable hash of the environment
    /// (1 to 256). Every process of a deployment must agree; see the README before changing
    /// it on a running deployment.
    #[arg(long, env = "SHARD_COUNT", default_value_t = defaults::SHARD_COUNT,
        value_parser = clap::value_parser!(u16).range(1..=MAX_SHARDS as i64))]
    pub shard_count: u16,

    /// How long before its due time a delayed job's message leaves the delay tiers; the
    /// worker holds it for the rest, in milliseconds. Relays and workers must agree.
    #[arg(long, env = "DELAY_LEAD_MS", default_value_t = defaults::DELAY_LEAD_MS)]
    pub delay_lead_ms: u64,

    /// Largest number of Postgres connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = defaults::DATABASE_MAX_CONNECTIONS)]
    pub database_max_connections: u32,

    /// Do not apply migrations at start-up (run `kongflow-events migrate` instead).
    #[arg(long, env = "KONGFLOW_NO_MIGRATE", default_value_t = defaults::KONGFLOW_NO_MIGRATE)]
    pub no_migrate: bool,
}

/// Which roles one process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub http: bool,
    /// Consume send-event requests from the ingest exchange.
    pub ingest: bool,
    pub relay: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        http: true,
        ingest: true,
        relay: true,
        worker: true,
    };
    /// No role: a process whose caller drives each step.
    pub const NONE: Roles = Roles {
        http: false,
        ingest: false,
        relay: false,
        worker: false,
    };
}

/// Relay tuning.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Most jobs claimed and published per batch. Smaller batches hold their row locks for
    /// less time (a worker that receives a message waits for its batch to commit).
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = defaults::RELAY_BATCH_SIZE)]
    pub relay_batch_size: i64,

    /// Publishing loops per relay process.
    #[arg(long, env = "RELAY_CONCURRENCY", default_value_t = defaults::RELAY_CONCURRENCY)]
    pub relay_concurrency: usize,

    /// How often the relay looks for work when no notification arrives, in milliseconds.
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = defaults::RELAY_POLL_INTERVAL_MS)]
    pub relay_poll_interval_ms: u64,

    /// How long the relay waits for publisher confirms before it gives a batch up, in milliseconds.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT_MS", default_value_t = defaults::RELAY_CONFIRM_TIMEOUT_MS)]
    pub relay_confirm_timeout_ms: u64,

    /// How often the reconciler looks for jobs whose message went missing, in milliseconds.
    #[arg(long, env = "RECONCILE_INTERVAL_MS", default_value_t = defaults::RECONCILE_INTERVAL_MS)]
    pub reconcile_interval_ms: u64,

    /// How far past its due time (or its publication, if later) a job that is not final
    /// must be before the reconciler publishes it again, in milliseconds.
    #[arg(long, env = "RECONCILE_MARGIN_MS", default_value_t = defaults::RECONCILE_MARGIN_MS)]
    pub reconcile_margin_ms: u64,

    /// How often retention deletes old final jobs, in milliseconds.
    #[arg(long, env = "RETENTION_INTERVAL_MS", default_value_t = defaults::RETENTION_INTERVAL_MS)]
    pub retention_interval_ms: u64,

    /// Completed jobs are deleted this long after they completed, in milliseconds.
    /// Unique-by-args holds as long as the job is kept.
    #[arg(long, env = "RETENTION_COMPLETED_MS", default_value_t = defaults::RETENTION_COMPLETED_MS)]
    pub retention_completed_ms: u64,

    /// Discarded and cancelled jobs are deleted this long after they ended, in milliseconds.
    #[arg(long, env = "RETENTION_DISCARDED_MS", default_value_t = defaults::RETENTION_DISCARDED_MS)]
    pub retention_discarded_ms: u64,

    /// Delivered and cancelled events, with their runs, are deleted this long after they
    /// were stored, in milliseconds; 0: kept forever. Keep it above RETENTION_DISCARDED_MS,
    /// so a dead-lettered job's event is still there to replay.
    #[arg(long, env = "RETENTION_EVENTS_MS", default_value_t = defaults::RETENTION_EVENTS_MS)]
    pub retention_events_ms: u64,

    /// Most jobs one retention statement deletes; each batch is its own short statement.
    #[arg(long, env = "RETENTION_BATCH_SIZE", default_value_t = defaults::RETENTION_BATCH_SIZE)]
    pub retention_batch_size: i64,

    /// How often the relay looks at the ledger's busiest tables and vacuums (and analyzes)
    /// those autovacuum has left behind, in milliseconds; 0: never.
    #[arg(long, env = "VACUUM_INTERVAL_MS", default_value_t = defaults::VACUUM_INTERVAL_MS)]
    pub vacuum_interval_ms: u64,
}

impl RelayConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.relay_poll_interval_ms)
    }
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.relay_confirm_timeout_ms)
    }
    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms)
    }
    pub fn reconcile_margin(&self) -> Duration {
        Duration::from_millis(self.reconcile_margin_ms)
    }
    pub fn retention_interval(&self) -> Duration {
        Duration::from_millis(self.retention_interval_ms)
    }
    pub fn retention_completed(&self) -> Duration {
        Duration::from_millis(self.retention_completed_ms)
    }
    pub fn retention_discarded(&self) -> Duration {
        Duration::from_millis(self.retention_discarded_ms)
    }
    /// `None`: events are kept forever.
    pub fn retention_events(&self) -> Option<Duration> {
        (self.retention_events_ms > 0).then(|| Duration::from_millis(self.retention_events_ms))
    }
    /// `None`: the relay never vacuums.
    pub fn vacuum_interval(&self) -> Option<Duration> {
        (self.vacuum_interval_ms > 0).then(|| Duration::from_millis(self.vacuum_interval_ms))
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_batch_size: defaults::RELAY_BATCH_SIZE,
            relay_concurrency: defaults::RELAY_CONCURRENCY,
            relay_poll_interval_ms: defaults::RELAY_POLL_INTERVAL_MS,
            relay_confirm_timeout_ms: defaults::RELAY_CONFIRM_TIMEOUT_MS,
            reconcile_interval_ms: defaults::RECONCILE_INTERVAL_MS,
            reconcile_margin_ms: defaults::RECONCILE_MARGIN_MS,
            retention_interval_ms: defaults::RETENTION_INTERVAL_MS,
            retention_completed_ms: defaults::RETENTION_COMPLETED_MS,
            retention_discarded_ms: defaults::RETENTION_DISCARDED_MS,
            retention_events_ms: defaults::RETENTION_EVENTS_MS,
            retention_batch_size: defaults::RETENTION_BATCH_SIZE,
            vacuum_interval_ms: defaults::VACUUM_INTERVAL_MS,
        }
    }
}

/// Worker tuning.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Consumers per job kind; each has its own channel and runs one batch at a time.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = defaults::WORKER_CONCURRENCY)]
    pub worker_concurrency: usize,

    /// Unacknowledged messages RabbitMQ hands each consumer ahead of time.
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = defaults::WORKER_PREFETCH)]
    pub worker_prefetch: u16,

    /// Most messages whose work commits in one transaction.
    #[arg(long, env = "WORKER_BATCH_SIZE", default_value_t = defaults::WORKER_BATCH_SIZE)]
    pub worker_batch_size: usize,

    /// Wait before the second attempt of a failed job, in milliseconds; it doubles with
    /// every attempt after that (see `handlers::backoff`).
    #[arg(long, env = "RETRY_BASE_MS", default_value_t = defaults::RETRY_BASE_MS)]
    pub retry_base_ms: u64,

    /// Longest wait between two attempts, in milliseconds.
    #[arg(long, env = "RETRY_MAX_MS", default_value_t = defaults::RETRY_MAX_MS)]
    pub retry_max_ms: u64,

    /// The shards this worker consumes, as a list of numbers and ranges (`0,2,4-7`);
    /// unset: every shard. Lets a deployment run separate worker groups.
    #[arg(long = "shards", env = "WORKER_SHARDS")]
    pub shards: Option<ShardSet>,

    /// Longest a webhook request may take, connect to last byte, in milliseconds; past it
    /// the attempt fails and is retried like any job.
    #[arg(long, env = "WEBHOOK_TIMEOUT_MS", default_value_t = defaults::WEBHOOK_TIMEOUT_MS)]
    pub webhook_timeout_ms: u64,

    /// Webhook requests one consumer has in flight at once (each settles its own message,
    /// so a slow receiver holds up only its own).
    #[arg(long, env = "WEBHOOK_CONCURRENCY", default_value_t = defaults::WEBHOOK_CONCURRENCY)]
    pub webhook_concurrency: usize,

    /// Of a consumer's `WEBHOOK_CONCURRENCY` places, the most one environment holds (its
    /// share): its other webhooks wait in the delay tiers while it has that many out, so a
    /// tenant whose receivers hang leaves the other places to the others.
    #[arg(long, env = "WEBHOOK_CONCURRENCY_PER_ENVIRONMENT", default_value_t = defaults::WEBHOOK_CONCURRENCY_PER_ENVIRONMENT)]
    pub webhook_concurrency_per_environment: usize,

    /// Longest a webhook's host may take to resolve and to connect, in milliseconds.
    #[arg(long, env = "WEBHOOK_CONNECT_TIMEOUT_MS", default_value_t = defaults::WEBHOOK_CONNECT_TIMEOUT_MS)]
    pub webhook_connect_timeout_ms: u64,

    /// Networks webhooks may reach although they are loopback, private, link-local or
    /// otherwise inside (comma-separated, `10.0.0.0/8,::1`). Unset: none.
    #[arg(long, env = "WEBHOOK_ALLOW_NETS", value_parser = crate::webhooks::parse_nets_arg)]
    pub webhook_allow_nets: Option<crate::webhooks::NetList>,
}

impl WorkerConfig {
    /// How this worker sends webhooks.
    pub fn webhook_sender(&self) -> crate::webhooks::Sender {
        crate::webhooks::Sender {
            guard: crate::webhooks::Guard {
                allow: self.webhook_allow_nets.clone().unwrap_or_default().0,
            },
            connect_timeout: Duration::from_millis(self.webhook_connect_timeout_ms),
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            resolver: crate::webhooks::Resolver::default(),
        }
    }
}

/// A set of shards, written `0,2,4-7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSet(Vec<u16>);

impl std::str::FromStr for ShardSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<u16>()
                .map_err(|_| format!("{t:?} is not a shard number (0 to 255)"))
        };
        let mut shards = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(format!("the range {part:?} runs backwards"));
                    }
                    shards.extend(a..=b);
                }
                None => shards.push(number(part)?),
            }
        }
        if shards.is_empty() {
            return Err("no shard given: write them like 0,2,4-7".into());
        }
        shards.sort_unstable();
        shards.dedup();
        Ok(Self(shards))
    }
}

impl ShardSet {
    pub fn new(shards: impl IntoIterator<Item = u16>) -> Self {
        let mut v: Vec<u16> = shards.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Self(v)
    }
}

impl WorkerConfig {
    /// The shards to consume among `count`: the configured set, or all of them. An error
    /// names a configured shard that does not exist.
    pub fn shards_of(&self, count: u16) -> Result<Vec<u16>, String> {
        match &self.shards {
            None => Ok((0..count).collect()),
            Some(ShardSet(set)) => match set.iter().find(|s| **s >= count) {
                Some(s) => Err(format!(
                    "WORKER_SHARDS names shard {s}, but SHARD_COUNT is {count} (shards 0 to {}): \
                     give shards below SHARD_COUNT, or raise SHARD_COUNT on every process",
                    count - 1
                )),
                None => Ok(set.clone()),
            },
        }
    }
}

impl WorkerConfig {
    pub fn retry_base(&self) -> Duration {
        Duration::from_millis(self.retry_base_ms)
    }
    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_concurrency: defaults::WORKER_CONCURRENCY,
            worker_prefetch: defaults::WORKER_PREFETCH,
            worker_batch_size: defaults::WORKER_BATCH_SIZE,
            retry_base_ms: defaults::RETRY_BASE_MS,
            retry_max_ms: defaults::RETRY_MAX_MS,
            shards: None,
            webhook_timeout_ms: defaults::WEBHOOK_TIMEOUT_MS,
            webhook_connect_timeout_ms: defaults::WEBHOOK_CONNECT_TIMEOUT_MS,
            webhook_concurrency: defaults::WEBHOOK_CONCURRENCY,
            webhook_concurrency_per_environment: defaults::WEBHOOK_CONCURRENCY_PER_ENVIRONMENT,
            webhook_allow_nets: None,
        }
    }
}

/// Ingest consumer tuning (the AMQP ingest exchange).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestConfig {
    /// Consumers of the ingest queue per process; each has its own channel and commits one
    /// batch at a time.
    #[arg(long, env = "INGEST_CONCURRENCY", default_value_t = defaults::INGEST_CONCURRENCY)]
    pub ingest_concurrency: usize,

    /// Unacknowledged requests RabbitMQ hands each ingest consumer ahead of time.
    #[arg(long, env = "INGEST_PREFETCH", default_value_t = defaults::INGEST_PREFETCH)]
    pub ingest_prefetch: u16,

    /// Most requests stored in one transaction.
    #[arg(long, env = "INGEST_BATCH_SIZE", default_value_t = defaults::INGEST_BATCH_SIZE)]
    pub ingest_batch_size: usize,

    /// Queues a request's `reply_to` may name, by the start of their names, besides direct
    /// reply-to (`amq.rabbitmq.reply-to`) and server-named queues (`amq.gen-`); default
    /// `<AMQP_PREFIX>.reply.`. A request naming any other queue gets no reply.
    #[arg(long, env = "INGEST_REPLY_PREFIX")]
    pub ingest_reply_prefix: Option<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            ingest_concurrency: defaults::INGEST_CONCURRENCY,
            ingest_prefetch: defaults::INGEST_PREFETCH,
            ingest_batch_size: defaults::INGEST_BATCH_SIZE,
            ingest_reply_prefix: None,
        }
    }
}

/// Where a relay or worker process serves `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsConfig {
    /// Address of the metrics and health listener (`0` as port: any free one).
    #[arg(
        long = "metrics",
        env = "METRICS_ADDR",
        default_value = defaults::METRICS_ADDR
    )]
    pub metrics_addr: SocketAddr,
}

/// HTTP listener and the bounds on what one client can hold of it.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpConfig {
    /// Address the HTTP API listens on (`0` as port: any free one).
    #[arg(long = "http", env = "HTTP_ADDR", default_value = defaults::HTTP_ADDR)]
    pub http_addr: SocketAddr,

    /// How long a client may take to send a request's headers, in milliseconds, counted
    /// from the connection's start or the end of the previous response: it is also how
    /// long an idle keep-alive connection stays open.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_MS", default_value_t = defaults::HTTP_HEADER_TIMEOUT_MS)]
    pub http_header_timeout_ms: u64,

    /// Longest a request may take, body upload included, in milliseconds; past it the API
    /// answers 408.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = defaults::HTTP_REQUEST_TIMEOUT_MS)]
    pub http_request_timeout_ms: u64,

    /// Longest a request's body may take to arrive, in milliseconds, counted from when the
    /// handler starts reading it (after the caller is authenticated); past it the API
    /// answers 408.
    #[arg(long, env = "HTTP_BODY_TIMEOUT_MS", default_value_t = defaults::HTTP_BODY_TIMEOUT_MS)]
    pub http_body_timeout_ms: u64,

    /// Most API requests served at once; beyond it the API answers 503 with `Retry-After`
    /// (the v2 SDK retries). `/healthz` and `/readyz` are not counted.
    #[arg(long, env = "HTTP_MAX_IN_FLIGHT", default_value_t = defaults::HTTP_MAX_IN_FLIGHT)]
    pub http_max_in_flight: usize,

    /// Most of those places one environment (or the operator token) may hold at once;
    /// beyond it its requests get 429 with `Retry-After`. Unset: a quarter of
    /// `HTTP_MAX_IN_FLIGHT`. Public routes hold at most an eighth together, and keys not
    /// yet known are looked up an eighth at a time.
    #[arg(long, env = "HTTP_MAX_IN_FLIGHT_PER_ENVIRONMENT")]
    pub http_max_in_flight_per_environment: Option<usize>,

    /// Most connections the API holds open at once. At the cap the oldest connections are
    /// closed to make room (first those that never sent a request, at once; then others
    /// after their answer), and a new one waits in the listen backlog until then. Also
    /// kept below the open-files limit (raised to its hard limit at start), with room for
    /// the process's database and broker connections.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = defaults::HTTP_MAX_CONNECTIONS)]
    pub http_max_connections: usize,

    /// Where `/metrics`, `/healthz` and `/readyz` are served, apart from the API, so the
    /// API's port shows no traffic figures or tenant names (`0` as port: any free one).
    /// `/healthz` and `/readyz` are also served on the API's port.
    #[arg(long = "metrics", env = "METRICS_ADDR", default_value = defaults::METRICS_ADDR)]
    pub metrics_addr: SocketAddr,

    /// The bearer token of the operator endpoints (`/api/v1/operator/...`: environment
    /// limits). Unset: those endpoints answer 403.
    #[arg(long, env = "OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<OperatorToken>,
}

/// The operator endpoints' bearer token; printed as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorToken(pub String);

impl std::str::FromStr for OperatorToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() < 16 {
            return Err("OPERATOR_TOKEN must be at least 16 characters".into());
        }
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl HttpConfig {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http_request_timeout_ms)
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.http_body_timeout_ms)
    }
    /// The places one environment may hold: `HTTP_MAX_IN_FLIGHT_PER_ENVIRONMENT`, or a
    /// quarter of `HTTP_MAX_IN_FLIGHT`; at least one, at most all.
    pub fn in_flight_per_environment(&self) -> usize {
        let all = self.http_max_in_flight.max(1);
        self.http_max_in_flight_per_environment
            .unwrap_or(all / 4)
            .clamp(1, all)
    }
    /// The places callers not yet authenticated and public routes hold together: an
    /// eighth of `HTTP_MAX_IN_FLIGHT`, at least one.
    pub fn in_flight_unauthenticated(&self) -> usize {
        (self.http_max_in_flight / 8).max(1)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            http_addr: defaults::HTTP_ADDR
                .parse()
                .expect("the default address parses"),
            http_header_timeout_ms: defaults::HTTP_HEADER_TIMEOUT_MS,
            http_request_timeout_ms: defaults::HTTP_REQUEST_TIMEOUT_MS,
            http_body_timeout_ms: defaults::HTTP_BODY_TIMEOUT_MS,
            http_max_in_flight: defaults::HTTP_MAX_IN_FLIGHT,
            http_max_in_flight_per_environment: None,
            http_max_connections: defaults::HTTP_MAX_CONNECTIONS,
            metrics_addr: defaults::METRICS_ADDR
                .parse()
                .expect("the default address parses"),
            operator_token: None,
        }
    }
}

/// How a long-running process stops.
#[derive(Debug, Clone, clap::Args)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long the process may take to finish what it holds, in
    /// milliseconds; past it the process exits anyway (status 1), and the messages it held
    /// unacknowledged go back to RabbitMQ. Keep it below the pod's grace period.
    #[arg(long, env = "SHUTDOWN_DEADLINE_MS", default_value_t = defaults::SHUTDOWN_DEADLINE_MS)]
    pub shutdown_deadline_ms: u64,
}

impl ShutdownConfig {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.shutdown_deadline_ms)
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("amqp_prefix", &self.amqp_prefix)
            .field("amqp_queue_expires_ms", &self.amqp_queue_expires_ms)
            .field("amqp_queue_type", &self.amqp_queue_type)
            .field("shard_count", &self.shard_count)
            .field("delay_lead_ms", &self.delay_lead_ms)
            .field("database_max_connections", &self.database_max_connections)
            .field("no_migrate", &self.no_migrate)
            .finish()
    }
}

/// A connection URL with its password (the part between `user:` and `@`) replaced by
/// `***`, fit to print; a comma-separated list of URLs (`AMQP_URL` naming a cluster's nodes)
/// has each of them redacted.
pub fn redact_url(url: &str) -> String {
    url_list(url)
        .into_iter()
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

/// The URLs of a comma-separated list. It splits only where a new URL (`scheme://`) starts,
/// so a comma inside one (in a password, in a Postgres host list) stays in it.
pub fn url_list(list: &str) -> Vec<&str> {
    let list = list.trim().trim_matches(',');
    let mut urls = Vec::new();
    let mut start = 0;
    for (at, _) in list.match_indices(',') {
        let next = &list[at + 1..];
        if next[..next.find(',').unwrap_or(next.len())].contains("://") {
            urls.push(list[start..at].trim());
            start = at + 1;
        }
    }
    urls.push(list[start..].trim());
    urls.retain(|u| !u.is_empty());
    urls
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first `/`, `?` or `#`; its credentials at its last `@`.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{ShardSet, WorkerConfig, redact_url, url_list};

    #[test]
    fn url_lists_split_where_a_url_starts() {
        assert_eq!(
            url_list("amqp://u:p@a/%2f, amqp://u:p,q@b/%2f,"),
            ["amqp://u:p@a/%2f", "amqp://u:p,q@b/%2f"]
        );
        assert_eq!(url_list("amqp://one"), ["amqp://one"]);
        assert!(url_list(" , ").is_empty());
    }

    #[test]
    fn shard_sets_read_lists_and_ranges() {
        let set: ShardSet = "4-6, 0,2,5".parse().unwrap();
        assert_eq!(set, ShardSet::new([0, 2, 4, 5, 6]));
        for bad in ["", "x", "3-1", "1-", "70000"] {
            assert!(bad.parse::<ShardSet>().is_err(), "{bad:?}");
        }
        let worker = WorkerConfig {
            shards: Some(set),
            ..WorkerConfig::default()
        };
        assert_eq!(worker.shards_of(8).unwrap(), [0, 2, 4, 5, 6]);
        let e = worker.shards_of(4).unwrap_err();
        assert!(
            e.contains("shard 4") && e.contains("SHARD_COUNT is 4"),
            "{e}"
        );
        assert_eq!(WorkerConfig::default().shards_of(3).unwrap(), [0, 1, 2]);
    }

    #[test]
    fn the_store_configuration_prints_without_passwords() {
        let store = super::StoreConfig {
            database_url: "postgres://app:hunter2@db/kongflow".into(),
            amqp_url: "amqp://app:hunter3@rabbit/%2f".into(),
            amqp_prefix: "kongflow".into(),
            amqp_queue_expires_ms: None,
            amqp_queue_type: super::QueueType::Classic,
            shard_count: super::defaults::SHARD_COUNT,
            delay_lead_ms: super::defaults::DELAY_LEAD_MS,
            database_max_connections: super::defaults::DATABASE_MAX_CONNECTIONS,
            no_migrate: false,
        };
        let printed = format!("{store:?}");
        assert!(!printed.contains("hunter"), "{printed}");
        assert!(
            printed.contains("postgres://app:***@db/kongflow"),
            "{printed}"
        );
    }

    #[test]
    fn passwords_are_redacted_and_nothing_else() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://app:p@ss@db/kongflow?sslmode=require"),
            "postgres://app:***@db/kongflow?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://localhost/kongflow"),
            "postgres://localhost/kongflow"
        );
        assert_eq!(redact_url("postgres://app@db/k"), "postgres://app@db/k");
        assert_eq!(redact_url("not a url"), "not a url");
        // Several nodes: each one's password goes.
        assert_eq!(
            redact_url("amqp://a:one@n1:5672/%2f, amqp://a:two@n2:5672/%2f"),
            "amqp://a:***@n1:5672/%2f,amqp://a:***@n2:5672/%2f"
        );
        // A comma inside one URL does not split it.
        assert_eq!(
            redact_url("postgres://app:p,ss@db1,db2/k"),
            "postgres://app:***@db1,db2/k"
        );
    }
}
