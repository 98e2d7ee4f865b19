//! Job handlers, one file per kind. A handler runs a batch of jobs of its kind inside the
//! worker's transaction, with a few set-based statements for the whole batch: its effects
//! and the jobs' completion commit together or not at all.

pub mod deliver_event;
pub mod invoke_dispatcher;

use sqlx::PgConnection;

use crate::queue::{Job, JobKind, QueueService};

/// Why a handler did not complete its jobs.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt later (a database error, a conflict).
    #[error("{0}")]
    Retryable(String),
    /// No attempt can succeed (arguments that do not parse, an unknown kind).
    #[error("{0}")]
    Permanent(String),
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
    match JobKind::parse(kind) {
        Some(JobKind::DeliverEvent) => {
            let args = parse_all(jobs)?;
            deliver_event::run(tx, queue, &args).await
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
