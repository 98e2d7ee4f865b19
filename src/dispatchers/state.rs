//! A dispatcher's life after registration: matched by delivery ([`candidates`]), enabled
//! or disabled ([`set_dispatcher_enabled`]), fired (EPHEMERAL, once: [`fire`]), its webhook
//! attempted ([`webhook_target`], [`record_attempt`]), delivered or failed, and deleted
//! once spent ([`delete_spent`]). Registering is in the module's root.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::tenants::Environment;

/// A dispatcher that may take some event of a delivery batch.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: Uuid,
    pub environment_id: Uuid,
    pub event_names: Vec<String>,
    pub source: String,
    pub external_account_id: Option<Uuid>,
    pub payload_filter: Option<Value>,
    pub context_filter: Option<Value>,
}

/// The enabled, non-manual dispatchers of the environments `envs` that list one of `names`,
/// in one statement.
pub async fn candidates(
    tx: &mut PgConnection,
    envs: &[Uuid],
    names: &[String],
) -> Result<Vec<Candidate>, sqlx::Error> {
    sqlx::query_as!(
        Candidate,
        r#"SELECT id, environment_id, event_names, source, external_account_id,
                  payload_filter, context_filter
           FROM event_dispatchers
           WHERE enabled AND NOT manual AND environment_id = ANY($1) AND event_names && $2
             AND (expires_at IS NULL OR expires_at > now())
           ORDER BY id"#,
        envs,
        names
    )
    .fetch_all(&mut *tx)
    .await
}

/// What enabling or disabling a dispatcher came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toggled {
    Done,
    /// The environment has no dispatcher by that id.
    NotFound,
    /// An EPHEMERAL dispatcher that has fired or expired (the word says which): spent, it
    /// cannot be enabled again.
    Spent(&'static str),
}

/// Enable or disable a dispatcher of the environment. A spent EPHEMERAL dispatcher (fired or
/// expired) may be disabled, not enabled: it fires once.
pub async fn set_dispatcher_enabled(
    pool: &PgPool,
    env: &Environment,
    id: Uuid,
    enabled: bool,
) -> Result<Toggled, sqlx::Error> {
    let n = sqlx::query!(
        r#"UPDATE event_dispatchers SET enabled = $3, updated_at = now()
           WHERE id = $1 AND environment_id = $2
             AND NOT ($3 AND dispatchable_type = 'EPHEMERAL'
                      AND (fired_at IS NOT NULL OR COALESCE(expires_at <= now(), false)))"#,
        id,
        env.id,
        enabled
    )
    .execute(pool)
    .await?
    .rows_affected();
    if n > 0 {
        return Ok(Toggled::Done);
    }
    let spent = sqlx::query!(
        r#"SELECT fired_at IS NOT NULL AS "fired!", COALESCE(expires_at <= now(), false) AS "expired!"
           FROM event_dispatchers WHERE id = $1 AND environment_id = $2"#,
        id,
        env.id
    )
    .fetch_optional(pool)
    .await?;
    Ok(match spent {
        None => Toggled::NotFound,
        Some(s) if s.fired => Toggled::Spent("fired"),
        Some(s) if s.expired => Toggled::Spent("expired"),
        // Changed meanwhile (deleted and made again, or no longer spent): as not found.
        Some(_) => Toggled::NotFound,
    })
}

/// An EPHEMERAL dispatcher [`fire`] fired, for the event that fired it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    pub id: Uuid,
    pub event_record_id: Uuid,
    pub environment_id: Uuid,
}

/// Fire the EPHEMERAL dispatchers of a batch of (dispatcher, event) invocations, in the
/// caller's transaction: each that is live (enabled, not fired, not expired) and of its
/// event's environment is disabled and stamped `fired_at`, once. The row locks, taken in id
/// order (so two batches cannot deadlock), serialize two invocations of one dispatcher (two
/// events matched it): the second finds it fired. Of two pairs naming it in one batch, the
/// UPDATE takes one. Dispatchers of other kinds are left alone.
pub async fn fire(
    tx: &mut PgConnection,
    dispatchers: &[Uuid],
    events: &[Uuid],
) -> Result<Vec<Fired>, sqlx::Error> {
    sqlx::query_as!(
        Fired,
        r#"UPDATE event_dispatchers d
           SET enabled = false, fired_at = now(), updated_at = now()
           FROM UNNEST($1::uuid[], $2::uuid[]) AS a(dispatcher_id, event_id)
           JOIN event_records e ON e.id = a.event_id
           WHERE d.id = a.dispatcher_id AND d.id IN (
                   SELECT id FROM event_dispatchers
                   WHERE id = ANY($1) AND dispatchable_type = 'EPHEMERAL'
                   ORDER BY id FOR UPDATE)
             AND d.enabled AND d.fired_at IS NULL AND d.expires_at > now()
             AND e.environment_id = d.environment_id
           RETURNING d.id AS "id!", e.id AS "event_record_id!",
                     d.environment_id AS "environment_id!""#,
        dispatchers,
        events
    )
    .fetch_all(&mut *tx)
    .await
}

/// What a webhook needs: where, with which secret, and the event.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub secret: String,
    pub event_id: String,
    pub source: String,
    pub name: String,
    pub payload: Value,
    pub context: Value,
    pub timestamp: DateTime<Utc>,
    pub account_id: Option<String>,
}

/// The URL and secret of an EPHEMERAL dispatcher with the event it fired for (`None` when
/// either is gone).
pub async fn webhook_target(
    pool: &PgPool,
    dispatcher: Uuid,
    event_record_id: Uuid,
) -> Result<Option<WebhookTarget>, sqlx::Error> {
    sqlx::query_as!(
        WebhookTarget,
        r#"SELECT d.url AS "url!", d.secret AS "secret!", e.event_id, e.source, e.name,
                  e.payload, e.context, e.timestamp, a.identifier AS "account_id?"
           FROM event_dispatchers d
           JOIN event_records e ON e.id = $2 AND e.environment_id = d.environment_id
           LEFT JOIN external_accounts a ON a.id = e.external_account_id
           WHERE d.id = $1 AND d.dispatchable_type = 'EPHEMERAL'"#,
        dispatcher,
        event_record_id
    )
    .fetch_optional(pool)
    .await
}

/// One webhook attempt, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub dispatcher: Uuid,
    pub event_record_id: Uuid,
    pub job_id: i64,
    pub attempt: i32,
    pub status: Option<i32>,
    pub duration_ms: i32,
    pub error: Option<&'a str>,
}

/// Record a webhook attempt (shown by the dispatcher's view), under its dispatcher's
/// environment; a dispatcher deleted meanwhile is `RowNotFound`.
pub async fn record_attempt(pool: &PgPool, a: &Attempt<'_>) -> Result<(), sqlx::Error> {
    let recorded = sqlx::query!(
        r#"INSERT INTO webhook_attempts (environment_id, dispatcher_id, event_record_id, job_id,
                                         attempt, status, duration_ms, error)
           SELECT d.environment_id, d.id, $2, $3, $4, $5, $6, $7 FROM event_dispatchers d
           WHERE d.id = $1"#,
        a.dispatcher,
        a.event_record_id,
        a.job_id,
        a.attempt,
        a.status,
        a.duration_ms,
        a.error
    )
    .execute(pool)
    .await?;
    if recorded.rows_affected() == 0 {
        return Err(sqlx::Error::RowNotFound);
    }
    Ok(())
}

/// Mark the dispatchers of answered webhooks delivered, in the jobs' transaction.
pub async fn delivered(tx: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE event_dispatchers SET delivered_at = now(), updated_at = now() WHERE id = ANY($1)",
        ids
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Mark a dispatcher whose webhook job was discarded (its last attempt failed, or its
/// address was refused).
pub async fn failed(tx: &mut PgConnection, dispatcher: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE event_dispatchers SET failed_at = now(), updated_at = now() WHERE id = $1",
        dispatcher
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Delete EPHEMERAL dispatchers spent (fired, or expired) more than `keep` ago, with their
/// attempts, `batch` per statement (rows locked by others skipped). Returns how many.
pub async fn delete_spent(pool: &PgPool, keep: Duration, batch: i64) -> Result<u64, sqlx::Error> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = sqlx::query!(
            r#"DELETE FROM event_dispatchers WHERE id IN (
                   SELECT id FROM event_dispatchers
                   WHERE dispatchable_type = 'EPHEMERAL'
                     AND COALESCE(fired_at, expires_at)
                         < now() - make_interval(secs => $1)
                   LIMIT $2 FOR UPDATE SKIP LOCKED)"#,
            keep.as_secs_f64(),
            batch
        )
        .execute(pool)
        .await?
        .rows_affected();
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}
