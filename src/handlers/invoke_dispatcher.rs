//! `events.invokeDispatcher`: create the job runs of dispatchers for events (and hand each
//! to the runs service: [`crate::runs`]), or fire an EPHEMERAL dispatcher's webhook
//! ([`crate::dispatchers::fire`]).

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{JobError, Transactional, Written};
use crate::dispatchers::Fired;
use crate::ledger::publishers::PublishedBy;
use crate::ledger::{InsertOpts, InvokeDispatcherArgs, Job, JobArgs, JobInsert};
use crate::runs::handoff::HandOff;
use crate::runs::{CreatedRun, Invocation};
use crate::trace::TraceParent;

/// The kind `events.invokeDispatcher`: transactional (its effects are rows).
pub struct InvokeDispatcher;

impl Transactional for InvokeDispatcher {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        jobs: &'a [Job],
        caller_publishes: Option<PublishedBy>,
    ) -> BoxFuture<'a, Result<Written, JobError>> {
        let group: Vec<&Job> = jobs.iter().collect();
        async move { run(tx, &group, caller_publishes).await }.boxed()
    }
}

/// Invoke a batch of (dispatcher, event) pairs, in the batch's transaction, in at most two
/// statements whatever the batch's size: the runs and their hand-offs
/// ([`crate::runs::create`]), then, for the pairs that created no run, the EPHEMERAL
/// dispatchers fired ([`crate::dispatchers::fire`]), each followed by its
/// `events.deliverWebhook` job (one insert for all). A dispatcher or event that is gone, a
/// disabled dispatcher, or a pair from two environments does nothing.
///
/// Returns the jobs inserted and, with `caller_publishes`, the runs' hand-offs for the
/// caller to publish (see [`Transactional::handle`]).
pub async fn run(
    tx: &mut PgConnection,
    batch: &[&Job],
    caller_publishes: Option<PublishedBy>,
) -> Result<Written, JobError> {
    let jobs: Vec<(&Job, InvokeDispatcherArgs)> = batch
        .iter()
        .filter_map(|job| match job.args {
            JobArgs::InvokeDispatcher(a) => Some((*job, a)),
            _ => None,
        })
        .collect();
    // What the runs' hand-offs and the webhooks continue: each invocation's trace.
    let invocations: Vec<Invocation> = jobs
        .iter()
        .map(|(job, a)| Invocation {
            dispatcher: a.id,
            event_record_id: a.event_record_id,
            trace_parent: job
                .trace_parent
                .as_deref()
                .and_then(TraceParent::parse)
                .map(|t| t.child().to_string()),
        })
        .collect();
    let created = crate::runs::create(tx, &invocations, caller_publishes).await?;
    observe_created(&created);
    let handoffs = readable_handoffs(tx, &created).await?;
    // Only an invocation that created no run may be of an EPHEMERAL dispatcher (one that
    // created a run is of a job's): most batches have none, and skip the second statement.
    let (dispatchers, events): (Vec<Uuid>, Vec<Uuid>) = invocations
        .iter()
        .filter(|i| {
            !created
                .iter()
                .any(|r| r.dispatcher_id == i.dispatcher && r.event_record_id == i.event_record_id)
        })
        .map(|i| (i.dispatcher, i.event_record_id))
        .unzip();
    let fired = if dispatchers.is_empty() {
        Vec::new()
    } else {
        crate::dispatchers::fire(tx, &dispatchers, &events).await?
    };
    let webhooks: Vec<JobInsert> = fired
        .iter()
        .map(|f| webhook_job(f, &jobs, &invocations, caller_publishes))
        .collect();
    let inserted = crate::ledger::QueueService::new()
        .enqueue_many(tx, webhooks)
        .await?;
    tracing::debug!(
        invocations = batch.len(),
        created = created.len(),
        webhooks = fired.len(),
        "dispatchers invoked"
    );
    Ok(Written {
        jobs: inserted
            .into_iter()
            .filter(|r| !r.unique_skipped_as_duplicate)
            .map(|r| r.job)
            .collect(),
        handoffs,
    })
}

/// The hand-offs of the runs created for the caller to publish, their messages read. One
/// whose message cannot be read or is too large goes to the relay instead, which sets it
/// aside with its reason (`runs::handoff::Claimed::read`).
async fn readable_handoffs(
    tx: &mut PgConnection,
    created: &[CreatedRun],
) -> Result<Vec<HandOff>, sqlx::Error> {
    let mut handoffs = Vec::new();
    let mut unreadable = Vec::new();
    for claimed in created.iter().filter_map(|r| r.handoff.clone()) {
        match claimed.read() {
            Ok(h) => handoffs.push(h),
            Err((id, reason)) => {
                tracing::warn!(handoff_id = id, %reason, "run hand-off left to the relay");
                unreadable.push(id);
            }
        }
    }
    if !unreadable.is_empty() {
        crate::runs::handoff::hand_back(tx, &unreadable).await?;
    }
    Ok(handoffs)
}

/// Count each run created (its lateness, in `kongflow_event_latency_seconds`) and log it.
fn observe_created(created: &[CreatedRun]) {
    let latency = crate::metrics::metrics()
        .event_latency
        .with_label_values(&[crate::ledger::JobKind::InvokeDispatcher.as_str()]);
    for run in created {
        latency.observe(run.late.unwrap_or(0.0).max(0.0));
        tracing::info!(run = %run.id, event_id = ?run.event_id, event = %run.event_record_id,
            dispatcher = %run.dispatcher_id, "run created");
    }
}

/// The `events.deliverWebhook` job of a dispatcher fired: the invocation that fired it gives
/// its priority and trace.
fn webhook_job(
    fired: &Fired,
    jobs: &[(&Job, InvokeDispatcherArgs)],
    invocations: &[Invocation],
    caller_publishes: Option<PublishedBy>,
) -> JobInsert {
    let i = invocations
        .iter()
        .position(|i| i.dispatcher == fired.id && i.event_record_id == fired.event_record_id);
    tracing::info!(dispatcher = %fired.id, event = %fired.event_record_id,
        "ephemeral dispatcher fired");
    JobInsert::deliver_webhook(
        InvokeDispatcherArgs {
            id: fired.id,
            event_record_id: fired.event_record_id,
        },
        InsertOpts {
            priority: i.map_or_else(Default::default, |i| jobs[i].0.priority),
            trace_parent: i.and_then(|i| invocations[i].trace_parent.clone()),
            environment_id: Some(fired.environment_id),
            caller_publishes,
            ..InsertOpts::default()
        },
    )
}
