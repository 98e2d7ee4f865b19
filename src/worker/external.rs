//! Running an external-effect kind's messages (see [`crate::handlers::ExternalEffect`]):
//! each as a task of its own that settles its own message, so a slow effect holds its own
//! message and no other, within the kind's places ([`Places`]); its job leased, the effect
//! made holding no transaction, then the job completed in a transaction of its own, or its
//! failure recorded.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::batch::{Ran, Take};
use super::consume::Due;
use super::{Shard, Worker, WorkerError};
use crate::amqp::{JobMessage, Unrunnable};
use crate::handlers::{Deferral, ErrorAt, ExternalEffect, JobError, Places};
use crate::ledger::Job;
use crate::ledger::run;

/// An external-effect kind's messages running on one consumer.
pub(super) struct Running {
    effect: Arc<dyn ExternalEffect>,
    places: Places,
    tasks: Mutex<JoinSet<Result<(), WorkerError>>>,
    /// Cancelled when the consumer stops: a message still waiting for a place does not
    /// start (unacknowledged, it goes back when the channel closes).
    stopping: CancellationToken,
}

impl Running {
    pub(super) fn new(effect: Arc<dyn ExternalEffect>) -> Self {
        Self {
            places: effect.places(),
            effect,
            tasks: Mutex::new(JoinSet::new()),
            stopping: CancellationToken::new(),
        }
    }

    /// The first error of the tasks already finished.
    fn reap(&self) -> Result<(), WorkerError> {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| WorkerError::Task(e.to_string()))??;
        }
        Ok(())
    }

    /// Wait for every task still running (a stopping consumer lets them settle); those
    /// still waiting for a place end at once.
    pub(super) async fn drain(&self) {
        self.stopping.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) | Err(e) = done.map_err(|e| WorkerError::Task(e.to_string())) {
                tracing::warn!(error = %e, "a message's task ended in error while stopping");
            }
        }
    }
}

impl Worker {
    /// Run due messages each in a task of its own, settled as each ends, within the
    /// consumer's places and each environment's share of them; a message over its
    /// environment's share goes back into the tiers.
    pub(super) async fn run_apart(
        &self,
        running: &Running,
        publisher: &Channel,
        queue: Shard,
        due: Due,
        now: DateTime<Utc>,
    ) -> Result<(), WorkerError> {
        running.reap()?;
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
            let Some(place) = running.places.admit(env) else {
                if let (delivery, Ok(message)) = one {
                    over_share.push((delivery, message));
                }
                continue;
            };
            let (this, publisher) = (self.clone(), publisher.clone());
            let (effect, stopping) = (running.effect.clone(), running.stopping.clone());
            running.tasks.lock().expect("tasks lock").spawn(async move {
                let place = tokio::select! {
                    p = place.taken() => p,
                    _ = stopping.cancelled() => return Ok(()),
                };
                let settled = this.run_one(&*effect, &publisher, queue, one, now).await;
                drop(place);
                settled
            });
        }
        if !over_share.is_empty() {
            tracing::debug!(
                kind = queue.kind.as_str(),
                waiting = over_share.len(),
                "messages of an environment at its share wait in the tiers"
            );
            let effect = &*running.effect;
            self.defer(effect, publisher, queue, over_share, Deferral::Share)
                .await?;
        }
        Ok(())
    }

    /// Run one message and settle it. An error of the database while taking it (its row
    /// held longer than the lease waits, say) stops no one: it is logged and counted, and
    /// the message goes back into the tiers for a later try.
    async fn run_one(
        &self,
        effect: &dyn ExternalEffect,
        publisher: &Channel,
        queue: Shard,
        (delivery, message): (Delivery, Result<JobMessage, Unrunnable>),
        now: DateTime<Utc>,
    ) -> Result<(), WorkerError> {
        let again = message.as_ref().ok().cloned();
        let late_ms = again.as_ref().map(|m| (now - m.run_at).num_milliseconds());
        let dispositions = match self.process(vec![message]).await {
            Ok(d) => d,
            Err(e) => {
                effect.count_error(ErrorAt::Message);
                let Some(message) = again else {
                    return Err(e.into());
                };
                tracing::error!(job_id = message.id, kind = queue.kind.as_str(), error = %e,
                    "message not run for a database error; sent back for a later try");
                return self
                    .defer(
                        effect,
                        publisher,
                        queue,
                        vec![(delivery, message)],
                        Deferral::Error,
                    )
                    .await;
            }
        };
        tracing::debug!(kind = queue.kind.as_str(), late_ms, "message processed");
        self.settle_dispositions(publisher, vec![delivery], dispositions, false)
            .await
    }

    /// Send messages back into the tiers for the kind's [`ExternalEffect::defer`], and
    /// acknowledge them once the broker has confirmed the copies. The job is not touched:
    /// the copy runs it.
    async fn defer(
        &self,
        effect: &dyn ExternalEffect,
        publisher: &Channel,
        queue: Shard,
        messages: Vec<(Delivery, JobMessage)>,
        why: Deferral,
    ) -> Result<(), WorkerError> {
        effect.count_deferred(why, messages.len());
        let later = Utc::now()
            + chrono::Duration::from_std(effect.defer()).expect("a deferral is a duration");
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

    /// Run an external-effect kind's jobs, each on its own: the job leased ([`run::lease`]:
    /// only one worker attempts it), the effect made holding no transaction, then, if it
    /// succeeded, the job taken and completed in a transaction of its own
    /// ([`ExternalEffect::complete`]); a failed attempt is recorded like any job's. Returns
    /// the ids the ledger has no row for.
    pub(super) async fn run_external(
        &self,
        effect: &dyn ExternalEffect,
        ids: &[i64],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let pending = run::lease(&self.pool, ids, effect.lease()).await?;
        for bad in &pending.unreadable {
            self.record_failure(bad.id, &JobError::Permanent(bad.reason.clone()))
                .await?;
        }
        let attempts = pending.jobs.iter().map(|job| async move {
            let Err(e) = self.run_external_job(effect, job).await else {
                return Ok(());
            };
            // A database error of this job's is this job's failure, not the worker's: the
            // job is retried (or discarded) like any other, and the others run on.
            effect.count_error(ErrorAt::Job);
            tracing::error!(job_id = job.id, kind = job.kind.as_str(), error = %e,
                "job failed in the database");
            self.fail(effect, job, &JobError::from(e)).await
        });
        for done in join_all(attempts).await {
            done?;
        }
        Ok(pending.missing)
    }

    /// One leased job: the attempt, then its completion or its failure.
    async fn run_external_job(
        &self,
        effect: &dyn ExternalEffect,
        job: &Job,
    ) -> Result<(), sqlx::Error> {
        let error = match effect.attempt(&self.pool, job).await {
            Ok(()) => match self.run_jobs(&[job.id], Take::Leased).await? {
                Ran { failed: None, .. } => return Ok(()),
                Ran {
                    failed: Some(error),
                    ..
                } => error,
            },
            // The database failed around the attempt: the caller records it.
            Err(JobError::Database(e)) => return Err(e),
            Err(error) => error,
        };
        self.fail(effect, job, &error).await
    }

    /// Record a job's failure; when that was its last attempt, the kind records what that
    /// leaves in the same transaction.
    async fn fail(
        &self,
        effect: &dyn ExternalEffect,
        job: &Job,
        error: &JobError,
    ) -> Result<(), sqlx::Error> {
        self.record_failure_of(job.id, error, Some((effect, job)))
            .await
            .map(drop)
    }
}
