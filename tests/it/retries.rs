//! Retries with backoff, dead letters, priorities, retention, and the `jobs` commands.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kongflow_events::admin;
use kongflow_events::amqp::JobMessage;
use kongflow_events::config::RelayConfig;
use kongflow_events::failpoint::{self, Fault};
use kongflow_events::ledger::upkeep;
use kongflow_events::ledger::{
    InsertOpts, InvokeDispatcherArgs, Job, JobInsert, JobKind, JobPriority, JobState, QueueService,
};
use kongflow_events::maintenance::RETENTION_LOCK;
use kongflow_events::relay::Relay;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{NO_ROLES, TestApp, job_body, wait_until};

fn at(ms_from_now: i64) -> String {
    kongflow_events::dates::iso(Utc::now() + chrono::Duration::milliseconds(ms_from_now))
}

/// Send an event due in a second, and return its record id (the key of its deliverEvent
/// job's faults) and its job.
async fn delayed_event(app: &TestApp, name: &str, id: &str) -> (Uuid, Job) {
    app.send_event(
        &app.api_key,
        json!({"event": {"name": name, "id": id, "payload": {}}, "options": {"deliverAt": at(1_000)}}),
    )
    .await;
    let record: Uuid = sqlx::query_scalar("SELECT id FROM event_records WHERE event_id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    (record, deliver_job(app, record).await)
}

async fn deliver_job(app: &TestApp, record: Uuid) -> Job {
    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM queue_jobs WHERE kind = 'deliverEvent' AND args->>'id' = $1",
    )
    .bind(record.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    admin::get_job(&app.pool, id).await.unwrap().unwrap()
}

async fn wait_state(app: &TestApp, id: i64, state: JobState, timeout: Duration) -> Job {
    wait_until(&format!("job {id} {}", state.as_str()), timeout, || async {
        admin::get_job(&app.pool, id).await.unwrap().unwrap().state == state
    })
    .await;
    admin::get_job(&app.pool, id).await.unwrap().unwrap()
}

fn error_times(job: &Job) -> Vec<DateTime<Utc>> {
    job.errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            DateTime::parse_from_rfc3339(e["at"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc)
        })
        .collect()
}

/// Run `kongflow-events jobs ...` against the test's stores; its stdout.
async fn jobs_cli(app: &TestApp, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("jobs")
        .args(args)
        .envs(app.child_env())
        .output()
        .await
        .expect("run kongflow-events jobs");
    assert!(
        out.status.success(),
        "jobs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_always_fails_is_tried_five_times_then_dead_lettered() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("flaky", json!({}))).await;
    let (record, job) = delayed_event(&app, "flaky", "bad").await;
    failpoint::arm_handler_fault(&record.to_string(), Fault::Error, i32::MAX);

    // Other events flow meanwhile, at full speed.
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(1_800);
    let mut i = 0;
    while Instant::now() < deadline {
        let id = format!("good-{i}");
        let sent = Instant::now();
        app.send_event(
            &key,
            json!({"event": {"name": "flaky", "id": id, "payload": {}}}),
        )
        .await;
        wait_until("a good event's run", Duration::from_secs(10), || async {
            !app.runs_by_job(&id).await.is_empty()
        })
        .await;
        latencies.push(sent.elapsed());
        i += 1;
    }

    let job = wait_state(&app, job.id, JobState::Discarded, Duration::from_secs(20)).await;
    failpoint::disarm_handler_fault(&record.to_string());
    assert_eq!(job.attempt, 5);
    let errors = job.errors.as_array().unwrap();
    assert_eq!(errors.len(), 5, "{}", job.errors);
    for (n, e) in errors.iter().enumerate() {
        assert_eq!(e["attempt"], n as i64 + 1);
        assert_eq!(e["kind"], "error");
        assert!(e["error"].as_str().unwrap().contains("injected fault"));
    }
    // Waits of 100, 200, 400, 800 ms (±10%), plus the trip through the pipeline.
    let times = error_times(&job);
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).num_milliseconds())
        .collect();
    for (n, gap) in gaps.iter().enumerate() {
        let floor = (100.0 * 2f64.powi(n as i32) * 0.9) as i64;
        assert!(
            *gap >= floor,
            "gap {n} is {gap} ms, under {floor}: {gaps:?}"
        );
    }
    eprintln!("gaps between attempts: {gaps:?} ms");
    assert!(gaps.windows(2).all(|w| w[1] > w[0]), "growing: {gaps:?}");

    // The dead letter: the job's message with the reason.
    wait_until("the dead letter", Duration::from_secs(10), || async {
        app.depth_of(&app.topology.dead_queue()).await == 1
    })
    .await;
    let letters = admin::dead_letters(&app.amqp, &app.topology, &app.pool, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].job_id, Some(job.id));
    assert_eq!(letters[0].attempts, Some(5));
    assert_eq!(letters[0].kind.as_deref(), Some("deliverEvent"));
    assert_eq!(letters[0].ledger_state.as_deref(), Some("discarded"));
    assert!(
        letters[0].reason.contains("injected fault"),
        "{}",
        letters[0].reason
    );
    // Peeking left it there (back in the queue once the peeking channel is closed).
    wait_until(
        "the letter back in its queue",
        Duration::from_secs(5),
        || async { app.depth_of(&app.topology.dead_queue()).await == 1 },
    )
    .await;
    assert!(app.runs_by_job("bad").await.is_empty());

    eprintln!(
        "{i} good events meanwhile, slowest {:?}",
        latencies.iter().max()
    );
    assert!(i >= 5, "only {i} good events went through");
    let slowest = latencies.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(2),
        "good events slowed to {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_fails_twice_completes_on_its_third_attempt_once() {
    let app = TestApp::builder().start().await;
    app.put_job(&app.api_key, "job", job_body("twice", json!({})))
        .await;
    let (record, job) = delayed_event(&app, "twice", "t-1").await;
    failpoint::arm_handler_fault(&record.to_string(), Fault::Error, 2);
    let job = wait_state(&app, job.id, JobState::Completed, Duration::from_secs(20)).await;
    failpoint::disarm_handler_fault(&record.to_string());
    assert_eq!(job.attempt, 3);
    assert_eq!(job.errors.as_array().unwrap().len(), 2);
    app.settle_with_errors().await;
    assert_eq!(app.runs_by_job("t-1").await, vec![("job".to_string(), 1)]);
    assert_eq!(app.depth_of(&app.topology.dead_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_failure_and_the_worker_survives() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("boom", json!({}))).await;
    let (record, job) = delayed_event(&app, "boom", "p-1").await;
    failpoint::arm_handler_fault(&record.to_string(), Fault::Panic, 1);
    let job = wait_state(&app, job.id, JobState::Completed, Duration::from_secs(20)).await;
    failpoint::disarm_handler_fault(&record.to_string());
    assert_eq!(job.attempt, 2);
    let errors = job.errors.as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["kind"], "panic");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("injected panic")
    );
    // The same worker goes on.
    app.send_event(
        &key,
        json!({"event": {"name": "boom", "id": "p-2", "payload": {}}}),
    )
    .await;
    wait_until("the next event's run", Duration::from_secs(10), || async {
        !app.runs_by_job("p-2").await.is_empty()
    })
    .await;
    app.settle_with_errors().await;
    assert_eq!(app.runs_by_job("p-1").await, vec![("job".to_string(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_kinds_are_dead_lettered_with_a_reason() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("after", json!({}))).await;
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let message = |kind: &str, id: i64| JobMessage {
        v: 1,
        id,
        kind: kind.into(),
        queue: "events".into(),
        args: json!({}),
        attempt: 0,
        run_at: Utc::now(),
    };
    let bodies: Vec<Vec<u8>> = vec![
        b"\x00\xffnot json at all".to_vec(),
        message("nope.unknown", 1).to_bytes(),
        message("deliverEvent", 987_654_321).to_bytes(),
    ];
    for body in &bodies {
        let confirm = channel
            .basic_publish(
                app.topology.exchange(JobKind::DeliverEvent).as_str().into(),
                app.work_key().as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
    wait_until("three dead letters", Duration::from_secs(10), || async {
        app.depth_of(&app.topology.dead_queue()).await == 3
    })
    .await;
    let mut reasons: Vec<String> = admin::dead_letters(&app.amqp, &app.topology, &app.pool, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.reason)
        .collect();
    reasons.sort();
    assert!(reasons[0].contains("\"nope.unknown\""), "{reasons:?}");
    assert!(
        reasons[1].contains("the ledger has no job 987654321"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("unparseable job message"),
        "{reasons:?}"
    );
    // Nothing else disturbed: the next event runs.
    app.send_event(
        &key,
        json!({"event": {"name": "after", "id": "a-1", "payload": {}}}),
    )
    .await;
    wait_until("the next event's run", Duration::from_secs(10), || async {
        !app.runs_by_job("a-1").await.is_empty()
    })
    .await;
    assert_eq!(app.queue_depth(JobKind::DeliverEvent).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_commands_list_retry_and_replay_a_discarded_job() {
    let app = TestApp::builder().start().await;
    app.put_job(&app.api_key, "job", job_body("fixme", json!({})))
        .await;
    let (first_record, first) = delayed_event(&app, "fixme", "f-1").await;
    let (second_record, second) = delayed_event(&app, "fixme", "f-2").await;
    for r in [first_record, second_record] {
        failpoint::arm_handler_fault(&r.to_string(), Fault::Error, i32::MAX);
    }
    for id in [first.id, second.id] {
        wait_state(&app, id, JobState::Discarded, Duration::from_secs(20)).await;
    }
    wait_until("two dead letters", Duration::from_secs(10), || async {
        app.depth_of(&app.topology.dead_queue()).await == 2
    })
    .await;

    // list --state failed, as JSON and as a table.
    let listed: Value =
        serde_json::from_str(&jobs_cli(&app, &["list", "--state", "failed", "--json"]).await)
            .unwrap();
    let ids: Vec<i64> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![first.id, second.id]);
    let table = jobs_cli(&app, &["list", "--kind", "deliverEvent", "--limit", "1"]).await;
    assert!(table.lines().next().unwrap().contains("STATE"), "{table}");
    assert!(table.contains("more: --after"), "a second page: {table}");
    let got = jobs_cli(&app, &["get", &first.id.to_string()]).await;
    assert!(got.contains("errors:       5"), "{got}");
    let dead = jobs_cli(&app, &["dead"]).await;
    assert!(dead.contains("injected fault"), "{dead}");

    // The cause is fixed: `jobs retry <id>` runs the first again.
    for r in [first_record, second_record] {
        failpoint::disarm_handler_fault(&r.to_string());
    }
    let out = jobs_cli(&app, &["retry", &first.id.to_string()]).await;
    assert!(out.contains(&first.id.to_string()), "{out}");
    let done = wait_state(&app, first.id, JobState::Completed, Duration::from_secs(10)).await;
    assert_eq!(done.attempt, 6, "attempts kept, one more granted");
    assert_eq!(done.errors.as_array().unwrap().len(), 5, "errors kept");
    // `jobs dead replay` retries the job of each letter whose job is not done, and removes
    // the letters of both.
    let replay: Value =
        serde_json::from_str(&jobs_cli(&app, &["dead", "replay", "--json"]).await).unwrap();
    let retried: Vec<i64> = replay["retried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert!(retried.contains(&second.id), "{replay}");
    wait_state(
        &app,
        second.id,
        JobState::Completed,
        Duration::from_secs(10),
    )
    .await;
    // Both letters are gone from the dead-letter queue, and nothing else is in it.
    assert_eq!(replay["kept"], json!([]), "{replay}");
    assert_eq!(app.depth_of(&app.topology.dead_queue()).await, 0);
    app.settle_with_errors().await;
    assert_eq!(app.runs_by_job("f-1").await, vec![("job".to_string(), 1)]);
    assert_eq!(app.runs_by_job("f-2").await, vec![("job".to_string(), 1)]);
    // A cancelled job is final; cancelling it again says so.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .args(["jobs", "cancel", &first.id.to_string()])
        .envs(app.child_env())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("completed"));
}

/// Invocation jobs for dispatchers that do not exist: they complete and do nothing.
fn idle_jobs(n: usize, priority: JobPriority) -> Vec<JobInsert> {
    (0..n)
        .map(|_| {
            JobInsert::invoke_dispatcher(
                InvokeDispatcherArgs {
                    id: Uuid::new_v4(),
                    event_record_id: Uuid::new_v4(),
                },
                InsertOpts {
                    priority,
                    ..InsertOpts::default()
                },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_job_overtakes_a_backlog_of_ten_thousand() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let queue = QueueService::new();
    let mut tx = app.pool.begin().await.unwrap();
    queue
        .enqueue_many(&mut tx, idle_jobs(10_000, JobPriority::Normal))
        .await
        .unwrap();
    let critical = queue
        .enqueue_many(&mut tx, idle_jobs(1, JobPriority::Critical))
        .await
        .unwrap()
        .remove(0)
        .job;
    tx.commit().await.unwrap();
    assert_eq!(app.relay_all().await, 10_001);

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .run(app.store.amqp_url.clone(), shutdown.clone()),
    );
    wait_state(
        &app,
        critical.id,
        JobState::Completed,
        Duration::from_secs(30),
    )
    .await;
    let done_before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue_jobs WHERE state = 'completed' AND priority = 3",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    shutdown.cancel();
    let _ = worker.await;
    eprintln!("{done_before} of 10,000 ran before the critical job");
    assert!(
        done_before < 2_000,
        "{done_before} of the backlog ran before the critical job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_critical_job_is_still_critical() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let mut jobs = idle_jobs(1, JobPriority::Critical);
    let key = jobs[0].args.id().to_string();
    let mut tx = app.pool.begin().await.unwrap();
    let job = QueueService::new()
        .enqueue_many(&mut tx, std::mem::take(&mut jobs))
        .await
        .unwrap()
        .remove(0)
        .job;
    tx.commit().await.unwrap();
    failpoint::arm_handler_fault(&key, Fault::Error, 1);
    let worker = app.worker();
    app.relay_all().await;
    wait_until("the message", Duration::from_secs(5), || async {
        app.queue_depth(JobKind::InvokeDispatcher).await == 1
    })
    .await;
    app.drain_with(&worker, JobKind::InvokeDispatcher).await;
    let failed = admin::get_job(&app.pool, job.id).await.unwrap().unwrap();
    assert_eq!(failed.state, JobState::Retryable);
    // The retry goes through the tiers (a second's backoff) and comes out CRITICAL.
    app.relay_all().await;
    wait_until("the retry's message", Duration::from_secs(10), || async {
        app.queue_depth(JobKind::InvokeDispatcher).await == 1
    })
    .await;
    let m = app.get_message(JobKind::InvokeDispatcher).await.unwrap();
    assert_eq!(m.delivery.properties.priority(), &Some(4));
    let parsed = JobMessage::parse(&m.delivery.data).unwrap();
    failpoint::disarm_handler_fault(&key);
    worker.process(vec![Ok(parsed)]).await.unwrap();
    m.delivery
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .unwrap();
    let done = admin::get_job(&app.pool, job.id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.attempt, done.priority),
        (JobState::Completed, 2, JobPriority::Critical)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_final_jobs_in_batches_under_a_lock() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let queue = QueueService::new();
    let mut tx = app.pool.begin().await.unwrap();
    let jobs: Vec<Job> = queue
        .enqueue_many(&mut tx, idle_jobs(2_506, JobPriority::High))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.job)
        .collect();
    tx.commit().await.unwrap();
    let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
    let set = |range: std::ops::Range<usize>, sql: &'static str| {
        let ids = ids[range].to_vec();
        let pool = app.pool.clone();
        async move {
            sqlx::query(sql).bind(&ids).execute(&pool).await.unwrap();
        }
    };
    // 2,500 completed two days ago: gone. One completed an hour ago: kept.
    set(0..2_500, "UPDATE queue_jobs SET state = 'completed', finalized_at = now() - interval '2 days', published_at = now() WHERE id = ANY($1)").await;
    set(2_500..2_501, "UPDATE queue_jobs SET state = 'completed', finalized_at = now() - interval '1 hour', published_at = now() WHERE id = ANY($1)").await;
    // Discarded eight days ago: gone; its dead letter not yet published: kept.
    set(2_501..2_502, "UPDATE queue_jobs SET state = 'discarded', finalized_at = now() - interval '8 days', published_at = now() WHERE id = ANY($1)").await;
    set(2_502..2_503, "UPDATE queue_jobs SET state = 'discarded', finalized_at = now() - interval '8 days', published_at = NULL WHERE id = ANY($1)").await;
    // Discarded two days ago: kept. Cancelled eight days ago: gone. Live: kept.
    set(2_503..2_504, "UPDATE queue_jobs SET state = 'discarded', finalized_at = now() - interval '2 days', published_at = now() WHERE id = ANY($1)").await;
    set(2_504..2_505, "UPDATE queue_jobs SET state = 'cancelled', finalized_at = now() - interval '8 days' WHERE id = ANY($1)").await;

    let relay = Relay::new(
        app.pool.clone(),
        app.topology.clone(),
        RelayConfig {
            maintenance: kongflow_events::config::MaintenanceConfig {
                retention_batch_size: 400,
                ..Default::default()
            },
            ..RelayConfig::default()
        },
    );
    // Another process holds the lock: this one skips the pass.
    let mut other = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(
        relay.maintenance().retain().await.unwrap(),
        Vec::<u64>::new()
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    drop(other);

    // 2,502 rows in statements of at most 400.
    assert_eq!(
        relay.maintenance().retain().await.unwrap(),
        vec![400, 400, 400, 400, 400, 400, 102]
    );
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM queue_jobs ORDER BY id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, vec![ids[2_500], ids[2_502], ids[2_503], ids[2_505]]);
    assert_eq!(relay.maintenance().retain().await.unwrap(), vec![0]);

    // Unique by args holds while the job is kept, and ends with it.
    let again = |job: &Job| JobInsert {
        args: job.args,
        opts: InsertOpts::default(),
    };
    let mut tx = app.pool.begin().await.unwrap();
    let results = queue
        .enqueue_many(&mut tx, vec![again(&jobs[2_500]), again(&jobs[0])])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(results[0].unique_skipped_as_duplicate);
    assert_eq!(results[0].job.id, ids[2_500]);
    assert!(!results[1].unique_skipped_as_duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_vacuums_ledger_tables_autovacuum_left_behind() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    // Whatever this machine's autovacuum does, it leaves this test's table alone.
    sqlx::query("ALTER TABLE queue_jobs SET (autovacuum_enabled = false)")
        .execute(&app.pool)
        .await
        .unwrap();
    let n = upkeep::VACUUM_MIN_DEAD as usize + 2_000;
    let mut tx = app.pool.begin().await.unwrap();
    QueueService::new()
        .enqueue_many(&mut tx, idle_jobs(n, JobPriority::High))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Every row ends once: one dead version each, as the workers leave them.
    sqlx::query("UPDATE queue_jobs SET state = 'completed', finalized_at = now()")
        .execute(&app.pool)
        .await
        .unwrap();
    let dead = || async {
        sqlx::query_as::<_, (i64, Option<DateTime<Utc>>)>(
            "SELECT n_dead_tup, last_vacuum FROM pg_stat_user_tables WHERE relname = 'queue_jobs'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    // Statistics reach pg_stat_user_tables within a second or so.
    wait_until("the dead rows counted", Duration::from_secs(20), || async {
        dead().await.0 >= n as i64
    })
    .await;

    // Another process holds the lock: this one skips the pass.
    let mut other = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(upkeep::VACUUM_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    assert!(
        upkeep::vacuum(&app.pool, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(upkeep::VACUUM_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    drop(other);

    let done = upkeep::vacuum(&app.pool, Duration::from_secs(60))
        .await
        .unwrap();
    let queue_jobs: Vec<_> = done.iter().filter(|v| v.table == "queue_jobs").collect();
    assert_eq!(queue_jobs.len(), 1, "{done:?}");
    assert!(queue_jobs[0].dead.unwrap() >= n as i64, "{done:?}");
    wait_until("the vacuum counted", Duration::from_secs(20), || async {
        let (dead_rows, last) = dead().await;
        dead_rows == 0 && last.is_some()
    })
    .await;
    // Vacuumed within the interval, and nothing dead: the next pass leaves it alone.
    let again = upkeep::vacuum(&app.pool, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(again.iter().all(|v| v.table != "queue_jobs"), "{again:?}");
    // The session settings of the pass do not leak into the pool.
    for _ in 0..4 {
        let delay: String = sqlx::query_scalar("SHOW vacuum_cost_delay")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(delay, "0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retry_is_refused_while_a_live_job_holds_the_key() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let queue = QueueService::new();
    let args = kongflow_events::ledger::DeliverEventArgs { id: Uuid::new_v4() };
    let insert = |app: &TestApp| {
        let (pool, queue) = (app.pool.clone(), queue);
        async move {
            let mut tx = pool.begin().await.unwrap();
            let r = queue
                .enqueue_many(
                    &mut tx,
                    vec![JobInsert::deliver_event(args, InsertOpts::default())],
                )
                .await
                .unwrap()
                .remove(0);
            tx.commit().await.unwrap();
            r
        }
    };
    let set_state = |id: i64, state: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query(
                "UPDATE queue_jobs SET state = $2::queue_job_state, finalized_at = now(),
                        published_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(state)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let state_of = |id: i64| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state::text FROM queue_jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // The first job of these arguments is discarded, which frees its key: a second job
    // of the same arguments takes it and is live.
    let first = insert(&app).await.job;
    set_state(first.id, "discarded").await;
    let second = insert(&app).await;
    assert!(!second.unique_skipped_as_duplicate);
    let second = second.job;
    assert_ne!(second.id, first.id);

    match admin::retry_job(&app.pool, first.id).await {
        Err(admin::AdminError::Refused(admin::Refusal::Duplicate { id, other })) => {
            assert_eq!((id, other), (first.id, second.id))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let retried = admin::retry_jobs(
        &app.pool,
        &admin::matching(admin::StateFilter::Failed, None, None),
    )
    .await
    .unwrap();
    assert_eq!(retried, Vec::<i64>::new(), "skipped as well");
    assert_eq!(state_of(first.id).await, "discarded");

    // Once the live job is cancelled, the key is free and the retry goes through.
    set_state(second.id, "cancelled").await;
    let job = admin::retry_job(&app.pool, first.id).await.unwrap();
    assert_eq!(job.state, JobState::Available);
    assert_eq!(state_of(first.id).await, "available");
}

/// With quorum queues, a work message that keeps coming back unacknowledged (each worker
/// that takes it dies) is dead-lettered by the broker after its delivery limit, and the
/// dead-letter listing says the broker put it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_work_message_returned_past_its_delivery_limit_is_dead_lettered() {
    use kongflow_events::amqp::{Topology, topology::WORK_DELIVERY_LIMIT};
    use kongflow_events::config::QueueType;
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let quorum = Topology::new(format!("{}.q", app.topology.prefix()))
        .with_queue_type(QueueType::Quorum)
        .with_queue_expiry(600_000);
    quorum.declare(&app.channel).await.unwrap();
    let queue = quorum.queue_for(JobKind::DeliverEvent, 0, None);
    app.channel
        .basic_publish(
            quorum.exchange(JobKind::DeliverEvent).as_str().into(),
            quorum.work_key("events", 0, None).as_str().into(),
            BasicPublishOptions::default(),
            br#"{"v": 1, "id": 4242, "kind": "deliverEvent", "queue": "events", "args": {"id": "x"}, "attempt": 0, "runAt": "2026-01-01T00:00:00Z"}"#,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    let mut returned = 0;
    for _ in 0..(WORK_DELIVERY_LIMIT + 5) {
        let got = app
            .channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap();
        let Some(m) = got else {
            wait_until(
                "the message back, or dead",
                Duration::from_secs(5),
                || async {
                    app.depth_of(&queue).await > 0 || app.depth_of(&quorum.dead_queue()).await > 0
                },
            )
            .await;
            if app.depth_of(&quorum.dead_queue()).await > 0 {
                break;
            }
            continue;
        };
        m.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
        returned += 1;
    }
    wait_until(
        "the broker's dead letter",
        Duration::from_secs(10),
        || async { app.depth_of(&quorum.dead_queue()).await == 1 },
    )
    .await;
    assert_eq!(app.depth_of(&queue).await, 0);
    assert!(
        returned > WORK_DELIVERY_LIMIT && returned <= WORK_DELIVERY_LIMIT + 1,
        "returned {returned} times"
    );
    let letters = admin::dead_letters(&app.amqp, &quorum, &app.pool, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].job_id, Some(4242));
    assert_eq!(letters[0].reason, "broker: delivery_limit");
    for q in quorum.all_queues() {
        let _ = app
            .channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
}

/// The run hand-offs' outbox is inserted into and deleted from once per run: with
/// autovacuum off or behind, the relay's vacuum pass takes its dead rows too (a 10-minute
/// run at 300 events/s left 72,000 of them after 4 minutes without it: `bench.sh deadrows`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_vacuums_the_run_handoffs_outbox_too() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    sqlx::query("ALTER TABLE run_handoffs SET (autovacuum_enabled = false)")
        .execute(&app.pool)
        .await
        .unwrap();
    let n = upkeep::VACUUM_MIN_DEAD + 2_000;
    sqlx::query(
        "INSERT INTO run_handoffs (run_id, environment_id, kind)
         SELECT gen_random_uuid(), $2, 'created' FROM generate_series(1, $1)",
    )
    .bind(n)
    .bind(app.env.id)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM run_handoffs")
        .execute(&app.pool)
        .await
        .unwrap();
    let dead = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'run_handoffs'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    wait_until("the dead rows counted", Duration::from_secs(20), || async {
        dead().await >= n
    })
    .await;
    let done = upkeep::vacuum(&app.pool, Duration::from_secs(60))
        .await
        .unwrap();
    let handoffs: Vec<_> = done.iter().filter(|v| v.table == "run_handoffs").collect();
    assert_eq!(handoffs.len(), 1, "{done:?}");
    wait_until("the vacuum counted", Duration::from_secs(20), || async {
        dead().await == 0
    })
    .await;
}

/// A table never analyzed gets its statistics from the vacuum pass once it holds rows: the
/// planner without them takes an id list to match hundreds of rows and reads the whole
/// ledger where its key would do (the key led by the id holds the environment too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vacuum_pass_analyzes_a_table_never_analyzed_once_it_holds_rows() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    sqlx::query("ALTER TABLE queue_jobs SET (autovacuum_enabled = false)")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO queue_jobs (kind, args, state, environment_id)
         SELECT 'k', '{}', 'available', $2 FROM generate_series(1, $1)",
    )
    .bind(upkeep::FIRST_ANALYZE_MIN + 500)
    .bind(app.env.id)
    .execute(&app.pool)
    .await
    .unwrap();
    let plan = || async {
        let rows: Vec<String> = sqlx::query_scalar(
            "EXPLAIN SELECT id FROM queue_jobs WHERE id = ANY('{5,6,7,8}'::int8[])",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        rows.join("\n")
    };
    wait_until("the rows counted", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = 'queue_jobs'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
            >= upkeep::FIRST_ANALYZE_MIN
    })
    .await;
    let done = upkeep::vacuum(&app.pool, Duration::from_secs(60))
        .await
        .unwrap();
    let analyzed: Vec<_> = done.iter().filter(|v| v.table == "queue_jobs").collect();
    assert_eq!(analyzed.len(), 1, "{done:?}");
    assert_eq!(analyzed[0].dead, None, "analyzed only: {done:?}");
    // Four ids, four rows, read through the key.
    let after = plan().await;
    assert!(after.contains("rows=4"), "{after}");
    assert!(after.contains("queue_jobs_pkey"), "{after}");
}
