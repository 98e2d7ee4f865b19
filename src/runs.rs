//! The run hand-off: what the runs service learns of the runs this service creates.
//!
//! Each run created by `events.invokeDispatcher`, and each run `cancel-runs` cancels, gets a
//! row of `run_handoffs` in the transaction that creates or cancels it (the invocation
//! writes its rows in the statement that creates the runs). The relay claims rows
//! ([`claim`]), builds each message from the run and its event, publishes it to the runs
//! exchange (`{prefix}.runs`, topic, routing keys `run.created` and `run.cancelled`) and
//! deletes the rows the broker confirmed ([`published`]) in the claiming transaction. The
//! bodies are JSON, version 1, as `rabbitmq/schemas/run-created.v1.schema.json` and
//! `run-cancelled.v1.schema.json` describe; the AMQP `message-id` is `<run id>:created` or
//! `<run id>:cancelled`, so a repeat (a relay that died between the confirm and its commit)
//! carries the same id and a consumer drops it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The channel a statement that writes hand-offs notifies (by a trigger, once).
pub const NOTIFY_CHANNEL: &str = "kongflow_handoffs";
/// `run_handoffs.kind` of a run created, and of a run cancelled.
pub const CREATED: &str = "created";
pub const CANCELLED: &str = "cancelled";

/// A hand-off to publish.
#[derive(Debug, Clone)]
pub struct HandOff {
    pub id: i64,
    pub run_id: Uuid,
    /// [`CREATED`] or [`CANCELLED`].
    pub kind: String,
    pub trace_parent: Option<String>,
    /// The message; `None` when the run is gone (its event deleted by retention, or its
    /// environment), which leaves nothing to hand off.
    pub body: Option<Value>,
    pub created_at: DateTime<Utc>,
}

impl HandOff {
    /// `run.created` or `run.cancelled`.
    pub fn routing_key(&self) -> String {
        format!("run.{}", self.kind)
    }

    /// The AMQP `type`: `run.created.v1`, `run.cancelled.v1`.
    pub fn amqp_type(&self) -> String {
        format!("run.{}.v1", self.kind)
    }

    /// The AMQP `message-id`: the same for every copy of one hand-off.
    pub fn message_id(&self) -> String {
        format!("{}:{}", self.run_id, self.kind)
    }
}

/// Write the `run.cancelled` hand-off of each run, in the transaction that cancelled them.
pub async fn hand_off_cancelled(tx: &mut PgConnection, runs: &[Uuid]) -> Result<(), sqlx::Error> {
    if runs.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO run_handoffs (run_id, kind) SELECT UNNEST($1::uuid[]), $2",
        runs,
        CANCELLED
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Lock up to `limit` hand-offs, oldest first, skipping those another relay holds, with
/// their messages built from the runs and events as they now stand.
pub async fn claim(tx: &mut PgConnection, limit: i64) -> Result<Vec<HandOff>, sqlx::Error> {
    sqlx::query_as!(
        HandOff,
        r#"SELECT h.id AS "id!", h.run_id AS "run_id!", h.kind AS "kind!",
                  h.trace_parent, h.created_at AS "created_at!",
                  CASE WHEN r.id IS NULL THEN NULL
                       WHEN h.kind = 'created' THEN jsonb_build_object(
                           'type', 'run.created', 'version', 1,
                           'runId', r.id, 'createdAt', iso_time(r.created_at),
                           'environmentId', r.environment_id,
                           'jobId', r.job_id, 'jobSlug', j.slug,
                           'jobVersionId', r.job_version_id, 'jobVersion', v.version,
                           'dispatcherId', r.dispatcher_id,
                           'event', jsonb_build_object(
                               'id', e.event_id, 'recordId', e.id, 'name', e.name,
                               'source', e.source, 'payload', e.payload, 'context', e.context,
                               'timestamp', iso_time(e.timestamp), 'accountId', a.identifier),
                           'traceparent', h.trace_parent)
                       ELSE jsonb_build_object(
                           'type', 'run.cancelled', 'version', 1,
                           'runId', r.id, 'cancelledAt', iso_time(r.completed_at),
                           'environmentId', r.environment_id, 'jobId', r.job_id,
                           'jobVersionId', r.job_version_id,
                           'event', jsonb_build_object('id', e.event_id, 'recordId', e.id))
                  END AS body
           FROM (SELECT * FROM run_handoffs ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) h
           LEFT JOIN job_runs r ON r.id = h.run_id
           LEFT JOIN event_records e ON e.id = r.event_record_id
           LEFT JOIN job_versions v ON v.id = r.job_version_id
           LEFT JOIN jobs j ON j.id = r.job_id
           LEFT JOIN external_accounts a ON a.id = e.external_account_id
           ORDER BY h.id"#,
        limit
    )
    .fetch_all(&mut *tx)
    .await
}

/// Delete hand-offs the broker confirmed (or that have nothing left to hand off), in the
/// claiming transaction.
pub async fn published(tx: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM run_handoffs WHERE id = ANY($1)", ids)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// How many hand-offs wait, and the age of the oldest in seconds.
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64), sqlx::Error> {
    let r = sqlx::query!(
        r#"SELECT count(*) AS "n!",
                  COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS "age!"
           FROM run_handoffs"#
    )
    .fetch_one(pool)
    .await?;
    Ok((r.n, r.age))
}
