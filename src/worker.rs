//! Workers: consume job messages and run their handlers.
//!
//! Messages are taken in batches (up to `worker_batch_size`, from what the prefetch already
//! holds). A batch runs in one transaction: the job rows are locked in id order, each
//! handler runs, the jobs are marked completed, the transaction commits, and only then are
//! the messages acknowledged. A job already final (a duplicate message, a redelivery after
//! a crash between commit and ack) is acknowledged with no effect. If any handler fails,
//! the batch is rolled back and its jobs run one transaction each, so one bad job cannot
//! hold back the others; a job that fails alone records its error and goes back to the
//! outbox for a later attempt, or is discarded after its last one.
//!
//! Delayed jobs come out of the delay tiers a little before they are due (the topology's
//! delay lead): the consumer hands such a message, unacknowledged, to its timer, which holds
//! it in due order and runs it when it is due, in a batch of its own, concurrently with the
//! consumer's batches of fresh jobs (so it never waits behind one). A message due later than
//! the lead goes back into the tiers for the remainder.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use rand::Rng;
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::publish::publish_dead;
use crate::amqp::{self, DirectPublisher, JobMessage, Topology, publish_job};
use crate::config::WorkerConfig;
use crate::failpoint;
use crate::handlers::{self, JobError};
use crate::ledger::publishers::{PublishedBy, Ticket};
use crate::ledger::run::{self, Failure};
use crate::ledger::{Job, JobKind, outbox};
use crate::metrics::ConnectedGuard;
use crate::metrics::{Stage, metrics};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker closed the consumer")]
    ConsumerClosed,
    #[error("a consumer task failed: {0}")]
    Task(String),
    #[error("the broker did not take a message back (early or dead)")]
    SendBack,
}

/// What to do with a message once its batch is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    /// Copy it to the dead-letter queue with this reason, then acknowledge it: it names no
    /// job this worker can run (it does not parse, its kind is unknown, or the ledger has
    /// no such job).
    DeadLetter(String),
}

/// How much longer than its longest attempt a webhook job stays leased to its worker.
pub const WEBHOOK_LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a webhook message waits in the delay tiers when its environment holds its share
/// of the places, or when the ledger could not take it (a database error of its own).
pub const WEBHOOK_DEFER: std::time::Duration = std::time::Duration::from_secs(1);

/// Webhook deliveries in flight on a consumer: each runs as a task of its own and settles
/// its own message, so a slow receiver holds its own message and no other. At most
/// `WEBHOOK_CONCURRENCY` run at once, and one environment holds at most its share of those
/// places (`WEBHOOK_CONCURRENCY_PER_ENVIRONMENT`, counting those waiting for a place): its
/// other messages go back into the delay tiers, never in the way of another environment's.
struct Inflight {
    tasks: std::sync::Mutex<JoinSet<Result<(), WorkerError>>>,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// Places each environment holds, running or waiting for a permit.
    held: Shares,
    /// The most places one environment holds.
    share: usize,
    /// Cancelled when the consumer stops: a webhook still waiting for a place does not
    /// start (its message, unacknowledged, goes back when the channel closes).
    stopping: CancellationToken,
}

type Shares = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, usize>>>;

/// An environment's place, given back when dropped.
struct Place {
    env: Option<uuid::Uuid>,
    held: Shares,
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(env) = self.env else { return };
        let mut held = self.held.lock().expect("inflight lock");
        if let Some(n) = held.get_mut(&env) {
            *n -= 1;
            if *n == 0 {
                held.remove(&env);
            }
        }
    }
}

impl Inflight {
    fn new(concurrency: usize, share: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            tasks: std::sync::Mutex::new(JoinSet::new()),
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency)),
            held: Default::default(),
            share: share.clamp(1, concurrency),
            stopping: CancellationToken::new(),
        }
    }

    /// A place for a webhook of `env`, unless the environment holds its share already. A
    /// message of no known environment (it names no job; it is dead-lettered at once) is
    /// not counted.
    fn admit(&self, env: Option<uuid::Uuid>) -> Option<Place> {
        if let Some(env) = env {
            let mut held = self.held.lock().expect("inflight lock");
            let n = held.entry(env).or_default();
            if *n >= self.share {
                return None;
            }
            *n += 1;
        }
        Some(Place {
            env,
            held: self.held.clone(),
        })
    }

    /// The first error of the tasks already finished.
    fn reap(&self) -> Result<(), WorkerError> {
        let mut tasks = self.tasks.lock().expect("inflight lock");
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| WorkerError::Task(e.to_string()))??;
        }
        Ok(())
    }

    /// Wait for every task still running (a stopping consumer lets them settle); those
    /// still waiting for a place end at once.
    async fn drain(&self) {
        self.stopping.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("inflight lock"));
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) | Err(e) = done.map_err(|e| WorkerError::Task(e.to_string())) {
                tracing::warn!(error = %e, "webhook delivery ended in error while stopping");
            }
        }
    }
}

/// A message held until its due time.
type Held = (DateTime<Utc>, Delivery, JobMessage);

/// The deliveries of a shard's consumers, merged.
type Deliveries = futures_util::stream::BoxStream<'static, lapin::Result<Delivery>>;

/// Merge consumers given highest priority first: whenever a higher one has a delivery
/// ready, it comes before any of a lower one.
fn highest_first(consumers: Vec<lapin::Consumer>) -> Deliveries {
    use futures_util::stream::{PollNext, select_with_strategy};
    let mut streams = consumers.into_iter().map(StreamExt::boxed);
    let first = streams.next().expect("a shard has a queue");
    streams.fold(first, |higher, lower| {
        select_with_strategy(higher, lower, |_: &mut ()| PollNext::Left).boxed()
    })
}

/// One work queue: a kind's shard.
#[derive(Debug, Clone, Copy)]
struct Shard {
    kind: JobKind,
    shard: u16,
}

/// A batch of deliveries sorted by [`Worker::sort_arrivals`].
#[derive(Default)]
struct Arrived {
    /// To run now (or to dead-letter, with the reason).
    due: Vec<(Delivery, Result<JobMessage, String>)>,
    /// To send back into the tiers.
    early: Vec<(Delivery, JobMessage)>,
    /// To hold until due.
    hold: Vec<Held>,
    /// Another installation's (see `amqp::owner`): given back to the queue, never run.
    foreign: Vec<Delivery>,
}

#[derive(Clone)]
pub struct Worker {
    pool: PgPool,
    topology: Topology,
    config: WorkerConfig,
    /// Publishes the jobs the handlers insert right after their batch commits; without one,
    /// the relay publishes them.
    publisher: Option<DirectPublisher>,
    /// Sends the webhooks of `events.deliverWebhook` jobs.
    webhooks: std::sync::Arc<crate::webhooks::Sender>,
}

impl Worker {
    pub fn new(pool: PgPool, topology: Topology, config: WorkerConfig) -> Self {
        Self {
            webhooks: std::sync::Arc::new(crate::webhooks::Sender::new(&config.webhook)),
            pool,
            topology,
            config,
            publisher: None,
        }
    }

    /// Publish the jobs handlers insert with `publisher`, right after each commit.
    pub fn publishing(self, publisher: DirectPublisher) -> Self {
        Self {
            publisher: Some(publisher),
            ..self
        }
    }

    /// Run until `shutdown`, reconnecting with backoff.
    pub async fn run(self, amqp_url: String, shutdown: CancellationToken) {
        crate::supervise::supervise("worker", shutdown.clone(), || {
            let this = self.clone();
            let url = amqp_url.clone();
            let shutdown = shutdown.clone();
            async move { this.run_connected(&url, shutdown).await }
        })
        .await
    }

    async fn run_connected(
        &self,
        url: &str,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let conn: Connection =
            amqp::connect(url, &format!("kongflow-worker:{}", self.topology.prefix())).await?;
        let setup = conn.create_channel().await?;
        self.topology.declare(&setup).await?;
        // Messages that arrive early go back into the tiers through this channel.
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let _connected = ConnectedGuard::new("worker");
        let mut tasks = JoinSet::new();
        let shards = self.shards();
        for kind in JobKind::ALL {
            for &shard in &shards {
                for _ in 0..self.config.worker_concurrency.max(1) {
                    // A channel per queue of the shard (one, or one per priority level).
                    let mut channels = Vec::new();
                    for _ in self.topology.shard_queues(kind, shard) {
                        channels.push(conn.create_channel().await?);
                    }
                    let this = self.clone();
                    let shutdown = shutdown.clone();
                    let publisher = publisher.clone();
                    let queue = Shard { kind, shard };
                    tasks.spawn(
                        async move { this.consume(channels, publisher, queue, shutdown).await },
                    );
                }
            }
        }
        tracing::info!(?shards, "worker connected");
        let result = crate::supervise::until_first_failure(tasks, WorkerError::Task).await;
        let _ = conn.close(200, "bye".into()).await;
        result
    }

    /// The shards this worker consumes (the process checked the configuration at start).
    pub fn shards(&self) -> Vec<u16> {
        self.config
            .shards_of(self.topology.shard_count())
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "the worker consumes no shard");
                Vec::new()
            })
    }

    /// Consume a kind's shard: its one queue, or with quorum queues its queue of each
    /// priority level, each on its own channel, merged so that a level's ready messages are
    /// always taken before a lower level's.
    async fn consume(
        &self,
        channels: Vec<Channel>,
        publisher: Channel,
        queue: Shard,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let Shard { kind, shard } = queue;
        let mut consumers = Vec::new();
        for (channel, (_, name)) in channels.iter().zip(self.topology.shard_queues(kind, shard)) {
            channel
                .basic_qos(self.config.worker_prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(consumer);
        }
        let mut consumer = highest_first(consumers);
        // One `multiple` ack covers earlier deliveries of its own channel only: with several
        // channels a batch is acknowledged message by message.
        let one_channel = channels.len() == 1;
        // Messages that came out of the tiers a little before their due time wait in the
        // timer, unacknowledged, and run at their due time in batches of their own, never
        // behind a batch of fresh jobs. `holding` counts them until they are settled.
        let (to_timer, from_loop) = tokio::sync::mpsc::unbounded_channel();
        let holding = AtomicUsize::new(0);
        let inflight = Inflight::new(
            self.config.webhook.webhook_concurrency,
            self.config.webhook.webhook_concurrency_per_environment,
        );
        let arrivals = async {
            loop {
                let batch = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    d = consumer.next() => self.more_of(&mut consumer, d)?,
                };
                let now = Utc::now();
                let Arrived {
                    due,
                    early,
                    hold,
                    foreign,
                } = self.sort_arrivals(kind, batch, now);
                if !foreign.is_empty() {
                    self.give_back(kind, foreign).await?;
                }
                if !hold.is_empty() {
                    holding.fetch_add(hold.len(), Ordering::SeqCst);
                    for held in hold {
                        // The timer lives as long as this loop.
                        let _ = to_timer.send(held);
                    }
                }
                if !early.is_empty() {
                    self.send_back(&publisher, queue, &early).await?;
                    for (delivery, _) in &early {
                        delivery.ack(BasicAckOptions::default()).await?;
                    }
                }
                if !due.is_empty() {
                    // One `multiple` ack may settle the batch only when the timer holds
                    // nothing unsettled: it gets its messages from this loop alone.
                    let alone = one_channel && holding.load(Ordering::SeqCst) == 0;
                    self.settle(&publisher, queue, due, now, alone, &inflight)
                        .await?;
                }
            }
        };
        let result = tokio::select! {
            r = arrivals => r,
            r = self.run_held(&publisher, queue, from_loop, &holding, &inflight) => r,
        };
        inflight.drain().await;
        // Unacknowledged prefetched messages go back to the queue when the channel closes.
        for channel in channels {
            let _ = channel.close(200, "shutdown".into()).await;
        }
        result
    }

    /// The timer of a consumer: hold messages that came out of the tiers before their due
    /// time, in due order, and run each batch that falls due at once, settling its messages
    /// one by one. Ends when the consumer's loop does.
    async fn run_held(
        &self,
        publisher: &Channel,
        queue: Shard,
        mut arriving: tokio::sync::mpsc::UnboundedReceiver<Held>,
        holding: &AtomicUsize,
        inflight: &Inflight,
    ) -> Result<(), WorkerError> {
        let mut held: Vec<Held> = Vec::new();
        loop {
            let wake = held.first().map(|(at, _, _)| instant_of(*at));
            tokio::select! {
                biased;
                _ = sleep_until_opt(wake) => {}
                next = arriving.recv() => {
                    let Some(next) = next else { return Ok(()) };
                    let pos = held.partition_point(|(t, _, _)| *t <= next.0);
                    held.insert(pos, next);
                    continue;
                }
            }
            let now = Utc::now();
            let ripe = held.partition_point(|(t, _, _)| *t <= now);
            if ripe == 0 {
                continue;
            }
            let batch: Vec<_> = held.drain(..ripe).map(|(_, d, m)| (d, Ok(m))).collect();
            let settled = batch.len();
            self.settle(publisher, queue, batch, now, false, inflight)
                .await?;
            holding.fetch_sub(settled, Ordering::SeqCst);
        }
    }

    /// The delivery that woke the consumer and whatever else is ready, up to a batch.
    fn more_of(
        &self,
        consumer: &mut Deliveries,
        first: Option<lapin::Result<Delivery>>,
    ) -> Result<Vec<Delivery>, WorkerError> {
        let Some(first) = first else {
            return Err(WorkerError::ConsumerClosed);
        };
        let mut batch = vec![first?];
        while batch.len() < self.config.worker_batch_size {
            match consumer.next().now_or_never() {
                Some(Some(d)) => batch.push(d?),
                _ => break,
            }
        }
        Ok(batch)
    }

    /// Decide for each delivery (see [`arrival`]): due (or unrunnable: it goes to the dead
    /// letters with the batch), held until due, or early (sent back).
    fn sort_arrivals(&self, kind: JobKind, batch: Vec<Delivery>, now: DateTime<Utc>) -> Arrived {
        let mut arrived = Arrived::default();
        for delivery in batch {
            if let (Some(ours), Some(theirs)) = (
                self.topology.install(),
                crate::amqp::owner::install_of(&delivery.properties),
            ) && ours != theirs
            {
                arrived.foreign.push(delivery);
                continue;
            }
            match JobMessage::parse(&delivery.data) {
                Ok(m) if m.kind != kind.as_str() => {
                    let reason = format!(
                        "a message of kind {:?} on the queue of {:?}",
                        m.kind,
                        kind.as_str()
                    );
                    arrived.due.push((delivery, Err(reason)));
                }
                Ok(m) => {
                    time_broker_hop(&delivery, &m, now);
                    match arrival(&m, now, self.topology.delay_lead()) {
                        Arrival::Due => arrived.due.push((delivery, Ok(m))),
                        Arrival::Hold => arrived.hold.push((m.run_at, delivery, m)),
                        Arrival::SendBack => arrived.early.push((delivery, m)),
                    }
                }
                Err(e) => arrived
                    .due
                    .push((delivery, Err(format!("unparseable job message: {e}")))),
            }
        }
        arrived
    }

    /// Run a batch and settle its messages ([`Worker::run_and_settle`]); webhooks each in a
    /// task of their own, settled as each ends, within the consumer's places and each
    /// environment's share of them (see [`Inflight`]).
    async fn settle(
        &self,
        publisher: &Channel,
        queue: Shard,
        due: Vec<(Delivery, Result<JobMessage, String>)>,
        now: DateTime<Utc>,
        alone: bool,
        inflight: &Inflight,
    ) -> Result<(), WorkerError> {
        if queue.kind != JobKind::DeliverWebhook {
            return self
                .run_and_settle(publisher, queue.kind, due, now, alone)
                .await;
        }
        inflight.reap()?;
        let ids: Vec<i64> = due
            .iter()
            .filter_map(|(_, m)| m.as_ref().ok().map(|m| m.id))
            .collect();
        let envs = run::environments_of(&self.pool, &ids).await?;
        let mut over_share = Vec::new();
        for one in due {
            let env = one
                .1
                .as_ref()
                .ok()
                .and_then(|m| envs.iter().find(|(id, _)| *id == m.id).map(|&(_, env)| env));
            let Some(place) = inflight.admit(env) else {
                if let (delivery, Ok(message)) = one {
                    over_share.push((delivery, message));
                }
                continue;
            };
            let (this, publisher) = (self.clone(), publisher.clone());
            let (permits, stopping) = (inflight.permits.clone(), inflight.stopping.clone());
            inflight
                .tasks
                .lock()
                .expect("inflight lock")
                .spawn(async move {
                    let permit = tokio::select! {
                        p = permits.acquire_owned() => p.expect("the semaphore is never closed"),
                        _ = stopping.cancelled() => return Ok(()),
                    };
                    let settled = this.run_webhook(&publisher, queue, one, now).await;
                    drop((permit, place));
                    settled
                });
        }
        if !over_share.is_empty() {
            tracing::debug!(
                waiting = over_share.len(),
                "webhooks of an environment at its share wait in the tiers"
            );
            self.defer(publisher, queue, over_share, "share").await?;
        }
        Ok(())
    }

    /// Run one webhook message and settle it. An error of the database while taking it (its
    /// row held longer than the lease waits, say) stops no one: it is logged and counted,
    /// and the message goes back into the tiers for a later try.
    async fn run_webhook(
        &self,
        publisher: &Channel,
        queue: Shard,
        (delivery, message): (Delivery, Result<JobMessage, String>),
        now: DateTime<Utc>,
    ) -> Result<(), WorkerError> {
        let again = message.as_ref().ok().cloned();
        let late_ms = again.as_ref().map(|m| (now - m.run_at).num_milliseconds());
        let dispositions = match self.process(vec![message]).await {
            Ok(d) => d,
            Err(e) => {
                metrics()
                    .webhook_errors
                    .with_label_values(&["message"])
                    .inc();
                let Some(message) = again else {
                    return Err(e.into());
                };
                tracing::error!(job_id = message.id, error = %e,
                    "webhook message not run for a database error; sent back for a later try");
                return self
                    .defer(publisher, queue, vec![(delivery, message)], "error")
                    .await;
            }
        };
        tracing::debug!(late_ms, "webhook message processed");
        self.settle_dispositions(publisher, vec![delivery], dispositions, false)
            .await
    }

    /// Send messages back into the tiers for [`WEBHOOK_DEFER`], and acknowledge them once
    /// the broker has confirmed the copies. The job is not touched: the copy runs it.
    async fn defer(
        &self,
        publisher: &Channel,
        queue: Shard,
        messages: Vec<(Delivery, JobMessage)>,
        reason: &str,
    ) -> Result<(), WorkerError> {
        metrics()
            .webhooks_deferred
            .with_label_values(&[reason])
            .inc_by(messages.len() as u64);
        let later =
            Utc::now() + chrono::Duration::from_std(WEBHOOK_DEFER).expect("a second is a duration");
        let copies: Vec<(Delivery, JobMessage)> = messages
            .into_iter()
            .map(|(d, m)| (d, JobMessage { run_at: later, ..m }))
            .collect();
        self.send_back(publisher, queue, &copies).await?;
        for (delivery, _) in &copies {
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    /// Run a batch and settle its messages. `alone`: no other message of this channel is
    /// unsettled, so one `multiple` ack can settle the batch.
    async fn run_and_settle(
        &self,
        publisher: &Channel,
        kind: JobKind,
        due: Vec<(Delivery, Result<JobMessage, String>)>,
        now: DateTime<Utc>,
        alone: bool,
    ) -> Result<(), WorkerError> {
        let started = std::time::Instant::now();
        let worst_late_ms = due
            .iter()
            .filter_map(|(_, m)| m.as_ref().ok())
            .map(|m| (now - m.run_at).num_milliseconds())
            .max();
        let (deliveries, messages): (Vec<Delivery>, Vec<_>) = due.into_iter().unzip();
        let dispositions = self.process(messages).await?;
        tracing::debug!(kind = kind.as_str(), size = deliveries.len(), worst_late_ms, took = ?started.elapsed(), "batch processed");
        self.settle_dispositions(publisher, deliveries, dispositions, alone)
            .await
    }

    /// Acknowledge each delivery, or copy it to the dead letters first, as its disposition
    /// says. `alone`: see [`Worker::run_and_settle`].
    async fn settle_dispositions(
        &self,
        publisher: &Channel,
        deliveries: Vec<Delivery>,
        dispositions: Vec<Disposition>,
        alone: bool,
    ) -> Result<(), WorkerError> {
        let acking = std::time::Instant::now();
        if alone && dispositions.iter().all(|d| *d == Disposition::Ack) {
            // One frame acknowledges the whole batch: this channel has one consumer and
            // every other delivery on it is already settled.
            let last = deliveries
                .iter()
                .max_by_key(|d| d.delivery_tag)
                .expect("a batch is never empty");
            last.ack(BasicAckOptions { multiple: true }).await?;
            metrics().stage(Stage::Ack, acking);
            return Ok(());
        }
        // One frame per delivery (a channel consuming several queues, as in quorum mode
        // with a queue per priority level, or a batch with a dead letter in it).
        for (delivery, disposition) in deliveries.iter().zip(dispositions) {
            match disposition {
                Disposition::Ack => {
                    delivery.ack(BasicAckOptions::default()).await?;
                }
                Disposition::DeadLetter(reason) => {
                    metrics()
                        .dead_lettered
                        .with_label_values(&["unrunnable"])
                        .inc();
                    tracing::error!(%reason, delivery_tag = delivery.delivery_tag, "message dead-lettered");
                    let confirm = publish_dead(
                        publisher,
                        &self.topology,
                        &delivery.data,
                        &reason,
                        None,
                        delivery.properties.clone(),
                    )
                    .await?
                    .await?;
                    if !confirm.is_ack() || confirm.take_message().is_some() {
                        return Err(WorkerError::SendBack);
                    }
                    delivery.ack(BasicAckOptions::default()).await?;
                }
            }
        }
        metrics().stage(Stage::Ack, acking);
        Ok(())
    }

    /// Another installation's messages go back to the queue, settled before the batch
    /// they came in (whose `multiple` ack must not cover them). The consumer then pauses a
    /// second, so a broker shared by mistake does not spin it.
    async fn give_back(&self, kind: JobKind, foreign: Vec<Delivery>) -> Result<(), WorkerError> {
        metrics()
            .foreign_messages
            .with_label_values(&[kind.as_str()])
            .inc_by(foreign.len() as u64);
        tracing::error!(
            messages = foreign.len(),
            prefix = self.topology.prefix(),
            "messages of another installation on this prefix: given back, not run; give each installation its own AMQP_PREFIX"
        );
        for delivery in &foreign {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await?;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        Ok(())
    }

    /// Messages that arrived well before their due time (a delay longer than the tiers hold
    /// in one pass, or clocks apart) go back into the tiers for the remainder. The caller
    /// acknowledges the originals only after this returns: the broker confirmed the copies.
    async fn send_back(
        &self,
        publisher: &Channel,
        Shard { kind, shard }: Shard,
        early: &[(Delivery, JobMessage)],
    ) -> Result<(), WorkerError> {
        let mut confirms = Vec::with_capacity(early.len());
        for (delivery, message) in early {
            tracing::debug!(job_id = message.id, run_at = %message.run_at, "message early, sent back into the tiers");
            let confirm = publish_job(
                publisher,
                &self.topology,
                kind,
                shard,
                message,
                delivery.properties.clone(),
                Utc::now(),
            )
            .await?;
            confirms.push(confirm);
        }
        for confirm in join_all(confirms).await {
            let confirm = confirm?;
            if !confirm.is_ack() || confirm.take_message().is_some() {
                return Err(WorkerError::SendBack);
            }
        }
        Ok(())
    }

    /// Run the jobs named by a batch of messages and say what to do with each message. On
    /// `Ok`, everything the batch did is committed. Public so tests can drive one step.
    pub async fn process(
        &self,
        messages: Vec<Result<JobMessage, String>>,
    ) -> Result<Vec<Disposition>, sqlx::Error> {
        let mut ids = Vec::with_capacity(messages.len());
        let mut message_ids = Vec::with_capacity(messages.len());
        // A queue holds one kind: a webhook batch is all webhooks.
        let webhooks = messages.iter().any(|m| {
            m.as_ref()
                .is_ok_and(|m| m.kind == JobKind::DeliverWebhook.as_str())
        });
        let mut dispositions: Vec<Disposition> = messages
            .into_iter()
            .map(|m| match m {
                Ok(m) => {
                    ids.push(m.id);
                    message_ids.push(Some(m.id));
                    Disposition::Ack
                }
                Err(reason) => {
                    message_ids.push(None);
                    Disposition::DeadLetter(reason)
                }
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(dispositions);
        }

        // Webhooks record their own failures (each runs alone).
        let (outcome, missing) = if webhooks {
            (Ok(()), self.run_webhooks(&ids).await?)
        } else {
            self.run_jobs(&ids, false).await?
        };
        for (d, id) in dispositions.iter_mut().zip(&message_ids) {
            if let Some(id) = id
                && missing.contains(id)
            {
                *d = Disposition::DeadLetter(format!("the ledger has no job {id}"));
            }
        }
        if let Err(error) = outcome {
            if let [id] = ids[..] {
                self.record_failure(id, &error).await?;
            } else {
                // Find the culprit: one transaction per job, so the others still complete.
                for id in ids {
                    if let (Err(error), _) = self.run_jobs(&[id], false).await? {
                        self.record_failure(id, &error).await?;
                    }
                }
            }
        }
        failpoint::hit(failpoint::WORKER_AFTER_COMMIT);
        Ok(dispositions)
    }

    /// Run webhook jobs, each on its own: the job leased ([`run::lease`]: only one worker
    /// sends it), the request made holding no transaction, then, for a 2xx answer, the job
    /// taken and completed in a transaction of its own (see [`handlers::deliver_webhook`]);
    /// a failed attempt is recorded like any job's. Returns the ids the ledger has no row
    /// for.
    async fn run_webhooks(&self, ids: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
        // Held for the longest an attempt can take, and a margin: a duplicate message meanwhile
        // finds the job not due, and a worker that dies holding it leaves it to the reconciler.
        let hold = self.webhooks.connect_timeout + self.webhooks.timeout + WEBHOOK_LEASE_MARGIN;
        let pending = run::lease(&self.pool, ids, hold).await?;
        for bad in &pending.unreadable {
            self.record_failure(bad.id, &JobError::Permanent(bad.reason.clone()))
                .await?;
        }
        let attempts = pending.jobs.iter().map(|job| async move {
            let Err(e) = self.run_webhook_job(job).await else {
                return Ok(());
            };
            // A database error of this job's is this job's failure, not the worker's: the
            // job is retried (or discarded) like any other, and the others run on.
            metrics().webhook_errors.with_label_values(&["job"]).inc();
            tracing::error!(job_id = job.id, error = %e, "webhook job failed in the database");
            if self.record_failure(job.id, &JobError::from(e)).await?
                && let crate::ledger::JobArgs::DeliverWebhook(args) = job.args
            {
                handlers::deliver_webhook::failed(&self.pool, args.id).await?;
            }
            Ok::<(), sqlx::Error>(())
        });
        for done in join_all(attempts).await {
            done?;
        }
        Ok(pending.missing)
    }

    /// One leased webhook job: the attempt, then its completion or its failure.
    async fn run_webhook_job(&self, job: &Job) -> Result<(), sqlx::Error> {
        let crate::ledger::JobArgs::DeliverWebhook(args) = job.args else {
            let error = JobError::Permanent(format!("job {} is no webhook", job.id));
            return self.record_failure(job.id, &error).await.map(drop);
        };
        let sent = handlers::deliver_webhook::attempt(&self.pool, &self.webhooks, job, args);
        let error = match sent.await? {
            Ok(()) => match self.run_jobs(&[job.id], true).await? {
                (Ok(()), _) => return Ok(()),
                (Err(error), _) => error,
            },
            Err(error) => error,
        };
        if self.record_failure(job.id, &error).await? {
            handlers::deliver_webhook::failed(&self.pool, args.id).await?;
        }
        Ok(())
    }

    /// Run `ids` (sorted) in one transaction (`leased`: jobs this worker holds by
    /// [`run::lease`]). On a handler error the transaction is rolled
    /// back and the error returned inside `Ok`, with the ids the ledger does not have.
    async fn run_jobs(
        &self,
        ids: &[i64],
        leased: bool,
    ) -> Result<(Result<(), JobError>, Vec<i64>), sqlx::Error> {
        let started = std::time::Instant::now();
        // Taken before the transaction: the jobs it inserts for this process to publish
        // carry its stamp from their first commit.
        let ticket = match &self.publisher {
            Some(p) => Some(p.ticket().await?),
            None => None,
        };
        let stamp = ticket.as_ref().map(Ticket::stamp);
        let mut tx = self.pool.begin().await?;
        let taken = if leased {
            run::take_leased(&mut tx, ids).await?
        } else {
            run::take(&mut tx, ids).await?
        };
        metrics().stage(Stage::Take, started);
        if !taken.missing.is_empty() {
            // A message for a final job is a duplicate (or a redelivery after a crash
            // between commit and ack): acknowledged, no effect. One naming no job at all
            // goes to the dead letters.
            tracing::warn!(missing = ?taken.missing, "messages name jobs that have no ledger row");
        }
        if let Some(bad) = taken.unreadable.first() {
            return Ok((Err(JobError::Permanent(bad.reason.clone())), taken.missing));
        }
        failpoint::stall_if(failpoint::WORKER_STALL, !taken.jobs.is_empty());
        let started_at = Utc::now();
        for job in &taken.jobs {
            tracing::debug!(job_id = job.id, kind = job.kind.as_str(), attempt = job.attempt,
                event = %job.args.event_record_id(), trace_id = job.trace_id().unwrap_or_default(), "job started");
        }
        let mut inserted = match self.run_by_kind(&mut tx, &taken.jobs, stamp).await {
            Ok(inserted) => inserted,
            Err(e) => return Ok((Err(e), taken.missing)),
        };
        if let Some(stamp) = stamp {
            // The room these jobs leave in flight goes to their environments' next jobs.
            inserted.extend(outbox::refill(&mut tx, &freed_by(&taken.jobs), stamp).await?);
        }
        let committing = std::time::Instant::now();
        tx.commit().await?;
        metrics().stage(Stage::WorkerCommit, committing);
        count_completed(&self.topology, &taken.jobs, started_at);
        if let (Some(p), Some(ticket)) = (&self.publisher, ticket) {
            p.publish(&inserted, ticket).await;
        }
        Ok((Ok(()), taken.missing))
    }

    /// Each kind's handler on its jobs, timed; the first error stops the batch. Returns the
    /// jobs the handlers inserted.
    async fn run_by_kind(
        &self,
        tx: &mut PgConnection,
        jobs: &[Job],
        caller_publishes: Option<PublishedBy>,
    ) -> Result<Vec<Job>, JobError> {
        let mut inserted = Vec::new();
        let mut kinds: Vec<JobKind> = jobs.iter().map(|j| j.kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            let group: Vec<Job> = jobs.iter().filter(|j| j.kind == kind).cloned().collect();
            let timer = std::time::Instant::now();
            let outcome = AssertUnwindSafe(handlers::run_batch(tx, kind, &group, caller_publishes))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(JobError::Panic(panic_message(&panic))));
            let outcome_label = match &outcome {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            metrics()
                .handler_duration
                .with_label_values(&[kind.as_str(), outcome_label])
                .observe(timer.elapsed().as_secs_f64());
            metrics().stage(Stage::Handler, timer);
            inserted.extend(outcome?);
        }
        Ok(inserted)
    }

    /// Record a failed attempt (see [`run::record_failure`]): retried after
    /// [`handlers::backoff`] × a jitter of 0.9 to 1.1 (the relay routes it through the delay
    /// tiers), or discarded after its last attempt or a permanent error, for the relay to
    /// copy it to the dead-letter queue. Returns whether it was discarded.
    async fn record_failure(&self, id: i64, error: &JobError) -> Result<bool, sqlx::Error> {
        let jitter: f64 = rand::rng().random_range(0.9..1.1);
        let (base, max) = (self.config.retry_base, self.config.retry_max);
        let message = error.to_string();
        let failure = Failure {
            error: &message,
            kind: error.kind(),
            permanent: matches!(error, JobError::Permanent(_)),
        };
        let wait = |kind, attempt| handlers::backoff(kind, attempt, base, max).mul_f64(jitter);
        let Some(done) = run::record_failure(&self.pool, id, &failure, wait).await? else {
            return Ok(false);
        };
        let kind = done.kind.map_or("unknown", JobKind::as_str);
        let kq = [kind, done.queue.as_str()];
        let trace_id = crate::trace::trace_id_of(done.trace_parent.as_deref()).unwrap_or_default();
        let attempt = done.attempt;
        let m = metrics();
        m.jobs_started.with_label_values(&kq).inc();
        if done.discarded {
            m.jobs_discarded.with_label_values(&kq).inc();
            tracing::error!(job_id = id, kind, attempt, %error, trace_id, "job discarded after its last attempt");
        } else {
            m.jobs_retried.with_label_values(&kq).inc();
            tracing::warn!(job_id = id, kind, attempt, %error, retry_in = ?done.wait, trace_id, "job attempt failed; will retry");
        }
        Ok(done.discarded)
    }
}

/// How many due jobs of each environment and kind a batch completes.
fn freed_by(jobs: &[Job]) -> Vec<(uuid::Uuid, JobKind, i64)> {
    let mut freed: Vec<(uuid::Uuid, JobKind, i64)> = Vec::new();
    for job in jobs {
        match freed
            .iter_mut()
            .find(|(e, k, _)| *e == job.environment_id && *k == job.kind)
        {
            Some(f) => f.2 += 1,
            None => freed.push((job.environment_id, job.kind, 1)),
        }
    }
    freed
}

/// Count and log jobs whose batch committed.
fn count_completed(topology: &Topology, jobs: &[Job], started_at: DateTime<Utc>) {
    let m = metrics();
    for job in jobs {
        let kq = [job.kind.as_str(), job.queue.as_str()];
        m.jobs_started.with_label_values(&kq).inc();
        m.jobs_completed.with_label_values(&kq).inc();
        m.queue_latency
            .with_label_values(&[
                job.kind.as_str(),
                &topology.shard_of(job.environment_id).to_string(),
            ])
            .observe(seconds_since(job.run_at, started_at));
        tracing::debug!(job_id = job.id, kind = job.kind.as_str(), attempt = job.attempt,
            event = %job.args.event_record_id(), trace_id = job.trace_id().unwrap_or_default(), "job completed");
    }
}

/// Time the broker hop of a message that was due when published (see
/// [`crate::amqp::publish::PUBLISHED_AT_HEADER`]); a delayed message's time in the tiers is
/// not the broker's.
fn time_broker_hop(delivery: &Delivery, message: &JobMessage, now: DateTime<Utc>) {
    if let Some(published) = amqp::publish::published_at(&delivery.properties)
        && message.run_at <= published
    {
        metrics().stage_seconds(Stage::Broker, seconds_since(published, now));
    }
}

/// Seconds from `due` to `at`, never negative.
fn seconds_since(due: DateTime<Utc>, at: DateTime<Utc>) -> f64 {
    ((at - due).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
}

/// What a worker does with a message when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Due: run it.
    Due,
    /// Due within the delay lead: keep it (unacknowledged) and run it at its due time.
    Hold,
    /// Due later than that: send it back into the tiers for the remainder.
    SendBack,
}

/// The tiers deliver a message `lead` before its due time (see
/// [`crate::amqp::Topology::delay_lead`]), so what comes out of them is held for the rest;
/// anything earlier than that goes back.
pub fn arrival(message: &JobMessage, now: DateTime<Utc>, lead: std::time::Duration) -> Arrival {
    let ahead = message.run_at - now;
    if ahead <= chrono::Duration::zero() {
        Arrival::Due
    } else if ahead.to_std().is_ok_and(|a| a <= lead + HOLD_SLACK) {
        Arrival::Hold
    } else {
        Arrival::SendBack
    }
}

/// Room for clock noise on top of the lead before a message is sent back.
const HOLD_SLACK: std::time::Duration = std::time::Duration::from_millis(20);

/// The tokio instant at which wall-clock time `at` comes.
fn instant_of(at: DateTime<Utc>) -> tokio::time::Instant {
    let ahead = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::Instant::now() + ahead
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".to_string());
    format!("handler panicked: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due_in(ms: i64, now: DateTime<Utc>) -> JobMessage {
        JobMessage {
            v: 1,
            id: 1,
            kind: "deliverEvent".into(),
            queue: "events".into(),
            args: serde_json::json!({}),
            attempt: 0,
            run_at: now + chrono::Duration::milliseconds(ms),
        }
    }

    #[test]
    fn arrivals_run_wait_or_go_back() {
        let now = Utc::now();
        let lead = std::time::Duration::from_millis(100);
        assert_eq!(arrival(&due_in(-5, now), now, lead), Arrival::Due);
        assert_eq!(arrival(&due_in(0, now), now, lead), Arrival::Due);
        assert_eq!(arrival(&due_in(1, now), now, lead), Arrival::Hold);
        assert_eq!(arrival(&due_in(100, now), now, lead), Arrival::Hold);
        assert_eq!(arrival(&due_in(500, now), now, lead), Arrival::SendBack);
        assert_eq!(
            arrival(&due_in(1, now), now, std::time::Duration::ZERO),
            Arrival::Hold
        );
        assert_eq!(
            arrival(&due_in(30, now), now, std::time::Duration::ZERO),
            Arrival::SendBack
        );
    }
}
