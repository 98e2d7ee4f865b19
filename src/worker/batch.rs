//! Running a batch: the public step ([`Worker::process`]), the transaction around the
//! handlers (take → handle → commit → count), failure recording, and settling the
//! messages (acknowledged, or copied to the dead letters first).

use std::panic::AssertUnwindSafe;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use rand::Rng;
use sqlx::PgConnection;

use super::consume::Due;
use super::{Disposition, Worker, WorkerError};
use crate::amqp::publish::publish_dead;
use crate::amqp::{JobMessage, Topology, Unrunnable};
use crate::failpoint;
use crate::handlers::{self, Execution, ExternalEffect, JobError, Written};
use crate::ledger::publishers::{PublishedBy, Ticket};
use crate::ledger::run::{self, Failure};
use crate::ledger::{Job, JobKind, outbox};
use crate::metrics::{Stage, metrics};

/// How [`Worker::run_jobs`] takes its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Take {
    /// Jobs due now ([`run::take`]).
    Due,
    /// Jobs this worker holds by [`run::lease`] ([`run::take_leased`]).
    Leased,
}

/// What [`Worker::run_jobs`] did.
pub(super) struct Ran {
    /// The handler's error: the transaction was rolled back. `None`: the jobs taken
    /// completed, and their batch committed.
    pub failed: Option<JobError>,
    /// The ids the ledger has no row for.
    pub missing: Vec<i64>,
}

impl Worker {
    /// Run the jobs named by a batch of messages and say what to do with each message. On
    /// `Ok`, everything the batch did is committed. Public so tests can drive one step.
    pub async fn process(
        &self,
        messages: Vec<Result<JobMessage, Unrunnable>>,
    ) -> Result<Vec<Disposition>, sqlx::Error> {
        // A queue holds one kind: a batch with a message of an external-effect kind is all
        // of that kind.
        let external = messages
            .iter()
            .filter_map(|m| m.as_ref().ok().and_then(|m| JobKind::parse(&m.kind)))
            .find_map(|kind| match self.handlers.execution(kind) {
                Execution::ExternalEffect(effect) => Some(effect),
                Execution::Transactional(_) => None,
            });
        let mut ids = Vec::with_capacity(messages.len());
        let mut message_ids = Vec::with_capacity(messages.len());
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
                    Disposition::DeadLetter(reason.to_string())
                }
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(dispositions);
        }

        // An external-effect kind's jobs record their own failures (each runs alone).
        let Ran { failed, missing } = match external {
            Some(effect) => Ran {
                failed: None,
                missing: self.run_external(&*effect, &ids).await?,
            },
            None => self.run_jobs(&ids, Take::Due).await?,
        };
        for (d, id) in dispositions.iter_mut().zip(&message_ids) {
            if let Some(id) = id
                && missing.contains(id)
            {
                *d = Disposition::DeadLetter(format!("the ledger has no job {id}"));
            }
        }
        if let Some(error) = failed {
            if let [id] = ids[..] {
                self.record_failure(id, &error).await?;
            } else {
                // Find the culprit: one transaction per job, so the others still complete.
                for id in ids {
                    if let Some(error) = self.run_jobs(&[id], Take::Due).await?.failed {
                        self.record_failure(id, &error).await?;
                    }
                }
            }
        }
        failpoint::hit(failpoint::WORKER_AFTER_COMMIT);
        Ok(dispositions)
    }

    /// Run a batch and settle its messages. `alone`: no other message of this channel is
    /// unsettled, so one `multiple` ack can settle the batch.
    pub(super) async fn run_and_settle(
        &self,
        publisher: &Channel,
        kind: JobKind,
        due: Due,
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
    pub(super) async fn settle_dispositions(
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

    /// Run `ids` (sorted) in one transaction, taken as `take` says. On a handler error the
    /// transaction is rolled back and the error returned in [`Ran::failed`].
    pub(super) async fn run_jobs(&self, ids: &[i64], take: Take) -> Result<Ran, sqlx::Error> {
        let started = std::time::Instant::now();
        // Taken before the transaction: the jobs it inserts for this process to publish
        // carry its stamp from their first commit.
        let ticket = match &self.publisher {
            Some(p) => Some(p.ticket().await?),
            None => None,
        };
        let stamp = ticket.as_ref().map(Ticket::stamp);
        let mut tx = crate::db::begin_pipeline(&self.pool).await?;
        let taken = match take {
            Take::Due => run::take(&mut tx, ids).await?,
            Take::Leased => run::take_leased(&mut tx, ids).await?,
        };
        metrics().stage(Stage::Take, started);
        if !taken.missing.is_empty() {
            // A message for a final job is a duplicate (or a redelivery after a crash
            // between commit and ack): acknowledged, no effect. One naming no job at all
            // goes to the dead letters.
            tracing::warn!(missing = ?taken.missing, "messages name jobs that have no ledger row");
        }
        if let Some(bad) = taken.unreadable.first() {
            return Ok(Ran {
                failed: Some(JobError::Permanent(bad.reason.clone())),
                missing: taken.missing,
            });
        }
        failpoint::stall_if(failpoint::WORKER_STALL, !taken.jobs.is_empty());
        let started_at = Utc::now();
        for job in &taken.jobs {
            tracing::debug!(job_id = job.id, kind = job.kind.as_str(), attempt = job.attempt,
                event = %job.args.event_record_id(), trace_id = job.trace_id().unwrap_or_default(), "job started");
        }
        let mut written = match self.run_by_kind(&mut tx, &taken.jobs, stamp).await {
            Ok(written) => written,
            Err(e) => {
                return Ok(Ran {
                    failed: Some(e),
                    missing: taken.missing,
                });
            }
        };
        if let Some(stamp) = stamp
            && taken.others_wait
        {
            // The room these jobs leave in flight goes to their environments' next jobs
            // (when any wait: most batches skip the statement).
            written
                .jobs
                .extend(outbox::refill(&mut tx, &freed_by(&taken.jobs), stamp).await?);
        }
        let committing = std::time::Instant::now();
        tx.commit().await?;
        metrics().stage(Stage::WorkerCommit, committing);
        count_completed(&self.topology, &taken.jobs, started_at);
        if let (Some(p), Some(ticket)) = (&self.publisher, ticket) {
            p.publish_all(&written.jobs, written.handoffs, ticket).await;
        }
        Ok(Ran {
            failed: None,
            missing: taken.missing,
        })
    }

    /// Each kind's part of the transaction on its jobs ([`handlers::Handlers::run_batch`]),
    /// timed; the first error stops the batch. Returns what the handlers wrote.
    async fn run_by_kind(
        &self,
        tx: &mut PgConnection,
        jobs: &[Job],
        caller_publishes: Option<PublishedBy>,
    ) -> Result<Written, JobError> {
        let mut written = Written::default();
        let mut kinds: Vec<JobKind> = jobs.iter().map(|j| j.kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            let group: Vec<Job> = jobs.iter().filter(|j| j.kind == kind).cloned().collect();
            let timer = std::time::Instant::now();
            let handled = self.handlers.run_batch(tx, kind, &group, caller_publishes);
            let outcome = AssertUnwindSafe(handled)
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
            let outcome = outcome?;
            written.jobs.extend(outcome.jobs);
            written.handoffs.extend(outcome.handoffs);
        }
        Ok(written)
    }

    /// Record a failed attempt (see [`run::record_failure`]): retried after
    /// [`handlers::backoff`] × a jitter of 0.9 to 1.1 (the relay routes it through the delay
    /// tiers), or discarded after its last attempt or a permanent error, for the relay to
    /// copy it to the dead-letter queue. Returns whether it was discarded.
    pub(super) async fn record_failure(
        &self,
        id: i64,
        error: &JobError,
    ) -> Result<bool, sqlx::Error> {
        self.record_failure_of(id, error, None).await
    }

    /// [`Worker::record_failure`]; when the job is discarded, `effect` records what that
    /// leaves ([`ExternalEffect::discarded`]) in the same transaction.
    pub(super) async fn record_failure_of(
        &self,
        id: i64,
        error: &JobError,
        effect: Option<(&dyn ExternalEffect, &Job)>,
    ) -> Result<bool, sqlx::Error> {
        let jitter: f64 = rand::rng().random_range(0.9..1.1);
        let (base, max) = (self.config.retry_base, self.config.retry_max);
        let message = error.to_string();
        let failure = Failure {
            error: &message,
            kind: error.kind(),
            permanent: error.is_permanent(),
        };
        let wait = |kind, attempt| handlers::backoff(kind, attempt, base, max).mul_f64(jitter);
        let mut tx = self.pool.begin().await?;
        let Some(done) = run::record_failure(&mut tx, id, &failure, wait).await? else {
            return Ok(false);
        };
        if let (true, Some((effect, job))) = (done.discarded, effect) {
            effect.discarded(&mut tx, job).await?;
        }
        tx.commit().await?;
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

/// Seconds from `due` to `at`, never negative.
pub(super) fn seconds_since(due: DateTime<Utc>, at: DateTime<Utc>) -> f64 {
    ((at - due).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".to_string());
    format!("handler panicked: {msg}")
}
