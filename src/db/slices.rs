//! Time slices of the tables written per event: `event_records` range-partitioned on its id
//! (a UUIDv7, so by the time the event was stored), `job_runs` and `webhook_attempts` on
//! their `event_record_id` with the same bounds, one slice a day (UTC). An event, its runs
//! and its webhook attempts share a slice, and retention (`events::retention`) detaches and
//! drops a settled slice whole instead of deleting its rows.
//!
//! [`partition`] turns the plain tables of a database into sliced ones, online (the command
//! `kongflow-events storage partition`): the existing tables become the legacy slice of each,
//! holding everything below a cut-over id, attached without a scan (a `CHECK` validated
//! beforehand, which does not stop writes); the slices from the cut-over on are created
//! empty. The swap holds the tables' locks for milliseconds. [`ensure`] creates the slices
//! ahead (the relay's retention pass, every `RETENTION_INTERVAL_MS`); the SQL function
//! `event_slices_ensure` does the work, so scripts and tests create past slices the same way.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The tables sliced together, each with the column its slices are bounded by, the event
/// table last: slices are dropped in this order, so a run's slice never outlives its
/// event's.
pub const SLICED_TABLES: [(&str, &str); 3] = [
    ("webhook_attempts", "event_record_id"),
    ("job_runs", "event_record_id"),
    ("event_records", "id"),
];

/// How many days of slices are kept ready ahead of today.
pub const DAYS_AHEAD: i32 = 7;

/// One slice of `event_records` (and of the tables sliced with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// The day (UTC) of a daily slice; `None` for the legacy slice.
    pub day: Option<NaiveDate>,
    /// Its first id (the nil id for the legacy slice, which starts at `MINVALUE`).
    pub lower: Uuid,
    /// Ids from here on are in later slices.
    pub upper: Uuid,
}

impl Slice {
    /// The partition's name in `table` (one of [`SLICED_TABLES`]).
    pub fn name(&self, table: &str) -> String {
        match self.day {
            Some(day) => format!("{table}_p{}", day.format("%Y%m%d")),
            None => format!("{table}_legacy"),
        }
    }

    /// The time the slice's events end: its upper bound's UUIDv7 time.
    pub fn ends(&self) -> DateTime<Utc> {
        uuid_time(self.upper)
    }
}

/// A statement naming a slice: the names are made here from a table of [`SLICED_TABLES`] and
/// a day, or read from the catalog, never from input.
pub(super) fn sql(statement: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(statement)
}

/// The time in a UUIDv7's first 48 bits (milliseconds since 1970).
pub fn uuid_time(id: Uuid) -> DateTime<Utc> {
    let ms = (id.as_u128() >> 80) as i64;
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

/// Whether `event_records` is sliced in this database.
pub async fn is_sliced(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table
                        WHERE partrelid = to_regclass('event_records'))",
    )
    .fetch_one(conn)
    .await
}

/// The slices of `event_records`, oldest first (the legacy slice, if any, first). Empty
/// where the table is not sliced.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<Slice>, sqlx::Error> {
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        r#"SELECT c.relname::text,
                  substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \(''([0-9a-f-]{36})''\)'),
                  substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([0-9a-f-]{36})''\)')
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = to_regclass('event_records') AND NOT i.inhdetachpending"#,
    )
    .fetch_all(conn)
    .await?;
    let mut slices: Vec<Slice> = rows
        .into_iter()
        .filter_map(|(name, lower, upper)| {
            let upper = Uuid::parse_str(&upper).ok()?;
            let lower = match lower {
                Some(lower) => Uuid::parse_str(&lower).ok()?,
                None => Uuid::nil(),
            };
            let day = match name.strip_prefix("event_records_p") {
                Some(d) => Some(NaiveDate::parse_from_str(d, "%Y%m%d").ok()?),
                None if name == "event_records_legacy" => None,
                None => return None,
            };
            Some(Slice { day, lower, upper })
        })
        .collect();
    slices.sort_by_key(|s| s.upper);
    Ok(slices)
}

/// Create the missing slices from yesterday to [`DAYS_AHEAD`] days ahead. Returns how many
/// tables were created (0 where the tables are not sliced).
pub async fn ensure<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT event_slices_ensure((now() AT TIME ZONE 'UTC')::date - 1,
                                    (now() AT TIME ZONE 'UTC')::date + $1)",
    )
    .bind(DAYS_AHEAD)
    .fetch_one(db)
    .await
}

/// Which of `ids` (events of the slice) is neither delivered nor cancelled: one, if any.
/// Looked up by id in the slice alone.
pub async fn unsettled_among(
    conn: &mut PgConnection,
    slice: &Slice,
    ids: &[Uuid],
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(sql(format!(
        "SELECT id FROM {} WHERE id = ANY($1) AND delivered_at IS NULL AND cancelled_at IS NULL
         LIMIT 1",
        slice.name("event_records")
    )))
    .bind(ids)
    .fetch_optional(conn)
    .await
}

/// The newest event of a slice's time (its UUIDv7 time), `None` when it is empty.
pub async fn newest(
    conn: &mut PgConnection,
    slice: &Slice,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let newest: Option<Uuid> = sqlx::query_scalar(sql(format!(
        "SELECT id FROM {} ORDER BY id DESC LIMIT 1",
        slice.name("event_records")
    )))
    .fetch_optional(conn)
    .await?;
    Ok(newest.map(uuid_time))
}

/// What dropping a slice removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub events: u64,
    pub runs: u64,
}

/// Detach a slice from each of [`SLICED_TABLES`] (`CONCURRENTLY`: inserts and reads of the
/// other slices go on) and drop it, counting its events and runs (by the planner's
/// estimate where the slice was analyzed). A detach that an earlier
/// pass began and did not finish is finished first (`FINALIZE`). Not in a transaction.
pub async fn drop_slice(conn: &mut PgConnection, slice: &Slice) -> Result<Dropped, sqlx::Error> {
    // Its events' keys are forgotten after it, paced ([`forget_gone_keys`]); from here on
    // they are stale: a send of one of their ids takes the key over (their events are past
    // the retention already).
    sqlx::query(
        "INSERT INTO event_keys_gone (lower, upper) VALUES ($1, $2)
         ON CONFLICT (lower) DO UPDATE SET upper = GREATEST(event_keys_gone.upper, EXCLUDED.upper)",
    )
    .bind(slice.lower)
    .bind(slice.upper)
    .execute(&mut *conn)
    .await?;
    let mut dropped = Dropped::default();
    for (table, _) in SLICED_TABLES {
        let name = slice.name(table);
        let state: Option<bool> = sqlx::query_scalar(
            "SELECT i.inhdetachpending FROM pg_inherits i
             WHERE i.inhrelid = to_regclass($1) AND i.inhparent = to_regclass($2)",
        )
        .bind(&name)
        .bind(table)
        .fetch_optional(&mut *conn)
        .await?;
        match state {
            Some(false) => {
                sqlx::query(sql(format!(
                    "ALTER TABLE {table} DETACH PARTITION {name} CONCURRENTLY"
                )))
                .execute(&mut *conn)
                .await?;
            }
            Some(true) => {
                sqlx::query(sql(format!(
                    "ALTER TABLE {table} DETACH PARTITION {name} FINALIZE"
                )))
                .execute(&mut *conn)
                .await?;
            }
            None => {}
        }
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        if !exists {
            continue;
        }
        // Counted by the planner's estimate where the slice has one (analyzed): a count
        // would read the whole slice again, a second of a core for a million rows.
        let rows: i64 = sqlx::query_scalar(sql(format!(
            "SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::int8
                         ELSE (SELECT count(*) FROM {name}) END
             FROM pg_class c WHERE c.oid = to_regclass($1)"
        )))
        .bind(&name)
        .fetch_one(&mut *conn)
        .await?;
        match table {
            "event_records" => dropped.events = rows as u64,
            "job_runs" => dropped.runs = rows as u64,
            _ => {}
        }
        sqlx::query(sql(format!("DROP TABLE {name}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(dropped)
}

/// Keys filled in or forgotten per statement.
const KEYS_BATCH: i32 = 10_000;

/// How the keys of dropped slices are forgotten: at most `work` of statements in one call,
/// each batch followed by a pause that keeps the statements to `duty` of the time, and no
/// pause once `stop` is cancelled (the call returns).
#[derive(Debug, Clone)]
pub struct Pace {
    pub work: Duration,
    pub duty: f64,
    pub stop: CancellationToken,
}

impl Pace {
    /// Retention's: a twentieth of a core, and about `interval` (its pass interval) in all.
    /// 1,000,000 keys are under a second of statements here (docs/operations.md).
    pub fn within(interval: Duration, stop: CancellationToken) -> Self {
        const DUTY: f64 = 0.05;
        Self {
            work: interval.mul_f64(DUTY),
            duty: DUTY,
            stop,
        }
    }

    /// No pause and no bound.
    pub fn flat_out() -> Self {
        Self {
            work: Duration::MAX,
            duty: 1.0,
            stop: CancellationToken::new(),
        }
    }
}

/// What [`forget_gone_keys`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Keys deleted (a key a send took over meanwhile counted too).
    pub keys: u64,
    /// Whether some are left for the next call (its `work` ran out).
    pub more: bool,
}

/// Delete the keys of the events of the slices that went (`event_keys_gone`, oldest range
/// first; a range is struck off once its keys are gone), [`KEYS_BATCH`] a statement, each
/// its own transaction, paced by `pace`. Then the keys below `oldest` (the oldest slice
/// kept), which no stored event can have: keys written apart from their events (a
/// script's, say) while their slice went; where there are none, a look at the BRIN index.
pub async fn forget_gone_keys(
    conn: &mut PgConnection,
    oldest: Option<&Slice>,
    pace: &Pace,
) -> Result<Forgotten, sqlx::Error> {
    let mut ranges: Vec<(Uuid, Uuid)> =
        sqlx::query_as("SELECT lower, upper FROM event_keys_gone ORDER BY lower")
            .fetch_all(&mut *conn)
            .await?;
    if let Some(oldest) = oldest.filter(|o| !o.lower.is_nil()) {
        ranges.push((Uuid::nil(), oldest.lower));
    }
    let mut done = Forgotten::default();
    let mut spent = Duration::ZERO;
    for (lower, upper) in ranges {
        loop {
            if spent >= pace.work {
                done.more = true;
                return Ok(done);
            }
            let started = std::time::Instant::now();
            let looked: i32 = sqlx::query_scalar("SELECT event_keys_forget($1, $2, $3)")
                .bind(lower)
                .bind(upper)
                .bind(KEYS_BATCH)
                .fetch_one(&mut *conn)
                .await?;
            let took = started.elapsed();
            spent += took;
            done.keys += looked as u64;
            if looked < KEYS_BATCH {
                // Struck off (the range below `oldest` is not listed, or listed exactly
                // and done all the same).
                sqlx::query("DELETE FROM event_keys_gone WHERE lower = $1 AND upper = $2")
                    .bind(lower)
                    .bind(upper)
                    .execute(&mut *conn)
                    .await?;
                break;
            }
            if pace.duty < 1.0 {
                tokio::select! {
                    _ = pace.stop.cancelled() => {
                        done.more = true;
                        return Ok(done);
                    }
                    _ = tokio::time::sleep(took.mul_f64(1.0 / pace.duty - 1.0)) => {}
                }
            }
        }
    }
    Ok(done)
}

/// Fill in the `event_keys` of every stored event that lacks one, in batches (each its own
/// statement): for the rows stored before sends kept keys (see [`partition`]).
async fn fill_keys(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let mut after: Option<Uuid> = None;
    loop {
        after = sqlx::query_scalar("SELECT event_keys_fill($1, $2)")
            .bind(after)
            .bind(KEYS_BATCH)
            .fetch_one(&mut *conn)
            .await?;
        if after.is_none() {
            return Ok(());
        }
    }
}

/// Slice the tables of a new installation (no environment yet, so no event stored and no
/// older build serving one): what `migrate`, and every process that migrates at start,
/// does after the migrations. An installation with environments is sliced by the operator
/// (`storage partition`), once no older build runs. Returns whether it sliced them now.
pub async fn slice_if_new(pool: &PgPool) -> Result<bool, PartitionError> {
    let new: bool = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_partitioned_table
                            WHERE partrelid = 'event_records'::regclass)
            AND NOT EXISTS (SELECT 1 FROM runtime_environments)",
    )
    .fetch_one(pool)
    .await?;
    if !new {
        return Ok(false);
    }
    Ok(partition(pool, Duration::from_secs(3600)).await? != Partitioned::Already)
}

/// What [`partition`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitioned {
    /// The tables were sliced already.
    Already,
    /// The tables were empty: replaced by sliced ones, no legacy slice.
    Empty,
    /// The tables became the legacy slices, holding the ids below `cutover`.
    Legacy { cutover: Uuid, took: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error(
        "event_records holds ids at or above the cut-over {cutover} (not UUIDv7 ids of \
         their time): the legacy slice would not hold them; delete or re-id them, or give a \
         later cut-over with --margin"
    )]
    IdsAboveCutover { cutover: Uuid },
}

/// Turn the plain per-event tables into sliced ones, online. Each step its own transaction:
/// (1) a `CHECK (id < cut-over)` on each table, `NOT VALID` (the cut-over `margin` from now:
/// rows stored until the swap must fall below it), (2) validated (reads the tables; writes
/// go on), (3) the keys the slices need built `CONCURRENTLY` (job_runs' and
/// webhook_attempts' primary keys must hold the partition key), (4) the swap: the plain
/// tables renamed to `*_legacy`, partitioned tables made in their place with the same
/// columns, keys, indexes and triggers, the legacy tables attached below the cut-over (the
/// validated checks spare the scan), or dropped when empty; then the slices from the
/// cut-over to [`DAYS_AHEAD`] days ahead. Run again after an interruption, it goes on from
/// where it stopped. Run it once every process runs a build that has it (older builds name
/// the unique constraint the sliced table cannot have). `storage partition` runs it with
/// the tenant keys after it (`app::partition_storage`).
pub async fn partition(pool: &PgPool, margin: Duration) -> Result<Partitioned, PartitionError> {
    let mut conn = pool.acquire().await?;
    // One at a time: a second run waits, then finds the tables sliced.
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SLICING_LOCK)
        .execute(&mut *conn)
        .await?;
    let result = partition_locked(&mut conn, margin).await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SLICING_LOCK)
        .execute(&mut *conn)
        .await?;
    result
}

/// The advisory lock [`partition`] holds.
pub const SLICING_LOCK: i64 = 0x006b_6673_6c69_6365; // "kfslice"

async fn partition_locked(
    conn: &mut PgConnection,
    margin: Duration,
) -> Result<Partitioned, PartitionError> {
    if is_sliced(&mut *conn).await? {
        // Tables sliced by the previous release, whose sends kept no keys.
        fill_keys(&mut *conn).await?;
        ensure(&mut *conn).await?;
        return Ok(Partitioned::Already);
    }
    let started = std::time::Instant::now();
    let empty: bool = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM event_records) AND NOT EXISTS (SELECT 1 FROM job_runs)
            AND NOT EXISTS (SELECT 1 FROM webhook_attempts)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let cutover = if empty {
        None
    } else {
        let cutover = bound_below_cutover(conn, margin).await?;
        // Sends keep keys from step (1) on (its check is their sign: `events::NewEvents`):
        // the rows before it get theirs here, so the keys are whole when the slices' own
        // unique indexes stop spanning the table.
        fill_keys(&mut *conn).await?;
        Some(cutover)
    };
    build_key(
        &mut *conn,
        "job_runs_slice_key",
        "job_runs (id, event_record_id)",
    )
    .await?;
    build_key(
        &mut *conn,
        "webhook_attempts_slice_key",
        "webhook_attempts (environment_id, id, event_record_id)",
    )
    .await?;
    let outcome = swap(conn, cutover).await?;
    Ok(match outcome {
        Some(cutover) => Partitioned::Legacy {
            cutover,
            took: started.elapsed(),
        },
        None => Partitioned::Empty,
    })
}

/// Steps (1) and (2): the checks added (or the cut-over of those an interrupted run added),
/// then validated.
async fn bound_below_cutover(
    conn: &mut PgConnection,
    margin: Duration,
) -> Result<Uuid, PartitionError> {
    let existing: Option<String> = sqlx::query_scalar(
        r#"SELECT substring(pg_get_constraintdef(oid) FROM '''([0-9a-f-]{36})''')
           FROM pg_constraint WHERE conname = 'event_records_below_cutover'"#,
    )
    .fetch_optional(&mut *conn)
    .await?;
    let cutover = match existing.and_then(|c| Uuid::parse_str(&c).ok()) {
        Some(c) => c,
        None => {
            sqlx::query_scalar("SELECT uuid_v7_floor(now() + make_interval(secs => $1))")
                .bind(margin.as_secs_f64())
                .fetch_one(&mut *conn)
                .await?
        }
    };
    let above: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM event_records WHERE id >= $1)")
            .bind(cutover)
            .fetch_one(&mut *conn)
            .await?;
    if above {
        return Err(PartitionError::IdsAboveCutover { cutover });
    }
    // The event table's first: a run cut short after it is taken up with its cut-over.
    for (table, column) in SLICED_TABLES.iter().rev() {
        sqlx::query(sql(format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{table}_below_cutover') THEN
                 SET LOCAL lock_timeout = '5s';
                 ALTER TABLE {table} ADD CONSTRAINT {table}_below_cutover
                   CHECK ({column} < '{cutover}') NOT VALID;
               END IF;
             END $$"
        )))
        .execute(&mut *conn)
        .await?;
    }
    for (table, _) in SLICED_TABLES {
        sqlx::query(sql(format!(
            "ALTER TABLE {table} VALIDATE CONSTRAINT {table}_below_cutover"
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(cutover)
}

/// Step (3): a unique index built without stopping writes; one left invalid by an
/// interrupted build is dropped and built again.
pub(super) async fn build_key(
    conn: &mut PgConnection,
    name: &str,
    on: &str,
) -> Result<(), sqlx::Error> {
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    match valid {
        Some(true) => return Ok(()),
        Some(false) => {
            sqlx::query(sql(format!("DROP INDEX CONCURRENTLY {name}")))
                .execute(&mut *conn)
                .await?;
        }
        None => {}
    }
    sqlx::query(sql(format!(
        "CREATE UNIQUE INDEX CONCURRENTLY {name} ON {on}"
    )))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Step (4), in one transaction holding the three tables' locks for its few milliseconds
/// (waiting at most 5 s for them, so a long query ahead fails the step instead of stalling
/// every insert behind it).
async fn swap(conn: &mut PgConnection, before: Option<Uuid>) -> Result<Option<Uuid>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("LOCK TABLE event_records, job_runs, webhook_attempts IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(SWAP).execute(&mut *tx).await?;
    // Rows that came after step (1) found the tables empty: take them along below a cut-over
    // made now (a scan under the lock, of those few rows).
    let now_empty: bool = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM event_records_legacy)
            AND NOT EXISTS (SELECT 1 FROM job_runs_legacy)
            AND NOT EXISTS (SELECT 1 FROM webhook_attempts_legacy)",
    )
    .fetch_one(&mut *tx)
    .await?;
    let cutover = match (now_empty, before) {
        (true, _) => None,
        (false, Some(c)) => Some(c),
        (false, None) => Some(
            sqlx::query_scalar("SELECT uuid_v7_floor(now() + interval '1 minute')")
                .fetch_one(&mut *tx)
                .await?,
        ),
    };
    match cutover {
        None => {
            sqlx::raw_sql(
                "DROP TABLE webhook_attempts_legacy, job_runs_legacy, event_records_legacy",
            )
            .execute(&mut *tx)
            .await?;
        }
        Some(cutover) => {
            for (table, _) in SLICED_TABLES {
                sqlx::query(sql(format!(
                    "ALTER TABLE {table} ATTACH PARTITION {table}_legacy
                     FOR VALUES FROM (MINVALUE) TO ('{cutover}')"
                )))
                .execute(&mut *tx)
                .await?;
                sqlx::query(sql(format!(
                    "ALTER TABLE {table}_legacy DROP CONSTRAINT IF EXISTS {table}_below_cutover"
                )))
                .execute(&mut *tx)
                .await?;
            }
            if before.is_none() {
                // Stored after the tables were found empty, so before sends kept keys:
                // theirs, under the lock (a few rows).
                sqlx::query("SELECT event_keys_fill(NULL, 2147483647)")
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    ensure(&mut *tx).await?;
    tx.commit().await?;
    Ok(cutover)
}

/// The swap's renames and new tables (see [`partition`]). The plain tables keep their
/// columns, defaults and checks as legacy slices; their indexes are renamed so the
/// partitioned tables' indexes take the names the plain ones had.
const SWAP: &str = r#"
ALTER TABLE event_records RENAME TO event_records_legacy;
ALTER INDEX event_records_pkey RENAME TO event_records_legacy_pkey;
ALTER INDEX event_records_environment_timestamp_idx RENAME TO event_records_legacy_environment_timestamp_idx;
ALTER INDEX event_records_created_brin RENAME TO event_records_legacy_created_brin;
ALTER INDEX event_records_environment_id_event_id_key RENAME TO event_records_legacy_event_id_key;
CREATE TABLE event_records (LIKE event_records_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (id);
ALTER TABLE event_records
    ADD CONSTRAINT event_records_payload_type_check CHECK (payload_type IN ('JSON', 'REQUEST')),
    ADD CONSTRAINT event_records_pkey PRIMARY KEY (id);
CREATE INDEX event_records_environment_timestamp_idx ON event_records (environment_id, timestamp, id);
CREATE INDEX event_records_created_brin ON event_records USING brin (created_at);

ALTER TABLE job_runs RENAME TO job_runs_legacy;
ALTER TABLE job_runs_legacy DROP CONSTRAINT job_runs_pkey;
ALTER TABLE job_runs_legacy ADD CONSTRAINT job_runs_legacy_pkey PRIMARY KEY USING INDEX job_runs_slice_key;
ALTER INDEX job_runs_environment_idx RENAME TO job_runs_legacy_environment_idx;
ALTER INDEX job_runs_event_record_id_dispatcher_id_job_version_id_key RENAME TO job_runs_legacy_run_key;
CREATE TABLE job_runs (LIKE job_runs_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (event_record_id);
ALTER TABLE job_runs
    ADD CONSTRAINT job_runs_pkey PRIMARY KEY (id, event_record_id),
    ADD CONSTRAINT job_runs_event_record_id_dispatcher_id_job_version_id_key
        UNIQUE (event_record_id, dispatcher_id, job_version_id);
CREATE INDEX job_runs_environment_idx ON job_runs (environment_id, created_at);

ALTER TABLE webhook_attempts RENAME TO webhook_attempts_legacy;
ALTER SEQUENCE webhook_attempts_id_seq OWNED BY NONE;
DROP TRIGGER webhook_attempts_environment ON webhook_attempts_legacy;
ALTER TABLE webhook_attempts_legacy DROP CONSTRAINT webhook_attempts_pkey;
ALTER TABLE webhook_attempts_legacy
    ADD CONSTRAINT webhook_attempts_legacy_pkey PRIMARY KEY USING INDEX webhook_attempts_slice_key;
ALTER INDEX webhook_attempts_dispatcher_idx RENAME TO webhook_attempts_legacy_dispatcher_idx;
ALTER TABLE webhook_attempts_legacy
    RENAME CONSTRAINT webhook_attempts_dispatcher_fkey TO webhook_attempts_legacy_dispatcher_fkey;
CREATE TABLE webhook_attempts (LIKE webhook_attempts_legacy INCLUDING DEFAULTS)
    PARTITION BY RANGE (event_record_id);
ALTER SEQUENCE webhook_attempts_id_seq OWNED BY webhook_attempts.id;
ALTER TABLE webhook_attempts
    ADD CONSTRAINT webhook_attempts_pkey PRIMARY KEY (environment_id, id, event_record_id),
    ADD CONSTRAINT webhook_attempts_dispatcher_fkey FOREIGN KEY (environment_id, dispatcher_id)
        REFERENCES event_dispatchers (environment_id, id) ON DELETE CASCADE;
CREATE INDEX webhook_attempts_dispatcher_idx ON webhook_attempts (dispatcher_id, id);
CREATE TRIGGER webhook_attempts_environment BEFORE INSERT ON webhook_attempts
    FOR EACH ROW WHEN (NEW.environment_id IS NULL)
    EXECUTE FUNCTION webhook_attempts_environment();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_v7_tells_its_time() {
        let t = DateTime::parse_from_rfc3339("2026-12-06T10:20:30.456Z")
            .unwrap()
            .with_timezone(&Utc);
        let id = Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            t.timestamp() as u64,
            t.timestamp_subsec_nanos(),
        ));
        assert_eq!(uuid_time(id), t);
    }

    #[test]
    fn slices_are_named_by_day_or_legacy() {
        let day = Slice {
            day: NaiveDate::from_ymd_opt(2026, 12, 6),
            lower: Uuid::nil(),
            upper: Uuid::nil(),
        };
        assert_eq!(day.name("job_runs"), "job_runs_p20261206");
        let legacy = Slice {
            day: None,
            lower: Uuid::nil(),
            upper: Uuid::nil(),
        };
        assert_eq!(legacy.name("event_records"), "event_records_legacy");
    }
}
