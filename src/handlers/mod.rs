//! Job handlers, one file per kind. A handler runs a batch of jobs of its kind inside the
//! worker's transaction, with a few set-based statements for the whole batch: its effects
//! and the jobs' completion commit together or not at all.

pub mod deliver_event;
pub mod deliver_webhook;
pub mod invoke_dispatcher;

use sqlx::PgConnection;

use crate::failpoint::{self, Fault};
use crate::ledger::publishers::PublishedBy;
use crate::ledger::{Job, JobArgs, JobKind};
use crate::trace::TraceParent;

/// How long to wait before attempt `attempt + 1` of a job of `kind` whose attempt
/// `attempt` (1-based) failed: `min(base * 2^(attempt - 1), max)`, times a jitter the caller
/// draws from 0.9 to 1.1. A kind that wants another curve gets its own arm here.
pub fn backoff(
    kind: JobKind,
    attempt: i32,
    base: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    match kind {
        JobKind::DeliverEvent | JobKind::InvokeDispatcher | JobKind::DeliverWebhook => {
            let exp = attempt.clamp(1, 32) as u32 - 1;
            base.saturating_mul(1u32 << exp.min(31)).min(max)
        }
    }
}

/// Why a handler did not complete its jobs.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt later (a database error, a conflict).
    #[error("{0}")]
    Retryable(String),
    /// No attempt can succeed (arguments that do not parse, an unknown kind).
    #[error("{0}")]
    Permanent(String),
    /// The handler panicked; treated like a retryable error.
    #[error("{0}")]
    Panic(String),
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Retryable(format!("database: {e}"))
    }
}

impl JobError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Retryable(_) => "error",
            Self::Permanent(_) => "permanent",
            Self::Panic(_) => "panic",
        }
    }
}

/// Run the handler of `kind` for `jobs` (all of that kind, their arguments decoded) in
/// `tx`. On error nothing of the batch may be kept: the caller rolls back. Returns the jobs
/// the handlers inserted; `caller_publishes`: inserted for the caller to publish after its
/// commit (the fast path), else for the relay.
pub async fn run_batch(
    tx: &mut PgConnection,
    kind: JobKind,
    jobs: &[Job],
    caller_publishes: Option<PublishedBy>,
) -> Result<Vec<Job>, JobError> {
    for job in jobs {
        match failpoint::handler_fault(&job.args.id().to_string(), job.attempt) {
            Some(Fault::Error) => {
                return Err(JobError::Retryable(format!(
                    "injected fault on attempt {}",
                    job.attempt
                )));
            }
            Some(Fault::Panic) => panic!("injected panic on attempt {}", job.attempt),
            None => {}
        }
    }
    match kind {
        JobKind::DeliverEvent => {
            let batch: Vec<deliver_event::ToDeliver> = jobs
                .iter()
                .filter_map(|job| match job.args {
                    JobArgs::DeliverEvent(args) => Some(deliver_event::ToDeliver {
                        args,
                        priority: job.priority,
                        trace: job.trace_parent.as_deref().and_then(TraceParent::parse),
                    }),
                    _ => None,
                })
                .collect();
            deliver_event::run(tx, &batch, caller_publishes).await
        }
        JobKind::InvokeDispatcher => {
            let group: Vec<&Job> = jobs.iter().filter(|j| j.kind == kind).collect();
            invoke_dispatcher::run(tx, &group, caller_publishes).await
        }
        JobKind::DeliverWebhook => {
            // The request was made and answered 2xx before the job was taken (see
            // `deliver_webhook`); what is left is the record of it.
            deliver_webhook::delivered(tx, jobs).await?;
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(3600));
        let waits: Vec<u64> = (1..=5)
            .map(|a| backoff(JobKind::DeliverEvent, a, base, max).as_secs())
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16]);
        assert_eq!(backoff(JobKind::DeliverEvent, 40, base, max), max);
        assert_eq!(backoff(JobKind::DeliverEvent, 0, base, max), base);
    }
}
