//! `deliverEvent`: match events against their environments' dispatchers and enqueue one
//! `events.invokeDispatcher` job per match.

use sqlx::PgConnection;
use uuid::Uuid;

use super::JobError;
use crate::events::filter::dispatcher_matches;
use crate::queue::{
    DeliverEventArgs, InsertOpts, InvokeDispatcherArgs, JobInsert, JobPriority, QueueService,
};
use crate::trace::TraceParent;

/// Deliver a batch of events: `(priority of the job, args)` each, with the jobs' trace
/// parents in the same order.
pub async fn run(
    tx: &mut PgConnection,
    queue: &QueueService,
    batch: &[(i16, DeliverEventArgs)],
    traces: &[Option<String>],
) -> Result<(), JobError> {
    let ids: Vec<Uuid> = batch.iter().map(|(_, a)| a.id).collect();
    // Stamp the events delivered and read them back in one statement. The row locks (taken
    // in id order) serialize delivery against a concurrent cancel; cancelled, delivered and
    // vanished events drop out here, so delivering them is a no-op.
    let events = sqlx::query!(
        r#"UPDATE event_records SET delivered_at = now(), updated_at = now()
           WHERE id IN (
               SELECT id FROM event_records
               WHERE id = ANY($1) AND cancelled_at IS NULL AND delivered_at IS NULL
               ORDER BY id FOR UPDATE)
           RETURNING id, environment_id, name, source, payload, payload_type, context, external_account_id"#,
        &ids
    )
    .fetch_all(&mut *tx)
    .await?;
    if events.is_empty() {
        return Ok(());
    }

    let envs: Vec<Uuid> = events.iter().map(|e| e.environment_id).collect();
    let names: Vec<String> = events.iter().map(|e| e.name.clone()).collect();
    let candidates = sqlx::query!(
        r#"SELECT id, environment_id, event_names, source, external_account_id,
                  payload_filter, context_filter
           FROM event_dispatchers
           WHERE enabled AND NOT manual AND environment_id = ANY($1) AND event_names && $2
           ORDER BY id"#,
        &envs,
        &names
    )
    .fetch_all(&mut *tx)
    .await?;

    let priority_of = |id: Uuid| {
        batch
            .iter()
            .find(|(_, a)| a.id == id)
            .map_or(JobPriority::High, |(p, _)| JobPriority::from_i16(*p))
    };
    // The invocations continue their delivery's trace.
    let trace_of = |id: Uuid| {
        batch
            .iter()
            .position(|(_, a)| a.id == id)
            .and_then(|i| traces.get(i).cloned().flatten())
            .and_then(|t| TraceParent::parse(&t))
    };
    let mut jobs = Vec::new();
    for e in &events {
        let trace = trace_of(e.id);
        let mut matched = 0;
        for d in &candidates {
            let selected = d.environment_id == e.environment_id
                && d.event_names.contains(&e.name)
                && d.source == e.source
                && (d.external_account_id.is_none()
                    || d.external_account_id == e.external_account_id);
            if selected
                && dispatcher_matches(
                    d.payload_filter.as_ref(),
                    d.context_filter.as_ref(),
                    &e.payload_type,
                    &e.payload,
                    &e.context,
                )
            {
                jobs.push(JobInsert::invoke_dispatcher(
                    InvokeDispatcherArgs {
                        id: d.id,
                        event_record_id: e.id,
                    },
                    InsertOpts {
                        priority: priority_of(e.id),
                        trace_parent: trace.as_ref().map(|t| t.child().to_string()),
                        ..InsertOpts::default()
                    },
                ));
                matched += 1;
            }
        }
        tracing::debug!(event = %e.id, environment = %e.environment_id, name = %e.name,
            matched, trace_id = trace.as_ref().map(|t| t.trace_id.as_str()).unwrap_or_default(),
            "event delivered");
    }
    let matched = jobs.len();
    queue.enqueue_many(tx, jobs).await?;

    tracing::debug!(events = events.len(), matched, "events delivered");
    Ok(())
}
