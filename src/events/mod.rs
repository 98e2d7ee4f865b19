//! Events: ingest, lookup, and the filters that decide which dispatchers an event reaches.

pub mod filter;
pub mod list;
pub mod ratelimit;
pub mod retention;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use crate::amqp::DirectPublisher;
use crate::ledger::publishers::{PublishedBy, Ticket};
use crate::ledger::{self, DeliverEventArgs, InsertOpts, JobArgs, JobInsert, JobInsertResult, run};
use crate::metrics::{Stage, metrics};
use crate::tenants::Environment;

/// Source given to events that name none.
pub const DEFAULT_SOURCE: &str = "trigger.dev";

/// An event as a producer sends it.
#[derive(Debug, Clone, Default)]
pub struct SendEvent {
    /// The producer's id, unique per environment; generated when absent.
    pub id: Option<String>,
    pub name: String,
    pub payload: Value,
    pub context: Option<Value>,
    pub timestamp: Option<DateTime<Utc>>,
    pub source: Option<String>,
    /// `JSON` (when absent) or `REQUEST`.
    pub payload_type: Option<String>,
}

/// When and for whom to deliver it.
#[derive(Debug, Clone, Default)]
pub struct SendEventOptions {
    /// Deliver at this time; wins over `deliver_after`.
    pub deliver_at: Option<DateTime<Utc>>,
    /// Deliver this many seconds from now.
    pub deliver_after: Option<u64>,
    /// Ties the event to an external account of the environment.
    pub account_id: Option<String>,
    /// The W3C `traceparent` of the request; the event's jobs carry it on.
    pub trace_parent: Option<String>,
}

/// A stored event (trigger.dev's EventRecord).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: Uuid,
    pub environment_id: Uuid,
    pub event_id: String,
    pub name: String,
    pub source: String,
    pub payload: Value,
    pub context: Value,
    pub timestamp: DateTime<Utc>,
    pub deliver_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub external_account_id: Option<Uuid>,
    pub is_test: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What ingest did.
#[derive(Debug, Clone)]
pub struct IngestResult {
    pub record: EventRecord,
    /// False when the environment already had an event with this id: nothing was written.
    pub created: bool,
    /// The `deliverEvent` job, when one was enqueued.
    pub job: Option<JobInsertResult>,
}

pub use crate::runs::RunSummary;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// A fault of ours, not of the request.
    #[error("{0}")]
    Internal(String),
    #[error("the service is shutting down")]
    Unavailable,
}

/// Ingest events inside the caller's transaction, so they commit with the caller's work.
/// The requests were validated by the caller. Results come in the order of `items`.
/// `caller_publishes`: the caller publishes the delivery jobs after its commit.
async fn ingest_in_tx(
    tx: &mut PgConnection,
    items: Vec<(Environment, SendEvent, SendEventOptions)>,
    caller_publishes: Option<PublishedBy>,
) -> Result<Vec<IngestResult>, IngestError> {
    let rows = NewEvents::build(tx, items).await?;
    let inserted = rows.insert(tx).await?;
    let mut stored = enqueue_deliveries(tx, &rows, inserted, caller_publishes).await?;
    resolve_resends(tx, &rows, &mut stored).await?;
    answer(rows, stored)
}

/// The events to insert, one column each (for `UNNEST`), in request order.
#[derive(Default)]
struct NewEvents {
    ids: Vec<Uuid>,
    envs: Vec<Uuid>,
    event_ids: Vec<String>,
    names: Vec<String>,
    sources: Vec<String>,
    payloads: Vec<Value>,
    contexts: Vec<Value>,
    timestamps: Vec<Option<DateTime<Utc>>>,
    deliver_ats: Vec<Option<DateTime<Utc>>>,
    deliver_afters: Vec<Option<f64>>,
    accounts: Vec<Option<Uuid>>,
    traces: Vec<Option<String>>,
    payload_types: Vec<String>,
}

/// Stored events by (environment, producer's id), with the delivery job of those this call
/// created.
type Stored = HashMap<(Uuid, String), (EventRecord, Option<JobInsertResult>)>;

impl NewEvents {
    /// Rows for the requests: ids generated where missing, defaults applied, accounts
    /// upserted.
    async fn build(
        tx: &mut PgConnection,
        items: Vec<(Environment, SendEvent, SendEventOptions)>,
    ) -> Result<Self, sqlx::Error> {
        let mut rows = NewEvents::default();
        for (env, request, options) in items {
            let account = match &options.account_id {
                Some(identifier) => {
                    Some(crate::tenants::external_account(tx, env.id, identifier).await?)
                }
                None => None,
            };
            rows.ids.push(Uuid::now_v7());
            rows.envs.push(env.id);
            rows.event_ids.push(
                request
                    .id
                    .unwrap_or_else(|| Uuid::now_v7().simple().to_string()),
            );
            rows.names.push(request.name);
            rows.sources
                .push(request.source.unwrap_or_else(|| DEFAULT_SOURCE.to_string()));
            rows.payloads.push(request.payload);
            rows.contexts.push(request.context.unwrap_or(Value::Null));
            rows.timestamps.push(request.timestamp);
            rows.payload_types
                .push(request.payload_type.unwrap_or_else(|| "JSON".to_string()));
            rows.deliver_ats.push(options.deliver_at);
            // deliverAt wins over deliverAfter.
            rows.deliver_afters.push(
                options
                    .deliver_after
                    .filter(|_| options.deliver_at.is_none())
                    .map(|s| s as f64),
            );
            rows.accounts.push(account);
            rows.traces.push(options.trace_parent);
        }
        Ok(rows)
    }

    /// One statement stores them all; ids the environment already has are skipped (and not
    /// returned). On plain tables the unique index on (environment, id) does it. On sliced
    /// ones (`db::slices`) a unique index holds within one slice only, and `event_keys`
    /// (migration `20261208000001_event_keys`) across them: the keys go in first, the first
    /// of each (environment, id) in the call, sorted (two bulk sends take them in one order),
    /// and only the events whose key went in are stored. A key another send holds
    /// uncommitted is waited for. A stale key (its event's slice dropped by retention, the
    /// key not yet forgotten: `event_keys_gone`, migration `20261209000001_event_keys_gone`)
    /// is taken over, as if it were gone. Keys are kept once the tables are sliced and from the
    /// first step of `storage partition` on (its `CHECK` on the plain table): `kept`, looked
    /// up as the statement runs. By `to_regclass`, not a `::regclass` literal: a literal is
    /// resolved when the statement is parsed, and a connection that parses it while the
    /// slicing's swap holds the tables would resolve it to the plain table (renamed the
    /// legacy slice, its check gone) and store its event without a key.
    async fn insert(&self, tx: &mut PgConnection) -> Result<Vec<EventRecord>, sqlx::Error> {
        sqlx::query_as!(
            EventRecord,
            r#"WITH kept AS MATERIALIZED (
                   SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = t.oid)
                       OR EXISTS (SELECT 1 FROM pg_constraint
                                  WHERE conrelid = t.oid
                                    AND conname = 'event_records_below_cutover') AS kept
                   FROM (SELECT to_regclass('event_records') AS oid) t),
               keyed AS (
                   INSERT INTO event_keys (environment_id, event_id, record_id)
                   SELECT DISTINCT ON (env, eid) env, eid, id
                   FROM UNNEST($1::uuid[], $2::uuid[], $3::text[]) WITH ORDINALITY AS k(id, env, eid, n)
                   WHERE (SELECT kept FROM kept)
                   ORDER BY env, eid, n
                   ON CONFLICT (environment_id, event_id) DO UPDATE SET record_id = EXCLUDED.record_id
                   WHERE EXISTS (SELECT 1 FROM event_keys_gone g
                                 WHERE event_keys.record_id >= g.lower
                                   AND event_keys.record_id < g.upper)
                   RETURNING record_id)
               INSERT INTO event_records
                   (id, environment_id, event_id, name, source, payload, context, timestamp,
                    deliver_at, external_account_id, is_test, payload_type)
               SELECT id, env, eid, name, source, payload, context, COALESCE(ts, now()),
                      COALESCE(at, now() + make_interval(secs => COALESCE(after, 0))), account, false, ptype
               FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                           $7::jsonb[], $8::timestamptz[], $9::timestamptz[], $10::float8[], $11::uuid[],
                           $12::text[])
                    AS t(id, env, eid, name, source, payload, context, ts, at, after, account, ptype)
               WHERE NOT (SELECT kept FROM kept) OR t.id IN (SELECT record_id FROM keyed)
               ON CONFLICT DO NOTHING
               RETURNING id, environment_id, event_id, name, source, payload, context, timestamp,
                         deliver_at, delivered_at, cancelled_at, external_account_id, is_test,
                         created_at, updated_at"#,
            &self.ids,
            &self.envs,
            &self.event_ids,
            &self.names,
            &self.sources,
            &self.payloads,
            &self.contexts,
            &self.timestamps as &[Option<DateTime<Utc>>],
            &self.deliver_ats as &[Option<DateTime<Utc>>],
            &self.deliver_afters as &[Option<f64>],
            &self.accounts as &[Option<Uuid>],
            &self.payload_types,
        )
        .fetch_all(&mut *tx)
        .await
    }

    fn keys(&self) -> impl Iterator<Item = (Uuid, String)> + '_ {
        self.envs
            .iter()
            .copied()
            .zip(self.event_ids.iter().cloned())
    }
}

/// Enqueue the `deliverEvent` job of every event inserted (due at its `deliverAt`, carrying
/// its request's trace), with one statement.
async fn enqueue_deliveries(
    tx: &mut PgConnection,
    rows: &NewEvents,
    inserted: Vec<EventRecord>,
    caller_publishes: Option<PublishedBy>,
) -> Result<Stored, sqlx::Error> {
    let trace_of: HashMap<(Uuid, &str), &Option<String>> = rows
        .envs
        .iter()
        .zip(&rows.event_ids)
        .zip(&rows.traces)
        .map(|((e, i), t)| ((*e, i.as_str()), t))
        .collect();
    let jobs = inserted
        .iter()
        .map(|r| {
            let trace_parent = trace_of
                .get(&(r.environment_id, r.event_id.as_str()))
                .and_then(|t| (*t).clone());
            JobInsert::deliver_event(
                DeliverEventArgs { id: r.id },
                InsertOpts {
                    run_at: Some(r.deliver_at),
                    trace_parent,
                    caller_publishes,
                    environment_id: Some(r.environment_id),
                    ..InsertOpts::default()
                },
            )
        })
        .collect();
    let jobs = ledger::QueueService::new().enqueue_many(tx, jobs).await?;
    Ok(inserted
        .into_iter()
        .zip(jobs)
        .map(|(r, j)| ((r.environment_id, r.event_id.clone()), (r, Some(j))))
        .collect())
}

/// Ids the environments already had: the stored events answer, and a pending event due
/// far enough ahead takes the new payload, context and time (trigger.dev's resend rule).
async fn resolve_resends(
    tx: &mut PgConnection,
    rows: &NewEvents,
    stored: &mut Stored,
) -> Result<(), sqlx::Error> {
    let (missing_envs, missing_ids): (Vec<Uuid>, Vec<String>) =
        rows.keys().filter(|k| !stored.contains_key(k)).unzip();
    if missing_envs.is_empty() {
        return Ok(());
    }
    let existing = sqlx::query_as!(
        EventRecord,
        r#"SELECT r.id, r.environment_id, r.event_id, r.name, r.source, r.payload, r.context,
                  r.timestamp, r.deliver_at, r.delivered_at, r.cancelled_at,
                  r.external_account_id, r.is_test, r.created_at, r.updated_at
           FROM UNNEST($1::uuid[], $2::text[]) AS k(env, eid)
           JOIN event_records r ON r.environment_id = k.env AND r.event_id = k.eid"#,
        &missing_envs,
        &missing_ids
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in existing {
        stored.insert((r.environment_id, r.event_id.clone()), (r, None));
    }
    let mut rearm = Vec::new();
    for (i, key) in rows.keys().enumerate() {
        let Some((record, None)) = stored.get(&key) else {
            continue;
        };
        let update = Resend {
            payload: &rows.payloads[i],
            context: &rows.contexts[i],
            deliver_at: rows.deliver_ats[i],
            deliver_after: rows.deliver_afters[i],
        };
        let id = record.id;
        match resend(tx, id, update).await? {
            Some(updated) => {
                stored.insert(key, (updated, None));
            }
            None => rearm.push(JobArgs::DeliverEvent(DeliverEventArgs { id })),
        }
    }
    // A request sent again may be the redelivery of one whose process died between its
    // commit and its own publish: its job, if still pending, goes back to the relay.
    ledger::outbox::rearm_by_args(tx, &rearm).await?;
    Ok(())
}

/// The answer to each request, in order: the first request for a key created it (when this
/// call stored it); any other for the same key did not.
fn answer(rows: NewEvents, stored: Stored) -> Result<Vec<IngestResult>, IngestError> {
    let mut seen = HashSet::new();
    rows.keys()
        .map(|key| {
            let (record, job) = stored.get(&key).cloned().ok_or_else(|| {
                IngestError::Internal(format!("event {:?} vanished during ingest", key.1))
            })?;
            let first = seen.insert(key);
            Ok(IngestResult {
                created: first && job.is_some(),
                job: job.filter(|_| first),
                record,
            })
        })
        .collect()
}

/// One ingest waiting in the batcher.
struct Pending {
    env: Environment,
    request: SendEvent,
    options: SendEventOptions,
    reply: oneshot::Sender<Result<IngestResult, IngestError>>,
    queued: std::time::Instant,
}

/// Ingest and lookup of events.
#[derive(Clone)]
pub struct EventsService {
    pool: PgPool,
    batcher: Option<mpsc::Sender<Pending>>,
    /// Publishes the delivery jobs of what this service commits, right after the commit;
    /// without one, the relay publishes them.
    publisher: Option<DirectPublisher>,
}

impl std::fmt::Debug for EventsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsService")
            .field("batching", &self.batcher.is_some())
            .field("publishing", &self.publisher.is_some())
            .finish()
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("name", &self.request.name)
            .finish()
    }
}

impl EventsService {
    /// Each ingest runs its own transaction.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            batcher: None,
            publisher: None,
        }
    }

    /// Publish the delivery jobs of committed events with `publisher`, right after each
    /// commit (the fast path), instead of leaving them to the relay.
    pub fn publishing(self, publisher: DirectPublisher) -> Self {
        Self {
            publisher: Some(publisher),
            ..self
        }
    }

    /// Concurrent ingests are grouped: `committers` tasks each take whatever requests are
    /// waiting (up to `max_batch`) and store them with one transaction, one commit. Every
    /// caller still gets its answer only after its event is committed.
    pub fn with_batching(pool: PgPool, committers: usize, max_batch: usize) -> Self {
        Self::new(pool).batching(committers, max_batch)
    }

    /// This service with its ingests grouped (see [`EventsService::with_batching`]).
    pub fn batching(self, committers: usize, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Pending>(max_batch * committers * 4);
        let rx = Arc::new(Mutex::new(rx));
        let this = self;
        for _ in 0..committers.max(1) {
            let this = this.clone();
            let rx = rx.clone();
            tokio::spawn(async move { this.commit_loop(rx, max_batch.max(1)).await });
        }
        Self {
            batcher: Some(tx),
            ..this
        }
    }

    async fn commit_loop(self, rx: Arc<Mutex<mpsc::Receiver<Pending>>>, max_batch: usize) {
        loop {
            let mut batch = Vec::new();
            {
                let mut rx = rx.lock().await;
                match rx.recv().await {
                    Some(p) => batch.push(p),
                    None => return,
                }
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
            }
            let items: Vec<_> = batch
                .iter()
                .map(|p| {
                    metrics().stage(Stage::GroupWait, p.queued);
                    (p.env.clone(), p.request.clone(), p.options.clone())
                })
                .collect();
            let stored = async {
                let ticket = self.ticket().await?;
                let stamp = ticket.as_ref().map(Ticket::stamp);
                Ok::<_, IngestError>((self.store_each(items, stamp).await?, ticket))
            }
            .await;
            match stored {
                Ok((results, ticket)) => {
                    // The publish starts before the callers are answered (so a stopping
                    // process, which waits for its requests and then for its publishes,
                    // cannot miss it) and goes on while they are.
                    let jobs = created_jobs(results.iter().filter_map(|r| r.as_ref().ok()));
                    if let (Some(p), Some(ticket)) = (&self.publisher, ticket) {
                        p.publish_soon(jobs, ticket).await;
                    }
                    for (p, r) in batch.into_iter().zip(results) {
                        let _ = p.reply.send(r);
                    }
                }
                Err(e) => {
                    let cause = e.to_string();
                    for p in batch {
                        let _ = p.reply.send(Err(IngestError::Internal(cause.clone())));
                    }
                }
            }
        }
    }

    /// Store many requests, from any environments, with as few transactions as possible,
    /// each request answered alone: every valid request is stored in one transaction; if
    /// that fails, each is tried in a transaction of its own, so a request the database
    /// refuses (a string jsonb cannot hold, say) fails alone, as
    /// [`IngestError::Invalid`]. Results come in the order of `items`. The outer error is a
    /// failure that says nothing about the requests (the database is unreachable): nothing
    /// of them was stored, and trying again later is right.
    pub async fn ingest_each(
        &self,
        items: Vec<(Environment, SendEvent, SendEventOptions)>,
    ) -> Result<Vec<Result<IngestResult, IngestError>>, IngestError> {
        let ticket = self.ticket().await?;
        let results = self
            .store_each(items, ticket.as_ref().map(Ticket::stamp))
            .await?;
        self.publish(
            &created_jobs(results.iter().filter_map(|r| r.as_ref().ok())),
            ticket,
        )
        .await;
        Ok(results)
    }

    /// [`EventsService::ingest_each`] for a caller that publishes the delivery jobs itself,
    /// when it likes, through its own [`DirectPublisher`]: they are inserted marked
    /// published, stamped with the caller's ticket, and returned beside the results.
    pub async fn ingest_each_for_caller(
        &self,
        items: Vec<(Environment, SendEvent, SendEventOptions)>,
        stamp: PublishedBy,
    ) -> Result<
        (
            Vec<Result<IngestResult, IngestError>>,
            Vec<crate::ledger::Job>,
        ),
        IngestError,
    > {
        let results = self.store_each(items, Some(stamp)).await?;
        let jobs = created_jobs(results.iter().filter_map(|r| r.as_ref().ok()));
        Ok((results, jobs))
    }

    /// [`EventsService::ingest_each`] without the publish; `claim`: insert the delivery jobs
    /// for the caller to publish.
    async fn store_each(
        &self,
        items: Vec<(Environment, SendEvent, SendEventOptions)>,
        claim: Option<PublishedBy>,
    ) -> Result<Vec<Result<IngestResult, IngestError>>, IngestError> {
        let mut results: Vec<Option<Result<IngestResult, IngestError>>> =
            Vec::with_capacity(items.len());
        let mut valid = Vec::new();
        let mut at = Vec::new();
        for (i, (env, request, options)) in items.into_iter().enumerate() {
            match validate(&request, &options) {
                Ok(()) => {
                    valid.push((env, request, options));
                    at.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if valid.is_empty() {
            return Ok(results.into_iter().flatten().collect());
        }
        let stored = match self.ingest_many(valid.clone(), claim).await {
            Ok(stored) => stored.into_iter().map(Ok).collect(),
            Err(e) if valid.len() == 1 => vec![refused_alone(e)?],
            Err(_) => {
                let mut each = Vec::with_capacity(valid.len());
                for item in valid {
                    each.push(match self.ingest_many(vec![item], claim).await {
                        Ok(mut one) => Ok(one.remove(0)),
                        Err(e) => refused_alone(e)?,
                    });
                }
                each
            }
        };
        for (i, r) in at.into_iter().zip(stored) {
            results[i] = Some(r);
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Store the event and enqueue its `deliverEvent` job in one transaction. An event id
    /// the environment already has returns the stored event and writes nothing.
    pub async fn ingest_send_event(
        &self,
        env: &Environment,
        request: SendEvent,
        options: SendEventOptions,
    ) -> Result<IngestResult, IngestError> {
        match &self.batcher {
            // The committer validates each request of its batch (`store_each`).
            Some(batcher) => {
                let (reply, answer) = oneshot::channel();
                batcher
                    .send(Pending {
                        env: env.clone(),
                        request,
                        options,
                        reply,
                        queued: std::time::Instant::now(),
                    })
                    .await
                    .map_err(|_| IngestError::Unavailable)?;
                answer.await.map_err(|_| IngestError::Unavailable)?
            }
            None => {
                validate(&request, &options)?;
                let ticket = self.ticket().await?;
                let result = self
                    .ingest_many(
                        vec![(env.clone(), request, options)],
                        ticket.as_ref().map(Ticket::stamp),
                    )
                    .await?
                    .remove(0);
                self.publish(&created_jobs(std::iter::once(&result)), ticket)
                    .await;
                Ok(result)
            }
        }
    }

    /// Store several events of one environment, all in one transaction: all or nothing.
    /// Each is idempotent on its id like a single send.
    pub async fn ingest_bulk(
        &self,
        env: &Environment,
        events: Vec<SendEvent>,
        options: SendEventOptions,
    ) -> Result<Vec<IngestResult>, IngestError> {
        if events.len() > MAX_BULK_EVENTS {
            return Err(IngestError::Invalid(format!(
                "events: at most {MAX_BULK_EVENTS} per call, got {}",
                events.len()
            )));
        }
        for (i, e) in events.iter().enumerate() {
            validate(e, &options).map_err(|err| match err {
                IngestError::Invalid(m) => IngestError::Invalid(format!("events[{i}]: {m}")),
                IngestError::TooLarge(m) => IngestError::TooLarge(format!("events[{i}]: {m}")),
                other => other,
            })?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let items = events
            .into_iter()
            .map(|e| (env.clone(), e, options.clone()))
            .collect();
        let ticket = self.ticket().await?;
        let results = self
            .ingest_many(items, ticket.as_ref().map(Ticket::stamp))
            .await?;
        self.publish(&created_jobs(results.iter()), ticket).await;
        Ok(results)
    }

    /// One transaction; `claim`: the delivery jobs are inserted for the caller to publish
    /// (see [`EventsService::publish`]).
    async fn ingest_many(
        &self,
        items: Vec<(Environment, SendEvent, SendEventOptions)>,
        claim: Option<PublishedBy>,
    ) -> Result<Vec<IngestResult>, IngestError> {
        let started = std::time::Instant::now();
        let mut tx = crate::db::begin_pipeline(&self.pool).await?;
        let results = ingest_in_tx(&mut tx, items, claim).await?;
        metrics().stage(Stage::Insert, started);
        let committing = std::time::Instant::now();
        tx.commit().await?;
        metrics().stage(Stage::Commit, committing);
        Ok(results)
    }

    /// A ticket for the delivery jobs of the next transaction, when this service publishes
    /// its own.
    async fn ticket(&self) -> Result<Option<Ticket>, IngestError> {
        match &self.publisher {
            Some(p) => Ok(Some(p.ticket().await?)),
            None => Ok(None),
        }
    }

    /// Publish committed delivery jobs, when this service publishes its own.
    async fn publish(&self, jobs: &[crate::ledger::Job], ticket: Option<Ticket>) {
        if let (Some(p), Some(ticket)) = (&self.publisher, ticket) {
            p.publish(jobs, ticket).await;
        }
    }

    /// An event of the environment by the producer's id, with its runs.
    pub async fn get_event(
        &self,
        env: &Environment,
        event_id: &str,
    ) -> Result<Option<(EventRecord, Vec<RunSummary>)>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let Some(record) = find_event(&mut conn, env.id, event_id).await? else {
            return Ok(None);
        };
        let runs = crate::runs::of_event(&mut conn, env.id, record.id).await?;
        Ok(Some((record, runs)))
    }

    /// Cancel the runs of an event that are still QUEUED ([`crate::runs::cancel_queued`]).
    /// Returns the ids cancelled, `None` if the environment has no such event.
    pub async fn cancel_runs(
        &self,
        env: &Environment,
        event_id: &str,
    ) -> Result<Option<Vec<Uuid>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let Some(record) = find_event(&mut tx, env.id, event_id).await? else {
            return Ok(None);
        };
        let cancelled = crate::runs::cancel_queued(&mut tx, env.id, record.id).await?;
        tx.commit().await?;
        Ok(Some(cancelled))
    }

    /// Cancel an event that is not yet delivered: it gets `cancelled_at` and its
    /// `deliverEvent` job is cancelled, so its message, when it comes out of the delay
    /// tiers, is acknowledged with no effect. A delivered or already cancelled event is left
    /// as it is. Returns the event as it now stands, `None` if the environment has no such
    /// event.
    pub async fn cancel_event(
        &self,
        env: &Environment,
        event_id: &str,
    ) -> Result<Option<EventRecord>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let Some(record) = find_event(&mut tx, env.id, event_id).await? else {
            return Ok(None);
        };
        if record.delivered_at.is_some() || record.cancelled_at.is_some() {
            return Ok(Some(record));
        }
        // The job row first, then the event: the worker locks in that order too, so a
        // cancel racing a delivery waits for it instead of deadlocking. Whichever commits
        // first wins; the other finds nothing left to change.
        let job = JobArgs::DeliverEvent(DeliverEventArgs { id: record.id });
        run::cancel_by_args(&mut tx, &job).await?;
        let cancelled = sqlx::query_as!(
            EventRecord,
            r#"UPDATE event_records SET cancelled_at = now(), updated_at = now()
               WHERE id = $1 AND delivered_at IS NULL AND cancelled_at IS NULL
               RETURNING id, environment_id, event_id, name, source, payload, context, timestamp,
                         deliver_at, delivered_at, cancelled_at, external_account_id, is_test,
                         created_at, updated_at"#,
            record.id
        )
        .fetch_optional(&mut *tx)
        .await?;
        let current = match cancelled {
            Some(r) => r,
            // Delivered in the meantime: the job was completed with it, nothing changed.
            None => find_event(&mut tx, env.id, event_id)
                .await?
                .expect("the event was just read"),
        };
        tx.commit().await?;
        tracing::info!(event = %current.id, event_id = ?current.event_id,
            cancelled = current.cancelled_at.is_some(), "event cancel asked");
        Ok(Some(current))
    }
}

/// The delivery jobs these ingests inserted (not those of ids already stored).
fn created_jobs<'a>(results: impl Iterator<Item = &'a IngestResult>) -> Vec<crate::ledger::Job> {
    results
        .filter_map(|r| r.job.as_ref())
        .filter(|j| !j.unique_skipped_as_duplicate)
        .map(|j| j.job.clone())
        .collect()
}

/// The answer to a request that failed in a transaction of its own: the database refusing
/// its data (SQLSTATE classes 22 and 23) is the request's fault, anything else is not, and
/// is returned as the outer error.
fn refused_alone(e: IngestError) -> Result<Result<IngestResult, IngestError>, IngestError> {
    match e {
        IngestError::Db(db) => match db.as_database_error().and_then(|d| d.code()) {
            Some(code) if code.starts_with("22") || code.starts_with("23") => Ok(Err(
                IngestError::Invalid(format!("the database refused the event: {db}")),
            )),
            _ => Err(IngestError::Db(db)),
        },
        other => Err(other),
    }
}

/// Longest event name (and source) accepted, in characters.
pub const MAX_NAME_CHARS: usize = 255;
/// Longest event id (and account id) accepted, in characters.
pub const MAX_ID_CHARS: usize = 255;
/// Largest payload plus context of one event, serialized as JSON: 512 KiB.
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024;
/// Deepest nesting of arrays and objects accepted in an event's payload, and in its context
/// (`{"a": [1]}` is 2 deep), on every ingest path. What the service wraps around them (a send
/// body, a webhook body, a run hand-off: a few levels each) stays far below the 128 levels
/// at which JSON readers such as serde_json stop, so every message the service writes can
/// be read back.
pub const MAX_JSON_DEPTH: usize = 64;
/// Most events in one bulk send.
pub const MAX_BULK_EVENTS: usize = 100;
/// A pending event due at least this long from now takes a resent payload and time.
pub const RESEND_WINDOW_SECS: i64 = 5;

/// Longest `deliverAfter` accepted: ten years, in seconds.
pub const MAX_DELIVER_AFTER_SECS: u64 = 10 * 365 * 24 * 3600;

fn validate(request: &SendEvent, options: &SendEventOptions) -> Result<(), IngestError> {
    if request.name.is_empty() {
        return Err(IngestError::Invalid("event.name must not be empty".into()));
    }
    if request.name.chars().count() > MAX_NAME_CHARS {
        return Err(IngestError::Invalid(format!(
            "event.name must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    if let Some(id) = &request.id {
        if id.is_empty() {
            return Err(IngestError::Invalid("event.id must not be empty".into()));
        }
        if id.chars().count() > MAX_ID_CHARS {
            return Err(IngestError::Invalid(format!(
                "event.id must be at most {MAX_ID_CHARS} characters"
            )));
        }
    }
    if let Some(source) = &request.source
        && (source.is_empty() || source.chars().count() > MAX_NAME_CHARS)
    {
        return Err(IngestError::Invalid(format!(
            "event.source must be 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if let Some(account) = &options.account_id
        && (account.is_empty() || account.chars().count() > MAX_ID_CHARS)
    {
        return Err(IngestError::Invalid(format!(
            "options.accountId must be 1 to {MAX_ID_CHARS} characters"
        )));
    }
    match request.payload_type.as_deref() {
        None | Some("JSON") => {}
        Some("REQUEST") => {
            if !filter::is_request_payload(&request.payload) {
                return Err(IngestError::Invalid(
                    "a REQUEST event's payload must be {url, method, headers (strings), rawBody}"
                        .into(),
                ));
            }
        }
        Some(other) => {
            return Err(IngestError::Invalid(format!(
                "event.payloadType must be JSON or REQUEST, not {other:?}"
            )));
        }
    }
    for (field, value) in [
        ("payload", Some(&request.payload)),
        ("context", request.context.as_ref()),
    ] {
        if let Some(value) = value
            && json_depth(value) > MAX_JSON_DEPTH
        {
            return Err(IngestError::Invalid(format!(
                "event.{field} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; \
                 at most {MAX_JSON_DEPTH} are accepted"
            )));
        }
    }
    let size = json_len(&request.payload) + request.context.as_ref().map_or(0, json_len);
    if size > MAX_PAYLOAD_BYTES {
        return Err(IngestError::TooLarge(format!(
            "event {:?}: payload and context are {size} bytes; at most {MAX_PAYLOAD_BYTES} are accepted",
            request.name
        )));
    }
    if options
        .deliver_after
        .is_some_and(|s| s > MAX_DELIVER_AFTER_SECS)
    {
        return Err(IngestError::Invalid(format!(
            "options.deliverAfter must be at most {MAX_DELIVER_AFTER_SECS} seconds (ten years)"
        )));
    }
    if options.deliver_at.is_some_and(|at| {
        at > Utc::now() + chrono::Duration::seconds(MAX_DELIVER_AFTER_SECS as i64)
    }) {
        return Err(IngestError::Invalid(format!(
            "options.deliverAt must be at most {MAX_DELIVER_AFTER_SECS} seconds (ten years) ahead"
        )));
    }
    Ok(())
}

/// How deeply arrays and objects nest in `value`: 0 for a scalar, 1 for `[]` or `{"a": 1}`.
/// Walked without recursion.
pub fn json_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(depth + 1);
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    deepest
}

/// What a resend brings.
struct Resend<'a> {
    payload: &'a Value,
    context: &'a Value,
    deliver_at: Option<DateTime<Utc>>,
    deliver_after: Option<f64>,
}

/// Move a pending event due at least [`RESEND_WINDOW_SECS`] from now to a new payload,
/// context and delivery time, and its `deliverEvent` job with it. `None` if the event is
/// delivered, cancelled or due sooner.
async fn resend(
    tx: &mut PgConnection,
    id: Uuid,
    update: Resend<'_>,
) -> Result<Option<EventRecord>, sqlx::Error> {
    let Some(updated) = sqlx::query_as!(
        EventRecord,
        r#"UPDATE event_records
           SET payload = $2, context = $3,
               deliver_at = COALESCE($4, now() + make_interval(secs => COALESCE($5::float8, 0))),
               updated_at = now()
           WHERE id = $1 AND delivered_at IS NULL AND cancelled_at IS NULL
             AND deliver_at >= now() + make_interval(secs => $6)
           RETURNING id, environment_id, event_id, name, source, payload, context, timestamp,
                     deliver_at, delivered_at, cancelled_at, external_account_id, is_test,
                     created_at, updated_at"#,
        id,
        update.payload,
        update.context,
        update.deliver_at,
        update.deliver_after,
        RESEND_WINDOW_SECS as f64
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let job = JobArgs::DeliverEvent(DeliverEventArgs { id });
    run::move_by_args(tx, &job, updated.deliver_at).await?;
    Ok(Some(updated))
}

/// The length of a value serialized as JSON, without building the text.
pub(crate) fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Find an event by the producer's id within one environment.
pub async fn find_event(
    conn: &mut PgConnection,
    environment_id: Uuid,
    event_id: &str,
) -> Result<Option<EventRecord>, sqlx::Error> {
    sqlx::query_as!(
        EventRecord,
        r#"SELECT id, environment_id, event_id, name, source, payload, context, timestamp,
                  deliver_at, delivered_at, cancelled_at, external_account_id, is_test,
                  created_at, updated_at
           FROM event_records WHERE environment_id = $1 AND event_id = $2"#,
        environment_id,
        event_id
    )
    .fetch_optional(conn)
    .await
}

/// An event being delivered, as stamped and read back.
#[derive(Debug, Clone)]
pub struct Stamped {
    pub id: Uuid,
    pub environment_id: Uuid,
    pub name: String,
    pub source: String,
    pub payload: Value,
    pub payload_type: String,
    pub context: Value,
    pub external_account_id: Option<Uuid>,
}

/// Stamp the events delivered and read them back in one statement. The row locks (taken in
/// id order) serialize delivery against a concurrent cancel; cancelled, delivered and
/// vanished events drop out here, so delivering them is a no-op.
pub async fn stamp_delivered(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<Stamped>, sqlx::Error> {
    sqlx::query_as!(
        Stamped,
        r#"UPDATE event_records SET delivered_at = now(), updated_at = now()
           WHERE id IN (
               SELECT id FROM event_records
               WHERE id = ANY($1) AND cancelled_at IS NULL AND delivered_at IS NULL
               ORDER BY id FOR UPDATE)
           RETURNING id, environment_id, name, source, payload, payload_type, context, external_account_id"#,
        ids
    )
    .fetch_all(&mut *tx)
    .await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!([])), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": 2}], "c": 3})), 3);
        let deep = (0..MAX_JSON_DEPTH).fold(json!(1), |v, _| json!([v]));
        let request = |payload: Value| SendEvent {
            name: "n".into(),
            payload,
            ..SendEvent::default()
        };
        let options = SendEventOptions::default();
        assert!(validate(&request(deep.clone()), &options).is_ok());
        let err = validate(&request(json!([deep])), &options).unwrap_err();
        assert!(err.to_string().contains("64 levels deep"), "{err}");
    }
}
