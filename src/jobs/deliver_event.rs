//! `deliverEvent`: match an event against its environment's dispatchers and enqueue one
//! `events.invokeDispatcher` job per match.

use sqlx::PgConnection;

use super::JobError;
use crate::events::filter::dispatcher_matches;
use crate::queue::{
    DeliverEventArgs, InsertOpts, InvokeDispatcherArgs, JobInsert, JobPriority, QueueService,
};

pub async fn run(
    tx: &mut PgConnection,
    queue: &QueueService,
    args: DeliverEventArgs,
    priority: i16,
) -> Result<(), JobError> {
    // The row lock orders delivery against a concurrent cancel of the same event.
    let Some(event) = sqlx::query!(
        r#"SELECT id, environment_id, name, source, payload, context, delivered_at, cancelled_at,
                  external_account_id
           FROM event_records WHERE id = $1 FOR UPDATE"#,
        args.id
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        tracing::warn!(event_record_id = %args.id, "deliverEvent: event is gone");
        return Ok(());
    };
    if event.cancelled_at.is_some() || event.delivered_at.is_some() {
        return Ok(());
    }

    let candidates = sqlx::query!(
        r#"SELECT id, payload_filter, context_filter FROM event_dispatchers
           WHERE environment_id = $1 AND enabled AND NOT manual
             AND event_names @> ARRAY[$2]::text[] AND source = $3
             AND (external_account_id IS NULL OR external_account_id = $4)
           ORDER BY id"#,
        event.environment_id,
        event.name,
        event.source,
        event.external_account_id
    )
    .fetch_all(&mut *tx)
    .await?;

    let jobs: Vec<JobInsert> = candidates
        .into_iter()
        .filter(|d| {
            dispatcher_matches(
                d.payload_filter.as_ref(),
                d.context_filter.as_ref(),
                &event.payload,
                &event.context,
            )
        })
        .map(|d| {
            JobInsert::invoke_dispatcher(
                InvokeDispatcherArgs {
                    id: d.id,
                    event_record_id: event.id,
                },
                InsertOpts {
                    priority: JobPriority::from_i16(priority),
                    ..InsertOpts::default()
                },
            )
        })
        .collect();
    let matched = jobs.len();
    queue.enqueue_many(tx, jobs).await?;

    sqlx::query!(
        "UPDATE event_records SET delivered_at = now(), updated_at = now() WHERE id = $1",
        event.id
    )
    .execute(&mut *tx)
    .await?;
    tracing::debug!(event_record_id = %event.id, matched, "event delivered");
    Ok(())
}
