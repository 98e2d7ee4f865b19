//! Runs: the job runs an invocation creates ([`create`]), cancels ([`cancel_queued`]), lists
//! ([`of_event`]) and deletes, and their hand-offs to the runs service ([`handoff`]). The
//! only module that names `job_runs` and `run_handoffs` (checked by `tests/it/structure.rs`).
//!
//! A run is handed off in the statement that creates or cancels it, so no run exists (or
//! is cancelled) without its `run_handoffs` row, and none gets two.

pub mod handoff;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

pub use handoff::HandOffKind;

use crate::ledger::publishers::PublishedBy;

/// A run created for an event, as the event lookup shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub id: Uuid,
    pub status: String,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// One invocation asking for runs: a dispatcher for an event, and the trace its runs'
/// hand-offs continue.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub dispatcher: Uuid,
    pub event_record_id: Uuid,
    pub trace_parent: Option<String>,
}

/// A run [`create`] made (and handed off).
#[derive(Debug, Clone)]
pub struct CreatedRun {
    pub id: Uuid,
    pub event_record_id: Uuid,
    /// The producer's id of the event.
    pub event_id: String,
    pub dispatcher_id: Uuid,
    /// Seconds from when the event was due to when its run was created.
    pub late: Option<f64>,
    /// Its `run.created` hand-off with the message built, when the caller publishes it
    /// (see [`create`]).
    pub handoff: Option<handoff::Claimed>,
}

/// A row of [`create`]'s statement.
struct CreatedRow {
    id: Uuid,
    event_record_id: Uuid,
    event_id: String,
    dispatcher_id: Uuid,
    late: Option<f64>,
    handoff_id: i64,
    handoff_created_at: DateTime<Utc>,
    trace_parent: Option<String>,
    message: Option<String>,
}

/// Create the runs of a batch of invocations and the `run.created` hand-off of each, in one
/// statement of the caller's transaction. A dispatcher or event that is gone, a disabled
/// dispatcher, or a pair from two environments creates nothing; an EPHEMERAL dispatcher
/// creates no run (it fires a webhook instead: `dispatchers::fire`).
///
/// JOB_VERSION creates one run of its version; DYNAMIC_TRIGGER one run of the latest version
/// of each attached job. Runs are unique per (event, dispatcher, job version), so a second
/// invocation creates nothing, and each run created gets exactly one hand-off (one per run
/// even when a batch names a pair twice).
///
/// The events and dispatchers named are read first, by primary key (`MATERIALIZED`): joined
/// directly, the planner could reach them through an index on the environment (both
/// tables have one) and walk every event of the environment for each invocation (measured:
/// 2,800 buffers a call at 3,000 events, growing with the table).
///
/// `caller_publishes`: the hand-offs are stamped with the caller's ticket, no relay claims
/// them, and each [`CreatedRun::handoff`] carries its message for the caller to publish
/// after its commit (the fast path, as for jobs: `amqp::DirectPublisher`). Without it they
/// are the relay's.
pub async fn create(
    tx: &mut PgConnection,
    invocations: &[Invocation],
    caller_publishes: Option<PublishedBy>,
) -> Result<Vec<CreatedRun>, sqlx::Error> {
    let dispatchers: Vec<Uuid> = invocations.iter().map(|i| i.dispatcher).collect();
    let events: Vec<Uuid> = invocations.iter().map(|i| i.event_record_id).collect();
    let traces: Vec<Option<String>> = invocations.iter().map(|i| i.trace_parent.clone()).collect();
    let rows = sqlx::query_as!(
        CreatedRow,
        r#"WITH ev AS MATERIALIZED (
               SELECT id, environment_id, event_id, deliver_at FROM event_records
               WHERE id = ANY($2::uuid[])),
           ds AS MATERIALIZED (
               SELECT id, environment_id, dispatchable_type, target_id FROM event_dispatchers
               WHERE id = ANY($1::uuid[]) AND enabled),
           created AS (
           INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id)
           SELECT gen_random_uuid(), d.environment_id, t.job_id, t.version_id, e.id, d.id
           FROM UNNEST($1::uuid[], $2::uuid[]) AS a(dispatcher_id, event_id)
           JOIN ds d ON d.id = a.dispatcher_id
           JOIN ev e ON e.id = a.event_id AND e.environment_id = d.environment_id
           JOIN LATERAL (
               SELECT v.job_id, v.id AS version_id FROM job_versions v
               WHERE d.dispatchable_type = 'JOB_VERSION' AND v.id = d.target_id
                 AND v.environment_id = d.environment_id
               UNION ALL
               SELECT j.id, j.latest_version_id FROM dynamic_trigger_jobs dtj
               JOIN jobs j ON j.environment_id = dtj.environment_id AND j.id = dtj.job_id
               WHERE d.dispatchable_type = 'DYNAMIC_TRIGGER' AND dtj.environment_id = d.environment_id
                 AND dtj.dynamic_trigger_id = d.target_id
                 AND j.latest_version_id IS NOT NULL AND j.environment_id = d.environment_id
           ) t ON true
           -- The run's key, keyed by its environment or not yet (`db::keys`): no target.
           ON CONFLICT DO NOTHING
           RETURNING id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id,
                     created_at),
           handed AS (
           INSERT INTO run_handoffs (run_id, environment_id, kind, trace_parent, published_by, publish_seq)
           SELECT DISTINCT ON (c.id) c.id, c.environment_id, $4, t.trace, $5, $6 FROM created c
           JOIN UNNEST($1::uuid[], $2::uuid[], $3::text[]) AS t(dispatcher_id, event_id, trace)
             ON t.dispatcher_id = c.dispatcher_id AND t.event_id = c.event_record_id
           RETURNING id, run_id, trace_parent, created_at)
           SELECT c.id AS "id!", c.event_record_id AS "event_record_id!", e.event_id AS "event_id!",
                  c.dispatcher_id AS "dispatcher_id!",
                  EXTRACT(EPOCH FROM c.created_at - e.deliver_at)::float8 AS late,
                  h.id AS "handoff_id!", h.created_at AS "handoff_created_at!", h.trace_parent,
                  CASE WHEN $5::bigint IS NOT NULL THEN run_created_message(
                      c.id, c.created_at, c.environment_id, c.job_id, c.job_version_id,
                      c.dispatcher_id, c.event_record_id, h.trace_parent) END AS message
           FROM created c JOIN handed h ON h.run_id = c.id
           JOIN ev e ON e.id = c.event_record_id"#,
        &dispatchers,
        &events,
        &traces as &[Option<String>],
        HandOffKind::Created.as_str(),
        caller_publishes.map(|p| p.publisher),
        caller_publishes.map(|p| p.seq),
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| CreatedRun {
            handoff: caller_publishes.map(|_| handoff::Claimed {
                id: r.handoff_id,
                run_id: r.id,
                kind: HandOffKind::Created.as_str().to_string(),
                trace_parent: r.trace_parent,
                body: r.message,
                created_at: r.handoff_created_at,
            }),
            id: r.id,
            event_record_id: r.event_record_id,
            event_id: r.event_id,
            dispatcher_id: r.dispatcher_id,
            late: r.late,
        })
        .collect())
}

/// How many runs `environment_id` had created in each of the last `minutes` minutes, oldest
/// first, a zero for a minute without any.
pub async fn per_minute(
    pool: &sqlx::PgPool,
    environment_id: Uuid,
    minutes: i32,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(r.id) AS "n!"
           FROM generate_series(0, $2 - 1) AS m(i)
           LEFT JOIN job_runs r
             ON r.environment_id = $1
            AND r.created_at >= date_trunc('minute', now()) - make_interval(mins => $2 - 1 - m.i)
            AND r.created_at < date_trunc('minute', now()) - make_interval(mins => $2 - 2 - m.i)
           GROUP BY m.i ORDER BY m.i"#,
        environment_id,
        minutes
    )
    .fetch_all(pool)
    .await
}

/// The runs of an event of the environment, oldest first.
pub async fn of_event(
    conn: &mut PgConnection,
    environment_id: Uuid,
    event_record_id: Uuid,
) -> Result<Vec<RunSummary>, sqlx::Error> {
    sqlx::query_as!(
        RunSummary,
        r#"SELECT id, status, started_at, completed_at FROM job_runs
               WHERE event_record_id = $1 AND environment_id = $2
               ORDER BY created_at, id"#,
        event_record_id,
        environment_id
    )
    .fetch_all(&mut *conn)
    .await
}

/// Cancel the runs of an event that are still QUEUED, each with its `run.cancelled`
/// hand-off, in the caller's transaction. Returns the ids cancelled (a run either is QUEUED
/// or has moved on, so none fails to cancel).
pub async fn cancel_queued(
    tx: &mut PgConnection,
    environment_id: Uuid,
    event_record_id: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let cancelled = sqlx::query_scalar!(
        r#"UPDATE job_runs SET status = 'CANCELED', completed_at = now(), updated_at = now()
               WHERE event_record_id = $1 AND environment_id = $2 AND status = 'QUEUED'
               RETURNING id"#,
        event_record_id,
        environment_id
    )
    .fetch_all(&mut *tx)
    .await?;
    // The runs service hears of each cancelled run, through the outbox.
    handoff::hand_off_cancelled(tx, environment_id, &cancelled).await?;
    Ok(cancelled)
}

/// Delete the runs of events being deleted, in the transaction that deletes them. Returns
/// how many.
pub async fn delete_of_events(
    tx: &mut PgConnection,
    event_record_ids: &[Uuid],
) -> Result<u64, sqlx::Error> {
    if event_record_ids.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query!(
        "DELETE FROM job_runs WHERE event_record_id = ANY($1)",
        event_record_ids
    )
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

/// Delete every run of an environment being deleted, `batch` per statement (those of events
/// already gone too: runs have an index by environment of their own). Returns how many.
pub async fn delete_of_environment(
    pool: &PgPool,
    environment: Uuid,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let runs = sqlx::query!(
            r#"DELETE FROM job_runs WHERE id IN (
                   SELECT id FROM job_runs WHERE environment_id = $1 LIMIT $2)"#,
            environment,
            batch
        )
        .execute(pool)
        .await?
        .rows_affected();
        total += runs;
        if runs < batch as u64 {
            return Ok(total);
        }
    }
}
