//! Job handlers, one file per kind. A handler runs inside the worker's transaction: its
//! effects and the job's completion commit together or not at all.

pub mod deliver_event;
pub mod invoke_dispatcher;

use sqlx::PgConnection;

use crate::queue::{Job, JobKind, QueueService};

/// Why a handler did not complete its job.
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

/// Run the handler for `job`'s kind in `tx`.
pub async fn run(tx: &mut PgConnection, queue: &QueueService, job: &Job) -> Result<(), JobError> {
    match JobKind::parse(&job.kind) {
        Some(JobKind::DeliverEvent) => {
            deliver_event::run(tx, queue, parse_args(job)?, job.priority).await
        }
        Some(JobKind::InvokeDispatcher) => invoke_dispatcher::run(tx, parse_args(job)?).await,
        None => Err(JobError::Permanent(format!(
            "unknown job kind {:?}",
            job.kind
        ))),
    }
}

fn parse_args<T: serde::de::DeserializeOwned>(job: &Job) -> Result<T, JobError> {
    serde_json::from_value(job.args.clone())
        .map_err(|e| JobError::Permanent(format!("arguments of {} do not parse: {e}", job.kind)))
}
