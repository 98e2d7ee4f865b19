//! The fast path: the process that commits jobs publishes them itself, right after its
//! commit. What the broker does not take goes back to the relay; a process that dies
//! before it publishes loses nothing (the reconciler publishes the jobs).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use kongflow_events::EventsService;
use kongflow_events::amqp::DirectPublisher;
use kongflow_events::app::Roles;
use kongflow_events::config::RelayConfig;
use kongflow_events::events::{SendEvent, SendEventOptions};
use kongflow_events::ledger::JobKind;
use serde_json::json;

use crate::helpers::{NO_ROLES, TestApp, wait_until};

async fn published_at(app: &TestApp, event_id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar(
        "SELECT j.published_at FROM queue_jobs j JOIN event_records e
           ON j.args->>'id' = e.id::text
         WHERE j.kind = 'deliverEvent' AND e.event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

fn send(id: &str) -> SendEvent {
    SendEvent {
        id: Some(id.into()),
        name: "fast".into(),
        payload: json!({}),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_broker_does_not_take_goes_back_to_the_outbox_for_the_relay() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let publisher = DirectPublisher::new(
        app.store.amqp_url.clone(),
        app.topology.clone(),
        app.pool.clone(),
        Duration::from_secs(10),
    );
    let events = EventsService::new(app.pool.clone()).publishing(publisher);
    events
        .ingest_send_event(&app.env, send("taken"), SendEventOptions::default())
        .await
        .unwrap();
    assert!(published_at(&app, "taken").await.is_some());
    wait_until("the first message", Duration::from_secs(5), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 1
    })
    .await;

    // The work queue gone: the broker confirms the publish but returns the message.
    app.remove_work_queue(JobKind::DeliverEvent).await;
    events
        .ingest_send_event(&app.env, send("returned"), SendEventOptions::default())
        .await
        .unwrap();
    assert_eq!(
        published_at(&app, "returned").await,
        None,
        "a returned message puts its job back in the outbox"
    );

    // The relay publishes it once the queue is back.
    app.topology.declare(&app.channel).await.unwrap();
    assert_eq!(app.relay_all().await, 1);
    assert!(published_at(&app, "returned").await.is_some());
    wait_until("the relayed message", Duration::from_secs(5), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_between_its_commit_and_its_publish_loses_nothing() {
    // Relay (reconciling every 200 ms, a job overdue by 500 ms) and worker in this process.
    let relay = RelayConfig {
        maintenance: kongflow_events::config::MaintenanceConfig {
            reconcile_interval: std::time::Duration::from_millis(200),
            reconcile_margin: std::time::Duration::from_millis(500),
            ..Default::default()
        },
        ..RelayConfig::default()
    };
    let app = TestApp::builder()
        .roles(Roles {
            relay: true,
            worker: true,
            ..Roles::NONE
        })
        .relay(relay)
        .start()
        .await;
    app.register_job("job", "fast").await;
    let (mut child, base) = app
        .start_child("serve", &[("KONGFLOW_FAILPOINTS", "publish-after-commit")])
        .await;
    // The answer may or may not get out before the process dies: the event is committed
    // before either.
    let _ = app
        .http
        .post(format!("{base}/api/v1/events"))
        .bearer_auth(&app.api_key)
        .json(&json!({"event": {"name": "fast", "id": "killed"}}))
        .send()
        .await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the process reaches its failpoint")
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(6),
        "serve should abort, got {status:?}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM event_records")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "committed before the publish it never made");
    wait_until(
        "the reconciled job's run",
        Duration::from_secs(30),
        || async { app.runs_by_job("killed").await == vec![("job".to_string(), 1)] },
    )
    .await;
    app.settle().await;
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 1)
        .await;
}
