//! The job ledger, which is also the transactional outbox.
//!
//! A job is a row in `queue_jobs`, written in the caller's transaction: it exists if and only
//! if the change that caused it commits. Every change of a job's state is a function here,
//! and no other module writes (or names) the table:
//!
//! - [`insert`]: insert, unique by args ([`QueueService`], the one way in, for the service and
//!   library callers alike);
//! - [`outbox`]: claim for publishing, take a mark back, put a job back in the outbox and
//!   wake the relays, sample the backlog;
//! - [`run`]: take jobs to run (marked completed in the handler's transaction), record a
//!   failure (retry or discard), cancel or move a job by its arguments;
//! - [`manage`]: list, get, retry and cancel for `kongflow-events jobs`;
//! - [`upkeep`]: the reconciler and retention.
//!
//! The relay publishes rows to RabbitMQ later; nothing here talks to the broker.

pub mod insert;
pub mod manage;
pub mod outbox;
pub mod publishers;
pub mod run;
pub mod upkeep;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use insert::QueueService;
pub use outbox::NOTIFY_CHANNEL;

/// The River queue every event job goes to (the ledger's `queue` column; RabbitMQ queues
/// are named after it).
pub const EVENTS_QUEUE: &str = "events";
/// Attempts before a job is discarded, unless the job says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

/// A query returning whole jobs: the one list of the ledger's columns, written once. The
/// arguments are the SQL before the column list, the SQL after it, and the binds.
macro_rules! query_jobs {
    ($before:literal, $after:literal $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            $crate::ledger::JobRow,
            $before
                + "id, kind, args, queue, priority, state::text AS \"state!\", attempt, max_attempts, \
                   run_at, errors, created_at, attempted_at, finalized_at, published_at, unique_key, \
                   trace_parent, environment_id"
                + $after
            $(, $arg)*
        )
    };
}
pub(crate) use query_jobs;

/// The kinds of job this service runs, with trigger.dev's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    DeliverEvent,
    InvokeDispatcher,
    /// POST an event to an EPHEMERAL dispatcher's URL.
    DeliverWebhook,
}

impl JobKind {
    pub const ALL: [JobKind; 3] = [
        JobKind::DeliverEvent,
        JobKind::InvokeDispatcher,
        JobKind::DeliverWebhook,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeliverEvent => "deliverEvent",
            Self::InvokeDispatcher => "events.invokeDispatcher",
            Self::DeliverWebhook => "events.deliverWebhook",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl Serialize for JobKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
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

impl Serialize for JobPriority {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i16(*self as i16)
    }
}

/// A job's place in its life cycle. A job goes from available (or scheduled, or retryable)
/// to completed in one transaction, its handler's, so no state says "running".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Scheduled,
    Available,
    Retryable,
    Completed,
    Discarded,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        Self::Scheduled,
        Self::Available,
        Self::Retryable,
        Self::Completed,
        Self::Discarded,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Available => "available",
            Self::Retryable => "retryable",
            Self::Completed => "completed",
            Self::Discarded => "discarded",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A final job never runs again (unless an operator retries it).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Discarded | Self::Cancelled)
    }

    /// The names of the final states, to bind in SQL: the one definition of "final".
    fn final_names() -> Vec<String> {
        Self::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| s.as_str().to_string())
            .collect()
    }
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

/// Arguments of `events.deliverWebhook`: the EPHEMERAL dispatcher and the event it fired
/// on (the same pair as an invocation's).
pub type DeliverWebhookArgs = InvokeDispatcherArgs;

/// A job's arguments, decoded once, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum JobArgs {
    DeliverEvent(DeliverEventArgs),
    InvokeDispatcher(InvokeDispatcherArgs),
    DeliverWebhook(DeliverWebhookArgs),
}

impl JobArgs {
    pub fn kind(&self) -> JobKind {
        match self {
            Self::DeliverEvent(_) => JobKind::DeliverEvent,
            Self::InvokeDispatcher(_) => JobKind::InvokeDispatcher,
            Self::DeliverWebhook(_) => JobKind::DeliverWebhook,
        }
    }

    /// The arguments of a job of `kind`, as stored (JSON).
    pub fn decode(kind: JobKind, args: &Value) -> Result<Self, serde_json::Error> {
        Ok(match kind {
            JobKind::DeliverEvent => Self::DeliverEvent(DeliverEventArgs::deserialize(args)?),
            JobKind::InvokeDispatcher => {
                Self::InvokeDispatcher(InvokeDispatcherArgs::deserialize(args)?)
            }
            JobKind::DeliverWebhook => Self::DeliverWebhook(DeliverWebhookArgs::deserialize(args)?),
        })
    }

    /// As stored: `{"id"}` or `{"id", "eventRecordId"}`.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("job arguments serialize")
    }

    /// The event record the job is about.
    pub fn event_record_id(&self) -> Uuid {
        match self {
            Self::DeliverEvent(a) => a.id,
            Self::InvokeDispatcher(a) | Self::DeliverWebhook(a) => a.event_record_id,
        }
    }

    /// The `id` of the arguments (the event record, or the dispatcher).
    pub fn id(&self) -> Uuid {
        match self {
            Self::DeliverEvent(a) => a.id,
            Self::InvokeDispatcher(a) | Self::DeliverWebhook(a) => a.id,
        }
    }
}

/// One job of the ledger, decoded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    pub args: JobArgs,
    pub queue: String,
    pub priority: JobPriority,
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
    /// The environment whose work it is (the nil UUID for none): its share of the workers
    /// and its shard.
    pub environment_id: Uuid,
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

/// A row whose kind or arguments this build cannot read (written by hand, or by another
/// version): it is never run or published, and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {id}: {reason}")]
pub struct UnreadableJob {
    pub id: i64,
    pub reason: String,
}

/// The result of an insert: the job, and whether an equal job already existed (in which case
/// `job` is that one and nothing was inserted).
#[derive(Debug, Clone)]
pub struct JobInsertResult {
    pub job: Job,
    pub unique_skipped_as_duplicate: bool,
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
    /// The inserting process publishes the job itself once its transaction commits (the
    /// fast path, the `amqp::direct` publisher): the row is inserted marked published, so no
    /// relay claims it, and the insert wakes no relay. Unset: the relay publishes it. A due
    /// job whose environment already has its `max_jobs_in_flight` of the kind in flight is
    /// left to the relay all the same (see [`outbox::claim`]): the returned job then has no
    /// `published_at`, and the caller must not publish it. The stamp names the ticket
    /// ([`publishers::Ticket`]) that covers the job until its message is confirmed.
    pub caller_publishes: Option<publishers::PublishedBy>,
    /// The environment whose work the job is.
    pub environment_id: Option<Uuid>,
}

impl Default for InsertOpts {
    fn default() -> Self {
        Self {
            queue: EVENTS_QUEUE.to_string(),
            priority: JobPriority::High,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            run_at: None,
            trace_parent: None,
            caller_publishes: None,
            environment_id: None,
        }
    }
}

/// A job to insert.
#[derive(Debug, Clone)]
pub struct JobInsert {
    pub args: JobArgs,
    pub opts: InsertOpts,
}

impl JobInsert {
    pub fn deliver_event(args: DeliverEventArgs, opts: InsertOpts) -> Self {
        Self {
            args: JobArgs::DeliverEvent(args),
            opts,
        }
    }

    pub fn invoke_dispatcher(args: InvokeDispatcherArgs, opts: InsertOpts) -> Self {
        Self {
            args: JobArgs::InvokeDispatcher(args),
            opts,
        }
    }

    pub fn deliver_webhook(args: DeliverWebhookArgs, opts: InsertOpts) -> Self {
        Self {
            args: JobArgs::DeliverWebhook(args),
            opts,
        }
    }
}

/// Unique by args: the key is a hash of the kind and the args in canonical form
/// (`serde_json` keeps object keys sorted).
pub fn unique_key(args: &JobArgs) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(args.kind().as_str().as_bytes());
    h.update([0]);
    h.update(args.to_value().to_string().as_bytes());
    h.finalize().to_vec()
}

/// The events with an id in `[from, to)` whose `deliverEvent` job is still to run
/// (scheduled, available or retryable: the live index; a job is never left running) or was
/// discarded less than `keep` ago (its dead letter may be replayed), at most `limit`. What
/// retention asks before it drops a slice of events: a look at the live and the discarded
/// jobs, never at the slice's rows.
pub async fn deliveries_between(
    conn: &mut sqlx::PgConnection,
    from: Uuid,
    to: Uuid,
    keep: std::time::Duration,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT id AS "id!" FROM (
               SELECT (args->>'id')::uuid AS id FROM queue_jobs
               WHERE state IN ('scheduled', 'available', 'retryable') AND kind = 'deliverEvent'
               UNION ALL
               SELECT (args->>'id')::uuid FROM queue_jobs
               WHERE state = 'discarded' AND kind = 'deliverEvent'
                 AND finalized_at > now() - make_interval(secs => $3)) AS j
           WHERE id >= $1 AND id < $2
           LIMIT $4"#,
        from,
        to,
        keep.as_secs_f64(),
        limit
    )
    .fetch_all(conn)
    .await
}

/// Whether each of `jobs` (named by its arguments) has a job in the ledger that is not
/// final (neither completed, discarded nor cancelled), found by its unique key.
pub async fn live(
    conn: &mut sqlx::PgConnection,
    jobs: &[JobArgs],
) -> Result<Vec<bool>, sqlx::Error> {
    let keys: Vec<Vec<u8>> = jobs.iter().map(unique_key).collect();
    let live: std::collections::HashSet<Vec<u8>> = sqlx::query_scalar!(
        r#"SELECT unique_key AS "unique_key!" FROM queue_jobs
           WHERE unique_key = ANY($1) AND state NOT IN ('cancelled', 'discarded', 'completed')"#,
        &keys
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .collect();
    Ok(keys.iter().map(|k| live.contains(k)).collect())
}

/// A ledger row as selected: `state` comes out as text, kind and args as stored.
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
    pub environment_id: Uuid,
}

impl TryFrom<JobRow> for Job {
    type Error = UnreadableJob;

    /// Where a row becomes a job: kind and arguments are decoded here, once.
    fn try_from(r: JobRow) -> Result<Self, UnreadableJob> {
        let unreadable = |reason: String| UnreadableJob { id: r.id, reason };
        let kind = JobKind::parse(&r.kind)
            .ok_or_else(|| unreadable(format!("unknown job kind {:?}", r.kind)))?;
        let args = JobArgs::decode(kind, &r.args)
            .map_err(|e| unreadable(format!("arguments of {} do not parse: {e}", r.kind)))?;
        // The column is an enum whose labels are exactly JobState's (but `running`, which
        // nothing writes): anything else is a schema this build does not know.
        let state = JobState::parse(&r.state)
            .ok_or_else(|| unreadable(format!("unknown job state {:?}", r.state)))?;
        Ok(Job {
            id: r.id,
            kind,
            args,
            queue: r.queue,
            priority: JobPriority::from_i16(r.priority),
            state,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            errors: r.errors,
            created_at: r.created_at,
            attempted_at: r.attempted_at,
            finalized_at: r.finalized_at,
            published_at: r.published_at,
            trace_parent: r.trace_parent,
            environment_id: r.environment_id,
        })
    }
}

/// Decode rows, all of them or the first that cannot be read.
pub(crate) fn decode_all(rows: Vec<JobRow>) -> Result<Vec<Job>, UnreadableJob> {
    rows.into_iter().map(Job::try_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unique_key_follows_the_arguments_and_separates_kinds() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let invoke = JobArgs::InvokeDispatcher(InvokeDispatcherArgs {
            id: a,
            event_record_id: b,
        });
        let same: Value =
            serde_json::from_str(&format!(r#"{{"eventRecordId":"{b}","id":"{a}"}}"#)).unwrap();
        assert_eq!(
            unique_key(&invoke),
            unique_key(&JobArgs::decode(JobKind::InvokeDispatcher, &same).unwrap())
        );
        assert_ne!(
            unique_key(&invoke),
            unique_key(&JobArgs::DeliverEvent(DeliverEventArgs { id: a }))
        );
    }

    #[test]
    fn arguments_decode_by_kind_and_refuse_strangers() {
        let id = Uuid::from_u128(7);
        let args = JobArgs::decode(JobKind::DeliverEvent, &json!({ "id": id })).unwrap();
        assert_eq!(args, JobArgs::DeliverEvent(DeliverEventArgs { id }));
        assert_eq!(args.to_value(), json!({ "id": id }));
        assert!(JobArgs::decode(JobKind::DeliverEvent, &json!({"id": id, "x": 1})).is_err());
        assert!(JobArgs::decode(JobKind::InvokeDispatcher, &json!({ "id": id })).is_err());
    }

    #[test]
    fn priorities_map_to_amqp_highest_first() {
        assert!(JobPriority::Critical.amqp_priority() > JobPriority::High.amqp_priority());
        assert_eq!(JobPriority::Low.amqp_priority(), 1);
        assert_eq!(JobPriority::from_i16(1), JobPriority::Critical);
    }

    #[test]
    fn kinds_and_states_round_trip() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(JobKind::parse("nope"), None);
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            JobState::final_names(),
            vec!["completed", "discarded", "cancelled"]
        );
    }
}
