//! The whole path of an event, with every role running.

use std::time::Duration;

use kongflow_events::app::Roles;
use kongflow_events::dispatchers::{self, EventRule, JobRegistration};
use kongflow_events::ledger::JobKind;
use kongflow_events::worker::Disposition;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::json;

use crate::helpers::{TestApp, job_body, wait_until};

async fn wait_delivered(app: &TestApp, event_id: &str) {
    wait_until(
        "the event to be delivered",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT delivered_at IS NOT NULL FROM event_records WHERE event_id = $1",
            )
            .bind(event_id)
            .fetch_optional(&app.pool)
            .await
            .unwrap()
            .unwrap_or(false)
        },
    )
    .await;
    app.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_runs_each_matching_dispatcher_once_and_no_other() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "match", job_body("order.paid", json!({})))
        .await;
    app.put_job(
        &key,
        "match-filter",
        job_body("order.paid", json!({"payload": {"total": [{"$gt": 10}]}})),
    )
    .await;
    app.put_job(
        &key,
        "filtered-out",
        job_body("order.paid", json!({"payload": {"total": [{"$lt": 10}]}})),
    )
    .await;
    app.put_job(
        &key,
        "disabled",
        json!({"version": "1", "trigger": {"event": "order.paid"}, "enabled": false}),
    )
    .await;
    dispatchers::register_job(
        &app.pool,
        &app.env,
        "manual",
        &JobRegistration {
            version: "1".into(),
            rule: EventRule {
                event_names: vec!["order.paid".into()],
                source: "trigger.dev".into(),
                payload_filter: None,
                context_filter: None,
            },
            enabled: true,
            manual: true,
        },
    )
    .await
    .unwrap();
    app.put_job(&key, "other-name", job_body("order.refunded", json!({})))
        .await;
    app.put_job(
        &key,
        "other-source",
        job_body("order.paid", json!({"source": "stripe"})),
    )
    .await;
    let (_, other_key) = app.new_env("other").await;
    app.put_job(&other_key, "other-env", job_body("order.paid", json!({})))
        .await;

    let log = app
        .send_event(
            &key,
            json!({"event": {"name": "order.paid", "id": "evt-1", "payload": {"total": 42}}}),
        )
        .await;
    assert_eq!(log["id"], "evt-1");
    assert_eq!(log["payload"], json!({"total": 42}));
    assert!(log["deliveredAt"].is_null());
    wait_delivered(&app, "evt-1").await;

    assert_eq!(
        app.runs_by_job("evt-1").await,
        vec![("match".to_string(), 1), ("match-filter".to_string(), 1)]
    );
    let (status, got) = app
        .request(
            reqwest::Method::GET,
            "/api/v2/events/evt-1",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(got["id"], "evt-1");
    assert_eq!(got["name"], "order.paid");
    let runs = got["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r["status"] == "QUEUED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_id_twice_stores_and_runs_once() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("signup", json!({})))
        .await;
    let body = json!({"event": {"name": "signup", "id": "dup-1", "payload": {"n": 1}}});
    let first = app.send_event(&key, body.clone()).await;
    let second = app
        .send_event(
            &key,
            json!({"event": {"name": "signup", "id": "dup-1", "payload": {"n": 2}}}),
        )
        .await;
    assert_eq!(
        second["payload"], first["payload"],
        "the stored event is returned"
    );
    wait_delivered(&app, "dup-1").await;
    app.send_event(&key, body).await;
    app.settle().await;

    let records: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_records WHERE event_id = 'dup-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let deliveries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs WHERE kind = 'deliverEvent'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((records, deliveries), (1, 1));
    assert_eq!(app.runs_by_job("dup-1").await, vec![("job".to_string(), 1)]);
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_trigger_runs_the_latest_version_of_each_attached_job() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "a", job_body("unrelated", json!({})))
        .await;
    app.put_job(&key, "b", job_body("unrelated", json!({})))
        .await;
    let a2 = app
        .put_job(
            &key,
            "a",
            json!({"version": "2.0.0", "trigger": {"event": "unrelated"}}),
        )
        .await;
    dispatchers::register_dynamic_trigger(
        &app.pool,
        &app.env,
        "on-push",
        &["a".into(), "b".into()],
    )
    .await
    .unwrap();
    dispatchers::register_dynamic_registration(
        &app.pool,
        &app.env,
        "on-push",
        "repo-1",
        &EventRule {
            event_names: vec!["repo.push".into()],
            source: "github".into(),
            payload_filter: Some(json!({"repo": ["kongflow"]})),
            context_filter: None,
        },
    )
    .await
    .unwrap();

    app.send_event(
        &key,
        json!({"event": {"name": "repo.push", "id": "push-1", "source": "github", "payload": {"repo": "kongflow"}}}),
    )
    .await;
    app.send_event(
        &key,
        json!({"event": {"name": "repo.push", "id": "push-2", "source": "github", "payload": {"repo": "other"}}}),
    )
    .await;
    wait_delivered(&app, "push-1").await;
    wait_delivered(&app, "push-2").await;
    assert_eq!(
        app.runs_by_job("push-1").await,
        vec![("a".to_string(), 1), ("b".to_string(), 1)]
    );
    assert!(app.runs_by_job("push-2").await.is_empty());
    let a_version: uuid::Uuid = sqlx::query_scalar(
        "SELECT r.job_version_id FROM job_runs r JOIN jobs j ON j.id = r.job_id WHERE j.slug = 'a'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        a_version.to_string(),
        a2["latestVersion"]["id"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_message_published_twice_creates_one_run() {
    // The relay runs; the worker is driven by hand so the duplicate is certain to be seen.
    let app = TestApp::builder()
        .roles(Roles {
            http: true,
            relay: true,
            ..Roles::NONE
        })
        .start()
        .await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("ping", json!({}))).await;
    app.send_event(
        &key,
        json!({"event": {"name": "ping", "id": "p-1", "payload": {}}}),
    )
    .await;
    let worker = app.worker();
    wait_until(
        "deliverEvent published",
        Duration::from_secs(10),
        || async { app.queue_depth(JobKind::DeliverEvent).await == 1 },
    )
    .await;
    assert_eq!(
        app.drain_with(&worker, JobKind::DeliverEvent).await,
        vec![Disposition::Ack]
    );
    wait_until(
        "invokeDispatcher published",
        Duration::from_secs(10),
        || async { app.queue_depth(JobKind::InvokeDispatcher).await == 1 },
    )
    .await;

    // Copy the message and publish the copy: the queue now holds the same job twice.
    let original = app.get_message(JobKind::InvokeDispatcher).await.unwrap();
    let data = original.delivery.data.clone();
    original
        .delivery
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    app.channel
        .basic_publish(
            app.topology
                .exchange(JobKind::InvokeDispatcher)
                .as_str()
                .into(),
            app.work_key().as_str().into(),
            BasicPublishOptions::default(),
            &data,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    wait_until("both copies queued", Duration::from_secs(10), || async {
        app.queue_depth(JobKind::InvokeDispatcher).await == 2
    })
    .await;
    let dispositions = app.drain_with(&worker, JobKind::InvokeDispatcher).await;
    assert_eq!(dispositions, vec![Disposition::Ack, Disposition::Ack]);
    assert_eq!(app.runs_by_job("p-1").await, vec![("job".to_string(), 1)]);
    // The copy found its job completed and ran nothing: one attempt.
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 1)
        .await;
    assert_eq!(app.queue_depth(JobKind::InvokeDispatcher).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_recovers_when_its_connections_are_cut() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("cut", json!({}))).await;
    app.send_event(
        &key,
        json!({"event": {"name": "cut", "id": "c-1", "payload": {}}}),
    )
    .await;
    wait_delivered(&app, "c-1").await;

    // Cut every Postgres connection of this test's database but the checker's own...
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // ...and every RabbitMQ connection of this test's relay and worker.
    let closed = close_amqp_connections(app.topology.prefix());
    assert!(closed >= 2, "closed {closed} rabbitmq connections");

    app.send_event(
        &key,
        json!({"event": {"name": "cut", "id": "c-2", "payload": {}}}),
    )
    .await;
    wait_delivered(&app, "c-2").await;
    assert_eq!(app.runs_by_job("c-2").await, vec![("job".to_string(), 1)]);
}

/// Close the broker connections whose name carries `prefix`; returns how many.
fn close_amqp_connections(prefix: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(prefix)) {
        let pid = line.split_whitespace().next().unwrap();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test cuts the connection", "-q"])
            .status()
            .expect("rabbitmqctl close_connection");
        assert!(status.success());
        closed += 1;
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_of_the_same_ids_store_each_id_once() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("burst", json!({}))).await;
    // 10 ids, each sent 5 times at once: the group commit sees duplicates in one batch.
    let sends = (0..50).map(|i| {
        let body =
            json!({"event": {"name": "burst", "id": format!("b-{}", i % 10), "payload": {"i": i}}});
        let app = &app;
        let key = key.clone();
        async move { app.send_event(&key, body).await }
    });
    let logs = futures_util::future::join_all(sends).await;
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(log["id"], format!("b-{}", i % 10));
    }
    for id in 0..10 {
        wait_delivered(&app, &format!("b-{id}")).await;
    }
    let (records, deliveries, runs): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM event_records), \
                (SELECT count(*) FROM queue_jobs WHERE kind = 'deliverEvent'), \
                (SELECT count(*) FROM job_runs)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((records, deliveries, runs), (10, 10, 10));
    app.settle().await;
    app.assert_completed_once(JobKind::DeliverEvent, 10).await;
    app.assert_completed_once(JobKind::InvokeDispatcher, 10)
        .await;
}
