//! `events.invokeDispatcher`: create the job runs of dispatchers for events (and hand each
//! to the runs service), or fire an EPHEMERAL dispatcher's webhook.

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{JobError, Transactional};
use crate::ledger::publishers::PublishedBy;
use crate::ledger::{InsertOpts, InvokeDispatcherArgs, Job, JobArgs, JobInsert};
use crate::trace::TraceParent;

/// The kind `events.invokeDispatcher`: transactional (its effects are rows).
pub struct InvokeDispatcher;

impl Transactional for InvokeDispatcher {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        jobs: &'a [Job],
        caller_publishes: Option<PublishedBy>,
    ) -> BoxFuture<'a, Result<Vec<Job>, JobError>> {
        let group: Vec<&Job> = jobs.iter().collect();
        async move { run(tx, &group, caller_publishes).await }.boxed()
    }
}

/// Invoke a batch of (dispatcher, event) pairs. A dispatcher or event that is gone, a
/// disabled dispatcher, or a pair from two environments does nothing.
///
/// - JOB_VERSION creates one run of its version; DYNAMIC_TRIGGER one run of the latest
///   version of each attached job. Runs are unique per (event, dispatcher, job version), so
///   a second invocation inserts nothing; each run created gets its `run.created`
///   hand-off in the same statement (see [`crate::runs`]).
/// - EPHEMERAL fires once: the first invocation while it is live (enabled, not fired, not
///   expired) disables it and inserts its `events.deliverWebhook` job; any other finds it
///   fired and does nothing.
///
/// Returns the jobs inserted (see [`Transactional::handle`] for `caller_publishes`).
pub async fn run(
    tx: &mut PgConnection,
    batch: &[&Job],
    caller_publishes: Option<PublishedBy>,
) -> Result<Vec<Job>, JobError> {
    let jobs: Vec<(&Job, InvokeDispatcherArgs)> = batch
        .iter()
        .filter_map(|job| match job.args {
            JobArgs::InvokeDispatcher(a) => Some((*job, a)),
            _ => None,
        })
        .collect();
    let pairs: Vec<InvokeDispatcherArgs> = jobs.iter().map(|(_, a)| *a).collect();
    let dispatchers: Vec<Uuid> = pairs.iter().map(|a| a.id).collect();
    let events: Vec<Uuid> = pairs.iter().map(|a| a.event_record_id).collect();
    // What the runs' hand-offs and the webhooks continue: each invocation's trace.
    let traces: Vec<Option<String>> = jobs
        .iter()
        .map(|(job, _)| {
            job.trace_parent
                .as_deref()
                .and_then(TraceParent::parse)
                .map(|t| t.child().to_string())
        })
        .collect();
    // The runs, and their hand-offs (`crate::runs`), in one statement.
    // EPHEMERAL, in the same statement: the row locks (taken in id order, so two batches
    // cannot deadlock) serialize two invocations of one dispatcher (two events matched it);
    // the second finds it fired. Of two pairs naming it in this batch, the UPDATE takes one.
    // Rows out: a run created (with its lateness), or a dispatcher fired.
    let rows = sqlx::query!(
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
           RETURNING id, event_record_id, dispatcher_id, created_at),
           handed AS (
           INSERT INTO run_handoffs (run_id, kind, trace_parent)
           SELECT c.id, $4, t.trace FROM created c
           JOIN UNNEST($1::uuid[], $2::uuid[], $3::text[]) AS t(dispatcher_id, event_id, trace)
             ON t.dispatcher_id = c.dispatcher_id AND t.event_id = c.event_record_id),
           fired AS (
           UPDATE event_dispatchers d
           SET enabled = false, fired_at = now(), updated_at = now()
           FROM UNNEST($1::uuid[], $2::uuid[]) AS a(dispatcher_id, event_id)
           JOIN event_records e ON e.id = a.event_id
           WHERE d.id = a.dispatcher_id AND d.id IN (
                   SELECT id FROM event_dispatchers
                   WHERE id = ANY($1) AND dispatchable_type = 'EPHEMERAL'
                   ORDER BY id FOR UPDATE)
             AND d.enabled AND d.fired_at IS NULL AND d.expires_at > now()
             AND e.environment_id = d.environment_id
           RETURNING d.id, e.id AS event_id, d.environment_id)
           SELECT NULL::uuid AS fired, NULL::uuid AS event, NULL::uuid AS environment,
                  EXTRACT(EPOCH FROM c.created_at - e.deliver_at)::float8 AS late
           FROM created c JOIN event_records e ON e.id = c.event_record_id
           UNION ALL
           SELECT f.id, f.event_id, f.environment_id, NULL FROM fired f"#,
        &dispatchers,
        &events,
        &traces as &[Option<String>],
        crate::runs::CREATED
    )
    .fetch_all(&mut *tx)
    .await?;
    let latency = crate::metrics::metrics()
        .event_latency
        .with_label_values(&[crate::ledger::JobKind::InvokeDispatcher.as_str()]);
    let mut created = 0;
    let mut fired = Vec::new();
    for row in rows {
        match (row.fired, row.event, row.environment) {
            (Some(id), Some(event), Some(environment)) => fired.push((id, event, environment)),
            _ => {
                created += 1;
                latency.observe(row.late.unwrap_or(0.0).max(0.0));
            }
        }
    }
    let webhooks: Vec<JobInsert> = fired
        .iter()
        .map(|&(id, event, environment)| {
            // The invocation that fired it: its priority and trace carry on.
            let i = pairs
                .iter()
                .position(|a| a.id == id && a.event_record_id == event);
            JobInsert::deliver_webhook(
                InvokeDispatcherArgs {
                    id,
                    event_record_id: event,
                },
                InsertOpts {
                    priority: i.map_or_else(Default::default, |i| jobs[i].0.priority),
                    trace_parent: i.and_then(|i| traces[i].clone()),
                    environment_id: Some(environment),
                    caller_publishes,
                    ..InsertOpts::default()
                },
            )
        })
        .collect();
    let inserted = crate::ledger::insert_many(tx, webhooks).await?;
    tracing::debug!(
        invocations = batch.len(),
        created,
        webhooks = fired.len(),
        "dispatchers invoked"
    );
    Ok(inserted
        .into_iter()
        .filter(|r| !r.unique_skipped_as_duplicate)
        .map(|r| r.job)
        .collect())
}
