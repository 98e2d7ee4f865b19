//! The relay: moves jobs from the outbox (unpublished ledger rows) to RabbitMQ.
//!
//! Each batch is claimed with `FOR UPDATE SKIP LOCKED` inside one transaction, so several
//! relays never hand out the same row; every message is published with `mandatory` and a
//! publisher confirm; rows are marked published only for messages the broker confirmed, in
//! the same transaction, which commits after the confirms. A relay that dies between
//! publish and commit leaves the rows unpublished: they are published again, and the
//! duplicate finds its job completed (at-least-once transport, exactly-once effect).
//!
//! The relay publishes a job as soon as it is in the outbox, due or not: a job due later
//! goes into the delay tiers, so RabbitMQ holds the timer and nothing polls Postgres for due
//! jobs. The relay is woken by `NOTIFY kongflow_outbox` (sent once per inserting statement,
//! and by every statement that puts a job back in the outbox) and otherwise polls slowly.
//!
//! A relay process also runs the maintenance passes ([`crate::maintenance`]): the
//! reconciler, the safety net that puts back in the outbox every job overdue and still not
//! final, whose message the broker lost or an operator purged (a duplicate it causes finds
//! its job completed and has no effect), the publisher reaper, retention, vacuum and the
//! gauges.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::Channel;
use lapin::Confirmation;
use lapin::options::ConfirmSelectOptions;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::publish::{
    DeadJob, count_published, log_published, properties, publish_dead, publish_handoff,
};
use crate::amqp::{self, JobMessage, Topology, publish_job};
use crate::config::RelayConfig;
use crate::failpoint;
use crate::ledger::outbox::{self, Claimed};
use crate::ledger::{Job, JobState, NOTIFY_CHANNEL};
use crate::metrics::ConnectedGuard;
use crate::metrics::{Stage, metrics};

use crate::maintenance::Maintenance;
use crate::supervise::supervise_connected;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("publisher confirms did not arrive within {0:?}")]
    ConfirmTimeout(Duration),
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    topology: Topology,
    config: RelayConfig,
    /// The last environment and kind a claim served: the next one starts after it.
    turn: Arc<Mutex<Option<(Uuid, String)>>>,
    /// Hand-offs were written: the first job loop's listener tells the hand-off loop.
    handoffs_written: Arc<tokio::sync::Notify>,
}

/// How soon the relay looks again when environments' due jobs wait for room in flight. The
/// workers hand the room their completions leave to the waiting jobs themselves
/// (`outbox::refill`); the relay is the fallback (a worker without the fast path, room
/// left by a job that failed or was cancelled).
pub const FAIR_POLL_INTERVAL: Duration = Duration::from_millis(50);

impl Relay {
    pub fn new(pool: PgPool, topology: Topology, config: RelayConfig) -> Self {
        Self {
            pool,
            topology,
            config,
            turn: Arc::default(),
            handoffs_written: Arc::default(),
        }
    }

    /// Run until `shutdown`, reconnecting to RabbitMQ and Postgres with backoff. Runs
    /// `relay_concurrency` publishing loops, each with its own connections; SKIP LOCKED keeps
    /// them (and the loops of other relay processes) off each other's rows.
    pub async fn run(self, amqp_url: String, shutdown: CancellationToken) {
        let mut loops = tokio::task::JoinSet::new();
        for i in 0..self.config.relay_concurrency.max(1) {
            let (this, url, stop) = (self.clone(), amqp_url.clone(), shutdown.clone());
            // One job loop's listener serves the hand-off loop: with every loop's, each
            // hand-off written woke it as many times, and all but the first found nothing.
            let tells_handoffs = i == 0;
            loops.spawn(supervise_connected(
                "relay",
                this,
                url,
                stop,
                move |this, url, stop| async move {
                    this.run_connected(&url, stop, tells_handoffs).await
                },
            ));
        }
        // The outbox's messages (the runs hand-off) have a loop of their own, woken by their
        // own notifications, so a message written never makes the job loops claim.
        let (this, url, stop) = (self.clone(), amqp_url.clone(), shutdown.clone());
        loops.spawn(supervise_connected(
            "relay",
            this,
            url,
            stop,
            |this, url, stop| async move { this.run_handoffs_connected(&url, stop).await },
        ));
        // The relay process also keeps the tables: the maintenance passes run beside it.
        let maintenance = self.maintenance();
        loops.spawn(async move { maintenance.run(amqp_url, shutdown).await });
        while loops.join_next().await.is_some() {}
    }

    /// The maintenance passes of this relay's database and topology.
    pub fn maintenance(&self) -> Maintenance {
        Maintenance::new(
            self.pool.clone(),
            self.topology.clone(),
            self.config.maintenance.clone(),
        )
    }

    async fn run_connected(
        &self,
        url: &str,
        shutdown: CancellationToken,
        tells_handoffs: bool,
    ) -> Result<(), RelayError> {
        let conn =
            amqp::connect(url, &format!("kongflow-relay:{}", self.topology.prefix())).await?;
        let channel = self.open_channel(&conn).await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        if tells_handoffs {
            listener
                .listen(crate::runs::handoff::NOTIFY_CHANNEL)
                .await?;
        }
        let _connected = ConnectedGuard::new("relay");
        tracing::info!("relay connected");

        while !shutdown.is_cancelled() {
            let (published, waiting) = self.publish_fair(&channel).await?;
            if published as i64 >= self.config.relay_batch_size || (waiting && published > 0) {
                continue;
            }
            let wait = if waiting {
                FAIR_POLL_INTERVAL
            } else {
                self.config.relay_poll_interval
            };
            let until = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    n = listener.recv() => {
                        // One pass serves every notification already received; one for
                        // the hand-off wakes the hand-off loop, not this one.
                        let mut jobs = false;
                        let mut next = Some(n?);
                        while let Some(n) = next {
                            if n.channel() == crate::runs::handoff::NOTIFY_CHANNEL {
                                self.handoffs_written.notify_one();
                            } else {
                                jobs = true;
                            }
                            next = listener.next_buffered();
                        }
                        if jobs {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        let _ = conn.close(200, "shutdown".into()).await;
        Ok(())
    }

    /// Publish the runs hand-off until `shutdown`: a batch whenever the first job loop hears
    /// a notification on [`crate::runs::handoff::NOTIFY_CHANNEL`] (its listener serves this
    /// loop: a listener holds a pool connection for good), or every `RELAY_POLL_INTERVAL_MS`.
    async fn run_handoffs_connected(
        &self,
        url: &str,
        shutdown: CancellationToken,
    ) -> Result<(), RelayError> {
        let conn = amqp::connect(
            url,
            &format!("kongflow-relay-messages:{}", self.topology.prefix()),
        )
        .await?;
        let channel = self.open_channel(&conn).await?;
        while !shutdown.is_cancelled() {
            if self.publish_handoffs(&channel).await? as i64 >= self.config.relay_batch_size {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = self.handoffs_written.notified() => {}
                _ = tokio::time::sleep(self.config.relay_poll_interval) => {}
            }
        }
        let _ = conn.close(200, "shutdown".into()).await;
        Ok(())
    }

    /// A channel in confirm mode, with the topology declared.
    pub async fn open_channel(&self, conn: &lapin::Connection) -> Result<Channel, RelayError> {
        let channel = conn.create_channel().await?;
        self.topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// Publish one batch of unpublished jobs, due or not: a job due later goes into the
    /// delay tiers (see [`crate::amqp::tiers`]). Returns how many were confirmed.
    ///
    /// One transaction: the claim locks the rows (SKIP LOCKED) and writes their published
    /// mark; the messages are published and every confirm awaited; rows whose message was
    /// not confirmed get their mark taken back; then the transaction commits. So a mark
    /// becomes visible only for a confirmed message, and a relay that dies before the commit
    /// leaves every row of the batch in the outbox.
    pub async fn publish_batch(&self, channel: &Channel) -> Result<usize, RelayError> {
        Ok(self.publish_fair(channel).await?.0)
    }

    /// [`Relay::publish_batch`], and whether due jobs stayed behind for want of room in
    /// flight (see [`outbox::claim`]).
    async fn publish_fair(&self, channel: &Channel) -> Result<(usize, bool), RelayError> {
        let started = std::time::Instant::now();
        let mut tx = crate::db::begin_pipeline(&self.pool).await?;
        let after = self.turn.lock().expect("turn lock").clone();
        let (
            Claimed {
                jobs,
                unreadable,
                waiting,
            },
            last,
        ) = outbox::claim(&mut tx, self.config.relay_batch_size, after).await?;
        if last.is_some() {
            *self.turn.lock().expect("turn lock") = last;
        }
        if jobs.is_empty() && unreadable.is_empty() {
            return Ok((0, waiting));
        }
        let claimed_in = started.elapsed();
        metrics().stage_seconds(Stage::RelayClaim, claimed_in.as_secs_f64());
        let mut unconfirmed: Vec<i64> = unreadable
            .iter()
            .map(|u| {
                tracing::error!(job_id = u.id, reason = %u.reason, "job this build cannot read left in the outbox");
                u.id
            })
            .collect();
        let confirms = self.publish_all(channel, &jobs).await?;
        unconfirmed.extend(self.settle_confirms(confirms)?);
        let confirmed_in = started.elapsed();
        metrics().stage_seconds(
            Stage::RelayConfirm,
            (confirmed_in - claimed_in).as_secs_f64(),
        );
        let committing = std::time::Instant::now();

        failpoint::hit(failpoint::RELAY_AFTER_CONFIRM);
        outbox::unmark(&mut tx, &unconfirmed).await?;
        tx.commit().await?;
        metrics().stage(Stage::RelayCommit, committing);
        let published = jobs.len() + unreadable.len() - unconfirmed.len();
        tracing::debug!(published, waiting, ?claimed_in, ?confirmed_in, total = ?started.elapsed(), "relay batch published");
        Ok((published, waiting))
    }

    /// Publish one batch of the runs hand-off (see [`crate::runs::handoff`]) and delete the
    /// hand-offs the broker confirmed, in the claiming transaction; set aside those whose
    /// message cannot be read or published (the others go out). Returns how many were
    /// confirmed.
    pub async fn publish_handoffs(&self, channel: &Channel) -> Result<usize, RelayError> {
        let mut tx = crate::db::begin_pipeline(&self.pool).await?;
        let rows = crate::runs::handoff::claim(&mut tx, self.config.relay_batch_size).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut claimed = Vec::with_capacity(rows.len());
        let mut aside = Vec::new();
        for row in rows {
            let run = row.run_id;
            match row.read() {
                Ok(h) => claimed.push(h),
                Err((id, reason)) => {
                    tracing::error!(handoff_id = id, %run, %reason,
                        "run hand-off set aside (see run_handoffs.set_aside_reason); the others go on");
                    aside.push((id, reason));
                }
            }
        }
        crate::runs::handoff::set_aside(&mut tx, &aside).await?;
        let mut done = Vec::with_capacity(claimed.len());
        let mut pending = Vec::with_capacity(claimed.len());
        for h in &claimed {
            let Some(body) = &h.body else {
                tracing::warn!(run = %h.run_id, kind = h.kind.as_str(),
                    "run gone before its hand-off was published (retention, or its environment deleted): dropped");
                done.push(h.id);
                continue;
            };
            let confirm = publish_handoff(channel, &self.topology, h, body).await?;
            pending.push(async move { (h, confirm.await) });
        }
        let timeout = self.config.relay_confirm_timeout;
        let confirms = tokio::time::timeout(timeout, join_all(pending))
            .await
            .map_err(|_| RelayError::ConfirmTimeout(timeout))?;
        let mut confirmed = Vec::with_capacity(claimed.len());
        for (h, confirm) in confirms {
            let confirm = confirm?;
            let acked = confirm.is_ack();
            match confirm.take_message() {
                None if acked => {
                    crate::runs::handoff::count_published(h);
                    done.push(h.id);
                    confirmed.push(h);
                }
                Some(returned) => {
                    tracing::error!(message_id = %h.message_id(), reply = %returned.reply_text,
                    "hand-off returned by the broker (is the runs queue declared?); it stays in the outbox")
                }
                None => {
                    tracing::warn!(message_id = %h.message_id(), "hand-off nacked by the broker; it stays in the outbox")
                }
            }
        }
        failpoint::hit(failpoint::RELAY_AFTER_MESSAGE_CONFIRM);
        crate::runs::handoff::published(&mut tx, &done).await?;
        tx.commit().await?;
        metrics().handoffs_set_aside.inc_by(aside.len() as u64);
        tracing::debug!(
            published = confirmed.len(),
            claimed = claimed.len(),
            "run hand-offs published"
        );
        Ok(confirmed.len())
    }

    /// Publish every claimed job (a discarded one to the dead letters) and wait for all
    /// their confirms, within the confirm timeout.
    async fn publish_all<'j>(
        &self,
        channel: &Channel,
        jobs: &'j [Job],
    ) -> Result<Vec<(&'j Job, lapin::Result<Confirmation>)>, RelayError> {
        let mut pending = Vec::with_capacity(jobs.len());
        for job in jobs {
            let message = JobMessage::from_job(job);
            let confirm = if job.state == JobState::Discarded {
                // Discarded after its last attempt: a copy goes to the dead-letter queue.
                let dead = DeadJob {
                    id: job.id,
                    kind: job.kind.as_str(),
                    attempts: job.attempt,
                };
                publish_dead(
                    channel,
                    &self.topology,
                    &message.to_bytes(),
                    &last_error(job),
                    Some(dead),
                    properties(job),
                )
                .await?
            } else {
                publish_job(
                    channel,
                    &self.topology,
                    job.kind,
                    self.topology.shard_of(job.environment_id),
                    &message,
                    properties(job),
                    chrono::Utc::now(),
                )
                .await?
            };
            pending.push(async move { (job, confirm.await) });
        }
        let timeout = self.config.relay_confirm_timeout;
        tokio::time::timeout(timeout, join_all(pending))
            .await
            .map_err(|_| RelayError::ConfirmTimeout(timeout))
    }

    /// Count what the broker confirmed; return the jobs it did not (returned unroutable, or
    /// nacked).
    fn settle_confirms(
        &self,
        confirms: Vec<(&Job, lapin::Result<Confirmation>)>,
    ) -> Result<Vec<i64>, RelayError> {
        let m = metrics();
        let mut unconfirmed = Vec::new();
        for (job, confirm) in confirms {
            let confirm = confirm?;
            let acked = confirm.is_ack();
            match confirm.take_message() {
                None if acked => {
                    if job.state == JobState::Discarded {
                        m.dead_lettered.with_label_values(&["discarded"]).inc();
                    } else {
                        count_published(job);
                    }
                    log_published!(job);
                }
                Some(returned) => {
                    tracing::error!(job_id = job.id, reply = %returned.reply_text,
                        "message returned by the broker (is the topology declared?)");
                    unconfirmed.push(job.id);
                }
                None => {
                    tracing::warn!(job_id = job.id, "message nacked by the broker");
                    unconfirmed.push(job.id);
                }
            }
        }
        Ok(unconfirmed)
    }
}

/// Why a discarded job is dead: its last error.
fn last_error(job: &Job) -> String {
    match job.last_error() {
        Some(e) => format!("discarded after attempt {}: {e}", job.attempt),
        None => "discarded".to_string(),
    }
}
