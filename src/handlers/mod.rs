//! Job handlers, one file per kind, and the two ways a kind runs.
//!
//! - A **transactional** kind ([`Transactional`]: `deliverEvent`, `events.invokeDispatcher`)
//!   has only effects in the database. The worker takes a batch of its jobs, the kind
//!   handles them inside the batch's transaction with a few set-based statements, and the
//!   jobs' completion commits with those effects or not at all.
//! - An **external-effect** kind ([`ExternalEffect`]: `events.deliverWebhook`) has an effect
//!   outside the database (a request to a receiver), which cannot commit with anything and
//!   must not hold a transaction while it waits. The worker leases each job, the kind makes
//!   its attempt holding no transaction, and the job is then completed in a transaction of
//!   its own (with the kind's record of the effect, [`ExternalEffect::complete`]) or its
//!   failure recorded. Each job runs as a task of its own, within the kind's [`Places`].
//!
//! [`Handlers::execution`] says which a kind is; the worker asks it and never names a kind.
//! The two are an enum of two traits, not one trait: the worker's control flow differs
//! between them (one transaction per batch, or a task per job with a lease), so a single
//! trait would only move that question into the worker. They are traits, not functions
//! matched by kind, because a kind's way of running carries its own state (the webhook
//! sender, its concurrency settings), built once from the configuration.

pub mod deliver_event;
pub mod deliver_webhook;
pub mod invoke_dispatcher;
pub mod places;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{PgConnection, PgPool};

use crate::config::WorkerConfig;
use crate::failpoint::{self, Fault};
use crate::ledger::publishers::PublishedBy;
use crate::ledger::{Job, JobKind};
use crate::runs::handoff::HandOff;

pub use places::Places;

/// How the worker runs a kind's jobs (see the module's documentation).
#[derive(Clone)]
pub enum Execution {
    /// Take → handle in the batch's transaction → complete.
    Transactional(&'static dyn Transactional),
    /// Lease → effect outside any transaction → complete, or record the failure. Shared:
    /// the worker's tasks each hold it while their attempt runs.
    ExternalEffect(Arc<dyn ExternalEffect>),
}

/// A kind whose effects are rows, made in the worker's transaction.
pub trait Transactional: Send + Sync {
    /// Handle `jobs` (all of this kind, their arguments decoded) in `tx`. On error nothing
    /// of the batch may be kept: the caller rolls back. Returns what it wrote;
    /// `caller_publishes`: written for the caller to publish after its commit (the fast
    /// path), else for the relay.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        jobs: &'a [Job],
        caller_publishes: Option<PublishedBy>,
    ) -> BoxFuture<'a, Result<Written, JobError>>;
}

/// What a transactional kind's batch wrote for its caller to publish after the commit
/// (`caller_publishes`): jobs, and the runs' hand-offs with their messages. Without
/// `caller_publishes` the jobs are listed all the same (the relay publishes them) and no
/// hand-off is.
#[derive(Debug, Default)]
pub struct Written {
    pub jobs: Vec<Job>,
    pub handoffs: Vec<HandOff>,
}

/// A kind whose effect is outside the database: each job is leased, its attempt made
/// holding no transaction, then completed or failed.
pub trait ExternalEffect: Send + Sync + 'static {
    /// How long a job stays leased to the worker attempting it: longer than an attempt can
    /// take, so a duplicate message meanwhile finds it not due, and a worker that dies
    /// holding it leaves it to the reconciler.
    fn lease(&self) -> Duration;

    /// How long a message waits in the delay tiers when its environment holds its share of
    /// the places, or when the ledger could not take it.
    fn defer(&self) -> Duration;

    /// The places of one consumer: how many attempts run at once, and one environment's
    /// share of them.
    fn places(&self) -> Places;

    /// Make one attempt of a leased job, holding no transaction. `Err(JobError::Database)`:
    /// the database failed around the attempt (the job's failure, counted apart).
    fn attempt<'a>(&'a self, pool: &'a PgPool, job: &'a Job)
    -> BoxFuture<'a, Result<(), JobError>>;

    /// Record the effect of attempts that succeeded, in the transaction completing their
    /// jobs.
    fn complete<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        jobs: &'a [Job],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// Record what a job discarded after its last attempt (or a permanent failure) leaves,
    /// in the transaction that discards it.
    fn discarded<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// Count a database error met running a job or taking its message, which the worker
    /// handled without stopping.
    fn count_error(&self, at: ErrorAt);

    /// Count messages sent back into the delay tiers for [`ExternalEffect::defer`].
    fn count_deferred(&self, why: Deferral, messages: usize);
}

/// Where an external-effect kind's database error was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAt {
    /// Running a leased job: recorded as the job's failure.
    Job,
    /// Taking a message's job: the message goes back into the tiers.
    Message,
}

/// Why an external-effect kind's message went back into the delay tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// Its environment holds its share of the places.
    Share,
    /// The ledger could not take it (a database error of its own).
    Error,
}

impl Deferral {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Share => "share",
            Self::Error => "error",
        }
    }
}

/// Every kind's way of running, built once from the worker's configuration.
#[derive(Clone)]
pub struct Handlers {
    deliver_webhook: Arc<deliver_webhook::DeliverWebhook>,
}

impl Handlers {
    pub fn new(config: &WorkerConfig) -> Self {
        Self {
            deliver_webhook: Arc::new(deliver_webhook::DeliverWebhook::new(config)),
        }
    }

    /// How `kind` runs. A new kind gets its arm here.
    pub fn execution(&self, kind: JobKind) -> Execution {
        match kind {
            JobKind::DeliverEvent => Execution::Transactional(&deliver_event::DeliverEvent),
            JobKind::InvokeDispatcher => {
                Execution::Transactional(&invoke_dispatcher::InvokeDispatcher)
            }
            JobKind::DeliverWebhook => Execution::ExternalEffect(self.deliver_webhook.clone()),
        }
    }

    /// The part of a batch of `kind` (`jobs`, all of that kind) that runs in the worker's
    /// transaction `tx`: a transactional kind's handling, an external-effect kind's record
    /// of its effect. Injected faults (see [`failpoint::handler_fault`]) fire here first. On
    /// error nothing of the batch may be kept: the caller rolls back. Returns what it wrote
    /// (see [`Transactional::handle`] for `caller_publishes`).
    pub async fn run_batch(
        &self,
        tx: &mut PgConnection,
        kind: JobKind,
        jobs: &[Job],
        caller_publishes: Option<PublishedBy>,
    ) -> Result<Written, JobError> {
        for job in jobs {
            match failpoint::handler_fault(job.args.id(), job.attempt) {
                Some(Fault::Error) => {
                    return Err(JobError::Injected {
                        attempt: job.attempt,
                    });
                }
                Some(Fault::Panic) => panic!("injected panic on attempt {}", job.attempt),
                None => {}
            }
        }
        match self.execution(kind) {
            Execution::Transactional(kind) => kind.handle(tx, jobs, caller_publishes).await,
            Execution::ExternalEffect(kind) => {
                kind.complete(tx, jobs).await?;
                Ok(Written::default())
            }
        }
    }
}

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

/// Why a job did not complete. Its text is what the ledger keeps in the job's errors.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The database failed; worth another attempt.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Worth another attempt later (a receiver's failure, say).
    #[error("{0}")]
    Retryable(String),
    /// A fault the tests injected (see [`failpoint::handler_fault`]); retryable.
    #[error("injected fault on attempt {attempt}")]
    Injected { attempt: i32 },
    /// No attempt can succeed (arguments that do not parse, a row gone, a refused address).
    #[error("{0}")]
    Permanent(String),
    /// The handler panicked; treated like a retryable error.
    #[error("{0}")]
    Panic(String),
}

impl JobError {
    /// The kind of failure, as the ledger records it and the metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Database(_) | Self::Retryable(_) | Self::Injected { .. } => "error",
            Self::Permanent(_) => "permanent",
            Self::Panic(_) => "panic",
        }
    }

    /// No attempt can succeed: discard the job now.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
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

    #[test]
    fn job_errors_keep_the_text_and_kind_the_ledger_records() {
        let injected = JobError::Injected { attempt: 2 };
        assert_eq!(injected.to_string(), "injected fault on attempt 2");
        assert_eq!(injected.kind(), "error");
        let db = JobError::from(sqlx::Error::PoolTimedOut);
        assert!(db.to_string().starts_with("database: "), "{db}");
        assert_eq!(db.kind(), "error");
        assert!(JobError::Permanent("gone".into()).is_permanent());
        assert!(!JobError::Panic("boom".into()).is_permanent());
    }
}
