//! Prometheus metrics, one registry per process, served at `/metrics`.
//!
//! Names start with `kongflow_`, carry their unit, counters end in `_total`, latencies are
//! `_seconds` histograms with buckets from 1 ms to 1 h (the stage timings from 50 µs to
//! 2.5 s). Labels are bounded: job kind, queue and shard, outcome, reason, cause, stage,
//! HTTP route (the matched pattern), method and status, role. No event or job ids; one
//! gauge names environments, and only the few with the largest backlog
//! ([`Metrics::environment_backlog`], the rest summed under one label).

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets, in seconds: 1 ms to 1 h.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 1800.0, 3600.0,
];

/// Stage-timing buckets, in seconds: 50 µs to 2.5 s, each about twice the last.
pub const STAGE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128,
    0.256, 0.512, 1.0, 2.5,
];

/// Where an event spends its time on its way to a run: each step of the path has a stage,
/// timed into `kongflow_stage_duration_seconds{stage}`. One observation per request for
/// `auth` and `group_wait`, per message for `broker`, per batch (one transaction, one
/// publish) for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// HTTP: the API key looked up (the environment of the call).
    Auth,
    /// HTTP: a send queued until the transaction of its group starts.
    GroupWait,
    /// AMQP ingest: a batch of messages decoded.
    Decode,
    /// Ingest (HTTP and AMQP): the transaction's statements, from `BEGIN` to before `COMMIT`.
    Insert,
    /// Ingest: the `COMMIT`.
    Commit,
    /// AMQP ingest: the replies and rejected copies of a batch sent.
    Reply,
    /// The fast path: committed jobs published, until the broker confirmed every one.
    Publish,
    /// Relay: a batch claimed from the outbox.
    RelayClaim,
    /// Relay: the batch published, until every confirm.
    RelayConfirm,
    /// Relay: unconfirmed marks taken back and the commit.
    RelayCommit,
    /// A job message due when published: from its publish to its delivery to a worker.
    Broker,
    /// Worker: the batch's jobs locked and marked completed.
    Take,
    /// Worker: the handlers of the batch.
    Handler,
    /// Worker: the `COMMIT` of the batch.
    WorkerCommit,
    /// Worker: the batch's messages acknowledged (AMQP ingest: its messages too).
    Ack,
}

impl Stage {
    pub const ALL: [Stage; 15] = [
        Stage::Auth,
        Stage::GroupWait,
        Stage::Decode,
        Stage::Insert,
        Stage::Commit,
        Stage::Reply,
        Stage::Publish,
        Stage::RelayClaim,
        Stage::RelayConfirm,
        Stage::RelayCommit,
        Stage::Broker,
        Stage::Take,
        Stage::Handler,
        Stage::WorkerCommit,
        Stage::Ack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Auth => "auth",
            Stage::GroupWait => "group_wait",
            Stage::Decode => "decode",
            Stage::Insert => "insert",
            Stage::Commit => "commit",
            Stage::Reply => "reply",
            Stage::Publish => "publish",
            Stage::RelayClaim => "relay_claim",
            Stage::RelayConfirm => "relay_confirm",
            Stage::RelayCommit => "relay_commit",
            Stage::Broker => "broker",
            Stage::Take => "take",
            Stage::Handler => "handler",
            Stage::WorkerCommit => "worker_commit",
            Stage::Ack => "ack",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Events stored, by how they came (`api`, `bulk`, `amqp`).
    pub events_ingested: IntCounterVec,
    /// Events refused, by reason (`invalid`, `unauthorized`, `too_large`, `unavailable`).
    pub events_rejected: IntCounterVec,
    /// AMQP ingest requests copied to the rejected queue, by reason (see
    /// `amqp_ingest::decode::Reason`; the ingest role creates every series at start).
    pub ingest_rejected: IntCounterVec,
    pub jobs_inserted: IntCounterVec,
    pub jobs_published: IntCounterVec,
    pub jobs_started: IntCounterVec,
    pub jobs_completed: IntCounterVec,
    pub jobs_retried: IntCounterVec,
    pub jobs_discarded: IntCounterVec,
    /// Messages copied to the dead-letter queue, by origin (`discarded`, `unrunnable`).
    pub dead_lettered: IntCounterVec,
    /// Another installation's job messages a worker gave back, by kind.
    pub foreign_messages: IntCounterVec,
    /// Jobs marked published by a process that never got them confirmed, put back in the
    /// outbox, by cause (`publisher_died`, `dropped`).
    pub jobs_recovered: IntCounterVec,
    /// Start of a job minus the moment it became due.
    pub queue_latency: HistogramVec,
    /// A run's creation minus its event's due time.
    pub event_latency: HistogramVec,
    /// Handler time per batch, by kind and outcome (`ok`, `error`, `panic`, `permanent`).
    pub handler_duration: HistogramVec,
    /// Webhook attempts, by result (`delivered`, `failed`, `refused`).
    pub webhook_attempts: IntCounterVec,
    /// Time of one webhook attempt, by result.
    pub webhook_duration: HistogramVec,
    /// Database errors of one webhook, handled without stopping the worker, by step
    /// (`record_attempt`, `job`, `message`).
    pub webhook_errors: IntCounterVec,
    /// Webhook messages sent back into the delay tiers, by reason (`share`: the environment
    /// had its share of the places out; `error`).
    pub webhooks_deferred: IntCounterVec,
    /// Run hand-offs published, by routing key.
    pub handoffs_published: IntCounterVec,
    /// Run hand-offs waiting to be published, and the oldest one's age.
    pub handoff_backlog: IntGauge,
    pub handoff_oldest_age: prometheus::Gauge,
    /// Run hand-offs set aside (their message could not be read or built), and how many
    /// set-aside rows are in the database.
    pub handoffs_set_aside: prometheus::IntCounter,
    pub handoffs_set_aside_waiting: IntGauge,
    /// AMQP ingest replies not sent: `reply_to` named a queue replies may not go to.
    pub ingest_replies_refused: prometheus::IntCounter,
    /// Jobs in the outbox (not yet published).
    pub outbox_backlog: IntGauge,
    /// Age of the oldest job in the outbox, in seconds.
    pub outbox_oldest_age: prometheus::Gauge,
    /// Delayed jobs published into the tiers and not yet due.
    pub delayed_jobs_waiting: IntGauge,
    /// Events refused for their environment's rate limit, by source (`http`).
    pub events_rate_limited: IntCounterVec,
    /// Due jobs waiting in the outbox, for the environments with the most (top
    /// [`TOP_BACKLOGS`], by `org/project/env`), and for all the others together
    /// ([`OTHER_ENVIRONMENTS`], 0 when none waits).
    pub environment_backlog: IntGaugeVec,
    /// Messages in the dead-letter queue.
    pub dead_letter_queue_depth: IntGauge,
    /// Messages in the runs queue (`P.runs`), waiting for a runs service.
    pub runs_queue_depth: IntGauge,
    /// Consumers of the runs queue: 0 while no runs service takes hand-offs.
    pub runs_queue_consumers: IntGauge,
    /// Rows deleted by retention, by what (`jobs`, `events`, `runs`).
    pub retention_deleted: IntCounterVec,
    /// Bytes on disk of the tables that grow with traffic, by table.
    pub table_bytes: IntGaugeVec,
    /// Messages ready in each work queue, by kind and shard (the relay samples them).
    pub work_queue_depth: IntGaugeVec,
    /// 1 while the role's RabbitMQ connection is up.
    pub amqp_connected: IntGaugeVec,
    /// 1 while Postgres answers.
    pub postgres_up: IntGauge,
    /// Connections lost and reopened, by role.
    pub reconnects: IntCounterVec,
    /// 1 while the process is ready (`/readyz`).
    pub ready: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Time per step of an event's path, by [`Stage`].
    pub stage_duration: HistogramVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    r.register(Box::new(c.clone())).expect("register counter");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
    r.register(Box::new(g.clone())).expect("register gauge");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid histogram");
    r.register(Box::new(h.clone())).expect("register histogram");
    h
}

fn stage_histogram(r: &Registry) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(
            "kongflow_stage_duration_seconds",
            "Time per step of an event's path to its runs",
        )
        .buckets(STAGE_BUCKETS.to_vec()),
        &["stage"],
    )
    .expect("valid histogram");
    r.register(Box::new(h.clone())).expect("register histogram");
    h
}

/// How many environments [`Metrics::environment_backlog`] reports by name.
pub const TOP_BACKLOGS: i64 = 10;

/// The `environment` label of the backlog of every environment not reported by name.
pub const OTHER_ENVIRONMENTS: &str = "(others)";

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid gauge");
    r.register(Box::new(g.clone())).expect("register gauge");
    g
}

fn plain_counter(r: &Registry, name: &str, help: &str) -> prometheus::IntCounter {
    let c = prometheus::IntCounter::new(name, help).expect("valid counter");
    r.register(Box::new(c.clone())).expect("register counter");
    c
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).expect("valid gauge");
    r.register(Box::new(g.clone())).expect("register gauge");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let kq = &["kind", "queue"];
        let outbox_oldest_age = prometheus::Gauge::new(
            "kongflow_outbox_oldest_age_seconds",
            "Age of the oldest job waiting in the outbox",
        )
        .expect("valid gauge");
        r.register(Box::new(outbox_oldest_age.clone()))
            .expect("register gauge");
        let amqp_connected = gauge_vec(
            &r,
            "kongflow_amqp_connected",
            "1 while the role's RabbitMQ connection is up",
            &["role"],
        );
        let environment_backlog = gauge_vec(
            &r,
            "kongflow_environment_backlog",
            "Due jobs waiting in the outbox, for the environments with the most",
            &["environment"],
        );
        let work_queue_depth = gauge_vec(
            &r,
            "kongflow_work_queue_depth",
            "Messages ready in a work queue, by kind and shard",
            &["kind", "shard"],
        );
        let table_bytes = gauge_vec(
            &r,
            "kongflow_table_bytes",
            "Bytes on disk of a table that grows with traffic, indexes included",
            &["table"],
        );
        Self {
            environment_backlog,
            work_queue_depth,
            table_bytes,
            retention_deleted: counter(
                &r,
                "kongflow_retention_deleted_total",
                "Rows deleted by retention",
                &["what"],
            ),
            events_ingested: counter(
                &r,
                "kongflow_events_ingested_total",
                "Events stored",
                &["source"],
            ),
            events_rate_limited: counter(
                &r,
                "kongflow_events_rate_limited_total",
                "Events refused for their environment's rate limit",
                &["source"],
            ),
            events_rejected: counter(
                &r,
                "kongflow_events_rejected_total",
                "Events refused",
                &["reason"],
            ),
            ingest_rejected: counter(
                &r,
                "kongflow_ingest_rejected_total",
                "AMQP ingest requests that could not be stored, copied to the rejected queue",
                &["reason"],
            ),
            jobs_inserted: counter(&r, "kongflow_jobs_inserted_total", "Jobs inserted", kq),
            jobs_published: counter(
                &r,
                "kongflow_jobs_published_total",
                "Job messages published and confirmed",
                kq,
            ),
            jobs_started: counter(
                &r,
                "kongflow_jobs_started_total",
                "Job attempts started",
                kq,
            ),
            jobs_completed: counter(&r, "kongflow_jobs_completed_total", "Jobs completed", kq),
            jobs_retried: counter(
                &r,
                "kongflow_jobs_retried_total",
                "Failed attempts with another to come",
                kq,
            ),
            jobs_discarded: counter(
                &r,
                "kongflow_jobs_discarded_total",
                "Jobs discarded after their last attempt",
                kq,
            ),
            dead_lettered: counter(
                &r,
                "kongflow_dead_lettered_total",
                "Messages copied to the dead-letter queue",
                &["origin"],
            ),
            foreign_messages: counter(
                &r,
                "kongflow_foreign_messages_total",
                "Job messages of another installation on this prefix, given back unrun",
                &["kind"],
            ),
            jobs_recovered: counter(
                &r,
                "kongflow_jobs_recovered_total",
                "Jobs whose publisher never got them confirmed, put back in the outbox",
                &["cause"],
            ),
            queue_latency: histogram(
                &r,
                "kongflow_queue_latency_seconds",
                "Start of a job minus the moment it became due",
                &["kind", "shard"],
            ),
            event_latency: histogram(
                &r,
                "kongflow_event_latency_seconds",
                "Run created minus the event's due time",
                &["kind"],
            ),
            handler_duration: histogram(
                &r,
                "kongflow_handler_duration_seconds",
                "Handler time per batch",
                &["kind", "outcome"],
            ),
            webhook_attempts: counter(
                &r,
                "kongflow_webhook_attempts_total",
                "Webhook attempts of EPHEMERAL dispatchers",
                &["result"],
            ),
            webhook_duration: histogram(
                &r,
                "kongflow_webhook_duration_seconds",
                "Time of one webhook attempt",
                &["result"],
            ),
            webhook_errors: counter(
                &r,
                "kongflow_webhook_errors_total",
                "Database errors of one webhook, handled without stopping the worker",
                &["step"],
            ),
            webhooks_deferred: counter(
                &r,
                "kongflow_webhooks_deferred_total",
                "Webhook messages sent back into the delay tiers",
                &["reason"],
            ),
            handoffs_published: counter(
                &r,
                "kongflow_handoffs_published_total",
                "Run hand-offs confirmed by the broker",
                &["routing_key"],
            ),
            handoff_backlog: gauge(
                &r,
                "kongflow_handoff_backlog",
                "Run hand-offs waiting to be published",
            ),
            handoff_oldest_age: float_gauge(
                &r,
                "kongflow_handoff_oldest_age_seconds",
                "Age of the oldest run hand-off waiting to be published",
            ),
            handoffs_set_aside: plain_counter(
                &r,
                "kongflow_handoffs_set_aside_total",
                "Run hand-offs set aside: their message could not be read or built",
            ),
            handoffs_set_aside_waiting: gauge(
                &r,
                "kongflow_handoffs_set_aside",
                "Run hand-offs set aside, kept in run_handoffs for an operator",
            ),
            ingest_replies_refused: plain_counter(
                &r,
                "kongflow_ingest_replies_refused_total",
                "AMQP ingest replies not sent: reply_to named a queue replies may not go to",
            ),
            outbox_backlog: gauge(&r, "kongflow_outbox_backlog", "Jobs waiting in the outbox"),
            outbox_oldest_age,
            delayed_jobs_waiting: gauge(
                &r,
                "kongflow_delayed_jobs_waiting",
                "Delayed jobs in the tiers, not yet due",
            ),
            dead_letter_queue_depth: gauge(
                &r,
                "kongflow_dead_letter_queue_depth",
                "Messages in the dead-letter queue",
            ),
            runs_queue_depth: gauge(
                &r,
                "kongflow_runs_queue_depth",
                "Messages in the runs queue, waiting for a runs service",
            ),
            runs_queue_consumers: gauge(
                &r,
                "kongflow_runs_queue_consumers",
                "Consumers of the runs queue (0: no runs service takes hand-offs)",
            ),
            amqp_connected,
            postgres_up: gauge(&r, "kongflow_postgres_up", "1 while Postgres answers"),
            reconnects: counter(
                &r,
                "kongflow_reconnects_total",
                "Connections lost and reopened",
                &["role"],
            ),
            ready: gauge(&r, "kongflow_ready", "1 while the process is ready"),
            http_requests: counter(
                &r,
                "kongflow_http_requests_total",
                "HTTP requests",
                &["route", "method", "status"],
            ),
            http_duration: histogram(
                &r,
                "kongflow_http_request_duration_seconds",
                "HTTP request duration",
                &["route", "method"],
            ),
            stage_duration: stage_histogram(&r),
            registry: r,
        }
    }

    /// Create the series of every job kind (with its queue), so they are exported (at 0)
    /// before anything happens. The process calls it with the kinds it knows.
    pub fn touch_job_series<'a>(
        &self,
        kinds: impl IntoIterator<Item = (&'a str, &'a str)>,
        shards: &[u16],
    ) {
        for cause in ["publisher_died", "dropped"] {
            self.jobs_recovered.with_label_values(&[cause]);
        }
        for (k, queue) in kinds {
            self.foreign_messages.with_label_values(&[k]);
            let kq = [k, queue];
            for c in [
                &self.jobs_inserted,
                &self.jobs_published,
                &self.jobs_started,
                &self.jobs_completed,
                &self.jobs_retried,
                &self.jobs_discarded,
            ] {
                c.with_label_values(&kq);
            }
            for shard in shards {
                self.queue_latency
                    .with_label_values(&[k, &shard.to_string()]);
            }
            self.event_latency.with_label_values(&[k]);
            for outcome in ["ok", "error", "panic", "permanent"] {
                self.handler_duration.with_label_values(&[k, outcome]);
            }
        }
    }

    /// Create the series of every known label value but the job kinds', so they are
    /// exported (at 0) before anything happens.
    fn touch_known_series(&self) {
        for what in ["jobs", "events", "runs", "dispatchers", "keys"] {
            self.retention_deleted.with_label_values(&[what]);
        }
        for source in ["api", "bulk", "amqp"] {
            self.events_ingested.with_label_values(&[source]);
        }
        for reason in [
            "invalid",
            "unauthorized",
            "too_large",
            "unavailable",
            "error",
        ] {
            self.events_rejected.with_label_values(&[reason]);
        }
        for origin in ["discarded", "unrunnable"] {
            self.dead_lettered.with_label_values(&[origin]);
        }
        for result in ["delivered", "failed", "refused"] {
            self.webhook_attempts.with_label_values(&[result]);
            self.webhook_duration.with_label_values(&[result]);
        }
        for step in ["record_attempt", "job", "message"] {
            self.webhook_errors.with_label_values(&[step]);
        }
        for reason in ["share", "error"] {
            self.webhooks_deferred.with_label_values(&[reason]);
        }
        for key in ["run.created", "run.cancelled"] {
            self.handoffs_published.with_label_values(&[key]);
        }
        for stage in Stage::ALL {
            self.stage_duration.with_label_values(&[stage.as_str()]);
        }
        for role in ["ingest", "relay", "worker"] {
            self.amqp_connected.with_label_values(&[role]);
            self.reconnects.with_label_values(&[role]);
        }
    }

    /// Time a [`Stage`] from `since` to now.
    pub fn stage(&self, stage: Stage, since: std::time::Instant) {
        self.stage_seconds(stage, since.elapsed().as_secs_f64());
    }

    pub fn stage_seconds(&self, stage: Stage, seconds: f64) {
        self.stage_duration
            .with_label_values(&[stage.as_str()])
            .observe(seconds);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("metrics encode");
        String::from_utf8(buf).expect("metrics are text")
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = Metrics::new();
        m.touch_known_series();
        m
    })
}

/// Counts one live connection of a role for as long as it is held.
pub struct ConnectedGuard(&'static str);

impl ConnectedGuard {
    pub fn new(role: &'static str) -> Self {
        metrics().amqp_connected.with_label_values(&[role]).inc();
        Self(role)
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        metrics().amqp_connected.with_label_values(&[self.0]).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = metrics();
        m.jobs_completed
            .with_label_values(&["deliverEvent", "events"])
            .inc();
        m.queue_latency
            .with_label_values(&["deliverEvent", "0"])
            .observe(0.002);
        let text = m.render();
        assert!(
            text.contains("kongflow_jobs_completed_total{kind=\"deliverEvent\",queue=\"events\"} ")
        );
        assert!(text.contains(
            "kongflow_queue_latency_seconds_bucket{kind=\"deliverEvent\",shard=\"0\",le=\"0.0025\"} "
        ));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("kongflow_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
            if kind == "histogram" {
                assert!(name.ends_with("_seconds"), "{name}");
            }
        }
    }
}
