//! Processes killed in the middle of their work (the binary, aborted at a failpoint).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use kongflow_events::EventsService;
use kongflow_events::app::Roles;
use kongflow_events::events::{SendEvent, SendEventOptions};
use kongflow_events::queue::JobKind;
use kongflow_events::triggers::{self, EventRule, JobRegistration};
use kongflow_events::worker::Disposition;
use serde_json::json;

use crate::helpers::{TestApp, wait_until};

const NO_ROLES: Roles = Roles {
    http: false,
    relay: false,
    worker: false,
};

async fn job_and_event(app: &TestApp, event_id: &str) {
    triggers::register_job(
        &app.pool,
        &app.env,
        "job",
        &JobRegistration {
            version: "1".into(),
            rule: EventRule {
                event_names: vec!["crash".into()],
                source: "trigger.dev".into(),
                payload_filter: None,
                context_filter: None,
            },
            enabled: true,
            manual: false,
        },
    )
    .await
    .unwrap();
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

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_after_publishing_before_marking_causes_no_double_effect() {
    let app = TestApp::spawn_with(NO_ROLES).await;
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
    app.relay_all().await;
    wait_until(
        "invokeDispatcher queued",
        Duration::from_secs(5),
        || async { app.queue_depth(JobKind::InvokeDispatcher).await == 1 },
    )
    .await;
    app.drain_with(&worker, JobKind::InvokeDispatcher).await;
    assert_eq!(app.runs_by_job("r-1").await, vec![("job".to_string(), 1)]);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_commit_and_ack_causes_no_double_effect() {
    let app = TestApp::spawn_with(NO_ROLES).await;
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
    app.relay_all().await;
    wait_until(
        "invokeDispatcher queued",
        Duration::from_secs(5),
        || async { app.queue_depth(JobKind::InvokeDispatcher).await == 1 },
    )
    .await;
    app.drain_with(&worker, JobKind::InvokeDispatcher).await;
    assert_eq!(app.runs_by_job("w-1").await, vec![("job".to_string(), 1)]);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_work_queue_is_rejected_and_the_worker_goes_on() {
    let app = TestApp::spawn_with(NO_ROLES).await;
    let worker = app.worker();
    let out = worker
        .process(vec![Err("unparseable job message: junk".into())])
        .await
        .unwrap();
    assert!(matches!(out[0], Disposition::Reject(_)));
    // A message naming a job that has no row is acknowledged and changes nothing.
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
        vec![Disposition::Ack]
    );
    app.finish().await;
}
