//! The run hand-off: what the runs service learns of the runs this service creates.
//!
//! Each run created by `events.invokeDispatcher`, and each run `cancel-runs` cancels, is
//! written as a message to the outbox (`outbox_messages`) in the transaction that creates or
//! cancels it; the relay publishes it to the runs exchange (`{prefix}.runs`, topic, routing
//! keys `run.created` and `run.cancelled`) and deletes it once the broker confirmed it. The
//! bodies are JSON, version 1, as `rabbitmq/schemas/run-created.v1.schema.json` and
//! `run-cancelled.v1.schema.json` describe; the AMQP `message-id` is `<run id>:created` or
//! `<run id>:cancelled`, so a repeat (a relay that died between the confirm and the delete)
//! carries the same id and a consumer drops it.

use sqlx::PgConnection;
use uuid::Uuid;

/// The outbox's name for the runs exchange.
pub const EXCHANGE: &str = "runs";
pub const CREATED_KEY: &str = "run.created";
pub const CANCELLED_KEY: &str = "run.cancelled";
pub const CREATED_TYPE: &str = "run.created.v1";
pub const CANCELLED_TYPE: &str = "run.cancelled.v1";

/// A run just created, and the trace it continues.
#[derive(Debug, Clone)]
pub struct Created {
    pub run_id: Uuid,
    pub trace_parent: Option<String>,
}

/// Write the `run.created` message of each run, in the transaction that created them.
pub async fn hand_off_created(tx: &mut PgConnection, runs: &[Created]) -> Result<(), sqlx::Error> {
    if runs.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = runs.iter().map(|r| r.run_id).collect();
    let traces: Vec<Option<String>> = runs.iter().map(|r| r.trace_parent.clone()).collect();
    sqlx::query!(
        r#"INSERT INTO outbox_messages (exchange, routing_key, message_id, type, body, trace_parent)
           SELECT $3, $4, r.id::text || ':created', $5,
                  jsonb_build_object(
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
                      'traceparent', t.trace),
                  t.trace
           FROM UNNEST($1::uuid[], $2::text[]) AS t(run_id, trace)
           JOIN job_runs r ON r.id = t.run_id
           JOIN event_records e ON e.id = r.event_record_id
           JOIN job_versions v ON v.id = r.job_version_id
           JOIN jobs j ON j.id = r.job_id
           LEFT JOIN external_accounts a ON a.id = e.external_account_id"#,
        &ids,
        &traces as &[Option<String>],
        EXCHANGE,
        CREATED_KEY,
        CREATED_TYPE
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Write the `run.cancelled` message of each run, in the transaction that cancelled them.
pub async fn hand_off_cancelled(tx: &mut PgConnection, runs: &[Uuid]) -> Result<(), sqlx::Error> {
    if runs.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        r#"INSERT INTO outbox_messages (exchange, routing_key, message_id, type, body)
           SELECT $2, $3, r.id::text || ':cancelled', $4,
                  jsonb_build_object(
                      'type', 'run.cancelled', 'version', 1,
                      'runId', r.id, 'cancelledAt', iso_time(r.completed_at),
                      'environmentId', r.environment_id, 'jobId', r.job_id,
                      'jobVersionId', r.job_version_id,
                      'event', jsonb_build_object('id', e.event_id, 'recordId', e.id))
           FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
           WHERE r.id = ANY($1)"#,
        runs,
        EXCHANGE,
        CANCELLED_KEY,
        CANCELLED_TYPE
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}
