//! The outbox's messages (`outbox_messages`): messages for other services (the runs
//! hand-off, see [`crate::runs`]), written in the transaction that causes them and
//! published by the relay as they are. A message is claimed with `FOR UPDATE SKIP LOCKED`
//! and deleted, in the claiming transaction, once the broker confirmed it; a relay that dies
//! before its commit leaves the message to be published again (same message id).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

/// The channel an insert into `outbox_messages` notifies (once per statement, by a trigger).
pub const NOTIFY_CHANNEL: &str = "kongflow_messages";

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub id: i64,
    /// The topology's name for the exchange (`runs`).
    pub exchange: String,
    pub routing_key: String,
    pub message_id: String,
    /// The AMQP `type` property.
    pub r#type: String,
    pub body: Value,
    pub trace_parent: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Lock up to `limit` messages for the exchanges this build knows, oldest first, skipping
/// those another relay holds. (Rows for an exchange a newer build added wait for it,
/// without standing in front of the others.)
pub async fn claim(
    tx: &mut PgConnection,
    limit: i64,
    exchanges: &[&str],
) -> Result<Vec<OutboxMessage>, sqlx::Error> {
    let exchanges: Vec<String> = exchanges.iter().map(|e| e.to_string()).collect();
    sqlx::query_as!(
        OutboxMessage,
        r#"SELECT id, exchange, routing_key, message_id, type AS "type", body, trace_parent, created_at
           FROM outbox_messages WHERE exchange = ANY($2)
           ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"#,
        limit,
        &exchanges
    )
    .fetch_all(&mut *tx)
    .await
}

/// Delete messages the broker confirmed, in the claiming transaction.
pub async fn published(tx: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query!("DELETE FROM outbox_messages WHERE id = ANY($1)", ids)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// How many messages wait, and the age of the oldest in seconds.
pub async fn backlog(pool: &sqlx::PgPool) -> Result<(i64, f64), sqlx::Error> {
    let r = sqlx::query!(
        r#"SELECT count(*) AS "n!",
                  COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS "age!"
           FROM outbox_messages"#
    )
    .fetch_one(pool)
    .await?;
    Ok((r.n, r.age))
}
