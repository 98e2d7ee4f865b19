//! Processes killed in the middle of their work (the binary, aborted at a failpoint).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use kongflow_events::EventsService;
use kongflow_events::events::{SendEvent, SendEventOptions};
use kongflow_events::ledger::JobKind;
use kongflow_events::worker::{Disposition, Worker};
use serde_json::json;

use crate::helpers::{NO_ROLES, TestApp, collect_stderr, wait_until};

async fn job_and_event(app: &TestApp, event_id: &str) {
    app.register_job("job", "crash").await;
    EventsService::new(app.pool.clone())
        .ingest_send_event(
            &app.env,
            SendEvent {
                id: Some(event_id.into()),
                name: "crash".into(),
                payload: json!({}),
                ..Default::default()
            },
            SendEventOptions::default(),
        )
        .await
        .unwrap();
}

/// Run the binary with a failpoint armed and expect it to die of SIGABRT.
async fn run_until_abort(app: &TestApp, role: &str, failpoint: &str) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg(role)
        .envs(app.child_env())
        .env("KONGFLOW_FAILPOINTS", failpoint)
        .env("WORKER_CONCURRENCY", "1")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kongflow-events");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the process reaches its failpoint")
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(6),
        "{role} should abort, got {status:?}"
    );
}

/// Publish the one pending invokeDispatcher job and run it with a worker step.
async fn invoke_by_hand(app: &TestApp, worker: &Worker) {
    app.relay_all().await;
    wait_until(
        "invokeDispatcher queued",
        Duration::from_secs(5),
        || async { app.queue_depth(JobKind::InvokeDispatcher).await == 1 },
    )
    .await;
    app.drain_with(worker, JobKind::InvokeDispatcher).await;
}

/// How many of these events (by the producer's id) have no run.
async fn without_a_run(app: &TestApp, ids: &[String]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM UNNEST($1::text[]) AS a(eid)
             WHERE NOT EXISTS (SELECT 1 FROM event_records e JOIN job_runs r ON r.event_record_id = e.id
                               WHERE e.event_id = a.eid)",
    )
    .bind(ids)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// How many events have more than one run.
async fn run_twice(app: &TestApp) -> i64 {
    count(
        app,
        "SELECT count(*) FROM (SELECT event_record_id FROM job_runs GROUP BY event_record_id HAVING count(*) > 1) d",
    )
    .await
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_after_publishing_before_marking_causes_no_double_effect() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    job_and_event(&app, "r-1").await;

    run_until_abort(&app, "relay", "relay-after-confirm").await;
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE published_at IS NULL"
        )
        .await,
        1,
        "the job is still in the outbox"
    );
    assert_eq!(
        app.queue_depth(JobKind::DeliverEvent).await,
        1,
        "but its message was published"
    );

    // Another relay publishes it again: two messages for one job.
    assert_eq!(app.relay_all().await, 1);
    wait_until("the second copy", Duration::from_secs(5), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 2
    })
    .await;
    let worker = app.worker();
    assert_eq!(
        app.drain_with(&worker, JobKind::DeliverEvent).await,
        vec![Disposition::Ack, Disposition::Ack]
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE kind = 'events.invokeDispatcher'"
        )
        .await,
        1
    );
    invoke_by_hand(&app, &worker).await;
    assert_eq!(app.runs_by_job("r-1").await, vec![("job".to_string(), 1)]);
    // The second copy found its job completed: one attempt each, not two.
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 1)
        .await;
    assert_eq!(app.assert_handed_off_once().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_commit_and_ack_causes_no_double_effect() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    job_and_event(&app, "w-1").await;
    assert_eq!(app.relay_all().await, 1);

    run_until_abort(&app, "worker", "worker-after-commit").await;
    // The work committed...
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE kind = 'deliverEvent' AND state = 'completed'"
        )
        .await,
        1
    );
    let delivered_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT delivered_at FROM event_records WHERE event_id = 'w-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    // ...but the ack never left: the broker hands the message out again.
    wait_until(
        "the message to be redelivered",
        Duration::from_secs(10),
        || async { app.queue_depth(JobKind::DeliverEvent).await == 1 },
    )
    .await;
    let worker = app.worker();
    let redelivered = app.get_message(JobKind::DeliverEvent).await.unwrap();
    assert!(redelivered.delivery.redelivered);
    let msg = kongflow_events::amqp::JobMessage::parse(&redelivered.delivery.data).unwrap();
    assert_eq!(
        worker.process(vec![Ok(msg)]).await.unwrap(),
        vec![Disposition::Ack]
    );
    redelivered
        .delivery
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .unwrap();
    assert_eq!(app.queue_depth(JobKind::DeliverEvent).await, 0);

    // No second effect: one invokeDispatcher job, delivery time unchanged, one run.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE kind = 'events.invokeDispatcher'"
        )
        .await,
        1
    );
    let again: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT delivered_at FROM event_records WHERE event_id = 'w-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(again, delivered_at);
    invoke_by_hand(&app, &worker).await;
    assert_eq!(app.runs_by_job("w-1").await, vec![("job".to_string(), 1)]);
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 1)
        .await;
    assert_eq!(app.assert_handed_off_once().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_step_dead_letters_garbage_and_ghosts() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let worker = app.worker();
    let out = worker
        .process(vec![kongflow_events::amqp::JobMessage::read(b"junk")])
        .await
        .unwrap();
    assert!(matches!(&out[0], Disposition::DeadLetter(r) if r.contains("unparseable")));
    // A message naming a job that has no row changes nothing and goes to the dead letters.
    let ghost = kongflow_events::amqp::JobMessage {
        v: 1,
        id: 987_654,
        kind: "deliverEvent".into(),
        queue: "events".into(),
        args: json!({"id": uuid::Uuid::new_v4()}),
        attempt: 0,
        run_at: chrono::Utc::now(),
    };
    assert_eq!(
        worker.process(vec![Ok(ghost)]).await.unwrap(),
        vec![Disposition::DeadLetter(
            "the ledger has no job 987654".into()
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_traffic_loses_no_acknowledged_event() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    job_and_event(&app, "seed").await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = format!("http://127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .args(["all", "--http", &format!("127.0.0.1:{port}")])
        .envs(app.child_env())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("the child to serve", Duration::from_secs(30), || async {
        app.http.get(format!("{base}/healthz")).send().await.is_ok()
    })
    .await;

    // 300 sends, 16 at a time; SIGTERM once 100 are acknowledged.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut sends = Vec::new();
    for i in 0..300 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (http, base, key, ok) = (
            app.http.clone(),
            base.clone(),
            app.api_key.clone(),
            acked.clone(),
        );
        sends.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/api/v1/events"))
                .bearer_auth(key)
                .json(&json!({"event": {"name": "crash", "id": format!("t-{i}"), "payload": {}}}))
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status().is_success()) {
                ok.lock().unwrap().push(format!("t-{i}"));
            }
            drop(permit);
        }));
        if i == 100 {
            wait_until("100 acknowledged", Duration::from_secs(30), || async {
                acked.lock().unwrap().len() >= 100
            })
            .await;
            crate::helpers::sigterm(&child);
        }
    }
    for s in sends {
        s.await.unwrap();
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the process exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful exit, got {status:?}");

    // Whatever was acknowledged is stored, and a new process delivers all of it.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 100);
    let mut next = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("all")
        .arg("--http")
        .arg("127.0.0.1:0")
        .envs(app.child_env())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(
        "a run for every acknowledged event",
        Duration::from_secs(60),
        || async { without_a_run(&app, &acked).await == 0 },
    )
    .await;
    assert_eq!(run_twice(&app).await, 0, "no event ran twice");
    // Every run was handed to the runs service, none twice under another id.
    app.assert_handed_off_once().await;
    next.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_process_exits_at_its_drain_deadline_and_loses_nothing() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    job_and_event(&app, "stuck").await;
    // The worker blocks its thread inside a batch, as a runaway computation would.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .args(["all", "--http", "127.0.0.1:0"])
        .envs(app.child_env())
        .env("KONGFLOW_FAILPOINTS", "worker-stall")
        .env("SHUTDOWN_DEADLINE_MS", "1000")
        .env("WORKER_CONCURRENCY", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    let saw = |needle: &'static str| {
        let lines = lines.clone();
        move || {
            let found = lines.lock().unwrap().iter().any(|l| l.contains(needle));
            async move { found }
        }
    };
    wait_until(
        "the worker to stall",
        Duration::from_secs(30),
        saw("failpoint worker-stall hit"),
    )
    .await;
    crate::helpers::sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the deadline ends the process")
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    wait_until(
        "the reason on stderr",
        Duration::from_secs(5),
        saw("drain deadline passed"),
    )
    .await;
    // The stalled batch never committed: its job is not completed and ran no attempt.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE kind = 'deliverEvent' AND state = 'completed'"
        )
        .await,
        0
    );
    // Its message went back to the broker: a new process delivers it, once.
    let mut next = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .args(["all", "--http", "127.0.0.1:0"])
        .envs(app.child_env())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("the event's run", Duration::from_secs(30), || async {
        app.runs_by_job("stuck").await == vec![("job".to_string(), 1)]
    })
    .await;
    wait_until("both jobs completed", Duration::from_secs(10), || async {
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE state = 'completed'",
        )
        .await
            == 2
    })
    .await;
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 1)
        .await;
    assert_eq!(app.assert_handed_off_once().await, 0);
    next.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_after_handing_a_run_off_before_deleting_it_repeats_it_with_its_id() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    job_and_event(&app, "h-1").await;
    app.relay_all().await;
    let worker = app.worker();
    app.drain_with(&worker, JobKind::DeliverEvent).await;
    invoke_by_hand(&app, &worker).await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM run_handoffs").await,
        1,
        "the run's hand-off, written with it"
    );

    run_until_abort(&app, "relay", "relay-after-message-confirm").await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM run_handoffs").await,
        1,
        "still in the outbox"
    );
    assert_eq!(
        app.depth_of(&app.topology.runs_queue()).await,
        1,
        "but published"
    );
    // The next relay publishes it again: a repeat, with the same message id.
    assert_eq!(app.relay_handoffs().await, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM run_handoffs").await, 0);
    assert_eq!(app.assert_handed_off_once().await, 1);
}

/// A child `kongflow-events <role>` with this environment and failpoints (one consumer per
/// kind), killed on drop.
fn spawn_role(
    env: &[(&'static str, String)],
    role: &str,
    failpoints: &str,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg(role)
        .envs(env.iter().cloned())
        .env("KONGFLOW_FAILPOINTS", failpoints)
        .env("WORKER_CONCURRENCY", "1")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kongflow-events")
}

fn spawn_worker(app: &TestApp, failpoints: &str) -> tokio::process::Child {
    spawn_role(&app.child_env(), "worker", failpoints)
}

/// HTTP and the relay in the test, no worker: a job on `event`, one event `id` sent, then a
/// worker child run until it aborts at `failpoint`.
async fn an_event_and_a_worker_dying_at(event: &str, id: &str, failpoint: &str) -> TestApp {
    let app = TestApp::builder()
        .roles(kongflow_events::config::Roles {
            http: true,
            relay: true,
            ..NO_ROLES
        })
        .start()
        .await;
    app.register_job("job", event).await;
    app.send_event(&app.api_key, json!({"event": {"name": event, "id": id}}))
        .await;
    let mut dying = spawn_worker(&app, failpoint);
    let status = tokio::time::timeout(Duration::from_secs(30), dying.wait())
        .await
        .expect("the worker reaches its failpoint")
        .unwrap();
    assert_eq!(status.signal(), Some(6), "the worker should abort");
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_its_commit_and_its_publish_has_its_jobs_run_within_seconds() {
    // The reconciler's margin is its default (minutes), so only the publishers' heartbeats
    // can bring the job back within the test's wait. The worker commits the delivery (and
    // the invocation job it inserts, marked for it to publish), then dies before publishing.
    let app = an_event_and_a_worker_dying_at("crash", "k-1", "publish-after-commit").await;
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE kind = 'events.invokeDispatcher'
             AND state = 'available' AND published_at IS NOT NULL AND attempt = 0"
        )
        .await,
        1,
        "the invocation job is committed, marked published, and was never sent"
    );
    let died = std::time::Instant::now();
    let _next = spawn_worker(&app, "");
    wait_until(
        "the stranded invocation to run (within 10 s of the death)",
        Duration::from_secs(10),
        || async { app.runs_by_job("k-1").await == vec![("job".to_string(), 1)] },
    )
    .await;
    eprintln!("ran {:?} after the worker died", died.elapsed());
    app.settle().await;
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_creating_a_run_and_handing_it_off_has_it_handed_off_within_seconds()
 {
    // The worker commits the run, its hand-off stamped for it to publish, and dies before
    // publishing. Only the reaper (the publisher's heartbeat stopped) can give the hand-off
    // to the relay within the wait.
    let app =
        an_event_and_a_worker_dying_at("handed", "ho-1", "handoff-publish-after-commit").await;
    assert_eq!(app.runs_by_job("ho-1").await, vec![("job".to_string(), 1)]);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM run_handoffs WHERE published_by IS NOT NULL"
        )
        .await,
        1,
        "the run's hand-off is committed, stamped for the dead worker to publish"
    );
    assert_eq!(
        app.depth_of(&app.topology.runs_queue()).await,
        0,
        "and was never sent"
    );
    let died = std::time::Instant::now();
    wait_until(
        "the hand-off published (within 10 s of the death)",
        Duration::from_secs(10),
        || async { app.depth_of(&app.topology.runs_queue()).await == 1 },
    )
    .await;
    eprintln!("handed off {:?} after the worker died", died.elapsed());
    assert_eq!(app.assert_handed_off_once().await, 0, "exactly once");
    assert_eq!(count(&app, "SELECT count(*) FROM run_handoffs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_publishers_confirmed_messages_waiting_in_a_deep_queue_are_not_published_again() {
    // The relay here, no worker anywhere: every message stays in its queue.
    let app = TestApp::builder()
        .roles(kongflow_events::config::Roles {
            relay: true,
            ..NO_ROLES
        })
        .start()
        .await;
    app.register_job("job", "deep").await;
    let (mut child, base) = app.start_child("serve", &[]).await;
    for i in 0..20 {
        let sent = app
            .http
            .post(format!("{base}/api/v1/events"))
            .bearer_auth(&app.api_key)
            .json(&json!({"event": {"name": "deep", "id": format!("deep-{i}")}}))
            .send()
            .await
            .unwrap();
        assert!(sent.status().is_success());
    }
    let depth = || async {
        let mut n = 0;
        for shard in 0..app.topology.shard_count() {
            n += app.shard_depth(JobKind::DeliverEvent, shard).await;
        }
        n
    };
    wait_until("20 messages confirmed", Duration::from_secs(10), || async {
        depth().await == 20
    })
    .await;
    // The process's heartbeat has said every ticket it took is settled...
    wait_until(
        "a heartbeat after the confirms",
        Duration::from_secs(10),
        || async {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM queue_jobs j JOIN job_publishers p ON p.id = j.published_by
             WHERE j.publish_seq > p.settled_through",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            open == 0
        },
    )
    .await;
    // ...then it dies, and the relay finds it dead.
    child.kill().await.unwrap();
    wait_until(
        "the dead publisher reaped",
        Duration::from_secs(15),
        || async { count(&app, "SELECT count(*) FROM job_publishers").await == 0 },
    )
    .await;
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE published_at IS NULL"
        )
        .await,
        0,
        "nothing went back to the outbox"
    );
    assert_eq!(depth().await, 20, "no message published twice");
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_workers_killed_every_two_seconds_and_the_relay_once_lose_nothing_and_run_nothing_twice()
 {
    // `CHAOS_EVENTS` at `CHAOS_RATE` a second (the full run: 10,000 at 400).
    let (events, rate) = (env_or("CHAOS_EVENTS", 2_000), env_or("CHAOS_RATE", 300));
    let app = TestApp::builder()
        .roles(kongflow_events::config::Roles {
            http: true,
            ..NO_ROLES
        })
        .start()
        .await;
    app.register_job("job", "chaos").await;
    let env = app.child_env();
    let mut relay = spawn_role(&env, "relay", "");
    let mut workers = [
        spawn_role(&env, "worker", ""),
        spawn_role(&env, "worker", ""),
    ];
    let sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));

    let chaos = {
        let sending = sending.clone();
        tokio::spawn(async move {
            let (mut kills, mut relay_killed) = (0, false);
            while sending.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let w = &mut workers[kills % 2];
                w.start_kill().unwrap();
                w.wait().await.unwrap();
                *w = spawn_role(&env, "worker", "");
                kills += 1;
                if kills == 3 && !relay_killed {
                    relay.start_kill().unwrap();
                    relay.wait().await.unwrap();
                    relay = spawn_role(&env, "relay", "");
                    relay_killed = true;
                }
            }
            (kills, relay_killed, relay, workers)
        })
    };

    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let started = std::time::Instant::now();
    let mut sends = Vec::new();
    for i in 0..events {
        // Paced: event i leaves at i / rate seconds.
        let at = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(at.into()).await;
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (http, base, key, ok) = (
            app.http.clone(),
            app.base_url.clone(),
            app.api_key.clone(),
            acked.clone(),
        );
        sends.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/api/v1/events"))
                .bearer_auth(key)
                .json(&json!({"event": {"name": "chaos", "id": format!("c-{i}")}}))
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status().is_success()) {
                ok.lock().unwrap().push(format!("c-{i}"));
            }
            drop(permit);
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    let last_send = std::time::Instant::now();
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let (kills, relay_killed, _relay, _workers) = chaos.await.unwrap();
    assert!(
        relay_killed && kills >= 3,
        "kills {kills}, relay killed {relay_killed}"
    );
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), events, "every send acknowledged");

    wait_until(
        "a run for every acknowledged event within 15 s of the last send",
        Duration::from_secs(15),
        || async { without_a_run(&app, &acked).await == 0 },
    )
    .await;
    eprintln!(
        "{events} events at {rate}/s, {kills} worker kills and the relay once: settled {:?} after the last send",
        last_send.elapsed()
    );
    assert_eq!(run_twice(&app).await, 0, "no event ran twice");
    app.settle().await;
    app.assert_completed_once(JobKind::DeliverEvent, events)
        .await;
    app.assert_completed_once(JobKind::InvokeDispatcher, events)
        .await;
}
