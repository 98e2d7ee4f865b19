//! `events.deliverWebhook`: POST an event to the URL of the EPHEMERAL dispatcher it fired.
//!
//! This kind's effect is outside the database, so it runs in two steps. First, holding no
//! transaction (a slow receiver must not hold a database connection), the worker loads the
//! dispatcher and the event, makes the request ([`crate::webhooks::Sender`]) and records
//! the attempt; then, for a 2xx answer, the job is taken and completed in a transaction of
//! its own with [`delivered`]. Any other answer, or none, is the job's failure: retried with
//! backoff, and dead-lettered after its last attempt. A refused address fails it at once
//! (no later attempt can do better). A worker that dies between the answer and the commit
//! sends it again: every attempt carries the same `webhook-id`, for the receiver to drop
//! the repeat.

use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::JobError;
use crate::dispatchers;
use crate::ledger::{DeliverWebhookArgs, Job};
use crate::webhooks::{Request, Sender};

/// The `webhook-id` of a dispatcher's one message.
pub fn message_id(dispatcher: Uuid) -> String {
    format!("msg_{}", dispatcher.simple())
}

/// Make one attempt of the job and record it. `Ok(Ok(()))`: the receiver answered 2xx.
pub async fn attempt(
    pool: &PgPool,
    sender: &Sender,
    job: &Job,
    args: DeliverWebhookArgs,
) -> Result<Result<(), JobError>, sqlx::Error> {
    let Some(t) = dispatchers::webhook_target(pool, args.id, args.event_record_id).await? else {
        return Ok(Err(JobError::Permanent(format!(
            "dispatcher {} or event {} is gone",
            args.id, args.event_record_id
        ))));
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
    let outcome = sender
        .send(Request {
            url: &t.url,
            msg_id: &msg_id,
            secret: &t.secret,
            body: serde_json::to_vec(&body).expect("a webhook body serializes"),
        })
        .await;
    let duration_ms = i32::try_from(outcome.duration.as_millis()).unwrap_or(i32::MAX);
    // Only clean text is stored: the error carries the receiver's answer.
    let error = outcome
        .error
        .as_deref()
        .map(|e| crate::webhooks::clean_text(e.as_bytes(), crate::webhooks::MAX_ERROR_CHARS));
    let recorded = dispatchers::record_attempt(
        pool,
        &dispatchers::Attempt {
            dispatcher: args.id,
            event_record_id: args.event_record_id,
            job_id: job.id,
            attempt: job.attempt + 1,
            status: outcome.status.map(i32::from),
            duration_ms,
            error: error.as_deref(),
        },
    )
    .await;
    let m = crate::metrics::metrics();
    // An attempt that cannot be recorded is still the attempt it was: its job completes,
    // or fails (retried, then discarded) as its answer says.
    let unrecorded = recorded.err().map(|e| {
        m.webhook_errors.with_label_values(&["record_attempt"]).inc();
        tracing::error!(job_id = job.id, dispatcher = %args.id, error = %e, "webhook attempt not recorded");
        format!(" (the attempt could not be recorded: {e})")
    });
    let result = match (&outcome.error, outcome.refused) {
        (None, _) => "delivered",
        (Some(_), true) => "refused",
        (Some(_), false) => "failed",
    };
    m.webhook_attempts.with_label_values(&[result]).inc();
    m.webhook_duration
        .with_label_values(&[result])
        .observe(outcome.duration.as_secs_f64());
    tracing::info!(job_id = job.id, dispatcher = %args.id, attempt = job.attempt + 1,
        status = ?outcome.status, took = ?outcome.duration, error = ?error, "webhook attempt");
    Ok(match error {
        None => Ok(()),
        Some(e) => {
            let e = e + unrecorded.as_deref().unwrap_or_default();
            if outcome.refused {
                Err(JobError::Permanent(e))
            } else {
                Err(JobError::Retryable(e))
            }
        }
    })
}

/// Mark the dispatchers of answered webhooks delivered, in the jobs' transaction.
pub async fn delivered(tx: &mut PgConnection, jobs: &[Job]) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.args.id()).collect();
    dispatchers::delivered(tx, &ids).await
}

/// Mark a dispatcher whose webhook job was discarded (its last attempt failed, or its
/// address was refused).
pub async fn failed(pool: &PgPool, dispatcher: Uuid) -> Result<(), sqlx::Error> {
    dispatchers::failed(pool, dispatcher).await
}
