//! The run hand-off: what the runs service learns of the runs this service creates.
//!
//! Each run created by `events.invokeDispatcher` ([`super::create`]), and each run
//! `cancel-runs` cancels ([`super::cancel_queued`]), gets a row of `run_handoffs` in the
//! statement that creates or cancels it. The relay claims rows
//! ([`claim`]), builds each message from the run and its event, publishes it to the runs
//! exchange (`{prefix}.runs`, topic, routing keys `run.created` and `run.cancelled`) and
//! deletes the rows the broker confirmed ([`published`]) in the claiming transaction. The
//! bodies are JSON, version 1, as `rabbitmq/schemas/run-created.v1.schema.json` and
//! `run-cancelled.v1.schema.json` describe; the AMQP `message-id` is `<run id>:created` or
//! `<run id>:cancelled`, so a repeat (a relay that died between the confirm and its commit)
//! carries the same id and a consumer drops it.
//!
//! Each message is built as JSON text by the claim and read here, row by row: a row whose
//! message cannot be read (nested deeper than a JSON reader takes) or is too large to
//! publish is set aside ([`set_aside`]: kept with its reason, claimed no more, counted in
//! `kongflow_handoffs_set_aside_total`) and never fails the batch of the others.

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::ledger::publishers::{Stamped, Unsettled};

/// The channel a statement that writes hand-offs notifies (by a trigger, once).
pub const NOTIFY_CHANNEL: &str = "kongflow_handoffs";
/// What a hand-off tells of its run: `run_handoffs.kind`, and the last word of its routing
/// key and AMQP type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOffKind {
    Created,
    Cancelled,
}

impl HandOffKind {
    /// The column's text; the one place it is spelled.
    pub fn as_str(self) -> &'static str {
        match self {
            HandOffKind::Created => "created",
            HandOffKind::Cancelled => "cancelled",
        }
    }

    /// The kind a column's text names (`None` for text this version does not write).
    pub fn parse(text: &str) -> Option<HandOffKind> {
        [HandOffKind::Created, HandOffKind::Cancelled]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

/// Largest hand-off message published: 1 MiB, twice an event's payload and context, and
/// below the broker's `max_message_size` (which would close the channel).
pub const MAX_HANDOFF_BYTES: usize = 1024 * 1024;

/// A hand-off as claimed: its message still JSON text.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub run_id: Uuid,
    pub kind: String,
    pub trace_parent: Option<String>,
    pub body: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Claimed {
    /// The hand-off with its message read, or why it cannot be published.
    pub fn read(self) -> Result<HandOff, (i64, String)> {
        let Some(kind) = HandOffKind::parse(&self.kind) else {
            return Err((self.id, format!("its kind {:?} is unknown", self.kind)));
        };
        let body = match self.body {
            None => None,
            Some(text) if text.len() > MAX_HANDOFF_BYTES => {
                return Err((
                    self.id,
                    format!(
                        "its message is {} bytes; at most {MAX_HANDOFF_BYTES} are published",
                        text.len()
                    ),
                ));
            }
            Some(text) => Some(
                serde_json::from_str(&text)
                    .map_err(|e| (self.id, format!("its message cannot be read: {e}")))?,
            ),
        };
        Ok(HandOff {
            id: self.id,
            run_id: self.run_id,
            kind,
            trace_parent: self.trace_parent,
            body,
            created_at: self.created_at,
        })
    }
}

/// A hand-off to publish.
#[derive(Debug, Clone)]
pub struct HandOff {
    pub id: i64,
    pub run_id: Uuid,
    pub kind: HandOffKind,
    pub trace_parent: Option<String>,
    /// The message; `None` when the run is gone (its event deleted by retention, or its
    /// environment), which leaves nothing to hand off.
    pub body: Option<Value>,
    pub created_at: DateTime<Utc>,
}

impl HandOff {
    /// `run.created` or `run.cancelled`.
    pub fn routing_key(&self) -> String {
        format!("run.{}", self.kind.as_str())
    }

    /// The AMQP `type`: `run.created.v1`, `run.cancelled.v1`.
    pub fn amqp_type(&self) -> String {
        format!("run.{}.v1", self.kind.as_str())
    }

    /// The AMQP `message-id`: the same for every copy of one hand-off.
    pub fn message_id(&self) -> String {
        format!("{}:{}", self.run_id, self.kind.as_str())
    }
}

/// Count and log a hand-off the broker confirmed.
pub fn count_published(h: &HandOff) {
    crate::metrics::metrics()
        .handoffs_published
        .with_label_values(&[&h.routing_key()])
        .inc();
    tracing::info!(run = %h.run_id, kind = h.kind.as_str(), handoff_id = h.id,
        "run hand-off published");
}

/// Write the `run.cancelled` hand-off of each run, in the transaction that cancelled them.
pub(super) async fn hand_off_cancelled(
    tx: &mut PgConnection,
    environment_id: Uuid,
    runs: &[Uuid],
) -> Result<(), sqlx::Error> {
    if runs.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "INSERT INTO run_handoffs (run_id, environment_id, kind) SELECT UNNEST($1::uuid[]), $2, $3",
        runs,
        environment_id,
        HandOffKind::Cancelled.as_str()
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Lock up to `limit` hand-offs left to the relay (not stamped for their creator to
/// publish), oldest first, skipping those another relay holds and those set aside, with
/// their messages built (as JSON text) from the runs and events as they now stand: a
/// `run.created` by the SQL function `run_created_message` (the fast path's builder too).
pub async fn claim(tx: &mut PgConnection, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as!(
        Claimed,
        r#"SELECT h.id AS "id!", h.run_id AS "run_id!", h.kind AS "kind!",
                  h.trace_parent, h.created_at AS "created_at!",
                  CASE WHEN r.id IS NULL THEN NULL
                       WHEN h.kind = $2 THEN run_created_message(
                           r.id, r.created_at, r.environment_id, r.job_id, r.job_version_id,
                           r.dispatcher_id, r.event_record_id, h.trace_parent)
                       ELSE jsonb_build_object(
                           'type', 'run.cancelled', 'version', 1,
                           'runId', r.id, 'cancelledAt', iso_time(r.completed_at),
                           'environmentId', r.environment_id, 'jobId', r.job_id,
                           'jobVersionId', r.job_version_id,
                           'event', jsonb_build_object(
                               'id', (SELECT e.event_id FROM event_records e
                                      WHERE e.id = r.event_record_id
                                        AND e.environment_id = r.environment_id),
                               'recordId', r.event_record_id))::text
                  END AS body
           FROM (SELECT * FROM run_handoffs WHERE set_aside_at IS NULL AND published_by IS NULL
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) h
           LEFT JOIN job_runs r ON r.id = h.run_id AND r.environment_id = h.environment_id
           ORDER BY h.id"#,
        limit,
        HandOffKind::Created.as_str()
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

/// Hand-offs their creator publishes itself (the fast path) go back to the relay: the
/// broker did not confirm them. Clearing the stamp wakes the relay (the trigger).
pub async fn hand_back(conn: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query!(
        "UPDATE run_handoffs SET published_by = NULL, publish_seq = NULL
             WHERE id = ANY($1) AND published_by IS NOT NULL",
        ids
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// What a publisher's tickets mean for the hand-offs they stamp
/// (see [`crate::ledger::publishers::Stamped`]).
pub struct StampedHandOffs;

impl Stamped for StampedHandOffs {
    fn hand_back<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        publisher: i64,
        unsettled: Unsettled<'a>,
    ) -> BoxFuture<'a, Result<u64, sqlx::Error>> {
        // One statement for both: the tickets named, or every one past a number.
        let (tickets, after) = match unsettled {
            Unsettled::Tickets(seqs) => (seqs, i64::MAX),
            Unsettled::After(through) => (&[][..], through),
        };
        async move {
            Ok(sqlx::query!(
                "UPDATE run_handoffs SET published_by = NULL, publish_seq = NULL
                     WHERE published_by = $1 AND (publish_seq = ANY($2) OR publish_seq > $3)",
                publisher,
                tickets,
                after
            )
            .execute(&mut *conn)
            .await?
            .rows_affected())
        }
        .boxed()
    }

    fn settled<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        publisher: i64,
        through: i64,
    ) -> BoxFuture<'a, Result<u64, sqlx::Error>> {
        async move {
            Ok(sqlx::query!(
                "DELETE FROM run_handoffs WHERE published_by = $1 AND publish_seq <= $2",
                publisher,
                through
            )
            .execute(&mut *conn)
            .await?
            .rows_affected())
        }
        .boxed()
    }
}

/// Set hand-offs aside, each with its reason, in the claiming transaction: they stay in
/// `run_handoffs` (`set_aside_at` set) for an operator, and no claim takes them again.
pub async fn set_aside(tx: &mut PgConnection, rows: &[(i64, String)]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let (ids, reasons): (Vec<i64>, Vec<String>) = rows.iter().cloned().unzip();
    sqlx::query!(
        "UPDATE run_handoffs h SET set_aside_at = now(), set_aside_reason = t.reason
         FROM UNNEST($1::bigint[], $2::text[]) AS t(id, reason) WHERE h.id = t.id",
        &ids,
        &reasons
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// How many hand-offs wait for the relay, the age of the oldest in seconds, and how many
/// are set aside. A row its creator publishes itself (stamped) is not counted: it is
/// published within milliseconds, or handed to the relay (the reaper) within seconds.
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64, i64), sqlx::Error> {
    let r = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE set_aside_at IS NULL AND published_by IS NULL) AS "n!",
                  COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)
                                    FILTER (WHERE set_aside_at IS NULL AND published_by IS NULL)),
                           0)::float8 AS "age!",
                  count(*) FILTER (WHERE set_aside_at IS NOT NULL) AS "aside!"
           FROM run_handoffs"#
    )
    .fetch_one(pool)
    .await?;
    Ok((r.n, r.age, r.aside))
}
