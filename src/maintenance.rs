//! The maintenance passes, each on its cadence, run by every relay process beside its
//! publishing loops: the reconciler (overdue jobs whose messages went missing back to the
//! outbox), the publisher reaper (the unconfirmed jobs of processes that stopped beating),
//! retention (old final jobs; old settled events with their runs; spent EPHEMERAL
//! dispatchers), the vacuum pass for tables autovacuum leaves behind, and the gauges sampled
//! from the ledger and the broker. Passes that must run once at a time across processes take
//! an advisory lock ([`RECONCILER_LOCK`], [`RETENTION_LOCK`]).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::{self, Topology};
use crate::config::MaintenanceConfig;
use crate::db::slices;
use crate::events::retention;
use crate::ledger::upkeep::{self, Retention};
use crate::ledger::{JobKind, outbox, publishers};
use crate::metrics::metrics;

pub use crate::ledger::upkeep::{RECONCILER_LOCK, RETENTION_LOCK};

/// How often the gauges are sampled (outbox, delayed jobs, dead letters).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
}

/// The maintenance passes of one database and topology.
#[derive(Clone)]
pub struct Maintenance {
    pool: PgPool,
    topology: Topology,
    config: MaintenanceConfig,
}

impl Maintenance {
    pub fn new(pool: PgPool, topology: Topology, config: MaintenanceConfig) -> Self {
        Self {
            pool,
            topology,
            config,
        }
    }

    /// Run every pass on its cadence until `shutdown`.
    pub async fn run(self, amqp_url: String, shutdown: CancellationToken) {
        let mut passes = tokio::task::JoinSet::new();
        let (this, stop) = (self.clone(), shutdown.clone());
        passes.spawn(async move { this.run_reconciler(stop).await });
        let (this, stop) = (self.clone(), shutdown.clone());
        passes.spawn(async move { this.run_reaper(stop).await });
        let (this, stop) = (self.clone(), shutdown.clone());
        passes.spawn(async move { this.run_retention(stop).await });
        if let Some(interval) = Some(self.config.vacuum_interval).filter(|i| !i.is_zero()) {
            let (this, stop) = (self.clone(), shutdown.clone());
            passes.spawn(async move { this.run_vacuum(interval, stop).await });
        }
        passes.spawn(async move { self.run_sampler(amqp_url, shutdown).await });
        while passes.join_next().await.is_some() {}
    }

    /// Reconcile every `reconcile_interval` until `shutdown`.
    async fn run_reconciler(&self, shutdown: CancellationToken) {
        let interval = self.config.reconcile_interval;
        every(interval, &shutdown, || async {
            match self.reconcile().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    jobs = n,
                    "reconciler put overdue jobs back in the outbox (their messages went missing)"
                ),
                Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
            }
        })
        .await
    }

    /// Every [`publishers::HEARTBEAT`], put back in the outbox the unsettled jobs of
    /// processes that stopped beating (they died between a commit and its confirms).
    async fn run_reaper(&self, shutdown: CancellationToken) {
        every(publishers::HEARTBEAT, &shutdown, || async {
            match publishers::reap(&self.pool, publishers::STALE_AFTER, crate::amqp::STAMPED).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    jobs = n,
                    "a publishing process stopped beating; its unconfirmed jobs went back to the outbox"
                ),
                Err(e) => tracing::warn!(error = %e, "publisher reaper pass failed"),
            }
        })
        .await
    }

    /// Sample the ledger and the dead-letter queue into gauges every
    /// [`SAMPLE_INTERVAL`] until `shutdown`.
    async fn run_sampler(&self, amqp_url: String, shutdown: CancellationToken) {
        let mut conn: Option<lapin::Connection> = None;
        loop {
            if let Err(e) = self.sample(&amqp_url, &mut conn).await {
                tracing::debug!(error = %e, "metrics sample failed");
                conn = None;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            }
        }
        if let Some(c) = conn {
            let _ = c.close(200, "bye".into()).await;
        }
    }

    /// One sample: outbox backlog and oldest age, the environments with the most waiting,
    /// delayed jobs waiting, dead letters, and the ready messages of every shard's work
    /// queue.
    pub async fn sample(
        &self,
        amqp_url: &str,
        conn: &mut Option<lapin::Connection>,
    ) -> Result<(), MaintenanceError> {
        let m = metrics();
        let stats = outbox::stats(&self.pool).await?;
        m.outbox_backlog.set(stats.backlog);
        m.outbox_oldest_age.set(stats.oldest_age_secs);
        m.delayed_jobs_waiting.set(stats.delayed);
        let (handoffs, oldest, aside) = crate::runs::handoff::backlog(&self.pool).await?;
        m.handoff_backlog.set(handoffs);
        m.handoff_oldest_age.set(oldest);
        m.handoffs_set_aside_waiting.set(aside);
        for (table, bytes) in upkeep::table_sizes(&self.pool).await? {
            m.table_bytes.with_label_values(&[&table]).set(bytes);
        }
        let (top, total) = outbox::top_backlogs(&self.pool, crate::metrics::TOP_BACKLOGS).await?;
        let ids: Vec<Uuid> = top.iter().map(|(id, _)| *id).collect();
        let paths = crate::tenants::paths(&self.pool, &ids).await?;
        m.environment_backlog.reset();
        let mut others = total;
        for (environment, waiting) in top {
            others -= waiting;
            // An environment deleted since is named by its id.
            let label = paths
                .get(&environment)
                .cloned()
                .unwrap_or_else(|| environment.to_string());
            m.environment_backlog
                .with_label_values(&[&label])
                .set(waiting);
        }
        m.environment_backlog
            .with_label_values(&[crate::metrics::OTHER_ENVIRONMENTS])
            .set(others);
        // The dead-letter queue exists once a relay loop has connected and declared the
        // topology; asking before that only makes the broker close the channel.
        if m.amqp_connected.with_label_values(&["relay"]).get() <= 0 {
            return Ok(());
        }
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            *conn = Some(amqp::connect(amqp_url, "kongflow-sampler").await?);
        }
        let channel = conn.as_ref().expect("connected").create_channel().await?;
        // A queue's messages and consumers, asked without declaring it.
        let ask = |queue: String| {
            let channel = channel.clone();
            async move {
                let q = channel
                    .queue_declare(
                        queue.as_str().into(),
                        lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await?;
                Ok::<(i64, i64), lapin::Error>((
                    q.message_count() as i64,
                    q.consumer_count() as i64,
                ))
            }
        };
        let depth = |queue: String| async { Ok::<i64, lapin::Error>(ask(queue).await?.0) };
        m.dead_letter_queue_depth
            .set(depth(self.topology.dead_queue()).await?);
        let (runs, consumers) = ask(self.topology.runs_queue()).await?;
        m.runs_queue_depth.set(runs);
        m.runs_queue_consumers.set(consumers);
        for kind in JobKind::ALL {
            for shard in 0..self.topology.shard_count() {
                let mut ready = 0;
                for (_, queue) in self.topology.shard_queues(kind, shard) {
                    ready += depth(queue).await?;
                }
                m.work_queue_depth
                    .with_label_values(&[kind.as_str(), &shard.to_string()])
                    .set(ready);
            }
        }
        let _ = channel.close(200, "sampled".into()).await;
        Ok(())
    }

    /// Delete old final jobs, and old settled events with their runs, every
    /// `retention_interval` until `shutdown`.
    async fn run_retention(&self, shutdown: CancellationToken) {
        let interval = self.config.retention_interval;
        every(interval, &shutdown, || async {
            let deleted = metrics().retention_deleted.clone();
            match self.retain().await {
                Ok(batches) if batches.iter().sum::<u64>() == 0 => {}
                Ok(batches) => {
                    let jobs = batches.iter().sum::<u64>();
                    deleted.with_label_values(&["jobs"]).inc_by(jobs);
                    tracing::info!(
                        jobs,
                        statements = batches.len(),
                        "retention deleted old final jobs"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "retention pass failed"),
            }
            match self.retain_events_until(&shutdown).await {
                Ok(batches) => {
                    let mut total = retention::Deleted::default();
                    for b in &batches {
                        total += *b;
                    }
                    deleted.with_label_values(&["events"]).inc_by(total.events);
                    deleted.with_label_values(&["runs"]).inc_by(total.runs);
                    deleted
                        .with_label_values(&["dispatchers"])
                        .inc_by(total.dispatchers);
                    deleted.with_label_values(&["keys"]).inc_by(total.keys);
                    if total.events > 0 || total.keys > 0 {
                        tracing::info!(
                            events = total.events,
                            runs = total.runs,
                            keys = total.keys,
                            statements = batches.len(),
                            "retention deleted old events and their runs"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "event retention pass failed"),
            }
        })
        .await
    }

    /// One event retention pass: the slices of the days ahead made where missing
    /// ([`slices::ensure`]), then [`retention::retain`] and spent EPHEMERAL dispatchers
    /// ([`crate::dispatchers::delete_spent`]); only the slices when `RETENTION_EVENTS_MS`
    /// is 0.
    pub async fn retain_events(&self) -> Result<Vec<retention::Deleted>, sqlx::Error> {
        self.retain_events_until(&CancellationToken::new()).await
    }

    /// [`Self::retain_events`], its paced forgetting of keys cut short by `shutdown`.
    async fn retain_events_until(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Vec<retention::Deleted>, sqlx::Error> {
        let c = &self.config;
        let made = slices::ensure(&self.pool).await?;
        if made > 0 {
            tracing::info!(tables = made, "made the event slices of the days ahead");
        }
        match Some(c.retention_events).filter(|d| !d.is_zero()) {
            Some(keep) => {
                let batch = c.retention_batch_size;
                let keys = slices::Pace::within(c.retention_interval, shutdown.clone());
                let mut batches = retention::retain(&self.pool, keep, batch, &keys).await?;
                let dispatchers = crate::dispatchers::delete_spent(&self.pool, keep, batch).await?;
                if dispatchers > 0 {
                    batches.push(retention::Deleted {
                        dispatchers,
                        ..retention::Deleted::default()
                    });
                }
                Ok(batches)
            }
            None => Ok(Vec::new()),
        }
    }

    /// Vacuum what autovacuum leaves behind every `interval` until `shutdown`.
    async fn run_vacuum(&self, interval: Duration, shutdown: CancellationToken) {
        every(interval, &shutdown, || async {
            match upkeep::vacuum(&self.pool, interval).await {
                Ok(done) => {
                    for v in done {
                        tracing::info!(table = v.table, dead_rows = v.dead, took = ?v.took,
                            "vacuumed a ledger table autovacuum had left behind");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "vacuum pass failed (the service's database user must own its tables)"),
            }
        })
        .await
    }

    /// One retention pass (see [`upkeep::retain`]): what each statement deleted.
    pub async fn retain(&self) -> Result<Vec<u64>, sqlx::Error> {
        let c = &self.config;
        let retention = Retention {
            completed: c.retention_completed,
            discarded: c.retention_discarded,
            batch: c.retention_batch_size,
        };
        upkeep::retain(&self.pool, retention).await
    }

    /// One reconciler pass (see [`upkeep::reconcile`]): how many jobs went back.
    pub async fn reconcile(&self) -> Result<u64, sqlx::Error> {
        upkeep::reconcile(&self.pool, self.config.reconcile_margin).await
    }
}

/// Run `pass` every `interval` (the first after one interval) until `shutdown`.
async fn every<F, Fut>(interval: Duration, shutdown: &CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        pass().await;
    }
}
