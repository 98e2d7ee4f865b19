//! `deliverEvent`: match events against their environments' dispatchers and enqueue one
//! `events.invokeDispatcher` job per match.

use std::collections::HashMap;

use sqlx::PgConnection;
use uuid::Uuid;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{JobError, Transactional, Written};
use crate::dispatchers::{self, Candidate, EventFacts, RuleRef, rule_miss};
use crate::events::filter::Evaluator;
use crate::ledger::publishers::PublishedBy;
use crate::ledger::{
    DeliverEventArgs, InsertOpts, InvokeDispatcherArgs, Job, JobArgs, JobInsert, JobPriority,
};
use crate::trace::TraceParent;

/// The kind `deliverEvent`: transactional (its effects are rows).
pub struct DeliverEvent;

impl Transactional for DeliverEvent {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        jobs: &'a [Job],
        caller_publishes: Option<PublishedBy>,
    ) -> BoxFuture<'a, Result<Written, JobError>> {
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
        async move {
            Ok(Written {
                jobs: run(tx, &batch, caller_publishes).await?,
                handoffs: Vec::new(),
            })
        }
        .boxed()
    }
}

/// One event to deliver: its id, and what its invocations inherit from its job.
#[derive(Debug, Clone)]
pub struct ToDeliver {
    pub args: DeliverEventArgs,
    pub priority: JobPriority,
    pub trace: Option<TraceParent>,
}

/// Deliver a batch of events: stamp them delivered, find the dispatchers that take each,
/// enqueue one `events.invokeDispatcher` job per match. Returns the jobs inserted (see
/// [`Transactional::handle`] for `caller_publishes`).
pub async fn run(
    tx: &mut PgConnection,
    batch: &[ToDeliver],
    caller_publishes: Option<PublishedBy>,
) -> Result<Vec<Job>, JobError> {
    let ids: Vec<Uuid> = batch.iter().map(|d| d.args.id).collect();
    let events = crate::events::stamp_delivered(tx, &ids).await?;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let envs: Vec<Uuid> = events.iter().map(|e| e.environment_id).collect();
    let names: Vec<String> = events.iter().map(|e| e.name.clone()).collect();
    let candidates = dispatchers::candidates(tx, &envs, &names).await?;
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
    let inserted = crate::ledger::QueueService::new()
        .enqueue_many(tx, jobs)
        .await?;
    tracing::debug!(events = delivered, matched, "events delivered");
    Ok(inserted
        .into_iter()
        .filter(|r| !r.unique_skipped_as_duplicate)
        .map(|r| r.job)
        .collect())
}

/// The invocation of every candidate whose rule takes an event of its environment (one
/// step budget per event; past it, the batch fails permanently).
fn invocations(
    events: &[crate::events::Stamped],
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
        tracing::info!(event = %e.id, environment = %e.environment_id, name = ?e.name,
            matched = jobs.len() - before, steps = eval.steps(),
            trace_id = trace.map(|t| t.trace_id.as_str()).unwrap_or_default(),
            "event delivered");
    }
    Ok(jobs)
}
