//! `events.invokeDispatcher`: create the job runs of dispatchers for events.

use sqlx::PgConnection;
use uuid::Uuid;

use super::JobError;
use crate::ledger::InvokeDispatcherArgs;

/// Invoke a batch of (dispatcher, event) pairs with one statement. A dispatcher or event
/// that is gone, a disabled dispatcher, or a pair from two environments creates nothing.
/// JOB_VERSION creates one run of its version; DYNAMIC_TRIGGER one run of the latest version
/// of each attached job. Runs are unique per (event, dispatcher, job version), so a second
/// invocation inserts nothing.
pub async fn run(tx: &mut PgConnection, batch: &[InvokeDispatcherArgs]) -> Result<(), JobError> {
    let dispatchers: Vec<Uuid> = batch.iter().map(|a| a.id).collect();
    let events: Vec<Uuid> = batch.iter().map(|a| a.event_record_id).collect();
    let created = sqlx::query_scalar!(
        r#"WITH created AS (
           INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id)
           SELECT gen_random_uuid(), d.environment_id, t.job_id, t.version_id, e.id, d.id
           FROM UNNEST($1::uuid[], $2::uuid[]) AS a(dispatcher_id, event_id)
           JOIN event_dispatchers d ON d.id = a.dispatcher_id AND d.enabled
           JOIN event_records e ON e.id = a.event_id AND e.environment_id = d.environment_id
           JOIN LATERAL (
               SELECT v.job_id, v.id AS version_id FROM job_versions v
               WHERE d.dispatchable_type = 'JOB_VERSION' AND v.id = d.target_id
                 AND v.environment_id = d.environment_id
               UNION ALL
               SELECT j.id, j.latest_version_id FROM dynamic_trigger_jobs dtj
               JOIN jobs j ON j.id = dtj.job_id
               WHERE d.dispatchable_type = 'DYNAMIC_TRIGGER' AND dtj.dynamic_trigger_id = d.target_id
                 AND j.latest_version_id IS NOT NULL AND j.environment_id = d.environment_id
           ) t ON true
           ON CONFLICT (event_record_id, dispatcher_id, job_version_id) DO NOTHING
           RETURNING event_record_id, created_at)
           SELECT EXTRACT(EPOCH FROM c.created_at - e.deliver_at)::float8 AS "late!"
           FROM created c JOIN event_records e ON e.id = c.event_record_id"#,
        &dispatchers,
        &events
    )
    .fetch_all(&mut *tx)
    .await?;
    let latency = crate::metrics::metrics()
        .event_latency
        .with_label_values(&[crate::ledger::JobKind::InvokeDispatcher.as_str()]);
    for late in &created {
        latency.observe(late.max(0.0));
    }
    tracing::debug!(
        invocations = batch.len(),
        created = created.len(),
        "dispatchers invoked"
    );
    Ok(())
}
