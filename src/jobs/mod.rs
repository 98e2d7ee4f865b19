//! Job handlers, one file per kind. A handler runs a batch of jobs of its kind inside the
//! worker's transaction, with a few set-based statements for the whole batch: its effects
//! and the jobs' completion commit together or not at all.

pub mod deliver_event;
pub mod invoke_dispatcher;

use sqlx::PgConnection;

use crate::failpoint::{self, Fault};
use crate::queue::{Job, JobKind, JobPriority, QueueService};
use crate::trace::TraceParent;

/// How long to wait before attempt `attempt + 1` of a job of `kind` whose attempt
/// `attempt` (1-based) failed: `min(base * 2^(attempt - 1), max)`, times a jitter the caller
/// draws from 0.9 to 1.1. A kind that wants another curve gets its own arm here.
pub fn backoff(
    kind: &str,
    attempt: i32,
    base: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    match JobKind::parse(kind) {
        Some(JobKind::DeliverEvent) | Some(JobKind::InvokeDispatcher) | None => {
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

/// Run the handler of `kind` for `jobs` (all of that kind) in `tx`. On error nothing of
/// the batch may be kept: the caller rolls back.
pub async fn run_batch(
    tx: &mut PgConnection,
    queue: &QueueService,
    kind: &str,
    jobs: &[Job],
) -> Result<(), JobError> {
    for job in jobs {
        let key = job.args.get("id").and_then(|v| v.as_str()).unwrap_or("");
        match failpoint::handler_fault(key, job.attempt) {
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
    match JobKind::parse(kind) {
        Some(JobKind::DeliverEvent) => {
            let batch: Vec<deliver_event::Delivery> = parse_all(jobs)?
                .into_iter()
                .zip(jobs)
                .map(|((priority, args), job)| deliver_event::Delivery {
                    args,
                    priority: JobPriority::from_i16(priority),
                    trace: job.trace_parent.as_deref().and_then(TraceParent::parse),
                })
                .collect();
            deliver_event::run(tx, queue, &batch).await
        }
        Some(JobKind::InvokeDispatcher) => {
            let args: Vec<_> = parse_all(jobs)?.into_iter().map(|(_, a)| a).collect();
            invoke_dispatcher::run(tx, &args).await
        }
        None => Err(JobError::Permanent(format!("unknown job kind {kind:?}"))),
    }
}

/// Each job's args with its priority.
fn parse_all<T: serde::de::DeserializeOwned>(jobs: &[Job]) -> Result<Vec<(i16, T)>, JobError> {
    jobs.iter()
        .map(|job| {
            serde_json::from_value(job.args.clone())
                .map(|a| (job.priority, a))
                .map_err(|e| {
                    JobError::Permanent(format!("arguments of {} do not parse: {e}", job.kind))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(3600));
        let waits: Vec<u64> = (1..=5)
            .map(|a| backoff("deliverEvent", a, base, max).as_secs())
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16]);
        assert_eq!(backoff("deliverEvent", 40, base, max), max);
        assert_eq!(backoff("deliverEvent", 0, base, max), base);
    }
}
