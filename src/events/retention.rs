//! Keeping `event_records` and `job_runs` bounded. Where the tables are sliced
//! ([`crate::db::slices`]), a slice whose events are all older than the retention, none with
//! a delivery still to run, is detached and dropped whole, with its runs and webhook
//! attempts; rows are deleted one by one only in the slices that cannot go yet (an event's
//! delivery is still to run) and in the legacy slice. Where they are plain, settled events older than
//! the retention are deleted with their runs ([`crate::runs::delete_of_events`], in the same
//! transaction), in batches. Deleting an environment deletes its events and runs (rows
//! written per event carry no foreign keys: see the initial migration).

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::db::slices::{self, Slice};
use crate::ledger::{self, DeliverEventArgs, JobArgs};

/// The advisory lock held by the process deleting old events.
pub const EVENTS_RETENTION_LOCK: i64 = 0x6b66_6576_7265_746e;

/// What one batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub events: u64,
    pub runs: u64,
    /// EPHEMERAL dispatchers spent (fired or expired) longer ago than the retention, with
    /// their webhook attempts (counted by the relay's pass, not by [`retain`]).
    pub dispatchers: u64,
    /// Keys of events whose slice went, forgotten after it ([`slices::forget_gone_keys`]).
    pub keys: u64,
}

impl std::ops::AddAssign for Deleted {
    fn add_assign(&mut self, other: Self) {
        self.events += other.events;
        self.runs += other.runs;
        self.dispatchers += other.dispatchers;
        self.keys += other.keys;
    }
}

/// One pass. Sliced tables: each slice older than `keep` (its end; the legacy slice's newest
/// event) none of whose undelivered events has a `deliverEvent` job still to run or
/// discarded within `keep` ([`held`]) is dropped, one entry each, and the keys of the
/// slices that went are forgotten as `keys` paces it (an entry; what is left goes in the
/// next passes, stale meanwhile: see [`slices::forget_gone_keys`]). Then, in the slices that
/// stay although past (and in the legacy slice), or everywhere on plain tables: events
/// created more than `keep` ago that are delivered or cancelled, and their runs, deleted
/// `batch` events per statement (each its own short transaction, rows locked by others
/// skipped), until a batch comes back short. An event still due (not yet delivered, however
/// old) is kept; one delivery gave up on (its `deliverEvent` job discarded or cancelled, due
/// more than `keep` ago) goes too, in a last entry. Only the process holding the lock does
/// it; the others skip the pass. Returns what each step deleted. (Spent EPHEMERAL
/// dispatchers go in the same pass of the relay: `dispatchers::delete_spent`.)
pub async fn retain(
    pool: &PgPool,
    keep: Duration,
    batch: i64,
    keys: &slices::Pace,
) -> Result<Vec<Deleted>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked = sqlx::query_scalar!("SELECT pg_try_advisory_lock($1)", EVENTS_RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if locked != Some(true) {
        return Ok(Vec::new());
    }
    let result = retain_locked(&mut conn, keep, batch.max(1), keys).await;
    sqlx::query_scalar!("SELECT pg_advisory_unlock($1)", EVENTS_RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    result
}

/// Which rows the row-by-row pass looks at.
enum Rows {
    /// Plain tables: all.
    All,
    /// Sliced: those below this id (the past slices that stayed, the legacy slice).
    Below(Uuid),
    /// Sliced, and every past slice went: none.
    None,
}

async fn retain_locked(
    conn: &mut PgConnection,
    keep: Duration,
    batch: i64,
    keys: &slices::Pace,
) -> Result<Vec<Deleted>, sqlx::Error> {
    let mut batches = Vec::new();
    let below = match drop_settled_slices(conn, keep, keys, &mut batches).await? {
        Rows::All => None,
        Rows::Below(bound) => Some(bound),
        Rows::None => return Ok(batches),
    };
    loop {
        let d = delete_settled(conn, keep, batch, below).await?;
        batches.push(d);
        if d.events < batch as u64 {
            break;
        }
    }
    let d = retain_abandoned(conn, keep, batch, below).await?;
    if d.events > 0 {
        batches.push(d);
    }
    Ok(batches)
}

/// Drop each past slice that no delivery holds (see [`retain`]); says which rows the
/// row-by-row pass is left with.
async fn drop_settled_slices(
    conn: &mut PgConnection,
    keep: Duration,
    keys: &slices::Pace,
    batches: &mut Vec<Deleted>,
) -> Result<Rows, sqlx::Error> {
    let all = slices::list(conn).await?;
    if all.is_empty() {
        return Ok(Rows::All);
    }
    let horizon =
        chrono::Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    let mut below: Option<Uuid> = None;
    let mut oldest_left: Option<Slice> = None;
    for slice in all {
        let stays = if !is_past(conn, &slice, horizon).await? {
            if slice.day.is_none() {
                // The legacy slice's events older than the retention go row by row.
                below = below.max(Some(slice.upper));
            }
            true
        } else if held(conn, &slice, keep).await? {
            below = below.max(Some(slice.upper));
            true
        } else {
            let d = slices::drop_slice(conn, &slice).await?;
            if d != slices::Dropped::default() {
                batches.push(Deleted {
                    events: d.events,
                    runs: d.runs,
                    ..Deleted::default()
                });
            }
            false
        };
        if stays && oldest_left.is_none() {
            oldest_left = Some(slice);
        }
    }
    let forgotten = slices::forget_gone_keys(conn, oldest_left.as_ref(), keys).await?;
    if forgotten.keys > 0 {
        batches.push(Deleted {
            keys: forgotten.keys,
            ..Deleted::default()
        });
    }
    Ok(below.map_or(Rows::None, Rows::Below))
}

/// How many of a slice's deliveries [`held`] looks at; more, and the slice is taken as held.
const HELD_LOOK: i64 = 10_000;

/// Whether a slice must stay: one of its events, neither delivered nor cancelled, has a
/// `deliverEvent` job still to run or discarded within `keep` (asked of the ledger's live and
/// discarded jobs, then of those events by id: the slice is never read whole).
async fn held(conn: &mut PgConnection, slice: &Slice, keep: Duration) -> Result<bool, sqlx::Error> {
    let ids = ledger::deliveries_between(conn, slice.lower, slice.upper, keep, HELD_LOOK).await?;
    if ids.len() as i64 >= HELD_LOOK {
        return Ok(true);
    }
    if ids.is_empty() {
        return Ok(false);
    }
    Ok(slices::unsettled_among(conn, slice, &ids).await?.is_some())
}

/// Whether a slice's events are all older than `horizon`: a day's slice by its end, the
/// legacy slice by its newest event (an empty one is past).
async fn is_past(
    conn: &mut PgConnection,
    slice: &Slice,
    horizon: chrono::DateTime<chrono::Utc>,
) -> Result<bool, sqlx::Error> {
    Ok(match slice.day {
        Some(_) => slice.ends() <= horizon,
        None => slices::newest(conn, slice)
            .await?
            .is_none_or(|newest| newest <= horizon),
    })
}

/// Delete up to `batch` events created more than `keep` ago that are delivered or
/// cancelled (rows locked by others skipped), and their runs, in one transaction.
async fn delete_settled(
    conn: &mut PgConnection,
    keep: Duration,
    batch: i64,
    below: Option<Uuid>,
) -> Result<Deleted, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let doomed = sqlx::query_scalar!(
        r#"SELECT id FROM event_records
           WHERE created_at < now() - make_interval(secs => $1)
             AND (delivered_at IS NOT NULL OR cancelled_at IS NOT NULL)
             AND id < COALESCE($3::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff')
           LIMIT $2
           FOR UPDATE SKIP LOCKED"#,
        keep.as_secs_f64(),
        batch,
        below
    )
    .fetch_all(&mut *tx)
    .await?;
    let events = delete_with_keys(&mut tx, &doomed).await?;
    let runs = crate::runs::delete_of_events(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(Deleted {
        events: events.len() as u64,
        runs,
        ..Deleted::default()
    })
}

/// Delete the events `ids` with their keys (`event_keys`, kept on sliced tables); the row
/// passes lock them first, in the caller's transaction. Returns the ids deleted.
async fn delete_with_keys(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"WITH gone AS (
               DELETE FROM event_records WHERE id = ANY($1)
               RETURNING id, environment_id, event_id),
           keys AS (
               DELETE FROM event_keys k USING gone g
               WHERE k.environment_id = g.environment_id AND k.event_id = g.event_id
                 AND k.record_id = g.id)
           SELECT id AS "id!" FROM gone"#,
        ids
    )
    .fetch_all(conn)
    .await
}

/// Delete events created and due more than `keep` ago that were never delivered nor
/// cancelled and whose `deliverEvent` job is no longer live (discarded, cancelled, or
/// already removed by the ledger's retention): delivery gave up on them. `batch` events
/// are looked at per statement; an event whose job is still live (due, running, retried)
/// stays. Returns what went, in one entry.
async fn retain_abandoned(
    conn: &mut PgConnection,
    keep: Duration,
    batch: i64,
    below: Option<Uuid>,
) -> Result<Deleted, sqlx::Error> {
    let mut total = Deleted::default();
    let mut after: Option<Uuid> = None;
    loop {
        let candidates = sqlx::query_scalar!(
            r#"SELECT id FROM event_records
               WHERE delivered_at IS NULL AND cancelled_at IS NULL
                 AND created_at < now() - make_interval(secs => $1)
                 AND deliver_at < now() - make_interval(secs => $1)
                 AND ($3::uuid IS NULL OR id > $3)
                 AND id < COALESCE($4::uuid, 'ffffffff-ffff-ffff-ffff-ffffffffffff')
               ORDER BY id
               LIMIT $2"#,
            keep.as_secs_f64(),
            batch,
            after,
            below
        )
        .fetch_all(&mut *conn)
        .await?;
        let Some(last) = candidates.last() else {
            return Ok(total);
        };
        after = Some(*last);
        let jobs: Vec<JobArgs> = candidates
            .iter()
            .map(|id| JobArgs::DeliverEvent(DeliverEventArgs { id: *id }))
            .collect();
        let live = ledger::live(&mut *conn, &jobs).await?;
        let doomed: Vec<Uuid> = candidates
            .iter()
            .zip(live)
            .filter(|(_, live)| !live)
            .map(|(id, _)| *id)
            .collect();
        if !doomed.is_empty() {
            let mut tx = conn.begin().await?;
            let still = sqlx::query_scalar!(
                r#"SELECT id FROM event_records
                   WHERE id = ANY($1) AND delivered_at IS NULL AND cancelled_at IS NULL
                   FOR UPDATE SKIP LOCKED"#,
                &doomed
            )
            .fetch_all(&mut *tx)
            .await?;
            let events = delete_with_keys(&mut tx, &still).await?;
            let runs = crate::runs::delete_of_events(&mut tx, &events).await?;
            tx.commit().await?;
            total.events += events.len() as u64;
            total.runs += runs;
        }
        if (candidates.len() as i64) < batch {
            return Ok(total);
        }
    }
}

/// Delete every event and run of an environment, `batch` events per statement. For an
/// environment being deleted: its row goes first, so no new event arrives.
pub async fn delete_environment_events(
    pool: &PgPool,
    environment: Uuid,
    batch: i64,
) -> Result<Deleted, sqlx::Error> {
    let batch = batch.max(1);
    let mut total = Deleted::default();
    let mut conn = pool.acquire().await?;
    loop {
        let ids = sqlx::query_scalar!(
            "SELECT id FROM event_records WHERE environment_id = $1 LIMIT $2",
            environment,
            batch
        )
        .fetch_all(&mut *conn)
        .await?;
        let gone = delete_with_keys(&mut conn, &ids).await?.len() as u64;
        total.events += gone;
        if gone < batch as u64 {
            break;
        }
    }
    drop(conn);
    // Runs by environment: those of events already gone too.
    total.runs += crate::runs::delete_of_environment(pool, environment, batch).await?;
    Ok(total)
}
