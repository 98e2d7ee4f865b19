//! Inserting jobs, unique by arguments, in the caller's transaction.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    DeliverEventArgs, InsertOpts, InvokeDispatcherArgs, Job, JobInsert, JobInsertResult,
    UnreadableJob, decode_all, query_jobs, unique_key,
};

/// Insert jobs into the ledger, always inside the caller's transaction (the seed's
/// `QueueService` with its `WithinTx` calls): the one way jobs enter the ledger, for the
/// service's own code (ingest, the handlers) and for library callers alike. Each insert is
/// unique by its kind and arguments: a job that is live, or completed within retention,
/// comes back with `unique_skipped_as_duplicate` and nothing is inserted.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueService;

impl QueueService {
    pub fn new() -> Self {
        Self
    }

    /// Enqueue `deliverEvent` for an event record.
    pub async fn enqueue_deliver_event(
        &self,
        tx: &mut PgConnection,
        args: DeliverEventArgs,
        opts: InsertOpts,
    ) -> Result<JobInsertResult, sqlx::Error> {
        let mut res = insert_many(tx, vec![JobInsert::deliver_event(args, opts)]).await?;
        Ok(res.remove(0))
    }

    /// Enqueue `events.invokeDispatcher` for a (dispatcher, event) pair.
    pub async fn enqueue_invoke_dispatcher(
        &self,
        tx: &mut PgConnection,
        args: InvokeDispatcherArgs,
        opts: InsertOpts,
    ) -> Result<JobInsertResult, sqlx::Error> {
        let mut res = insert_many(tx, vec![JobInsert::invoke_dispatcher(args, opts)]).await?;
        Ok(res.remove(0))
    }

    /// Enqueue jobs of any kinds with one statement (the batch form). Results come in the
    /// order of `jobs`.
    pub async fn enqueue_many(
        &self,
        tx: &mut PgConnection,
        jobs: Vec<JobInsert>,
    ) -> Result<Vec<JobInsertResult>, sqlx::Error> {
        insert_many(tx, jobs).await
    }
}

/// The columns of a batch of inserts, one vector each, for `UNNEST`.
#[derive(Default)]
struct Columns {
    kinds: Vec<String>,
    args: Vec<serde_json::Value>,
    queues: Vec<String>,
    priorities: Vec<i16>,
    max_attempts: Vec<i32>,
    run_ats: Vec<Option<DateTime<Utc>>>,
    keys: Vec<Vec<u8>>,
    traces: Vec<Option<String>>,
    claimed: Vec<bool>,
    publishers: Vec<Option<i64>>,
    seqs: Vec<Option<i64>>,
    envs: Vec<Uuid>,
}

impl Columns {
    fn of(jobs: &[JobInsert]) -> Self {
        let mut c = Columns::default();
        for j in jobs {
            c.kinds.push(j.args.kind().as_str().to_string());
            c.args.push(j.args.to_value());
            c.keys.push(unique_key(&j.args));
            c.queues.push(j.opts.queue.clone());
            c.priorities.push(j.opts.priority as i16);
            c.max_attempts.push(j.opts.max_attempts);
            c.run_ats.push(j.opts.run_at);
            c.traces.push(j.opts.trace_parent.clone());
            c.claimed.push(j.opts.caller_publishes.is_some());
            c.publishers
                .push(j.opts.caller_publishes.map(|p| p.publisher));
            c.seqs.push(j.opts.caller_publishes.map(|p| p.seq));
            c.envs.push(j.opts.environment_id.unwrap_or(Uuid::nil()));
        }
        c
    }
}

/// Insert several jobs with one statement, in the caller's transaction; results come in the
/// order of `jobs`. A job whose kind and arguments equal those of a job that is live or
/// completed (and kept) is not inserted: its result is that job, marked a duplicate; so is
/// the second of two equal jobs in one call.
pub(super) async fn insert_many(
    tx: &mut PgConnection,
    jobs: Vec<JobInsert>,
) -> Result<Vec<JobInsertResult>, sqlx::Error> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let c = Columns::of(&jobs);
    // A due job the caller would publish itself is marked published only while its
    // environment has room for it in flight (`room`, counted once per environment and kind
    // for the whole statement, the jobs numbered within it); the others stay in the outbox
    // for the relay to take in turn.
    let inserted = query_jobs!(
        r#"WITH t AS (
               SELECT *, row_number() OVER (
                          PARTITION BY e, k, COALESCE(r, now()) <= now() ORDER BY o) AS n
               FROM UNNEST($1::text[], $2::jsonb[], $3::text[], $4::int2[], $5::int4[],
                           $6::timestamptz[], $7::bytea[], $8::text[], $9::bool[], $10::uuid[],
                           $11::int8[], $12::int8[])
                    WITH ORDINALITY AS t(k, a, q, p, m, r, u, tp, cl, e, pb, ps, o)
           ), room AS (
               SELECT e, k, queue_jobs_room(e, k) AS free
               FROM (SELECT DISTINCT e, k FROM t WHERE cl) g
           )
           INSERT INTO queue_jobs (kind, args, queue, priority, state, max_attempts, run_at, unique_key, trace_parent, published_at, environment_id, awaits_room, published_by, publish_seq)
           SELECT t.k, a, q, p,
                  CASE WHEN COALESCE(r, now()) > now() THEN 'scheduled'::queue_job_state
                       ELSE 'available'::queue_job_state END,
                  m, COALESCE(r, now()), u, tp,
                  CASE WHEN has_room THEN now() END,
                  t.e, cl AND NOT has_room,
                  CASE WHEN has_room THEN pb END, CASE WHEN has_room THEN ps END
           FROM t LEFT JOIN room ON room.e = t.e AND room.k = t.k
           CROSS JOIN LATERAL (
               SELECT cl AND (COALESCE(r, now()) > now() OR room.free IS NULL OR t.n <= room.free)
                   AS has_room) h
           ORDER BY t.o
           -- The unique key, keyed by its environment or not yet (`db::keys`): no target.
           ON CONFLICT DO NOTHING
           RETURNING "#,
        "",
        &c.kinds,
        &c.args,
        &c.queues,
        &c.priorities,
        &c.max_attempts,
        &c.run_ats as &[Option<DateTime<Utc>>],
        &c.keys,
        &c.traces as &[Option<String>],
        &c.claimed,
        &c.envs,
        &c.publishers as &[Option<i64>],
        &c.seqs as &[Option<i64>],
    )
    .fetch_all(&mut *tx)
    .await?;

    let m = crate::metrics::metrics();
    let mut by_key: HashMap<Vec<u8>, (Job, bool)> = HashMap::with_capacity(inserted.len());
    for row in inserted {
        let key = row.unique_key.clone().unwrap_or_default();
        let job = readable(Job::try_from(row))?;
        m.jobs_inserted
            .with_label_values(&[job.kind.as_str(), &job.queue])
            .inc();
        by_key.insert(key, (job, false));
    }

    let missing: Vec<Vec<u8>> = c
        .keys
        .iter()
        .filter(|k| !by_key.contains_key(*k))
        .cloned()
        .collect();
    for (key, job) in holders_of(tx, &missing).await? {
        by_key.insert(key, (job, true));
    }

    // Two equal jobs in one call: the first is the insert, the rest are duplicates of it.
    let mut seen = HashSet::new();
    c.keys
        .into_iter()
        .map(|k| {
            let (job, dup) = by_key.get(&k).cloned().ok_or_else(|| {
                sqlx::Error::Protocol("a unique job vanished between insert and lookup".into())
            })?;
            let first = seen.insert(k);
            Ok(JobInsertResult {
                job,
                unique_skipped_as_duplicate: dup || !first,
            })
        })
        .collect()
}

/// The live (or kept completed) jobs holding `keys`, by key.
async fn holders_of(
    tx: &mut PgConnection,
    keys: &[Vec<u8>],
) -> Result<Vec<(Vec<u8>, Job)>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let existing = query_jobs!(
        "SELECT ",
        " FROM queue_jobs
          WHERE unique_key = ANY($1) AND state NOT IN ('cancelled', 'discarded')",
        keys
    )
    .fetch_all(&mut *tx)
    .await?;
    let found: Vec<Vec<u8>> = existing
        .iter()
        .map(|r| r.unique_key.clone().unwrap_or_default())
        .collect();
    Ok(found
        .into_iter()
        .zip(readable(decode_all(existing))?)
        .collect())
}

/// A job that holds a key a new one wants is read back; one this build cannot read is a
/// ledger written by another version: an error, not a panic.
fn readable<T>(r: Result<T, UnreadableJob>) -> Result<T, sqlx::Error> {
    r.map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
