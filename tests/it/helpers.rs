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

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
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
    shutdown: CancellationToken,
    running: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    /// Everything running: HTTP, relay, worker.
    pub async fn spawn() -> Self {
        Self::spawn_with(Roles::ALL).await
    }

    pub async fn spawn_with(roles: Roles) -> Self {
        Self::spawn_configured(roles, RelayConfig::default()).await
    }

    /// Whichever roles, with this relay configuration.
    pub async fn spawn_configured(roles: Roles, relay: RelayConfig) -> Self {
        Self::spawn_full(roles, relay, HttpConfig::default()).await
    }

    /// Whichever roles, with these relay and HTTP configurations.
    pub async fn spawn_full(roles: Roles, relay: RelayConfig, http_config: HttpConfig) -> Self {
        Self::spawn_all(roles, relay, http_config, test_worker_config()).await
    }

    /// Every role, with this worker configuration.
    pub async fn spawn_worker(worker: WorkerConfig) -> Self {
        Self::spawn_all(
            Roles::ALL,
            RelayConfig::default(),
            HttpConfig::default(),
            worker,
        )
        .await
    }

    /// Whichever roles, with these relay, HTTP and worker configurations.
    pub async fn spawn_all(
        roles: Roles,
        relay: RelayConfig,
        http_config: HttpConfig,
        worker: WorkerConfig,
    ) -> Self {
        let db_name = format!("kf_test_{}", Uuid::new_v4().simple());
        let admin = PgPool::connect(&format!("{}/postgres", pg_base()))
            .await
            .expect("connect to postgres");
        // The name is ours: a fixed prefix and a UUID.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let database_url = format!("{}/{db_name}", pg_base());
        let prefix = format!("kft.{}", &Uuid::new_v4().simple().to_string()[..12]);
        let store = StoreConfig {
            database_url: database_url.clone(),
            amqp_url: amqp_url(),
            amqp_prefix: prefix,
            amqp_queue_expires: Some(Duration::from_secs(600)),
            shard_count: shard_count(),
            amqp_queue_type: queue_type(),
            delay_lead: Duration::from_millis(100),
            database_max_connections: 6,
            no_migrate: false,
        };
        let pool = kongflow_events::app::open_database(&store)
            .await
            .expect("open test database");
        let topology = store.topology();
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
        let shutdown = CancellationToken::new();
        let process = Process {
            pool: pool.clone(),
            topology: topology.clone(),
            amqp_url: store.amqp_url.clone(),
            relay,
            worker,
            ingest: IngestConfig::default(),
            http: roles.http.then_some(listener),
            http_config,
            metrics: None,
        };
        let any_role = roles != Roles::NONE;
        let running = any_role.then(|| tokio::spawn(process.run(roles, shutdown.clone())));

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
            shutdown,
            running,
        }
    }

    /// Stop the roles and drop the database.
    pub async fn finish(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.running.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), r).await;
        }
        // Leave nothing on the broker (the queues would expire anyway, later).
        for queue in self.topology.all_queues() {
            let _ = self
                .channel
                .queue_delete(
                    queue.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        for exchange in self.topology.all_exchanges() {
            let _ = self
                .channel
                .exchange_delete(
                    exchange.as_str().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = self.amqp.close(200, "bye".into()).await;
        self.pool.close().await;
        let admin = PgPool::connect(&format!("{}/postgres", pg_base()))
            .await
            .unwrap();
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db_name
        )))
        .execute(&admin)
        .await;
        admin.close().await;
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
            let parsed = JobMessage::parse(&m.delivery.data).map_err(|e| e.to_string());
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
    /// message id, body), in queue order. The outbox is emptied first, by whichever relay
    /// runs, or by a relay step here.
    pub async fn take_hand_offs(&self) -> Vec<(String, String, String, Value)> {
        let waiting = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM run_handoffs")
                .fetch_one(&self.pool)
                .await
                .unwrap()
        };
        if waiting().await > 0 {
            self.relay_handoffs().await;
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

    /// A child `kongflow-events <role>` serving HTTP on a free port, its stderr piped, once
    /// its `/readyz` answers 200. Returns it and its base URL.
    pub async fn spawn_ready(
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
