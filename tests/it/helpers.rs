//! `TestApp`: a fresh database, a fresh RabbitMQ prefix, and whichever roles a test wants
//! running in the background.

use std::future::Future;
use std::time::{Duration, Instant};

use kongflow_events::amqp::{self, JobMessage, Topology};
use kongflow_events::app::{Process, Roles};
use kongflow_events::config::{
    HttpConfig, IngestConfig, QueueType, RelayConfig, StoreConfig, WebhookConfig, WorkerConfig,
};
use kongflow_events::ledger::JobKind;
use kongflow_events::relay::Relay;
use kongflow_events::tenants::{self, Environment, EnvironmentType};
use kongflow_events::worker::{Disposition, Worker};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Nothing running in the background: the test drives every step itself.
pub const NO_ROLES: Roles = Roles::NONE;

/// Only the HTTP API running: the test publishes or runs the rest itself.
pub const HTTP_ONLY: Roles = Roles {
    http: true,
    ..Roles::NONE
};

pub fn pg_base() -> String {
    std::env::var("TEST_PG_BASE").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// How many shards a test deployment has: `TEST_SHARD_COUNT`, 3 by default, so every
/// test runs with several shards (and `TEST_SHARD_COUNT=1` runs them with the default of a
/// small install).
pub fn shard_count() -> u16 {
    std::env::var("TEST_SHARD_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// The queue type of a test deployment: `TEST_QUEUE_TYPE` (`classic`, the default, or
/// `quorum`), so the whole suite can run on quorum queues.
pub fn queue_type() -> QueueType {
    match std::env::var("TEST_QUEUE_TYPE").as_deref() {
        Ok("quorum") => QueueType::Quorum,
        _ => QueueType::Classic,
    }
}

/// `rabbitmqctl -q ARGS` on the tests' broker (`RABBITMQ_NODENAME` names a suite's own
/// node): its output; a failure fails the test.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Send a child process SIGTERM, as an orchestrator stops it.
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {pid}");
}

/// The broker of the tests: `AMQP_URL`, with `AMQP_TLS_CA_FILE` applied as the service
/// applies it (scripts/tls-test.sh runs tests on an amqps-only node).
pub fn amqp_url() -> String {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    match std::env::var("AMQP_TLS_CA_FILE") {
        Ok(file) => kongflow_events::config::amqp_url_with_ca_file(&url, &file),
        Err(_) => url,
    }
}

pub struct TestApp {
    pub pool: PgPool,
    pub db_name: String,
    pub database_url: String,
    pub store: StoreConfig,
    pub topology: Topology,
    pub amqp: lapin::Connection,
    pub channel: lapin::Channel,
    pub base_url: String,
    pub env: Environment,
    pub api_key: String,
    pub http: reqwest::Client,
    /// Stops the roles and removes the database and the broker names when the test ends,
    /// however it ends (its drop does it).
    _cleanup: Cleanup,
}

/// What a test runs: `TestApp::builder()`, then any of the settings, then `start()`. By
/// default every role runs (HTTP, relay, worker), with the default relay and HTTP
/// configurations and [`test_worker_config`].
pub struct TestAppBuilder {
    roles: Roles,
    relay: RelayConfig,
    http: HttpConfig,
    worker: WorkerConfig,
    plain: bool,
}

impl TestAppBuilder {
    /// The per-event tables plain, as a database is before `storage partition` (every other
    /// test runs on sliced ones).
    pub fn plain_tables(mut self) -> Self {
        self.plain = true;
        self
    }

    /// Which roles run in the background ([`NO_ROLES`]: the test drives every step).
    pub fn roles(mut self, roles: Roles) -> Self {
        self.roles = roles;
        self
    }

    pub fn relay(mut self, relay: RelayConfig) -> Self {
        self.relay = relay;
        self
    }

    pub fn http(mut self, http: HttpConfig) -> Self {
        self.http = http;
        self
    }

    /// The whole worker configuration (start from [`test_worker_config`] to keep the
    /// tests' quick retries and loopback webhooks).
    pub fn worker(mut self, worker: WorkerConfig) -> Self {
        self.worker = worker;
        self
    }

    /// A database of its own (a copy of the migrated template), a name prefix of its own on
    /// the broker, its topology declared, an environment with its key, and the roles running.
    pub async fn start(self) -> TestApp {
        let db_name = test_database_name();
        create_test_database(&db_name, self.plain).await;
        let database_url = format!("{}/{db_name}", pg_base());
        let prefix = format!("kft.{}", &Uuid::new_v4().simple().to_string()[..12]);
        let store = StoreConfig {
            database_url: database_url.clone(),
            amqp_url: amqp_url(),
            amqp_tls_ca_file: None,
            amqp_prefix: prefix,
            amqp_queue_expires: Some(Duration::from_secs(600)),
            shard_count: shard_count(),
            amqp_queue_type: queue_type(),
            delay_lead: Duration::from_millis(100),
            database_max_connections: 6,
            no_migrate: false,
        };
        let topology = store.topology();
        // From here on the database and the broker names are removed however the test ends.
        let mut cleanup = Cleanup {
            db_name: db_name.clone(),
            amqp_url: store.amqp_url.clone(),
            queues: topology.all_queues(),
            exchanges: topology.all_exchanges(),
            shutdown: CancellationToken::new(),
            running: None,
        };
        // The template is migrated already.
        let pool = kongflow_events::app::open_database(&StoreConfig {
            no_migrate: true,
            ..store.clone()
        })
        .await
        .expect("open test database");
        // Each database is an installation of its own: not the template's identity.
        sqlx::query("UPDATE installation SET id = gen_random_uuid(), created_at = now()")
            .execute(&pool)
            .await
            .expect("a new installation id");
        let amqp = amqp::connect(&store.amqp_url, "kongflow-test")
            .await
            .expect("connect to rabbitmq");
        let channel = amqp.create_channel().await.unwrap();
        topology.declare(&channel).await.unwrap();

        let created = tenants::create_environment(
            &pool,
            &format!("org-{db_name}/proj/dev"),
            EnvironmentType::Development,
        )
        .await
        .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let roles = self.roles;
        let process = Process {
            pool: pool.clone(),
            topology: topology.clone(),
            amqp_url: store.amqp_url.clone(),
            relay: self.relay,
            worker: self.worker,
            ingest: IngestConfig::default(),
            http: roles.http.then_some(listener),
            http_config: self.http,
            metrics: None,
        };
        if roles != Roles::NONE {
            cleanup.running = Some(tokio::spawn(process.run(roles, cleanup.shutdown.clone())));
        }

        TestApp {
            pool,
            db_name,
            database_url,
            store,
            topology,
            amqp,
            channel,
            base_url,
            env: created.environment,
            api_key: created.api_key,
            http: reqwest::Client::new(),
            _cleanup: cleanup,
        }
    }
}

/// A test database's name: `kf_test_<unix seconds>_<random>`, so that `scripts/test.sh` can
/// tell a database left by an interrupted run (hours old) from one a concurrent run is using.
fn test_database_name() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(
        "kf_test_{secs}_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The migrated templates of this test binary's migrations (tables sliced, and plain),
/// made once per run of the binary (and reused by later runs while the migrations are the
/// same).
static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
static PLAIN_TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// The advisory lock that makes one process at a time build a template (any test binary,
/// any concurrent run on the machine).
const TEMPLATE_LOCK: i64 = 0x6b66_7465_6d70; // "kftemp"

/// `kf_template_<hash>` (`kf_template_<hash>_plain` with plain tables): the hash is of the
/// migrations embedded in the binary (versions and checksums), so a template made from
/// other migrations is never used.
fn template_name(plain: bool) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for m in kongflow_events::db::MIGRATOR.iter() {
        hash.update(m.version.to_be_bytes());
        hash.update(&m.checksum[..]);
    }
    let hex: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if plain {
        format!("kf_template_{hex}_plain")
    } else {
        format!("kf_template_{hex}")
    }
}

/// Create the template if it does not exist yet: under the advisory lock, migrate a
/// database under a temporary name, close every connection to it, then rename it, so the
/// template's name only ever names a complete one. Connections to it are then refused, so
/// nothing can keep `CREATE DATABASE ... TEMPLATE` from copying it.
async fn build_template(plain: bool) -> String {
    use sqlx::Connection;
    let name = template_name(plain);
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", pg_base()))
        .await
        .expect("connect to postgres");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut admin)
        .await
        .expect("take the template lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    if !exists {
        // The names are ours: a fixed prefix and a hex hash.
        let building = format!("{name}_building");
        for statement in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut admin)
                .await
                .expect("create the template database");
        }
        let pool = kongflow_events::db::connect(&format!("{}/{building}", pg_base()), 1)
            .await
            .expect("connect to the template database");
        kongflow_events::db::migrate(&pool)
            .await
            .expect("migrate the template database");
        if !plain {
            // As a new installation's first migrate does: sliced and keyed.
            let new = kongflow_events::app::prepare_new_storage(&pool)
                .await
                .expect("slice and key the template database's tables");
            assert!(new, "the template database is a new installation");
        }
        pool.close().await;
        for statement in [
            format!("ALTER DATABASE {building} RENAME TO {name}"),
            format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut admin)
                .await
                .expect("name the template database");
        }
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK)
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    name
}

/// A test's database: a copy of the migrated template.
async fn create_test_database(db_name: &str, plain: bool) {
    use sqlx::Connection;
    let template = if plain {
        PLAIN_TEMPLATE.get_or_init(|| build_template(true)).await
    } else {
        TEMPLATE.get_or_init(|| build_template(false)).await
    };
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", pg_base()))
        .await
        .expect("connect to postgres");
    // The names are ours: fixed prefixes, a timestamp, a UUID and a hash.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE DATABASE {db_name} TEMPLATE {template}"
    )))
    .execute(&mut admin)
    .await
    .expect("create test database");
    let _ = admin.close().await;
}

/// What a test leaves behind, removed when its `TestApp` is dropped: at the end of the test,
/// or while a failed assertion unwinds. Drop cannot wait on the test's runtime, so the work
/// runs on a thread of its own with a runtime of its own, and the drop waits for it.
struct Cleanup {
    db_name: String,
    amqp_url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
    shutdown: CancellationToken,
    running: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.abort();
        }
        let db_name = std::mem::take(&mut self.db_name);
        let amqp_url = std::mem::take(&mut self.amqp_url);
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let remove = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    remove_leftovers(&db_name, &amqp_url, &queues, &exchanges),
                )
                .await;
            });
        });
        let _ = remove.join();
    }
}

/// Drop the test's database (its connections closed by force) and delete its queues and
/// exchanges. Errors are ignored: this also runs while a failed test unwinds.
async fn remove_leftovers(db_name: &str, amqp_url: &str, queues: &[String], exchanges: &[String]) {
    use sqlx::Connection;
    if let Ok(mut admin) = sqlx::PgConnection::connect(&format!("{}/postgres", pg_base())).await {
        // The name is ours: a fixed prefix, a timestamp and a UUID.
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
    }
    let Ok(conn) = amqp::connect(amqp_url, "kongflow-test-cleanup").await else {
        return;
    };
    if let Ok(channel) = conn.create_channel().await {
        for queue in queues {
            let _ = channel
                .queue_delete(
                    queue.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        for exchange in exchanges {
            let _ = channel
                .exchange_delete(
                    exchange.as_str().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
}

impl TestApp {
    /// A test deployment, configured and started: `TestApp::builder().start().await` runs
    /// every role.
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            roles: Roles::ALL,
            relay: RelayConfig::default(),
            http: HttpConfig::default(),
            worker: test_worker_config(),
            plain: false,
        }
    }

    /// Another environment of this test, with its key.
    pub async fn new_env(&self, path: &str) -> (Environment, String) {
        let created = tenants::create_environment(
            &self.pool,
            &format!("{}-{path}/proj/env", self.db_name),
            EnvironmentType::Production,
        )
        .await
        .unwrap();
        (created.environment, created.api_key)
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("http request");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn send_event(&self, key: &str, body: Value) -> Value {
        let (status, v) = self
            .request(
                reqwest::Method::POST,
                "/api/v1/events",
                Some(key),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "send event: {v}");
        v
    }

    /// Register job `job` for events named `event` through the API at `base` (a child
    /// process's, rather than this app's): the answer's status.
    pub async fn put_job_at(&self, base: &str, job: &str, event: &str) -> StatusCode {
        self.http
            .put(format!("{base}/api/v1/jobs/{job}"))
            .bearer_auth(&self.api_key)
            .json(&job_body(event, serde_json::json!({})))
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn put_job(&self, key: &str, job: &str, body: Value) -> Value {
        let (status, v) = self
            .request(
                reqwest::Method::PUT,
                &format!("/api/v1/jobs/{job}"),
                Some(key),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "register job: {v}");
        v
    }

    /// Runs per job slug for one event (by the producer's id) in any environment.
    pub async fn runs_by_job(&self, event_id: &str) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT j.slug, count(*) FROM job_runs r JOIN jobs j ON j.id = r.job_id
             JOIN event_records e ON e.id = r.event_record_id
             WHERE e.event_id = $1 GROUP BY j.slug ORDER BY j.slug",
        )
        .bind(event_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Jobs of the ledger not yet final that should move now: due ones, and every retryable
    /// one whatever its next attempt's time.
    pub async fn unfinished_jobs(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM queue_jobs
             WHERE state NOT IN ('completed', 'discarded', 'cancelled')
               AND (run_at <= now() OR state = 'retryable')",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Wait until the ledger is drained (every due or retryable job final), and fail if
    /// any job recorded an error on the way: a test that expects errors says so with
    /// [`TestApp::settle_with_errors`].
    pub async fn settle(&self) {
        self.settle_with_errors().await;
        let failed: Vec<(i64, String, Value)> = sqlx::query_as(
            "SELECT id, kind, errors FROM queue_jobs WHERE jsonb_array_length(errors) > 0",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert!(failed.is_empty(), "jobs recorded errors: {failed:?}");
    }

    /// Every job of `kind` completed, each by exactly one attempt: a job's attempt count
    /// goes up only in the transaction that runs it, so a duplicate message that ran it
    /// again would show here even where unique constraints keep its effects single.
    pub async fn assert_completed_once(&self, kind: JobKind, jobs: usize) {
        let rows: Vec<(i64, String, i32)> = sqlx::query_as(
            "SELECT id, state::text, attempt FROM queue_jobs WHERE kind = $1 ORDER BY id",
        )
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), jobs, "{} jobs: {rows:?}", kind.as_str());
        for (id, state, attempt) in rows {
            assert_eq!(
                (state.as_str(), attempt),
                ("completed", 1),
                "{} job {id}",
                kind.as_str()
            );
        }
    }

    /// Wait until the ledger is drained, errors or not.
    pub async fn settle_with_errors(&self) {
        wait_until(
            "every due or retryable job to be final",
            Duration::from_secs(20),
            || async { self.unfinished_jobs().await == 0 },
        )
        .await;
    }

    /// Messages ready in a kind's queues, every shard (a passive declare: exact, unlike
    /// management stats).
    pub async fn queue_depth(&self, kind: JobKind) -> u32 {
        let mut ready = 0;
        for shard in 0..self.topology.shard_count() {
            ready += self.shard_depth(kind, shard).await;
        }
        ready
    }

    /// The routing key of the test environment's shard on a work exchange, for a message
    /// with no priority.
    pub fn work_key(&self) -> String {
        self.topology
            .work_key("events", self.topology.shard_of(self.env.id), None)
    }

    /// The work queue of a kind's shard that the test's environment hashes to, where a
    /// message with no priority goes.
    pub fn env_queue(&self, kind: JobKind) -> String {
        self.topology
            .queue_for(kind, self.topology.shard_of(self.env.id), None)
    }

    /// Messages ready in a kind's queues of one shard.
    pub async fn shard_depth(&self, kind: JobKind, shard: u16) -> u32 {
        let mut ready = 0;
        for (_, queue) in self.topology.shard_queues(kind, shard) {
            ready += self.depth_of(&queue).await;
        }
        ready
    }

    /// Messages ready in any queue by name.
    pub async fn depth_of(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
    }

    /// Take one message from a kind's queues (the first shard that has one), without
    /// acknowledging it yet.
    pub async fn get_message(&self, kind: JobKind) -> Option<lapin::message::BasicGetMessage> {
        for queue in self.topology.queues(kind) {
            let got = self
                .channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .expect("basic.get");
            if got.is_some() {
                return got;
            }
        }
        None
    }

    /// Take every message of a kind, hand each to a worker step, ack per its disposition.
    /// Returns the dispositions.
    pub async fn drain_with(&self, worker: &Worker, kind: JobKind) -> Vec<Disposition> {
        let mut out = Vec::new();
        while let Some(m) = self.get_message(kind).await {
            let parsed = JobMessage::read(&m.delivery.data);
            let d = worker.process(vec![parsed]).await.expect("worker step");
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
            out.extend(d);
        }
        out
    }

    pub fn relay(&self) -> Relay {
        Relay::new(
            self.pool.clone(),
            self.topology.clone(),
            RelayConfig::default(),
        )
    }

    pub fn worker(&self) -> Worker {
        Worker::new(
            self.pool.clone(),
            self.topology.clone(),
            WorkerConfig::default(),
        )
    }

    /// Publish every due job of the outbox now, through a relay step.
    pub async fn relay_all(&self) -> usize {
        let relay = self.relay();
        let channel = relay.open_channel(&self.amqp).await.unwrap();
        let mut total = 0;
        loop {
            let n = relay.publish_batch(&channel).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        let _ = channel.close(200, "done".into()).await;
        total
    }

    /// Delete a kind's work queues (every shard), keeping its exchange (a queue bound under another key
    /// holds the test's auto-delete exchange): publishes to it are confirmed but returned.
    pub async fn remove_work_queue(&self, kind: JobKind) {
        let keeper = private_queue(&self.channel).await;
        self.channel
            .queue_bind(
                keeper.name().clone(),
                self.topology.exchange(kind).as_str().into(),
                "elsewhere".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for queue in self.topology.queues(kind) {
            self.channel
                .queue_delete(
                    queue.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await
                .unwrap();
        }
    }

    /// A queue of the test's own for replies, and a consumer on it.
    pub async fn reply_queue(&self) -> (String, lapin::Consumer) {
        let channel = self.amqp.create_channel().await.unwrap();
        let name = private_queue(&channel).await.name().as_str().to_string();
        let consumer = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (name, consumer)
    }

    /// Register job `slug` (version 1) for events named `event` from the default source,
    /// through the library.
    pub async fn register_job(&self, slug: &str, event: &str) {
        self.register_job_from(slug, event, "trigger.dev").await;
    }

    /// Register job `slug` (version 1) for events named `event` from `source`.
    pub async fn register_job_from(&self, slug: &str, event: &str, source: &str) {
        kongflow_events::dispatchers::register_job(
            &self.pool,
            &self.env,
            slug,
            &kongflow_events::dispatchers::JobRegistration {
                version: "1".into(),
                rule: kongflow_events::dispatchers::EventRule {
                    event_names: vec![event.into()],
                    source: source.into(),
                    payload_filter: None,
                    context_filter: None,
                },
                enabled: true,
                manual: false,
            },
        )
        .await
        .unwrap();
    }

    /// Publish every message of the outbox (the runs hand-off) with a relay step; how many.
    pub async fn relay_handoffs(&self) -> usize {
        let relay = self.relay();
        let channel = relay.open_channel(&self.amqp).await.unwrap();
        let mut total = 0;
        loop {
            let n = relay.publish_handoffs(&channel).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        let _ = channel.close(200, "done".into()).await;
        total
    }

    /// Take every message of the runs queue (acknowledged): (routing key, AMQP type,
    /// message id, body), in queue order. The outbox is emptied first: the rows left to the
    /// relay by whichever relay runs or by a relay step here, those their creator publishes
    /// by its heartbeat once confirmed (within seconds).
    pub async fn take_hand_offs(&self) -> Vec<(String, String, String, Value)> {
        let waiting = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM run_handoffs WHERE set_aside_at IS NULL",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while waiting().await > 0 {
            self.relay_handoffs().await;
            assert!(
                Instant::now() < deadline,
                "hand-offs still in the outbox after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut got = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(
                self.topology.runs_queue().as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            let p = &m.delivery.properties;
            got.push((
                m.delivery.routing_key.to_string(),
                p.kind().as_ref().map(|t| t.to_string()).unwrap_or_default(),
                p.message_id()
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                serde_json::from_slice(&m.delivery.data).unwrap(),
            ));
            m.delivery
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .unwrap();
        }
        got
    }

    /// Every run of this test's database was handed off, and nothing else: each run has
    /// `run.created` messages, all with its message id and its run id (a repeat is allowed,
    /// with the same id: what a relay that died between confirm and commit sends), and no
    /// message names a run that does not exist. Returns how many repeats there were.
    pub async fn assert_handed_off_once(&self) -> usize {
        let runs: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM job_runs ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .unwrap();
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        for (key, kind, message_id, body) in self.take_hand_offs().await {
            assert_eq!(
                (key.as_str(), kind.as_str()),
                ("run.created", "run.created.v1")
            );
            let run = body["runId"].as_str().unwrap().to_string();
            assert_eq!(message_id, format!("{run}:created"), "{body}");
            *seen.entry(run).or_default() += 1;
        }
        let mut handed: Vec<uuid::Uuid> = seen.keys().map(|r| r.parse().unwrap()).collect();
        handed.sort();
        assert_eq!(handed, runs, "one hand-off per run, for runs that exist");
        seen.values().map(|n| n - 1).sum()
    }

    /// A child process `kongflow-events <role>` on this test's stores (the roles of a
    /// `TestApp` run in the test's own process), serving HTTP on a free port, its stderr
    /// piped, once its `/readyz` answers 200. Returns it and its base URL.
    pub async fn start_child(
        &self,
        role: &str,
        extra_env: &[(&str, &str)],
    ) -> (tokio::process::Child, String) {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let base = format!("http://127.0.0.1:{port}");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
            .args([role, "--http", &format!("127.0.0.1:{port}")])
            // Probes beside the API, where this helper looks for them; metrics on a port
            // of their own (child_env's).
            .envs(self.child_env())
            .envs(extra_env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_until("the child to be ready", Duration::from_secs(30), || async {
            matches!(self.http.get(format!("{base}/readyz")).send().await,
                     Ok(r) if r.status() == StatusCode::OK)
        })
        .await;
        (child, base)
    }

    /// Environment variables for a child `kongflow-events` process on this test's stores.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.database_url.clone()),
            ("AMQP_URL", self.store.amqp_url.clone()),
            ("AMQP_PREFIX", self.store.amqp_prefix.clone()),
            ("AMQP_QUEUE_EXPIRES_MS", "600000".into()),
            ("SHARD_COUNT", self.store.shard_count.to_string()),
            (
                "AMQP_QUEUE_TYPE",
                match self.store.amqp_queue_type {
                    QueueType::Quorum => "quorum".into(),
                    QueueType::Classic => "classic".into(),
                },
            ),
            ("DATABASE_MAX_CONNECTIONS", "3".into()),
            ("RUST_LOG", "warn".into()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
        ]
    }
}

/// The workers of tests: two consumers per kind; retries come quickly (100, 200, 400,
/// 800 ms); webhooks may reach loopback (where the tests' receivers listen) and give up
/// after 2 s.
pub fn test_worker_config() -> WorkerConfig {
    WorkerConfig {
        worker_concurrency: 2,
        retry_base: Duration::from_millis(100),
        webhook: WebhookConfig {
            webhook_timeout: Duration::from_secs(2),
            webhook_allow_nets: Some("127.0.0.0/8,::1".parse().unwrap()),
            ..WebhookConfig::default()
        },
        ..WorkerConfig::default()
    }
}

/// Poll `cond` every 20 ms until it holds; panic after `timeout`.
/// A server-named queue of `channel`'s connection alone, gone when it closes.
pub async fn private_queue(channel: &lapin::Channel) -> lapin::Queue {
    channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job registration body for `PUT /api/v1/jobs/{id}`.
pub fn job_body(event: &str, extra: Value) -> Value {
    let mut trigger = serde_json::json!({ "event": event });
    if let (Value::Object(t), Value::Object(x)) = (&mut trigger, extra) {
        t.extend(x);
    }
    serde_json::json!({ "version": "1.0.0", "trigger": trigger })
}

/// Collect a child's stderr lines as they come.
pub fn collect_stderr(
    child: &mut tokio::process::Child,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use tokio::io::AsyncBufReadExt;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr piped");
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}
