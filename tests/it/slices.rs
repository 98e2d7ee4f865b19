//! The time slices of the per-event tables (db::slices): retention drops a settled
//! slice whole and keeps one that holds a due event; a producer's id stays unique across
//! slices, also between two sends racing over a slice's edge, and is stored again once its
//! slice went, before its key is forgotten; a send a connection first prepares during the
//! slicing's swap keeps its key; and a database with 1,000,000 events is sliced while
//! events keep coming, losing none.

use std::time::Duration;

use kongflow_events::db::slices::{self, Pace, Partitioned};
use kongflow_events::events::retention;
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

use crate::helpers::{TestApp, job_body, wait_until};

/// Move the events `event_ids` of `env` (with their runs, webhook attempts and delivery
/// jobs) `days` back in time: their ids (the slice key) and `created_at`, as if they had
/// been stored then. Creates the slices of those days.
async fn age(app: &TestApp, env: Uuid, event_ids: &[&str], days: i32) {
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT event_slices_ensure(((now() AT TIME ZONE 'UTC') - make_interval(days => $1 + 1))::date,
                                    ((now() AT TIME ZONE 'UTC') - make_interval(days => $1 - 1))::date)",
    )
    .bind(days)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TEMP TABLE moved ON COMMIT DROP AS
         SELECT id AS old, make_interval(days => $2) AS back,
                (lpad(to_hex(floor(extract(epoch FROM uuid_v7_time(id) - make_interval(days => $2))
                                   * 1000)::bigint), 12, '0')
                 || substr(replace(id::text, '-', ''), 13))::uuid AS new
         FROM event_records WHERE environment_id = $1 AND event_id = ANY($3)",
    )
    .bind(env)
    .bind(days)
    .bind(event_ids)
    .execute(&mut *tx)
    .await
    .unwrap();
    for step in [
        "UPDATE job_runs r SET event_record_id = m.new FROM moved m WHERE r.event_record_id = m.old",
        "UPDATE webhook_attempts a SET event_record_id = m.new FROM moved m
         WHERE a.event_record_id = m.old",
        "UPDATE queue_jobs j SET args = jsonb_set(args, '{id}', to_jsonb(m.new::text))
         FROM moved m WHERE j.kind = 'deliverEvent' AND j.args->>'id' = m.old::text",
        "UPDATE event_records e SET id = m.new, created_at = e.created_at - m.back
         FROM moved m WHERE e.id = m.old",
        "UPDATE event_keys k SET record_id = m.new FROM moved m WHERE k.record_id = m.old",
    ] {
        sqlx::query(step).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// The day (UTC) `days` ago, as slices name it.
async fn day_ago(app: &TestApp, days: i32) -> String {
    sqlx::query_scalar(
        "SELECT to_char((now() AT TIME ZONE 'UTC') - make_interval(days => $1), 'YYYYMMDD')",
    )
    .bind(days)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn exists(app: &TestApp, table: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Store `n` delivered events named "planted" (ids `planted-1` ..) in `env`, one a second
/// from `days_ago` on, and a finished run each, directly in the tables; then analyze them.
async fn plant(app: &TestApp, env: Uuid, n: i64, days_ago: i32) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO event_records (id, environment_id, event_id, name, payload, created_at,
                                    deliver_at, delivered_at)
         SELECT uuid_v7_floor(t), '{env}', 'planted-' || g, 'planted', jsonb_build_object('g', g), t, t, t
         FROM generate_series(1, {n}) g,
              LATERAL (SELECT now() - make_interval(days => {days_ago}) + g * interval '1 second') AS ts(t);
         INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id,
                               dispatcher_id, status, created_at)
         SELECT gen_random_uuid(), environment_id, gen_random_uuid(), gen_random_uuid(), id,
                gen_random_uuid(), 'SUCCESS', created_at
         FROM event_records WHERE name = 'planted';
         ANALYZE event_records; ANALYZE job_runs;"
    )))
    .execute(&app.pool)
    .await
    .unwrap();
}

/// Send the event `id` again through the API: it is answered, and the event is still
/// stored once.
async fn resend_stores_nothing(app: &TestApp, id: &str) {
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "migrating", "id": id}}),
    )
    .await;
    let copies: i64 = sqlx::query_scalar("SELECT count(*) FROM event_records WHERE event_id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(copies, 1, "{id} stored again");
}

async fn runs_of(app: &TestApp, env: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM job_runs WHERE environment_id = $1")
        .bind(env)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// The event ids `env` has in `table` (`event_records`, or `event_keys`), in order.
async fn event_ids_in(app: &TestApp, table: &str, env: Uuid) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT event_id FROM {table} WHERE environment_id = $1 ORDER BY event_id"
    )))
    .bind(env)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn event_ids(app: &TestApp, env: Uuid) -> Vec<String> {
    event_ids_in(app, "event_records", env).await
}

async fn keys_of(app: &TestApp, env: Uuid) -> Vec<String> {
    event_ids_in(app, "event_keys", env).await
}

/// Run `statements` in a transaction of another connection, and send the event `id` through
/// the API meanwhile: the send waits for that transaction's commit, then is answered.
async fn sends_waiting_for(app: &TestApp, statements: String, id: &str) {
    let mut other = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = other.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(statements))
        .execute(&mut *tx)
        .await
        .unwrap();
    let send = {
        let (http, url, key) = (
            app.http.clone(),
            format!("{}/api/v1/events", app.base_url),
            app.api_key.clone(),
        );
        let body = json!({"event": {"name": "n", "id": id}});
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !send.is_finished(),
        "the send waits for the other one's commit"
    );
    tx.commit().await.unwrap();
    assert!(send.await.unwrap().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_slice_goes_whole_and_one_holding_a_due_event_stays_until_it_settles() {
    let app = TestApp::builder().start().await;
    let env = app.env.id;
    app.put_job(&app.api_key, "job", job_body("sliced", json!({})))
        .await;
    let names = ["old-0", "old-1", "old-2", "held-0", "held-1", "fresh"];
    for id in names {
        app.send_event(&app.api_key, json!({"event": {"name": "sliced", "id": id}}))
            .await;
    }
    // Due in a day: pending, however old its slice.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "sliced", "id": "later"}, "options": {"deliverAfter": 86_400}}),
    )
    .await;
    wait_until("six runs", Duration::from_secs(30), || async {
        runs_of(&app, env).await == 6
    })
    .await;
    age(&app, env, &["old-0", "old-1", "old-2"], 41).await;
    age(&app, env, &["held-0", "held-1", "later"], 40).await;
    let (d41, d40) = (day_ago(&app, 41).await, day_ago(&app, 40).await);
    assert!(exists(&app, &format!("event_records_p{d41}")).await);

    let maintenance = app.relay().maintenance().clone();
    let batches = maintenance.retain_events().await.unwrap();
    // The slice of 41 days ago went whole, with its runs: one entry, no row deleted.
    assert_eq!((batches[0].events, batches[0].runs), (3, 3), "{batches:?}");
    for table in ["event_records", "job_runs", "webhook_attempts"] {
        assert!(!exists(&app, &format!("{table}_p{d41}")).await, "{table}");
        assert!(exists(&app, &format!("{table}_p{d40}")).await, "{table}");
    }
    // The slice of 40 days ago holds "later": it stays, and its settled events go row by row.
    let events: u64 = batches.iter().map(|b| b.events).sum();
    assert_eq!(events, 5, "{batches:?}");
    assert_eq!(event_ids(&app, env).await, ["fresh", "later"]);
    // Another pass: "later"'s delivery job is still to run, so the slice stays.
    maintenance.retain_events().await.unwrap();
    assert!(exists(&app, &format!("event_records_p{d40}")).await);

    let cancelled = app
        .http
        .post(format!("{}/api/v1/events/later/cancel", app.base_url))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    assert!(cancelled.status().is_success());
    let batches = maintenance.retain_events().await.unwrap();
    let events: u64 = batches.iter().map(|b| b.events).sum();
    assert_eq!(events, 1, "{batches:?}");
    assert!(!exists(&app, &format!("event_records_p{d40}")).await);
    assert_eq!(event_ids(&app, env).await, ["fresh"]);
    // The keys went with their events, by slice and row by row: an id past the retention
    // can be stored again.
    assert_eq!(keys_of(&app, env).await, ["fresh"]);
    let again = app
        .send_event(
            &app.api_key,
            json!({"event": {"name": "sliced", "id": "old-0"}}),
        )
        .await;
    assert_eq!(again["id"], "old-0");
    assert_eq!(event_ids(&app, env).await, ["fresh", "old-0"]);
    // A key below the oldest slice (written apart from its event while the slice went) is
    // deleted by the next pass.
    sqlx::query(
        "INSERT INTO event_keys (environment_id, event_id, record_id)
         VALUES ($1, 'stray', uuid_v7_floor(now() - interval '60 days'))",
    )
    .bind(env)
    .execute(&app.pool)
    .await
    .unwrap();
    maintenance.retain_events().await.unwrap();
    assert_eq!(keys_of(&app, env).await, ["fresh", "old-0"]);
    // The slices ahead are there; the fresh event's run stayed (and old-0, stored again,
    // has a run of its own, or is about to).
    let mut conn = app.pool.acquire().await.unwrap();
    let all = slices::list(&mut conn).await.unwrap();
    assert!(all.len() >= slices::DAYS_AHEAD as usize + 2, "{all:?}");
    assert!(
        all.iter().all(|s| s.day.is_some()),
        "no legacy slice: {all:?}"
    );
    wait_until("old-0 run again", Duration::from_secs(30), || async {
        runs_of(&app, env).await == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_stored_in_an_older_slice_is_not_stored_again_even_by_a_racing_send() {
    let app = TestApp::builder().start().await;
    let env = app.env.id;
    app.send_event(&app.api_key, json!({"event": {"name": "n", "id": "once"}}))
        .await;
    age(&app, env, &["once"], 3).await;
    // Sent again, in today's slice: the stored one answers.
    let again = app
        .send_event(&app.api_key, json!({"event": {"name": "n", "id": "once"}}))
        .await;
    assert_eq!(again["id"], "once");
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM event_records WHERE environment_id = $1 AND event_id = $2",
        )
        .bind(env)
        .bind("racing")
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    assert_eq!(event_ids(&app, env).await, ["once"]);

    // A send that stores "racing" in yesterday's slice and has not committed yet: a send of
    // the same id through the API waits for it, then finds it.
    sends_waiting_for(
        &app,
        format!(
            "INSERT INTO event_keys (environment_id, event_id, record_id)
             VALUES ('{env}', 'racing', uuid_v7_floor(now() - interval '1 day'));
             INSERT INTO event_records (id, environment_id, event_id, name, delivered_at)
             VALUES (uuid_v7_floor(now() - interval '1 day'), '{env}', 'racing', 'n', now())"
        ),
        "racing",
    )
    .await;
    assert_eq!(count().await, 1);
}

/// Retention drops a slice and forgets its events' keys after it, paced: until then the
/// keys are stale, and one of their ids is stored again, once, even by two sends racing;
/// the keys forgotten later leave the ones taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_key_of_a_dropped_slice_is_taken_over_once_even_by_racing_sends() {
    let app = TestApp::builder().start().await;
    let env = app.env.id;
    let names = ["gone-0", "gone-1", "gone-2"];
    for id in names {
        app.send_event(&app.api_key, json!({"event": {"name": "n", "id": id}}))
            .await;
    }
    wait_until("three delivered", Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM event_records WHERE environment_id = $1 AND delivered_at IS NOT NULL",
        )
        .bind(env)
        .fetch_one(&app.pool)
        .await
        .unwrap()
            == 3
    })
    .await;
    age(&app, env, &names, 41).await;
    let d41 = day_ago(&app, 41).await;
    // A pass with no time for keys: the slice goes, its keys stay, listed as gone.
    let no_time = Pace {
        work: Duration::ZERO,
        ..Pace::flat_out()
    };
    let keep = Duration::from_secs(30 * 86_400);
    let batches = retention::retain(&app.pool, keep, 100, &no_time)
        .await
        .unwrap();
    assert_eq!((batches[0].events, batches[0].keys), (3, 0), "{batches:?}");
    assert!(!exists(&app, &format!("event_records_p{d41}")).await);
    assert!(event_ids(&app, env).await.is_empty());
    assert_eq!(keys_of(&app, env).await, names);

    // A send of a stale id stores it again.
    let again = app
        .send_event(
            &app.api_key,
            json!({"event": {"name": "n", "id": "gone-0"}}),
        )
        .await;
    assert_eq!(again["id"], "gone-0");
    assert_eq!(event_ids(&app, env).await, ["gone-0"]);

    // Another send has taken "gone-1"'s key over and not committed yet: a send of the same
    // id through the API waits for it, then finds its event.
    sends_waiting_for(
        &app,
        format!(
            "INSERT INTO event_keys (environment_id, event_id, record_id)
             VALUES ('{env}', 'gone-1', uuid_v7_floor(now()))
             ON CONFLICT (environment_id, event_id) DO UPDATE SET record_id = EXCLUDED.record_id
             WHERE EXISTS (SELECT 1 FROM event_keys_gone g
                           WHERE event_keys.record_id >= g.lower AND event_keys.record_id < g.upper);
             INSERT INTO event_records (id, environment_id, event_id, name, delivered_at)
             VALUES (uuid_v7_floor(now()), '{env}', 'gone-1', 'n', now())"
        ),
        "gone-1",
    )
    .await;
    assert_eq!(event_ids(&app, env).await, ["gone-0", "gone-1"]);

    // The keys forgotten now: the stale one goes, the ones taken over stay with their
    // events, and the range is struck off.
    let mut conn = app.pool.acquire().await.unwrap();
    let forgotten = slices::forget_gone_keys(&mut conn, None, &Pace::flat_out())
        .await
        .unwrap();
    assert!(!forgotten.more);
    assert_eq!(keys_of(&app, env).await, ["gone-0", "gone-1"]);
    let (keyed, listed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM event_keys k JOIN event_records r ON r.id = k.record_id
                 WHERE k.environment_id = $1),
                (SELECT count(*) FROM event_keys_gone)",
    )
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((keyed, listed), (2, 0));
}

/// A send whose statement a connection prepares while the slicing's swap holds the tables
/// (a new connection of the pool, say) keeps its key: the statement was parsed against the
/// plain table, and runs against the sliced one that replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_first_prepared_during_the_swap_keeps_its_key() {
    let app = TestApp::builder()
        .plain_tables()
        .roles(crate::helpers::HTTP_ONLY)
        .start()
        .await;
    let env = app.env.id;
    // Rows enough for steps (2) and (3) to take a while after step (1)'s checks.
    plant(&app, env, 100_000, 2).await;

    // Slice; once the last of step (1)'s checks is in, hold webhook_attempts (a reader's
    // lock: the rest of the steps go on, the swap waits for it, holding the other two).
    let slicing = {
        let pool = app.pool.clone();
        tokio::spawn(async move { slices::partition(&pool, Duration::from_secs(600)).await })
    };
    let mut holder = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    // Polled closer than `wait_until` does: steps (2) and (3) take a fraction of a second.
    loop {
        let checked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint
                            WHERE conname = 'webhook_attempts_below_cutover')",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if checked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut held = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE webhook_attempts IN ACCESS SHARE MODE")
        .execute(&mut *held)
        .await
        .unwrap();
    let waiting_for = |table: &'static str, mode: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_locks
                                WHERE relation = to_regclass($1) AND mode = $2 AND NOT granted)",
            )
            .bind(table)
            .bind(mode)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    wait_until(
        "the swap waits for webhook_attempts",
        Duration::from_secs(4),
        || waiting_for("webhook_attempts", "AccessExclusiveLock"),
    )
    .await;

    // A send on a connection that never prepared the statement: it waits for the swap.
    let fresh = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&app.database_url)
        .await
        .unwrap();
    let send = {
        let env = app.env.clone();
        tokio::spawn(async move {
            kongflow_events::EventsService::new(fresh)
                .ingest_send_event(
                    &env,
                    kongflow_events::events::SendEvent {
                        id: Some("during-the-swap".into()),
                        name: "migrating".into(),
                        payload: json!({}),
                        ..Default::default()
                    },
                    kongflow_events::events::SendEventOptions::default(),
                )
                .await
        })
    };
    wait_until(
        "the send waits for event_records",
        Duration::from_secs(3),
        || waiting_for("event_records", "RowExclusiveLock"),
    )
    .await;
    held.commit().await.unwrap();
    let sliced = slicing.await.unwrap().unwrap();
    assert!(matches!(sliced, Partitioned::Legacy { .. }), "{sliced:?}");
    send.await.unwrap().unwrap();

    // Stored once, with its key: a second send of the id stores nothing.
    let keyed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM event_keys k JOIN event_records e ON e.id = k.record_id
         WHERE k.environment_id = $1 AND k.event_id = 'during-the-swap'",
    )
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(keyed, 1, "the event sent during the swap has no key");
    resend_stores_nothing(&app, "during-the-swap").await;
}

/// A database of the release before slices, holding 1,000,000 events and a run each, is
/// sliced while this build stores events: nothing is lost, the old rows are the legacy
/// slice (attached without a scan: the tables' locks are held for the swap only), and
/// retention drops the legacy slice once its events are past the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_a_million_events_is_sliced_while_events_keep_coming() {
    let app = TestApp::builder().plain_tables().start().await;
    let env = app.env.id;
    app.put_job(&app.api_key, "job", job_body("migrating", json!({})))
        .await;
    let planted = std::time::Instant::now();
    plant(&app, env, 1_000_000, 20).await;
    eprintln!(
        "planted 1,000,000 events and runs in {:?}",
        planted.elapsed()
    );

    // Events keep coming while the tables are sliced; each send must succeed.
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = {
        let (http, url, key, stop) = (
            app.http.clone(),
            format!("{}/api/v1/events", app.base_url),
            app.api_key.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut sent = 0u32;
            let mut slowest = Duration::ZERO;
            while !stop.is_cancelled() {
                let started = std::time::Instant::now();
                let status = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"event": {"name": "migrating", "id": format!("live-{sent}")}}))
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert!(
                    status.is_success(),
                    "send {sent} during the slicing: {status}"
                );
                slowest = slowest.max(started.elapsed());
                sent += 1;
            }
            (sent, slowest)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let started_at = chrono::Utc::now();
    let sliced = kongflow_events::app::partition_storage(&app.pool, Duration::from_secs(600))
        .await
        .unwrap();
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (sent, slowest) = sender.await.unwrap();
    eprintln!(
        "sliced in {took:?} (from {started_at}) while {sent} events were sent (slowest send \
         {slowest:?})"
    );
    let Partitioned::Legacy { cutover, .. } = sliced else {
        panic!("{sliced:?}");
    };
    assert!(sent > 0);

    // Nothing lost: the planted rows and every event sent, each with its run.
    let planted_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_records WHERE name = 'planted'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(planted_left, 1_000_000);
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_records WHERE name = 'migrating'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(live, sent as i64);
    wait_until("a run per event sent", Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
             WHERE e.name = 'migrating'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
            == sent as i64
    })
    .await;
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM ONLY job_runs_legacy")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1_000_000 + sent as i64);
    // Every event has its key: those stored before the slicing got theirs from it.
    let keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM event_keys k JOIN event_records e ON e.id = k.record_id
         WHERE e.environment_id = k.environment_id AND e.event_id = k.event_id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    if keys != 1_000_000 + sent as i64 {
        // Which events lack their key, and when they were stored, to tell the race.
        let lacking: Vec<(uuid::Uuid, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT e.id, e.event_id, e.created_at FROM event_records e
             WHERE NOT EXISTS (SELECT 1 FROM event_keys k
                               WHERE k.environment_id = e.environment_id
                                 AND k.event_id = e.event_id AND k.record_id = e.id)
             LIMIT 10",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        panic!(
            "{keys} keys for {} events; lacking: {lacking:?}",
            1_000_000 + sent as i64
        );
    }
    // The legacy slice holds everything below the cut-over; slices follow it.
    let mut conn = app.pool.acquire().await.unwrap();
    let all = slices::list(&mut conn).await.unwrap();
    assert_eq!(all[0].day, None);
    assert_eq!(all[0].upper, cutover);
    assert!(all.len() > slices::DAYS_AHEAD as usize, "{all:?}");
    // The keys hold the environment (db::keys), each slice's index taken over by its
    // table's key, the legacy slice's too (built beside its 1,000,000 rows, not under lock).
    let keys = kongflow_events::app::event_sized_keys();
    let unkeyed = kongflow_events::db::keys::unkeyed(&mut conn, &keys)
        .await
        .unwrap();
    assert!(unkeyed.is_empty(), "{unkeyed:?}");
    for key in ["event_records_pkey", "job_runs_pkey", "job_runs_run_key"] {
        let under: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT c.relname::text FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
             WHERE h.inhparent = '{key}'::regclass"
        )))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        assert_eq!(under.len(), all.len(), "{key}: {under:?}");
        assert!(
            under.iter().any(|i| i.contains("legacy")),
            "{key}: {under:?}"
        );
    }
    // Sending an id stored before the slicing stores nothing new.
    resend_stores_nothing(&app, "planted-17").await;

    // Retention: the legacy slice's events older than the retention go row by row while it
    // holds newer ones (here: none are, with 30 days); with a retention shorter than its
    // newest event's age, it goes whole.
    sqlx::query("UPDATE event_records SET delivered_at = now() WHERE delivered_at IS NULL")
        .execute(&app.pool)
        .await
        .unwrap();
    let relay = kongflow_events::relay::Relay::new(
        app.pool.clone(),
        app.topology.clone(),
        kongflow_events::config::RelayConfig {
            maintenance: kongflow_events::config::MaintenanceConfig {
                retention_events: Duration::from_millis(1),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let batches = relay.maintenance().retain_events().await.unwrap();
    // Counted by the planner's estimate (the legacy slice was analyzed).
    let stored = 1_000_000 + sent as u64;
    assert!(
        batches[0].events.abs_diff(stored) < stored / 100,
        "the legacy slice, whole: {batches:?}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM event_records")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    // Its keys are forgotten after it, paced: what the pass had no time for, here all at
    // once.
    let in_pass: u64 = batches.iter().map(|b| b.keys).sum();
    let mut conn = app.pool.acquire().await.unwrap();
    let started = std::time::Instant::now();
    let forgotten = slices::forget_gone_keys(&mut conn, None, &Pace::flat_out())
        .await
        .unwrap();
    println!(
        "forgot {in_pass} keys in the pass, {} after it in {:?}",
        forgotten.keys,
        started.elapsed()
    );
    // All gone (the app's own relay may have forgotten some too, so the counts above
    // need not add up to the events).
    assert!(
        keys_of(&app, env).await.is_empty(),
        "{batches:?} {forgotten:?}"
    );
    assert!(!exists(&app, "event_records_legacy").await);
    assert!(!exists(&app, "job_runs_legacy").await);
}
