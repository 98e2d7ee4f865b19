//! The job ledger, which is also the transactional outbox.
//!
//! A job is a row in `queue_jobs`, written in the caller's transaction: it exists if and only
//! if the change that caused it commits. The relay publishes rows to RabbitMQ later; nothing
//! here talks to the broker.

use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

/// The queue every event job goes to.
pub const EVENTS_QUEUE: &str = "events";
/// Attempts before a job is discarded, unless the job says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

/// The kinds of job this service runs, with trigger.dev's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    DeliverEvent,
    InvokeDispatcher,
}

impl JobKind {
    pub const ALL: [JobKind; 2] = [JobKind::DeliverEvent, JobKind::InvokeDispatcher];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeliverEvent => "deliverEvent",
            Self::InvokeDispatcher => "events.invokeDispatcher",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// River's priorities: 1 runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum JobPriority {
    Critical = 1,
    #[default]
    High = 2,
    Normal = 3,
    Low = 4,
}

impl JobPriority {
    pub fn from_i16(p: i16) -> Self {
        match p {
            1 => Self::Critical,
            2 => Self::High,
            3 => Self::Normal,
            _ => Self::Low,
        }
    }

    /// The AMQP priority (0 to 4, higher first) for a RabbitMQ priority queue.
    pub fn amqp_priority(self) -> u8 {
        5 - self as u8
    }
}

/// A job's place in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Scheduled,
    Available,
    Running,
    Retryable,
    Completed,
    Discarded,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Available => "available",
            Self::Running => "running",
            Self::Retryable => "retryable",
            Self::Completed => "completed",
            Self::Discarded => "discarded",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Scheduled,
            Self::Available,
            Self::Running,
            Self::Retryable,
            Self::Completed,
            Self::Discarded,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// A finalized job never runs again (unless an operator retries it).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Discarded | Self::Cancelled)
    }
}

/// One row of the ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub args: Value,
    pub queue: String,
    pub priority: i16,
    pub state: JobState,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub errors: Value,
    pub created_at: DateTime<Utc>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub finalized_at: Option<DateTime<Utc>>,
    pub published_at: Option<DateTime<Utc>>,
    /// The W3C `traceparent` of what caused the job.
    pub trace_parent: Option<String>,
}

impl Job {
    /// The trace this job belongs to.
    pub fn trace_id(&self) -> Option<String> {
        crate::trace::trace_id_of(self.trace_parent.as_deref())
    }

    /// The message of the last error recorded on the job.
    pub fn last_error(&self) -> Option<&str> {
        self.errors.as_array()?.last()?.get("error")?.as_str()
    }
}

/// The result of an insert: the job, and whether an equal job already existed (in which case
/// `job` is that one and nothing was inserted).
#[derive(Debug, Clone)]
pub struct JobInsertResult {
    pub job: Job,
    pub unique_skipped_as_duplicate: bool,
}

/// Arguments of `deliverEvent`: the event record to deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverEventArgs {
    pub id: Uuid,
}

/// Arguments of `events.invokeDispatcher`: the dispatcher and the event it was matched by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InvokeDispatcherArgs {
    pub id: Uuid,
    pub event_record_id: Uuid,
}

/// Options of one insert.
#[derive(Debug, Clone)]
pub struct InsertOpts {
    pub queue: String,
    pub priority: JobPriority,
    pub max_attempts: i32,
    /// When the job becomes due; `None` is now (by the database's clock).
    pub run_at: Option<DateTime<Utc>>,
    /// The W3C `traceparent` of what causes the job.
    pub trace_parent: Option<String>,
}

impl Default for InsertOpts {
    fn default() -> Self {
        Self {
            queue: EVENTS_QUEUE.to_string(),
            priority: JobPriority::High,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            run_at: None,
            trace_parent: None,
        }
    }
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct JobInsert {
    pub kind: JobKind,
    pub args: Value,
    pub opts: InsertOpts,
}

impl JobInsert {
    pub fn deliver_event(args: DeliverEventArgs, opts: InsertOpts) -> Self {
        Self {
            kind: JobKind::DeliverEvent,
            args: serde_json::to_value(args).expect("args serialize"),
            opts,
        }
    }

    pub fn invoke_dispatcher(args: InvokeDispatcherArgs, opts: InsertOpts) -> Self {
        Self {
            kind: JobKind::InvokeDispatcher,
            args: serde_json::to_value(args).expect("args serialize"),
            opts,
        }
    }
}

/// Unique by args: the key is a hash of the kind and the args in canonical form
/// (`serde_json` keeps object keys sorted).
pub fn unique_key(kind: JobKind, args: &Value) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(kind.as_str().as_bytes());
    h.update([0]);
    h.update(args.to_string().as_bytes());
    h.finalize().to_vec()
}

/// Inserts jobs into the ledger, always inside the caller's transaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueService;

impl QueueService {
    pub fn new() -> Self {
        Self
    }

    /// Enqueue `deliverEvent` for an event record.
    pub async fn enqueue_deliver_event(
        &self,
        tx: &mut PgConnection,
        args: DeliverEventArgs,
        opts: InsertOpts,
    ) -> Result<JobInsertResult, sqlx::Error> {
        let mut res = self
            .enqueue_many(tx, vec![JobInsert::deliver_event(args, opts)])
            .await?;
        Ok(res.remove(0))
    }

    /// Enqueue `events.invokeDispatcher` for a dispatcher matched by an event.
    pub async fn enqueue_invoke_dispatcher(
        &self,
        tx: &mut PgConnection,
        args: InvokeDispatcherArgs,
        opts: InsertOpts,
    ) -> Result<JobInsertResult, sqlx::Error> {
        let mut res = self
            .enqueue_many(tx, vec![JobInsert::invoke_dispatcher(args, opts)])
            .await?;
        Ok(res.remove(0))
    }

    /// Enqueue several jobs with one statement. Results come in the order of `jobs`.
    pub async fn enqueue_many(
        &self,
        tx: &mut PgConnection,
        jobs: Vec<JobInsert>,
    ) -> Result<Vec<JobInsertResult>, sqlx::Error> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let n = jobs.len();
        let mut kinds = Vec::with_capacity(n);
        let mut args = Vec::with_capacity(n);
        let mut queues = Vec::with_capacity(n);
        let mut priorities = Vec::with_capacity(n);
        let mut max_attempts = Vec::with_capacity(n);
        let mut run_ats = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut traces = Vec::with_capacity(n);
        for j in &jobs {
            traces.push(j.opts.trace_parent.clone());
            kinds.push(j.kind.as_str().to_string());
            keys.push(unique_key(j.kind, &j.args));
            args.push(j.args.clone());
            queues.push(j.opts.queue.clone());
            priorities.push(j.opts.priority as i16);
            max_attempts.push(j.opts.max_attempts);
            run_ats.push(j.opts.run_at);
        }

        let inserted = sqlx::query_as!(
            JobRow,
            r#"INSERT INTO queue_jobs (kind, args, queue, priority, state, max_attempts, run_at, unique_key, trace_parent)
               SELECT k, a, q, p,
                      CASE WHEN COALESCE(r, now()) > now() THEN 'scheduled'::queue_job_state
                           ELSE 'available'::queue_job_state END,
                      m, COALESCE(r, now()), u, tp
               FROM UNNEST($1::text[], $2::jsonb[], $3::text[], $4::int2[], $5::int4[],
                           $6::timestamptz[], $7::bytea[], $8::text[]) AS t(k, a, q, p, m, r, u, tp)
               ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state NOT IN ('cancelled', 'discarded')
               DO NOTHING
               RETURNING id, kind, args, queue, priority, state::text AS "state!", attempt, max_attempts,
                         run_at, errors, created_at, attempted_at, finalized_at, published_at, unique_key, trace_parent"#,
            &kinds,
            &args,
            &queues,
            &priorities,
            &max_attempts,
            &run_ats as &[Option<DateTime<Utc>>],
            &keys,
            &traces as &[Option<String>],
        )
        .fetch_all(&mut *tx)
        .await?;

        let m = crate::metrics::metrics();
        for r in &inserted {
            m.jobs_inserted
                .with_label_values(&[&r.kind, &r.queue])
                .inc();
        }
        let mut by_key: HashMap<Vec<u8>, (Job, bool)> = inserted
            .into_iter()
            .filter_map(|r| r.unique_key.clone().map(|k| (k, (Job::from(r), false))))
            .collect();

        let missing: Vec<Vec<u8>> = keys
            .iter()
            .filter(|k| !by_key.contains_key(*k))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let existing = sqlx::query_as!(
                JobRow,
                r#"SELECT id, kind, args, queue, priority, state::text AS "state!", attempt, max_attempts,
                          run_at, errors, created_at, attempted_at, finalized_at, published_at, unique_key, trace_parent
                   FROM queue_jobs
                   WHERE unique_key = ANY($1) AND state NOT IN ('cancelled', 'discarded')"#,
                &missing
            )
            .fetch_all(&mut *tx)
            .await?;
            for r in existing {
                if let Some(k) = r.unique_key.clone() {
                    by_key.insert(k, (Job::from(r), true));
                }
            }
        }

        // Two equal jobs in one call: the first is the insert, the rest are duplicates of it.
        let mut seen = HashSet::new();
        keys.into_iter()
            .map(|k| {
                let (job, dup) = by_key.get(&k).cloned().ok_or_else(|| {
                    sqlx::Error::Protocol(
                        "a unique job vanished between insert and lookup".to_string(),
                    )
                })?;
                let first = seen.insert(k);
                Ok(JobInsertResult {
                    job,
                    unique_skipped_as_duplicate: dup || !first,
                })
            })
            .collect()
    }
}

/// A ledger row as selected: `state` comes out as text.
pub(crate) struct JobRow {
    pub id: i64,
    pub kind: String,
    pub args: Value,
    pub queue: String,
    pub priority: i16,
    pub state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub errors: Value,
    pub created_at: DateTime<Utc>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub finalized_at: Option<DateTime<Utc>>,
    pub published_at: Option<DateTime<Utc>>,
    pub unique_key: Option<Vec<u8>>,
    pub trace_parent: Option<String>,
}

impl From<JobRow> for Job {
    fn from(r: JobRow) -> Self {
        Job {
            id: r.id,
            kind: r.kind,
            args: r.args,
            queue: r.queue,
            priority: r.priority,
            state: parse_state(&r.state),
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            errors: r.errors,
            created_at: r.created_at,
            attempted_at: r.attempted_at,
            finalized_at: r.finalized_at,
            published_at: r.published_at,
            trace_parent: r.trace_parent,
        }
    }
}

pub(crate) fn parse_state(s: &str) -> JobState {
    // The column is an enum whose labels are exactly JobState's; a mismatch is a schema bug.
    JobState::parse(s).unwrap_or_else(|| panic!("unknown queue_job_state {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unique_key_ignores_key_order_and_separates_kinds() {
        let a = json!({"id": "x", "eventRecordId": "y"});
        let b: Value = serde_json::from_str(r#"{"eventRecordId":"y","id":"x"}"#).unwrap();
        assert_eq!(
            unique_key(JobKind::InvokeDispatcher, &a),
            unique_key(JobKind::InvokeDispatcher, &b)
        );
        assert_ne!(
            unique_key(JobKind::InvokeDispatcher, &a),
            unique_key(JobKind::DeliverEvent, &a)
        );
    }

    #[test]
    fn priorities_map_to_amqp_highest_first() {
        assert!(JobPriority::Critical.amqp_priority() > JobPriority::High.amqp_priority());
        assert_eq!(JobPriority::Low.amqp_priority(), 1);
        assert_eq!(JobPriority::from_i16(1), JobPriority::Critical);
    }

    #[test]
    fn kinds_round_trip() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(JobKind::parse("nope"), None);
    }
}
