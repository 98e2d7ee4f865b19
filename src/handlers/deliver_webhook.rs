//! `events.deliverWebhook`: POST an event to the URL of the EPHEMERAL dispatcher it fired.
//!
//! This kind's effect is outside the database ([`super::ExternalEffect`]), so it runs in
//! two steps. First, its job leased and holding no transaction (a slow receiver must not
//! hold a database connection), it loads the dispatcher and the event, makes the request
//! ([`crate::webhooks::Sender`]) and records the attempt; then, for a 2xx answer, the job
//! is taken and completed in a transaction of its own, which marks the dispatcher
//! delivered. Any other answer, or none, is the job's failure: retried with backoff, and
//! dead-lettered after its last attempt. A refused address fails it at once (no later
//! attempt can do better). A worker that dies between the answer and the commit sends it
//! again: every attempt carries the same `webhook-id`, for the receiver to drop the
//! repeat. Attempts run within a consumer's places ([`Places`]: `WEBHOOK_CONCURRENCY`,
//! and one environment's share of them, `WEBHOOK_CONCURRENCY_PER_ENVIRONMENT`).

use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Deferral, ErrorAt, ExternalEffect, JobError, Places};
use crate::config::WorkerConfig;
use crate::dispatchers;
use crate::ledger::{DeliverWebhookArgs, Job, JobArgs};
use crate::metrics::metrics;
use crate::webhooks::{Outcome, Request, Sender};

/// How much longer than its longest attempt a webhook job stays leased to its worker.
pub const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// How long a webhook message waits in the delay tiers when its environment holds its share
/// of the places, or when the ledger could not take it (a database error of its own).
pub const DEFER: Duration = Duration::from_secs(1);

/// The kind `events.deliverWebhook`: an external effect (see the module's documentation).
pub struct DeliverWebhook {
    sender: Sender,
    /// `WEBHOOK_CONCURRENCY`: a consumer's places.
    concurrency: usize,
    /// `WEBHOOK_CONCURRENCY_PER_ENVIRONMENT`: one environment's share of them.
    share: usize,
}

impl DeliverWebhook {
    pub fn new(config: &WorkerConfig) -> Self {
        Self {
            sender: crate::webhooks::Sender::new(&config.webhook),
            concurrency: config.webhook.webhook_concurrency,
            share: config.webhook.webhook_concurrency_per_environment,
        }
    }
}

impl ExternalEffect for DeliverWebhook {
    fn lease(&self) -> Duration {
        self.sender.connect_timeout + self.sender.timeout + LEASE_MARGIN
    }

    fn defer(&self) -> Duration {
        DEFER
    }

    fn places(&self) -> Places {
        Places::new(self.concurrency, self.share)
    }

    fn attempt<'a>(
        &'a self,
        pool: &'a PgPool,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<(), JobError>> {
        async move {
            let JobArgs::DeliverWebhook(args) = job.args else {
                return Err(JobError::Permanent(format!("job {} is no webhook", job.id)));
            };
            attempt(pool, &self.sender, job, args).await
        }
        .boxed()
    }

    fn complete<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        jobs: &'a [Job],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        delivered(tx, jobs).boxed()
    }

    fn discarded<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        async move {
            // Its dispatcher failed, in the transaction that discards the job.
            match job.args {
                JobArgs::DeliverWebhook(args) => dispatchers::failed(tx, args.id).await,
                _ => Ok(()),
            }
        }
        .boxed()
    }

    fn count_error(&self, at: ErrorAt) {
        let step = match at {
            ErrorAt::Job => "job",
            ErrorAt::Message => "message",
        };
        metrics().webhook_errors.with_label_values(&[step]).inc();
    }

    fn count_deferred(&self, why: Deferral, messages: usize) {
        metrics()
            .webhooks_deferred
            .with_label_values(&[why.as_str()])
            .inc_by(messages as u64);
    }
}

/// The `webhook-id` of a dispatcher's one message.
pub fn message_id(dispatcher: Uuid) -> String {
    format!("msg_{}", dispatcher.simple())
}

/// Make one attempt of the job and record it. `Ok`: the receiver answered 2xx; a refused
/// address fails the job for good, any other failure is retryable.
async fn attempt(
    pool: &PgPool,
    sender: &Sender,
    job: &Job,
    args: DeliverWebhookArgs,
) -> Result<(), JobError> {
    let Some(t) = dispatchers::webhook_target(pool, args.id, args.event_record_id).await? else {
        return Err(JobError::Permanent(format!(
            "dispatcher {} or event {} is gone",
            args.id, args.event_record_id
        )));
    };
    // trigger.dev's body for an ephemeral dispatcher.
    let body = json!({
        "id": t.event_id,
        "source": t.source,
        "name": t.name,
        "payload": t.payload,
        "context": t.context,
        "timestamp": crate::dates::iso(t.timestamp),
        "accountId": t.account_id,
    });
    let msg_id = message_id(args.id);
    let sent = sender
        .send(Request {
            url: &t.url,
            msg_id: &msg_id,
            secret: &t.secret,
            body: serde_json::to_vec(&body).expect("a webhook body serializes"),
        })
        .await;
    let status = sent.outcome.status();
    let duration_ms = i32::try_from(sent.duration.as_millis()).unwrap_or(i32::MAX);
    // Only clean text is stored: the error carries the receiver's answer.
    let error = sent
        .outcome
        .error()
        .map(|e| crate::webhooks::clean_text(e.as_bytes(), crate::webhooks::MAX_ERROR_CHARS));
    let recorded = dispatchers::record_attempt(
        pool,
        &dispatchers::Attempt {
            dispatcher: args.id,
            event_record_id: args.event_record_id,
            job_id: job.id,
            attempt: job.attempt + 1,
            status: status.map(i32::from),
            duration_ms,
            error: error.as_deref(),
        },
    )
    .await;
    let m = metrics();
    // An attempt that cannot be recorded is still the attempt it was: its job completes,
    // or fails (retried, then discarded) as its answer says.
    let unrecorded = recorded.err().map(|e| {
        m.webhook_errors.with_label_values(&["record_attempt"]).inc();
        tracing::error!(job_id = job.id, dispatcher = %args.id, error = %e, "webhook attempt not recorded");
        format!(" (the attempt could not be recorded: {e})")
    });
    let result = sent.outcome.label();
    m.webhook_attempts.with_label_values(&[result]).inc();
    m.webhook_duration
        .with_label_values(&[result])
        .observe(sent.duration.as_secs_f64());
    tracing::info!(job_id = job.id, dispatcher = %args.id, attempt = job.attempt + 1,
        status = ?status, took = ?sent.duration, error = ?error, "webhook attempt");
    let error = || error.unwrap_or_default() + unrecorded.as_deref().unwrap_or_default();
    match sent.outcome {
        Outcome::Delivered { .. } => Ok(()),
        Outcome::Refused { .. } => Err(JobError::Permanent(error())),
        Outcome::Answered { .. } | Outcome::TimedOut { .. } | Outcome::Failed { .. } => {
            Err(JobError::Retryable(error()))
        }
    }
}

/// Mark the dispatchers of answered webhooks delivered, in the jobs' transaction.
async fn delivered(tx: &mut PgConnection, jobs: &[Job]) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.args.id()).collect();
    dispatchers::delivered(tx, &ids).await
}
