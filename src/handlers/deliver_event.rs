//! `deliverEvent`: match events against their environments' dispatchers and enqueue one
//! `events.invokeDispatcher` job per match.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{JobError, Transactional};
use crate::events::filter::Evaluator;
use crate::ledger::publishers::PublishedBy;
use crate::ledger::{
    DeliverEventArgs, InsertOpts, InvokeDispatcherArgs, Job, JobArgs, JobInsert, JobPriority,
};
use crate::trace::TraceParent;
use crate::triggers::{EventFacts, RuleRef, rule_miss};

/// The kind `deliverEvent`: transactional (its effects are rows).
pub struct DeliverEvent;

impl Transactional for DeliverEvent {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        jobs: &'a [Job],
        caller_publishes: Option<PublishedBy>,
    ) -> BoxFuture<'a, Result<Vec<Job>, JobError>> {
        let batch: Vec<ToDeliver> = jobs
            .iter()
            .filter_map(|job| match job.args {
                JobArgs::DeliverEvent(args) => Some(ToDeliver {
                    args,
                    priority: job.priority,
                    trace: job.trace_parent.as_deref().and_then(TraceParent::parse),
                }),
                _ => None,
            })
            .collect();
        async move { run(tx, &batch, caller_publishes).await }.boxed()
    }
}

/// One event to deliver: its id, and what its invocations inherit from its job.
#[derive(Debug, Clone)]
pub struct ToDeliver {
    pub args: DeliverEventArgs,
    pub priority: JobPriority,
    pub trace: Option<TraceParent>,
}

/// An event being delivered, as stamped and read back.
struct Stamped {
    id: Uuid,
    environment_id: Uuid,
    name: String,
    source: String,
    payload: Value,
    payload_type: String,
    context: Value,
    external_account_id: Option<Uuid>,
}

/// A dispatcher that may take some event of the batch.
struct Candidate {
    id: Uuid,
    environment_id: Uuid,
    event_names: Vec<String>,
    source: String,
    external_account_id: Option<Uuid>,
    payload_filter: Option<Value>,
    context_filter: Option<Value>,
}

/// Deliver a batch of events: stamp them delivered, find the dispatchers that take each,
/// enqueue one `events.invokeDispatcher` job per match. Returns the jobs inserted (see
/// [`Transactional::handle`] for `caller_publishes`).
pub async fn run(
    tx: &mut PgConnection,
    batch: &[ToDeliver],
    caller_publishes: Option<PublishedBy>,
) -> Result<Vec<Job>, JobError> {
    let events = stamp_delivered(tx, batch).await?;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let candidates = candidates(tx, &events).await?;
    // What the invocations inherit: the job's priority, and its trace continued.
    let inherited: HashMap<Uuid, (JobPriority, Option<TraceParent>)> = batch
        .iter()
        .map(|d| (d.args.id, (d.priority, d.trace.clone())))
        .collect();
    let delivered = events.len();
    // Filters are CPU work bounded by each event's step budget: off the async threads, so
    // a costly event slows its own batch only.
    let mut jobs =
        tokio::task::spawn_blocking(move || invocations(&events, &candidates, &inherited))
            .await
            .map_err(|e| JobError::Panic(format!("filter evaluation: {e}")))??;
    for job in &mut jobs {
        job.opts.caller_publishes = caller_publishes;
    }
    let matched = jobs.len();
    let inserted = crate::ledger::insert_many(tx, jobs).await?;
    tracing::debug!(events = delivered, matched, "events delivered");
    Ok(inserted
        .into_iter()
        .filter(|r| !r.unique_skipped_as_duplicate)
        .map(|r| r.job)
        .collect())
}

/// Stamp the events delivered and read them back in one statement. The row locks (taken in
/// id order) serialize delivery against a concurrent cancel; cancelled, delivered and
/// vanished events drop out here, so delivering them is a no-op.
async fn stamp_delivered(
    tx: &mut PgConnection,
    batch: &[ToDeliver],
) -> Result<Vec<Stamped>, sqlx::Error> {
    let ids: Vec<Uuid> = batch.iter().map(|d| d.args.id).collect();
    sqlx::query_as!(
        Stamped,
        r#"UPDATE event_records SET delivered_at = now(), updated_at = now()
           WHERE id IN (
               SELECT id FROM event_records
               WHERE id = ANY($1) AND cancelled_at IS NULL AND delivered_at IS NULL
               ORDER BY id FOR UPDATE)
           RETURNING id, environment_id, name, source, payload, payload_type, context, external_account_id"#,
        &ids
    )
    .fetch_all(&mut *tx)
    .await
}

/// The enabled, non-manual dispatchers of the events' environments that list one of their
/// names, in one statement.
async fn candidates(
    tx: &mut PgConnection,
    events: &[Stamped],
) -> Result<Vec<Candidate>, sqlx::Error> {
    let envs: Vec<Uuid> = events.iter().map(|e| e.environment_id).collect();
    let names: Vec<String> = events.iter().map(|e| e.name.clone()).collect();
    sqlx::query_as!(
        Candidate,
        r#"SELECT id, environment_id, event_names, source, external_account_id,
                  payload_filter, context_filter
           FROM event_dispatchers
           WHERE enabled AND NOT manual AND environment_id = ANY($1) AND event_names && $2
             AND (expires_at IS NULL OR expires_at > now())
           ORDER BY id"#,
        &envs,
        &names
    )
    .fetch_all(&mut *tx)
    .await
}

/// The invocation of every candidate whose rule takes an event of its environment (one
/// step budget per event; past it, the batch fails permanently).
fn invocations(
    events: &[Stamped],
    candidates: &[Candidate],
    inherited: &HashMap<Uuid, (JobPriority, Option<TraceParent>)>,
) -> Result<Vec<JobInsert>, JobError> {
    let mut jobs = Vec::new();
    for e in events {
        let (priority, trace) = inherited
            .get(&e.id)
            .map_or((JobPriority::High, None), |(p, t)| (*p, t.as_ref()));
        let facts = EventFacts {
            name: &e.name,
            source: &e.source,
            account: e.external_account_id,
            payload_type: &e.payload_type,
            payload: &e.payload,
            context: &e.context,
        };
        let mut eval = Evaluator::default();
        let before = jobs.len();
        for d in candidates
            .iter()
            .filter(|d| d.environment_id == e.environment_id)
        {
            let rule = RuleRef {
                event_names: &d.event_names,
                source: &d.source,
                account: d.external_account_id,
                payload_filter: d.payload_filter.as_ref(),
                context_filter: d.context_filter.as_ref(),
            };
            let miss = rule_miss(&mut eval, rule, facts)
                .map_err(|over| JobError::Permanent(format!("event {}: {over}", e.id)))?;
            if miss.is_none() {
                jobs.push(JobInsert::invoke_dispatcher(
                    InvokeDispatcherArgs {
                        id: d.id,
                        event_record_id: e.id,
                    },
                    InsertOpts {
                        priority,
                        trace_parent: trace.map(|t| t.child().to_string()),
                        environment_id: Some(e.environment_id),
                        ..InsertOpts::default()
                    },
                ));
            }
        }
        tracing::debug!(event = %e.id, environment = %e.environment_id, name = ?e.name,
            matched = jobs.len() - before, steps = eval.steps(),
            trace_id = trace.map(|t| t.trace_id.as_str()).unwrap_or_default(),
            "event delivered");
    }
    Ok(jobs)
}
