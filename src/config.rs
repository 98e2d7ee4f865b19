//! Configuration: one typed struct per concern, read from flags and the environment.
//!
//! Every setting is declared once, here, as a flag with its environment variable; its
//! default is written in its `#[arg]` attribute and nowhere else (the `Default`
//! implementations read those attributes, [`defaults`]). Every environment variable the
//! process reads is read in this module. Durations are [`Duration`]s, written `1500ms`,
//! `5s`, `2m`, `1h`, `7d` (or a bare number of milliseconds, what the `_MS` variables have
//! always taken). `docs/configuration.md`'s table is [`reference`]'s output, and a test keeps
//! it so. This module depends on no other module of the crate.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

/// RabbitMQ's queue types this service can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

/// Most shards a deployment may have.
pub const MAX_SHARDS: u16 = 256;

/// A configuration group with every setting at its default, as the flags declare it (the
/// environment is not read): what the `Default` implementations return.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|a| a.env(None::<&str>));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("every setting has a default or is optional");
    T::from_arg_matches(&matches).expect("the defaults parse")
}

/// Parse a duration: numbers with units (`ms`, `s`, `m`, `h`, `d`), one or several
/// (`1500ms`, `5s`, `1m30s`), or a bare number of milliseconds, the unit every duration
/// variable (`…_MS`) took before units were accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{s:?} is not a duration: write it like 1500ms, 5s, 2m, 1h or 7d (a bare number \
             is milliseconds)"
        )
    };
    let text = s.trim();
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let millis_per: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let part = n.checked_mul(millis_per).ok_or_else(bad)?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(bad)?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(total)
}

/// Where the stores are. Shared by every command. Its `Debug` hides the passwords of the
/// URLs, and `--help` does not print their values from the environment.
#[derive(Clone, clap::Args)]
pub struct StoreConfig {
    /// Postgres, as a connection URL: `postgres://USER:PASSWORD@HOST:5432/DATABASE`.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://localhost/kongflow"
    )]
    pub database_url: String,

    /// RabbitMQ; the nodes of a cluster as several URLs separated by commas: each
    /// connection starts from the next node in turn and skips one that refuses or does not
    /// answer within 10 s, and a role whose connection drops reconnects (with backoff) to
    /// the next; jobs whose confirms were lost are published again from the ledger.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// A PEM file of the CA certificates that signed the certificates of the `amqps://`
    /// nodes (beside the public roots built in), for each node whose URL names none in its
    /// `cacertfile` parameter. The broker's certificate is always checked, for the host its
    /// URL names. (Postgres's TLS is set as libpq's: `sslmode` and `sslrootcert` in
    /// DATABASE_URL, or PGSSLMODE and PGSSLROOTCERT; see docs/configuration.md, TLS.)
    #[arg(long, env = "AMQP_TLS_CA_FILE")]
    pub amqp_tls_ca_file: Option<String>,

    /// Prefix of every exchange and queue name, so several deployments (or tests) can share
    /// one RabbitMQ virtual host. A prefix belongs to one installation (one database): a
    /// process of another refuses to start on it.
    #[arg(long, env = "AMQP_PREFIX", default_value = "kongflow")]
    pub amqp_prefix: String,

    /// If set, queues expire after this long unused and exchanges are declared
    /// auto-delete, so a short-lived deployment (a test, a preview) leaves nothing behind.
    #[arg(long, env = "AMQP_QUEUE_EXPIRES_MS", value_parser = parse_duration)]
    pub amqp_queue_expires: Option<Duration>,

    /// The type of every queue this service declares: `classic` (one node holds each
    /// queue) or `quorum` (replicated over a cluster's nodes; which to pick:
    /// docs/configuration.md, Which queue type).
    /// Every process must agree, and a queue's type cannot change in place (a new
    /// `AMQP_PREFIX` is the way over).
    #[arg(long, env = "AMQP_QUEUE_TYPE", value_enum, default_value = "classic")]
    pub amqp_queue_type: QueueType,

    /// Work queues per job kind, by a stable hash of the environment (1 to 256). Every
    /// process of a deployment must agree (before changing it on a running deployment, see
    /// docs/operations.md, Shards).
    #[arg(long, env = "SHARD_COUNT", default_value = "1",
        value_parser = clap::value_parser!(u16).range(1..=MAX_SHARDS as i64))]
    pub shard_count: u16,

    /// A delayed job's message leaves the delay tiers this long before it is due, and the
    /// worker holds it until then. Relays and workers must agree.
    #[arg(long, env = "DELAY_LEAD_MS", default_value = "250ms", value_parser = parse_duration)]
    pub delay_lead: Duration,

    /// Most Postgres connections this process opens (its pool's size).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value = "16")]
    pub database_max_connections: u32,

    /// Do not apply migrations at start-up (run `kongflow-events migrate` instead).
    #[arg(long, env = "KONGFLOW_NO_MIGRATE", default_value = "false")]
    pub no_migrate: bool,
}

impl StoreConfig {
    /// The configuration with `AMQP_TLS_CA_FILE` applied: `cacertfile=FILE` added to every
    /// `amqps://` node of `AMQP_URL` that names no CA file of its own.
    pub fn with_amqp_ca_file(mut self) -> Self {
        if let Some(file) = self.amqp_tls_ca_file.as_deref() {
            self.amqp_url = amqp_url_with_ca_file(&self.amqp_url, file);
        }
        self
    }
}

/// The nodes of an `AMQP_URL`, each `amqps://` one that names no CA file given
/// `cacertfile=file`.
pub fn amqp_url_with_ca_file(urls: &str, file: &str) -> String {
    url_list(urls)
        .into_iter()
        .map(|node| with_ca_file(node, file))
        .collect::<Vec<_>>()
        .join(",")
}

/// `node` with `cacertfile=file` when it is an `amqps://` URL that names no CA file.
fn with_ca_file(node: &str, file: &str) -> String {
    match url::Url::parse(node) {
        Ok(mut url)
            if url.scheme() == "amqps" && !url.query_pairs().any(|(k, _)| k == "cacertfile") =>
        {
            url.query_pairs_mut().append_pair("cacertfile", file);
            url.to_string()
        }
        _ => node.to_string(),
    }
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

/// Relay tuning: publishing the outbox. The relay also runs the maintenance loops, tuned
/// apart in [`MaintenanceConfig`].
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Most jobs claimed and published per relay batch. Smaller batches hold their row
    /// locks for less time (a worker that receives a message waits for its batch to
    /// commit).
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value = "200")]
    pub relay_batch_size: i64,

    /// Publishing loops per relay process.
    #[arg(long, env = "RELAY_CONCURRENCY", default_value = "2")]
    pub relay_concurrency: usize,

    /// How often the relay looks for work when no notification arrives.
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value = "1s", value_parser = parse_duration)]
    pub relay_poll_interval: Duration,

    /// How long the relay waits for a batch's publisher confirms; a batch whose confirms
    /// take longer is given up and retried.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT_MS", default_value = "10s", value_parser = parse_duration)]
    pub relay_confirm_timeout: Duration,

    #[command(flatten)]
    pub maintenance: MaintenanceConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        defaults()
    }
}

/// What relay processes do beside publishing: the reconciler, retention and vacuum.
#[derive(Debug, Clone, clap::Args)]
pub struct MaintenanceConfig {
    /// How often the reconciler looks for jobs whose message went missing.
    #[arg(long, env = "RECONCILE_INTERVAL_MS", default_value = "1m", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// How far overdue (from its due time or its publication, whichever is later) a job not
    /// yet final must be before the reconciler publishes it again.
    #[arg(long, env = "RECONCILE_MARGIN_MS", default_value = "5m", value_parser = parse_duration)]
    pub reconcile_margin: Duration,

    /// How often retention runs.
    #[arg(long, env = "RETENTION_INTERVAL_MS", default_value = "1m", value_parser = parse_duration)]
    pub retention_interval: Duration,

    /// Completed jobs are deleted this long after they completed. Unique-by-args holds as
    /// long as the job is kept.
    #[arg(long, env = "RETENTION_COMPLETED_MS", default_value = "1d", value_parser = parse_duration)]
    pub retention_completed: Duration,

    /// Discarded and cancelled jobs are deleted this long after they ended.
    #[arg(long, env = "RETENTION_DISCARDED_MS", default_value = "7d", value_parser = parse_duration)]
    pub retention_discarded: Duration,

    /// Delivered and cancelled events are deleted this long after they were stored, with
    /// their runs, and EPHEMERAL dispatchers this long after they fired or expired, with
    /// their attempts; `0`: kept forever. On sliced tables a day's slice goes whole once its
    /// day ended this long ago (so up to a day later). An event not yet delivered is kept however old
    /// while its delivery job lives (once that job is discarded or cancelled, the event goes
    /// this long after it was due). Keep it above `RETENTION_DISCARDED_MS`, so a
    /// dead-lettered job's event is still there to replay.
    #[arg(long, env = "RETENTION_EVENTS_MS", default_value = "30d", value_parser = parse_duration)]
    pub retention_events: Duration,

    /// Most jobs, or events, one retention statement deletes; each batch is its own short
    /// statement.
    #[arg(long, env = "RETENTION_BATCH_SIZE", default_value = "1000")]
    pub retention_batch_size: i64,

    /// How often relay processes look for ledger tables autovacuum has left behind and
    /// vacuum (and analyze) them; `0`: never.
    #[arg(long, env = "VACUUM_INTERVAL_MS", default_value = "1m", value_parser = parse_duration)]
    pub vacuum_interval: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        defaults()
    }
}

/// Worker tuning. Webhooks, which workers send, are tuned apart in [`WebhookConfig`].
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Consumers (channels) per job kind in each worker process; each runs one batch at a
    /// time. Fewer consumers make bigger batches and fewer commits. With one, a batch that
    /// waits (on a row lock, say) holds its kind back in that process: run several worker
    /// processes, or raise it where handlers may wait.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value = "1")]
    pub worker_concurrency: usize,

    /// Unacknowledged messages RabbitMQ hands each consumer ahead of time.
    #[arg(long, env = "WORKER_PREFETCH", default_value = "200")]
    pub worker_prefetch: u16,

    /// Most messages whose work commits in one transaction.
    #[arg(long, env = "WORKER_BATCH_SIZE", default_value = "100")]
    pub worker_batch_size: usize,

    /// Wait before a failed job's second attempt; it doubles with every attempt after that.
    #[arg(long, env = "RETRY_BASE_MS", default_value = "1s", value_parser = parse_duration)]
    pub retry_base: Duration,

    /// Longest wait between two attempts.
    #[arg(long, env = "RETRY_MAX_MS", default_value = "1h", value_parser = parse_duration)]
    pub retry_max: Duration,

    /// The shards this worker consumes, as a list of numbers and ranges (`0,2,4-7`); unset:
    /// every shard. Lets a deployment run separate worker groups; a shard at or past
    /// `SHARD_COUNT` stops the worker at start with the reason.
    #[arg(long = "shards", env = "WORKER_SHARDS")]
    pub shards: Option<ShardSet>,

    #[command(flatten)]
    pub webhook: WebhookConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        defaults()
    }
}

/// How workers send EPHEMERAL dispatchers' webhooks.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookConfig {
    /// Longest a webhook request may take, connect to last byte; past it the attempt fails
    /// and is retried like any job.
    #[arg(long, env = "WEBHOOK_TIMEOUT_MS", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,

    /// Longest a webhook's host may take to resolve, and to connect.
    #[arg(long, env = "WEBHOOK_CONNECT_TIMEOUT_MS", default_value = "3s", value_parser = parse_duration)]
    pub webhook_connect_timeout: Duration,

    /// Webhook requests one worker consumer has in flight at once; each settles its own
    /// message, so a slow receiver holds up only its own.
    #[arg(long, env = "WEBHOOK_CONCURRENCY", default_value = "64")]
    pub webhook_concurrency: usize,

    /// Of a consumer's `WEBHOOK_CONCURRENCY` places, the most one environment holds (its
    /// share, counting those waiting for a place): its other webhooks wait in the delay
    /// tiers and come back after 1 s, so a tenant whose receivers hang leaves the other
    /// places to the others.
    #[arg(
        long,
        env = "WEBHOOK_CONCURRENCY_PER_ENVIRONMENT",
        default_value = "16"
    )]
    pub webhook_concurrency_per_environment: usize,

    /// Networks webhooks may reach although they are inside, comma-separated
    /// (`10.20.0.0/16,127.0.0.1`). Unset, every entry of the IANA IPv4 and IPv6
    /// special-purpose address registries that is not globally reachable is refused
    /// (loopback, private, shared, link-local, unspecified, documentation, benchmarking,
    /// IETF protocol assignments, 6to4 relay anycast, discard-only, SRv6, overlay
    /// identifiers, ...), and multicast, reserved, IPv6 outside `2000::/3`, IPv4-translated
    /// addresses and the IPv6 forms that embed a refused IPv4 address (IPv4-mapped and
    /// -compatible, 6to4, NAT64), whatever name resolves to them; Teredo is refused
    /// outright. Cloud metadata addresses (`169.254.169.254`, `fd00:ec2::254`) are refused
    /// whatever it says.
    #[arg(long, env = "WEBHOOK_ALLOW_NETS")]
    pub webhook_allow_nets: Option<NetList>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        defaults()
    }
}

/// Networks, written `10.0.0.0/8,::1`: networks or single addresses, comma-separated
/// (`WEBHOOK_ALLOW_NETS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList(pub Vec<IpNet>);

impl std::str::FromStr for NetList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{p:?} is not a network (10.0.0.0/8) or an address"))
            })
            .collect::<Result<_, _>>()
            .map(NetList)
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

/// Ingest consumer tuning (the AMQP ingest exchange).
#[derive(Debug, Clone, clap::Args)]
pub struct IngestConfig {
    /// Consumers (channels) of the ingest queue per process; each commits one batch at a
    /// time.
    #[arg(long, env = "INGEST_CONCURRENCY", default_value = "2")]
    pub ingest_concurrency: usize,

    /// Unacknowledged requests RabbitMQ hands each ingest consumer ahead of time.
    #[arg(long, env = "INGEST_PREFETCH", default_value = "1000")]
    pub ingest_prefetch: u16,

    /// Most ingest requests stored in one transaction.
    #[arg(long, env = "INGEST_BATCH_SIZE", default_value = "500")]
    pub ingest_batch_size: usize,

    /// Queues a request's `reply_to` may name, by the start of their names, besides direct
    /// reply-to (`amq.rabbitmq.reply-to`) and server-named queues (`amq.gen-`); unset:
    /// `<AMQP_PREFIX>.reply.`. A request naming any other queue gets no reply.
    #[arg(long, env = "INGEST_REPLY_PREFIX")]
    pub ingest_reply_prefix: Option<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        defaults()
    }
}

/// Where a long-running process serves `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsConfig {
    /// Where the process serves `/metrics`, `/healthz` and `/readyz` (`0` as port: any free
    /// one). Every long-running command serves them there; `serve` and `all` never serve
    /// `/metrics` on `HTTP_ADDR` (its labels name tenants), and serve `/healthz` and
    /// `/readyz` there too. Several processes on one host each need their own.
    #[arg(
        long = "metrics",
        env = "METRICS_ADDR",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_addr: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        defaults()
    }
}

/// HTTP listener and the bounds on what one client can hold of it.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpConfig {
    /// Address the HTTP API listens on (`0` as port: any free one).
    #[arg(long = "http", env = "HTTP_ADDR", default_value = "127.0.0.1:3030")]
    pub http_addr: SocketAddr,

    /// How long a client may take to send a request's headers, counted from the
    /// connection's start or the end of the previous response: also how long an idle
    /// keep-alive connection stays open.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_MS", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Longest a request may take, body upload included; past it the API answers `408`.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value = "30s", value_parser = parse_duration)]
    pub http_request_timeout: Duration,

    /// Longest a request's body may take to arrive, counted from when the handler starts
    /// reading it (after the caller is authenticated); past it the API answers `408`.
    #[arg(long, env = "HTTP_BODY_TIMEOUT_MS", default_value = "5s", value_parser = parse_duration)]
    pub http_body_timeout: Duration,

    /// Most API requests served at once; beyond it the API answers `503` with
    /// `Retry-After: 1` (the v2 SDK retries). `/healthz` and `/readyz` are not counted.
    #[arg(long, env = "HTTP_MAX_IN_FLIGHT", default_value = "256")]
    pub http_max_in_flight: usize,

    /// Of those places, the most one environment (or the operator token) may hold at once;
    /// beyond it its requests get `429` with `Retry-After: 1`. Unset: a quarter of
    /// `HTTP_MAX_IN_FLIGHT`. Public routes hold at most an eighth together, and keys not yet
    /// known are looked up an eighth at a time (`503` if none frees within 250 ms).
    #[arg(long, env = "HTTP_MAX_IN_FLIGHT_PER_ENVIRONMENT")]
    pub http_max_in_flight_per_environment: Option<usize>,

    /// Most connections the API holds open at once. At the cap it accepts no more until one
    /// closes, and asks the oldest to close, every 50 ms: first those that never sent a
    /// request (closed at once), then others (after their answer). Kept below the
    /// open-files limit, which every process raises to its hard limit at start, with room
    /// for its database, broker and webhook sockets.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value = "1024")]
    pub http_max_connections: usize,

    /// The bearer token of the operator endpoints (`/api/v1/operator/...`), at least 16
    /// characters; unset, those endpoints answer `403`. Not an environment's API key: it
    /// changes any environment. After 10 wrong tokens from one client address in a minute,
    /// or 100 from all, attempts are refused with `429` and `Retry-After`, the token not
    /// checked, until the minute ends.
    #[arg(long, env = "OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<OperatorToken>,

    /// How long a sign-in to the operator console (`/console`, with `OPERATOR_TOKEN`) lasts.
    #[arg(long, env = "CONSOLE_SESSION_TTL", default_value = "8h", value_parser = parse_duration)]
    pub console_session_ttl: Duration,

    /// Mark the console's session cookie `Secure` (browsers then send it over HTTPS only):
    /// set it when the console is reached through HTTPS, as behind a TLS Ingress.
    #[arg(long, env = "CONSOLE_SECURE_COOKIES", default_value = "false")]
    pub console_secure_cookies: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        defaults()
    }
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

/// How a long-running process stops.
#[derive(Debug, Clone, clap::Args)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long the process may take to finish what it holds; past it the
    /// process exits anyway (status 1), and RabbitMQ hands the messages it held to other
    /// consumers. Keep it below the pod's grace period.
    #[arg(long, env = "SHUTDOWN_DEADLINE_MS", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_deadline: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        defaults()
    }
}

/// How a process logs. Every command reads it.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Log filter (`tracing`'s `EnvFilter` syntax): `kongflow_events=debug` adds a line per
    /// job with its trace id.
    #[arg(
        long = "log",
        env = "RUST_LOG",
        default_value = "info,sqlx::postgres::notice=warn",
        global = true
    )]
    pub log_filter: String,

    /// `human`, or `json` for one JSON object per line.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "human",
        global = true
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// The crash and fault points a test switched on (`KONGFLOW_FAILPOINTS`, names separated
/// by commas; see `failpoint`). Unset in production: none.
pub fn failpoints() -> Vec<String> {
    std::env::var("KONGFLOW_FAILPOINTS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("amqp_prefix", &self.amqp_prefix)
            .field("amqp_queue_expires", &self.amqp_queue_expires)
            .field("amqp_queue_type", &self.amqp_queue_type)
            .field("shard_count", &self.shard_count)
            .field("delay_lead", &self.delay_lead)
            .field("database_max_connections", &self.database_max_connections)
            .field("no_migrate", &self.no_migrate)
            .finish()
    }
}

/// One setting of the command line, as the reference shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub variable: String,
    pub flag: Option<String>,
    /// `None`: unset unless given.
    pub default: Option<String>,
    /// The values it takes, when they are a fixed list (not `true`/`false`).
    pub values: Vec<String>,
    /// The top-level commands that read it; empty: every command.
    pub commands: Vec<String>,
    pub meaning: String,
}

/// Every setting `cli` reads from the environment, in the order of first declaration, each
/// once with the commands that read it.
pub fn reference(cli: &clap::Command) -> Vec<Setting> {
    let mut settings: Vec<Setting> = Vec::new();
    let mut add = |arg: &clap::Arg, command: Option<&str>| {
        let Some(variable) = arg.get_env().and_then(|v| v.to_str()) else {
            return;
        };
        if let Some(known) = settings.iter_mut().find(|s| s.variable == variable) {
            if let Some(c) = command.filter(|c| !known.commands.iter().any(|k| k == c)) {
                known.commands.push(c.to_string());
            }
            return;
        }
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let mut meaning = help.split_whitespace().collect::<Vec<_>>().join(" ");
        if !meaning.ends_with('.') {
            meaning.push('.');
        }
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let mut values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect();
        if values == ["true", "false"] {
            values.clear();
        }
        settings.push(Setting {
            variable: variable.to_string(),
            flag: arg.get_long().map(|l| format!("--{l}")),
            default: (!default.is_empty()).then(|| default.join(",")),
            values,
            commands: command.map(String::from).into_iter().collect(),
            meaning,
        });
    };
    for arg in cli.get_arguments() {
        add(arg, None);
    }
    fn under(command: &clap::Command, top: &str, add: &mut dyn FnMut(&clap::Arg, Option<&str>)) {
        for arg in command.get_arguments() {
            add(arg, Some(top));
        }
        for sub in command.get_subcommands() {
            under(sub, top, add);
        }
    }
    for sub in cli.get_subcommands() {
        under(sub, sub.get_name(), &mut add);
    }
    settings
}

/// The reference as a Markdown table (`docs/configuration.md` holds it).
pub fn markdown(settings: &[Setting]) -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::from(
        "| variable | flag | default | read by | meaning |\n| --- | --- | --- | --- | --- |\n",
    );
    for s in settings {
        let mut default = match &s.default {
            Some(d) => format!("`{d}`"),
            None => "unset".to_string(),
        };
        if !s.values.is_empty() {
            let values: Vec<String> = s.values.iter().map(|v| format!("`{v}`")).collect();
            default.push_str(&format!(" (one of {})", values.join(", ")));
        }
        let commands = if s.commands.is_empty() {
            "every command".to_string()
        } else {
            s.commands
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            s.variable,
            s.flag.as_deref().map_or("".into(), |f| format!("`{f}`")),
            cell(&default),
            commands,
            cell(&s.meaning),
        ));
    }
    out
}

/// The reference as an environment file: each variable at its default, those unset by
/// default commented out.
pub fn env_file(settings: &[Setting]) -> String {
    settings
        .iter()
        .map(|s| match &s.default {
            Some(d) => format!("{}={d}\n", s.variable),
            None => format!("# {}=\n", s.variable),
        })
        .collect()
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
    use std::time::Duration;

    use super::{
        HttpConfig, MaintenanceConfig, RelayConfig, ShardSet, WebhookConfig, WorkerConfig,
        parse_duration, redact_url, url_list,
    };

    #[test]
    fn durations_take_units_and_bare_milliseconds() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("1500ms"), Ok(ms(1500)));
        assert_eq!(parse_duration("5s"), Ok(ms(5_000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("2min"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("30d"), Ok(ms(2_592_000_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration(" 1m 30s "), Ok(ms(90_000)));
        // What the `_MS` variables always took, and still take: milliseconds.
        assert_eq!(parse_duration("250"), Ok(ms(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in [
            "",
            "s",
            "5x",
            "1.5s",
            "-1s",
            "5 seconds",
            "99999999999999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("1500ms, 5s"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn defaults_come_from_the_flags() {
        let relay = RelayConfig::default();
        assert_eq!(relay.relay_batch_size, 200);
        assert_eq!(relay.relay_poll_interval, Duration::from_secs(1));
        assert_eq!(
            relay.maintenance.retention_events,
            Duration::from_secs(30 * 86_400)
        );
        let worker = WorkerConfig::default();
        assert_eq!(worker.retry_max, Duration::from_secs(3_600));
        assert_eq!(worker.webhook.webhook_timeout, Duration::from_secs(10));
        assert_eq!(worker.webhook.webhook_allow_nets, None);
        assert_eq!(
            HttpConfig::default().http_addr,
            "127.0.0.1:3030".parse().unwrap()
        );
    }

    #[test]
    fn settings_are_grouped_by_concern() {
        // Maintenance is the relay's, webhooks the worker's, each in its own group and its
        // own flags, read from the same variables as before.
        #[derive(clap::Parser)]
        struct Relay {
            #[command(flatten)]
            relay: RelayConfig,
        }
        #[derive(clap::Parser)]
        struct Worker {
            #[command(flatten)]
            worker: WorkerConfig,
        }
        let relay = <Relay as clap::Parser>::try_parse_from([
            "relay",
            "--retention-completed",
            "2h",
            "--vacuum-interval",
            "0",
            "--relay-poll-interval",
            "1500",
        ])
        .unwrap()
        .relay;
        assert_eq!(
            relay.maintenance.retention_completed,
            Duration::from_secs(7_200)
        );
        assert!(relay.maintenance.vacuum_interval.is_zero());
        assert_eq!(relay.relay_poll_interval, Duration::from_millis(1500));
        let worker = <Worker as clap::Parser>::try_parse_from([
            "worker",
            "--webhook-connect-timeout",
            "1s",
            "--webhook-allow-nets",
            "10.0.0.0/8, ::1",
            "--retry-base",
            "100ms",
        ])
        .unwrap()
        .worker;
        let webhook: &WebhookConfig = &worker.webhook;
        assert_eq!(webhook.webhook_connect_timeout, Duration::from_secs(1));
        assert_eq!(webhook.webhook_allow_nets.as_ref().unwrap().0.len(), 2);
        assert_eq!(worker.retry_base, Duration::from_millis(100));
        let _: MaintenanceConfig = relay.maintenance;
        assert!(
            <Worker as clap::Parser>::try_parse_from(["w", "--webhook-allow-nets", "nope"])
                .is_err()
        );
    }

    #[test]
    fn the_reference_names_each_variable_once_with_its_default() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            store: super::StoreConfig,
            #[command(subcommand)]
            command: Command,
        }
        #[derive(clap::Subcommand)]
        enum Command {
            Relay {
                #[command(flatten)]
                relay: RelayConfig,
                #[command(flatten)]
                metrics: super::MetricsConfig,
            },
            Worker {
                #[command(flatten)]
                metrics: super::MetricsConfig,
            },
        }
        let settings = super::reference(&<Cli as clap::CommandFactory>::command());
        let find = |v: &str| settings.iter().find(|s| s.variable == v).unwrap();
        assert_eq!(
            settings
                .iter()
                .filter(|s| s.variable == "METRICS_ADDR")
                .count(),
            1
        );
        assert_eq!(find("METRICS_ADDR").commands, ["relay", "worker"]);
        assert!(find("DATABASE_URL").commands.is_empty());
        assert_eq!(find("RETENTION_EVENTS_MS").default.as_deref(), Some("30d"));
        assert_eq!(find("AMQP_QUEUE_TYPE").values, ["classic", "quorum"]);
        assert_eq!(find("AMQP_QUEUE_EXPIRES_MS").default, None);
        let table = super::markdown(&settings);
        assert!(
            table.contains(
                "| `RELAY_POLL_INTERVAL_MS` | `--relay-poll-interval` | `1s` | `relay` |"
            ),
            "{table}"
        );
    }

    #[test]
    fn the_amqp_ca_file_goes_to_each_amqps_node_that_names_none() {
        let store = |url: &str, ca: Option<&str>| super::StoreConfig {
            amqp_url: url.into(),
            amqp_tls_ca_file: ca.map(String::from),
            ..test_store()
        };
        let urls =
            "amqps://u:p@a:5671/%2f,amqp://u:p@b/%2f,amqps://c/v?cacertfile=/own.pem&heartbeat=5";
        assert_eq!(
            store(urls, Some("/etc/ca dir/ca.pem"))
                .with_amqp_ca_file()
                .amqp_url,
            "amqps://u:p@a:5671/%2f?cacertfile=%2Fetc%2Fca+dir%2Fca.pem,amqp://u:p@b/%2f,\
             amqps://c/v?cacertfile=/own.pem&heartbeat=5"
        );
        assert_eq!(store(urls, None).with_amqp_ca_file().amqp_url, urls);
    }

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

    fn test_store() -> super::StoreConfig {
        super::StoreConfig {
            database_url: "postgres://app:hunter2@db/kongflow".into(),
            amqp_url: "amqp://app:hunter3@rabbit/%2f".into(),
            amqp_tls_ca_file: None,
            amqp_prefix: "kongflow".into(),
            amqp_queue_expires: None,
            amqp_queue_type: super::QueueType::Classic,
            shard_count: 1,
            delay_lead: Duration::from_millis(250),
            database_max_connections: 16,
            no_migrate: false,
        }
    }

    #[test]
    fn the_store_configuration_prints_without_passwords() {
        let store = test_store();
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
