//! The ledger as the outbox: claiming unpublished jobs for the relay, taking a mark back,
//! putting jobs back, and waking the relays.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::publishers::PublishedBy;
use super::{Job, JobArgs, JobKind, JobState, UnreadableJob, query_jobs, unique_key};

/// The channel relays listen on. Inserting jobs notifies it (a statement-level trigger);
/// every other way back into the outbox goes through [`back_to_outbox`], which does too.
pub const NOTIFY_CHANNEL: &str = "kongflow_outbox";

/// What a claim took: the jobs to publish, and rows this build cannot read (claimed too,
/// so the caller must take their marks back).
#[derive(Debug, Default)]
pub struct Claimed {
    pub jobs: Vec<Job>,
    pub unreadable: Vec<UnreadableJob>,
    /// Due jobs stayed behind because their environment had no room in flight (or the
    /// batch was full): the caller should come back soon, as the workers make room.
    pub waiting: bool,
}

/// An environment's jobs of one kind in the outbox, and how many more of them may go out.
#[derive(Debug, Clone)]
struct Group {
    environment_id: Uuid,
    kind: String,
    /// `None`: no limit.
    room: Option<i64>,
}

/// Claim up to `limit` unpublished jobs and write their published mark, in the caller's
/// transaction; rows locked by another relay are skipped. A job due now becomes
/// `available`. The mark must be taken back ([`unmark`]) for every message the broker does
/// not confirm, before the transaction commits.
///
/// Fair across environments: each environment with due jobs of a kind in the outbox gets
/// the room it has in flight (`max_jobs_in_flight` less what it has published and not yet
/// final), at most an equal part of `limit`, its jobs by priority then due time. Groups
/// beyond `limit` wait for the next claim, which starts after `after` (the last group this
/// one served, returned), so every environment takes its turn. Jobs due later (into the
/// delay tiers) and discarded ones (to the dead letters) have no share: they go oldest
/// first, up to `limit` more.
pub async fn claim(
    tx: &mut PgConnection,
    limit: i64,
    after: Option<(Uuid, String)>,
) -> Result<(Claimed, Option<(Uuid, String)>), sqlx::Error> {
    let groups = sqlx::query_as!(
        Group,
        r#"WITH RECURSIVE g AS (
               (SELECT environment_id AS e, kind AS k FROM queue_jobs
                WHERE published_at IS NULL ORDER BY environment_id, kind LIMIT 1)
               UNION ALL
               SELECT n.e, n.k FROM g CROSS JOIN LATERAL (
                   SELECT environment_id AS e, kind AS k FROM queue_jobs
                   WHERE published_at IS NULL AND (environment_id, kind) > (g.e, g.k)
                   ORDER BY environment_id, kind LIMIT 1) n
           )
           SELECT g.e AS "environment_id!", g.k AS "kind!", queue_jobs_room(g.e, g.k) AS room
           FROM g"#
    )
    .fetch_all(&mut *tx)
    .await?;
    let plan = share(&groups, limit, after.as_ref());
    let rows = query_jobs!(
        r#"UPDATE queue_jobs
           SET published_at = now(),
               state = CASE WHEN state IN ('scheduled', 'retryable') AND run_at <= now()
                            THEN 'available'::queue_job_state ELSE state END
           WHERE id IN (
               SELECT x.id FROM UNNEST($1::uuid[], $2::text[], $3::int8[]) AS g(e, k, n)
               CROSS JOIN LATERAL (
                   SELECT id FROM queue_jobs
                   WHERE environment_id = g.e AND kind = g.k AND published_at IS NULL
                     AND state IN ('scheduled', 'available', 'retryable') AND run_at <= now()
                   ORDER BY priority, run_at, id
                   LIMIT g.n
                   FOR UPDATE SKIP LOCKED) x
               UNION ALL
               SELECT id FROM (
                   SELECT id FROM queue_jobs
                   WHERE published_at IS NULL
                     AND (state = 'discarded'
                          OR (state IN ('scheduled', 'available', 'retryable') AND run_at > now()))
                   ORDER BY run_at, id
                   LIMIT $4
                   FOR UPDATE SKIP LOCKED) later)
           RETURNING "#,
        "",
        &plan.envs,
        &plan.kinds,
        &plan.takes,
        limit,
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut claimed = Claimed {
        waiting: plan.waiting,
        ..Claimed::default()
    };
    for row in rows {
        match Job::try_from(row) {
            Ok(job) => claimed.jobs.push(job),
            Err(e) => claimed.unreadable.push(e),
        }
    }
    // A group whose take came back full may have more due jobs behind it (a due job comes
    // out of the claim `available`; one due later stays `scheduled` or `retryable`).
    let mut due: HashMap<(Uuid, &str), i64> = HashMap::new();
    for job in claimed
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Available)
    {
        *due.entry((job.environment_id, job.kind.as_str()))
            .or_default() += 1;
    }
    claimed.waiting |=
        plan.envs
            .iter()
            .zip(&plan.kinds)
            .zip(&plan.takes)
            .any(|((env, kind), take)| {
                due.get(&(*env, kind.as_str()))
                    .is_some_and(|got| got >= take)
            });
    claimed.jobs.sort_by_key(|j| (j.run_at, j.id));
    Ok((claimed, plan.last))
}

/// Hand the room that completed jobs leave in flight to their environments' next due jobs
/// of the same kind, in the completing transaction: up to `freed` of each
/// `(environment, kind)`, and no more than its room counted again here (a relay may have
/// filled some meanwhile: counting keeps the share from ratcheting up), are marked
/// published (by priority, then due time; rows another transaction holds are skipped) and
/// returned for the caller to publish once it commits, as the fast path does. So an
/// environment at its share keeps it full without waiting for a relay.
pub async fn refill(
    tx: &mut PgConnection,
    freed: &[(Uuid, JobKind, i64)],
    stamp: PublishedBy,
) -> Result<Vec<Job>, sqlx::Error> {
    if freed.is_empty() {
        return Ok(Vec::new());
    }
    let envs: Vec<Uuid> = freed.iter().map(|f| f.0).collect();
    let kinds: Vec<String> = freed.iter().map(|f| f.1.as_str().to_string()).collect();
    let takes: Vec<i64> = freed.iter().map(|f| f.2).collect();
    let rows = query_jobs!(
        r#"UPDATE queue_jobs
           SET published_at = now(), published_by = $4, publish_seq = $5,
               state = CASE WHEN state IN ('scheduled', 'retryable')
                            THEN 'available'::queue_job_state ELSE state END
           WHERE id IN (
               SELECT x.id FROM UNNEST($1::uuid[], $2::text[], $3::int8[]) AS g(e, k, n)
               -- LEAST ignores NULL: no limit leaves the freed count.
               CROSS JOIN LATERAL (SELECT LEAST(g.n, queue_jobs_room(g.e, g.k)) AS room) r
               CROSS JOIN LATERAL (
                   SELECT id FROM queue_jobs
                   WHERE environment_id = g.e AND kind = g.k AND published_at IS NULL
                     AND state IN ('scheduled', 'available', 'retryable') AND run_at <= now()
                   ORDER BY priority, run_at, id
                   LIMIT GREATEST(r.room, 0)
                   FOR UPDATE SKIP LOCKED) x)
           RETURNING "#,
        "",
        &envs,
        &kinds,
        &takes,
        stamp.publisher,
        stamp.seq,
    )
    .fetch_all(&mut *tx)
    .await?;
    // A row this build cannot read stays marked: the reconciler puts it back.
    Ok(rows
        .into_iter()
        .filter_map(|r| Job::try_from(r).ok())
        .collect())
}

/// How many due jobs a claim takes from each group.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    envs: Vec<Uuid>,
    kinds: Vec<String>,
    takes: Vec<i64>,
    /// The last group served (the next claim starts after it).
    last: Option<(Uuid, String)>,
    /// A group was left with no room, or out of this batch.
    waiting: bool,
}

/// Share `limit` between the groups (sorted by environment and kind): starting after
/// `after` and wrapping round, each group with room gets at most its room and at most an
/// equal part of `limit` (at least one), until `limit` is spent.
fn share(groups: &[Group], limit: i64, after: Option<&(Uuid, String)>) -> Plan {
    let mut plan = Plan::default();
    let with_room: Vec<&Group> = groups
        .iter()
        .filter(|g| g.room.is_none_or(|r| r > 0))
        .collect();
    plan.waiting = with_room.len() < groups.len();
    if with_room.is_empty() || limit <= 0 {
        return plan;
    }
    let start = after.map_or(0, |(e, k)| {
        with_room
            .iter()
            .position(|g| (g.environment_id, g.kind.as_str()) > (*e, k.as_str()))
            .unwrap_or(0)
    });
    let part = (limit / with_room.len() as i64).max(1);
    let mut left = limit;
    for i in 0..with_room.len() {
        if left <= 0 {
            plan.waiting = true;
            break;
        }
        let g = with_room[(start + i) % with_room.len()];
        let take = g.room.map_or(part, |r| r.min(part)).min(left);
        left -= take;
        plan.envs.push(g.environment_id);
        plan.kinds.push(g.kind.clone());
        plan.takes.push(take);
        plan.last = Some((g.environment_id, g.kind.clone()));
    }
    plan
}

/// Take back the published mark of claimed jobs whose message was not confirmed: they stay
/// in the outbox. No wake-up: the relay comes back to them on its next pass.
pub async fn unmark(tx: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query!(
        "UPDATE queue_jobs SET published_at = NULL, published_by = NULL, publish_seq = NULL
         WHERE id = ANY($1)",
        ids
    )
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

/// Put jobs back in the outbox (their message will be published again) and wake the
/// relays; in the caller's transaction, so both happen at its commit.
pub async fn back_to_outbox(tx: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let n = unmark(tx, ids).await?;
    if n > 0 {
        wake_relays(tx).await?;
    }
    Ok(n)
}

/// Notify the relays' channel (delivered at commit).
async fn wake_relays(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What waits in the ledger, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxStats {
    /// Jobs not yet published.
    pub backlog: i64,
    /// Seconds since the oldest of them was created or last attempted.
    pub oldest_age_secs: f64,
    /// Jobs published into the delay tiers and not yet due.
    pub delayed: i64,
}

pub async fn stats(pool: &PgPool) -> Result<OutboxStats, sqlx::Error> {
    let outbox = sqlx::query!(
        r#"SELECT count(*) AS "backlog!",
                  EXTRACT(EPOCH FROM now() - min(COALESCE(attempted_at, created_at)))::float8 AS oldest
           FROM queue_jobs
           WHERE published_at IS NULL
             AND state IN ('scheduled', 'available', 'retryable', 'discarded')"#
    )
    .fetch_one(pool)
    .await?;
    let delayed = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM queue_jobs
           WHERE state IN ('scheduled', 'retryable') AND published_at IS NOT NULL
             AND run_at > now()"#
    )
    .fetch_one(pool)
    .await?;
    Ok(OutboxStats {
        backlog: outbox.backlog,
        oldest_age_secs: outbox.oldest.unwrap_or(0.0).max(0.0),
        delayed,
    })
}

/// The `n` environments with the most due jobs waiting in the outbox (for room in flight,
/// or for a relay), most first, with how many (`tenants::paths` names them); and how many
/// due jobs wait in all, every environment's.
pub async fn top_backlogs(pool: &PgPool, n: i64) -> Result<(Vec<(Uuid, i64)>, i64), sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT environment_id AS "environment_id!", count(*) AS "waiting!",
                  (sum(count(*)) OVER ())::int8 AS "total!"
           FROM queue_jobs
           WHERE published_at IS NULL AND state IN ('scheduled', 'available', 'retryable')
             AND run_at <= now()
           GROUP BY environment_id ORDER BY count(*) DESC LIMIT $1"#,
        n
    )
    .fetch_all(pool)
    .await?;
    let total = rows.first().map_or(0, |r| r.total);
    Ok((
        rows.into_iter()
            .map(|r| (r.environment_id, r.waiting))
            .collect(),
        total,
    ))
}

/// Put back in the outbox the live jobs with these arguments that left it in an earlier
/// transaction: a request sent again (an event id already stored) re-arms its job, because
/// the process that committed it may have died before publishing it (the fast path). If its
/// message did go out, the second one finds the job final and has no effect. Returns how
/// many were put back.
pub async fn rearm_by_args(tx: &mut PgConnection, args: &[JobArgs]) -> Result<u64, sqlx::Error> {
    if args.is_empty() {
        return Ok(0);
    }
    let keys: Vec<Vec<u8>> = args.iter().map(unique_key).collect();
    let rearmed = sqlx::query_scalar!(
        r#"SELECT id FROM queue_jobs
           WHERE unique_key = ANY($1) AND state IN ('scheduled', 'available')
             AND published_at < now()
           FOR UPDATE SKIP LOCKED"#,
        &keys
    )
    .fetch_all(&mut *tx)
    .await?;
    back_to_outbox(tx, &rearmed).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u128, room: Option<i64>) -> Group {
        Group {
            environment_id: Uuid::from_u128(n),
            kind: "deliverEvent".into(),
            room,
        }
    }

    #[test]
    fn each_group_gets_its_room_within_an_equal_part() {
        let groups = [group(1, Some(32)), group(2, Some(3)), group(3, None)];
        let plan = share(&groups, 30, None);
        assert_eq!(plan.takes, vec![10, 3, 10]);
        assert!(!plan.waiting);
        assert_eq!(plan.last, Some((Uuid::from_u128(3), "deliverEvent".into())));
    }

    #[test]
    fn a_group_without_room_waits() {
        let plan = share(&[group(1, Some(0)), group(2, Some(5))], 100, None);
        assert_eq!(plan.envs, vec![Uuid::from_u128(2)]);
        assert_eq!(plan.takes, vec![5]);
        assert!(plan.waiting);
    }

    #[test]
    fn more_groups_than_the_batch_take_turns() {
        let groups: Vec<Group> = (1..=5).map(|n| group(n, Some(32))).collect();
        let first = share(&groups, 2, None);
        assert_eq!(first.envs, vec![Uuid::from_u128(1), Uuid::from_u128(2)]);
        assert!(first.waiting);
        let second = share(&groups, 2, first.last.as_ref());
        assert_eq!(second.envs, vec![Uuid::from_u128(3), Uuid::from_u128(4)]);
        let third = share(&groups, 2, second.last.as_ref());
        assert_eq!(third.envs, vec![Uuid::from_u128(5), Uuid::from_u128(1)]);
    }
}
