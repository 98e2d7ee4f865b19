//! Delayed delivery through the RabbitMQ delay tiers.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kongflow_events::amqp::JobMessage;
use kongflow_events::amqp::publish::route;
use kongflow_events::amqp::tiers::{self, DelayDigits};
use kongflow_events::app::Roles;
use kongflow_events::config::RelayConfig;
use kongflow_events::ledger::JobKind;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{HTTP_ONLY, TestApp, job_body, wait_until};

/// `(deliver_at, delivered_at)` of an event by the producer's id.
async fn delivery(app: &TestApp, event_id: &str) -> (DateTime<Utc>, Option<DateTime<Utc>>) {
    sqlx::query_as("SELECT deliver_at, delivered_at FROM event_records WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn wait_delivered(app: &TestApp, event_id: &str, timeout: Duration) -> DateTime<Utc> {
    wait_until("the event to be delivered", timeout, || async {
        delivery(app, event_id).await.1.is_some()
    })
    .await;
    delivery(app, event_id).await.1.unwrap()
}

/// What the ledger says of an event's deliverEvent job.
#[derive(Debug, sqlx::FromRow)]
struct Ledger {
    id: i64,
    state: String,
    args: serde_json::Value,
    run_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
}

/// The deliverEvent job of an event.
async fn deliver_job(app: &TestApp, event_id: &str) -> Ledger {
    sqlx::query_as(
        "SELECT q.id, q.state::text AS state, q.args, q.run_at, q.published_at
         FROM queue_jobs q JOIN event_records e ON q.args->>'id' = e.id::text
         WHERE q.kind = 'deliverEvent' AND e.event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn wait_published(app: &TestApp, event_id: &str) -> Ledger {
    wait_until(
        "the job to be published",
        Duration::from_secs(10),
        || async { deliver_job(app, event_id).await.published_at.is_some() },
    )
    .await;
    deliver_job(app, event_id).await
}

/// Publish a deliverEvent job's message straight to the work queue, past the tiers, as a
/// clock gone wrong would, and wait for the broker's confirm.
async fn publish_to_work_queue(app: &TestApp, job: &Ledger) {
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let message = JobMessage {
        v: JobMessage::VERSION,
        id: job.id,
        kind: "deliverEvent".into(),
        queue: "events".into(),
        args: job.args.clone(),
        attempt: 0,
        run_at: job.run_at,
    };
    let confirm = channel
        .basic_publish(
            app.topology.exchange(JobKind::DeliverEvent).as_str().into(),
            app.work_key().as_str().into(),
            BasicPublishOptions::default(),
            &message.to_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());
}

fn at(ms_from_now: i64) -> String {
    kongflow_events::dates::iso(Utc::now() + chrono::Duration::milliseconds(ms_from_now))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_delays_sent_longest_first_arrive_in_due_order_on_time() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("later", json!({}))).await;
    // The longest first: a shared queue with per-message TTLs would hold the others
    // behind it.
    let delays = [5_000, 50, 1_000, 2_000];
    for ms in delays {
        app.send_event(
            &key,
            json!({"event": {"name": "later", "id": format!("d-{ms}"), "payload": {}},
                   "options": {"deliverAt": at(ms)}}),
        )
        .await;
    }
    let mut delivered = Vec::new();
    for ms in delays {
        let id = format!("d-{ms}");
        let done = wait_delivered(&app, &id, Duration::from_secs(15)).await;
        let (due, _) = delivery(&app, &id).await;
        let late = (done - due).num_milliseconds();
        // Never early. How late is the benchmark's to say; how they come out of the tiers
        // on time is asserted on the mechanism itself, in the test after this one.
        assert!(
            done >= due,
            "{id} delivered {}us early",
            (due - done).num_microseconds().unwrap()
        );
        eprintln!("{id} delivered {late} ms late");
        delivered.push((done, ms));
    }
    delivered.sort();
    let order: Vec<i64> = delivered.iter().map(|(_, ms)| *ms).collect();
    assert_eq!(order, vec![50, 1_000, 2_000, 5_000]);
    app.settle().await;
    for ms in delays {
        assert_eq!(
            app.runs_by_job(&format!("d-{ms}")).await,
            vec![("job".to_string(), 1)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_deliver_at_and_a_zero_deliver_after_deliver_now() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("now", json!({}))).await;
    let past = app
        .send_event(
            &key,
            json!({"event": {"name": "now", "id": "past", "payload": {}},
                   "options": {"deliverAt": "2020-01-01T00:00:00.000Z", "deliverAfter": 3600}}),
        )
        .await;
    assert_eq!(
        past["deliverAt"], "2020-01-01T00:00:00.000Z",
        "deliverAt wins over deliverAfter"
    );
    app.send_event(
        &key,
        json!({"event": {"name": "now", "id": "zero", "payload": {}}, "options": {"deliverAfter": 0}}),
    )
    .await;
    for id in ["past", "zero"] {
        wait_delivered(&app, id, Duration::from_secs(10)).await;
        let job = deliver_job(&app, id).await;
        // Straight to the work exchange: the job was never in a tier.
        let r = route(
            &app.topology,
            kongflow_events::amqp::publish::Destination {
                kind: JobKind::DeliverEvent,
                queue: "events",
                shard: 0,
                priority: None,
            },
            job.run_at,
            job.published_at.unwrap(),
        );
        assert_eq!(r.delay, None, "{id}");
    }
    app.settle().await;
    assert_eq!(app.runs_by_job("past").await, vec![("job".to_string(), 1)]);
    assert_eq!(app.runs_by_job("zero").await, vec![("job".to_string(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_waits_in_its_tier_not_in_postgres() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("later", json!({}))).await;
    let log = app
        .send_event(
            &key,
            json!({"event": {"name": "later", "id": "h-1", "payload": {}}, "options": {"deliverAfter": 3600}}),
        )
        .await;
    let deliver_at = DateTime::parse_from_rfc3339(log["deliverAt"].as_str().unwrap()).unwrap();
    let ahead = (deliver_at.with_timezone(&Utc) - Utc::now()).num_seconds();
    assert!((3590..=3600).contains(&ahead), "deliverAt {ahead}s ahead");

    // Published at once, into the tier of its longest part; the ledger says scheduled.
    let job = wait_published(&app, "h-1").await;
    assert_eq!(job.state, "scheduled");
    let entry = DelayDigits::of(3_600_000).entry_level().unwrap();
    let level = tiers::level(entry);
    let digit = (3_600_000 / level.unit_ms).min(level.max_digit as u64);
    let tier = app.topology.delay_queue(entry, digit * level.unit_ms);
    wait_until(
        "the message in its tier",
        Duration::from_secs(5),
        || async { app.depth_of(&tier).await == 1 },
    )
    .await;
    assert_eq!(app.queue_depth(JobKind::DeliverEvent).await, 0);
    assert!(app.runs_by_job("h-1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_of_a_year_is_routed_through_the_top_tier() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.send_event(
        &key,
        json!({"event": {"name": "far", "id": "y-1", "payload": {}}, "options": {"deliverAfter": 365 * 86_400}}),
    )
    .await;
    let job = wait_published(&app, "y-1").await;
    let r = route(
        &app.topology,
        kongflow_events::amqp::publish::Destination {
            kind: JobKind::DeliverEvent,
            queue: "events",
            shard: 0,
            priority: None,
        },
        job.run_at,
        job.published_at.unwrap(),
    );
    let digits = r.delay.expect("a year is delayed");
    assert_eq!(r.exchange, app.topology.delay_exchange(tiers::LEVELS - 1));
    assert!(digits.hops() <= tiers::LEVELS);
    let year_ms = 365 * 86_400_000u64;
    assert!(digits.total_ms().abs_diff(year_ms) < 10_000);
    // The top tier holds it now; every other tier and the work queue are empty.
    let top = app
        .topology
        .delay_queue(tiers::LEVELS - 1, tiers::level(tiers::LEVELS - 1).unit_ms);
    wait_until(
        "the message in the top tier",
        Duration::from_secs(5),
        || async { app.depth_of(&top).await == 1 },
    )
    .await;
    let mut elsewhere = 0;
    for q in app.topology.all_queues() {
        if q != top {
            elsewhere += app.depth_of(&q).await;
        }
    }
    assert_eq!(elsewhere, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_event_is_never_delivered_and_cancel_after_delivery_changes_nothing() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("c", json!({}))).await;
    app.send_event(
        &key,
        json!({"event": {"name": "c", "id": "soon", "payload": {}}, "options": {"deliverAt": at(1_500)}}),
    )
    .await;
    wait_published(&app, "soon").await;
    let cancel = |id: &'static str, key: String| {
        let app = &app;
        async move {
            app.request(
                Method::POST,
                &format!("/api/v1/events/{id}/cancel"),
                Some(&key),
                None,
            )
            .await
        }
    };
    let (status, log) = cancel("soon", key.clone()).await;
    assert_eq!(status, StatusCode::OK, "{log}");
    assert_eq!(log["id"], "soon");
    assert!(log["cancelledAt"].is_string(), "{log}");
    assert!(log["deliveredAt"].is_null());
    // Twice is harmless: the same answer.
    let (status, again) = cancel("soon", key.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["cancelledAt"], log["cancelledAt"]);
    // Another environment cannot see it.
    let (_, other_key) = app.new_env("other").await;
    let (status, body) = cancel("soon", other_key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    // The delay expires: the message is acknowledged, nothing delivered, no runs.
    let job = deliver_job(&app, "soon").await;
    assert_eq!(job.state, "cancelled");
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    wait_until(
        "the expired message to be consumed",
        Duration::from_secs(5),
        || async {
            let mut total = 0;
            for q in app.topology.all_queues() {
                total += app.depth_of(&q).await;
            }
            total == 0
        },
    )
    .await;
    assert_eq!(delivery(&app, "soon").await.1, None);
    assert!(app.runs_by_job("soon").await.is_empty());
    assert_eq!(deliver_job(&app, "soon").await.state, "cancelled");

    // Delivered first, cancelled after: nothing changes.
    app.send_event(
        &key,
        json!({"event": {"name": "c", "id": "done", "payload": {}}}),
    )
    .await;
    let delivered = wait_delivered(&app, "done", Duration::from_secs(10)).await;
    app.settle().await;
    let (status, log) = cancel("done", key.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(log["cancelledAt"].is_null(), "{log}");
    assert_eq!(log["deliveredAt"], kongflow_events::dates::iso(delivered));
    assert_eq!(app.runs_by_job("done").await, vec![("job".to_string(), 1)]);
    let (status, _) = cancel("nope", key.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_purged_from_the_tiers_are_delivered_by_the_reconciler() {
    let relay = RelayConfig {
        maintenance: kongflow_events::config::MaintenanceConfig {
            reconcile_interval: std::time::Duration::from_millis(200),
            reconcile_margin: std::time::Duration::from_millis(500),
            ..Default::default()
        },
        ..RelayConfig::default()
    };
    let app = TestApp::builder()
        .roles(Roles::ALL)
        .relay(relay)
        .start()
        .await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("lost", json!({}))).await;
    for i in 0..3 {
        app.send_event(
            &key,
            json!({"event": {"name": "lost", "id": format!("lost-{i}"), "payload": {}},
                   "options": {"deliverAt": at(4_000)}}),
        )
        .await;
    }
    // Due in 4 s: on a machine slowed by the suite, a shorter delay let messages leave the
    // tiers before the purge below.
    // The three messages in the tiers (the ledger's published mark is set at insert by
    // the process that publishes them itself, so it says nothing about the broker yet).
    let not_work: Vec<String> = app
        .topology
        .all_queues()
        .into_iter()
        .skip(JobKind::ALL.len())
        .collect();
    wait_until(
        "three messages in the tiers",
        Duration::from_secs(10),
        || async {
            let mut held = 0;
            for q in &not_work {
                held += app.depth_of(q).await;
            }
            held == 3
        },
    )
    .await;
    // An operator purges every tier.
    let mut purged = 0;
    for q in &not_work {
        purged += app
            .channel
            .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    assert_eq!(purged, 3, "the three messages sat in the tiers");
    for i in 0..3 {
        let id = format!("lost-{i}");
        wait_delivered(&app, &id, Duration::from_secs(15)).await;
    }
    app.settle().await;
    for i in 0..3 {
        assert_eq!(
            app.runs_by_job(&format!("lost-{i}")).await,
            vec![("job".to_string(), 1)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_arrives_early_is_sent_back_until_due() {
    // No relay: the test publishes the message itself, straight to the work exchange,
    // skipping the tiers, as a clock gone wrong would.
    let roles = Roles {
        http: true,
        worker: true,
        ..Roles::NONE
    };
    let app = TestApp::builder().roles(roles).start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("early", json!({}))).await;
    app.send_event(
        &key,
        json!({"event": {"name": "early", "id": "e-1", "payload": {}}, "options": {"deliverAt": at(800)}}),
    )
    .await;
    let job = deliver_job(&app, "e-1").await;
    // Straight to the work queue, 800 ms before it is due.
    publish_to_work_queue(&app, &job).await;
    // The worker sends it back: it waits in a tier for the rest of its delay.
    wait_until(
        "the message back in a tier",
        Duration::from_secs(5),
        || async { tiers_depth(&app).await > 0 },
    )
    .await;
    assert_eq!(delivery(&app, "e-1").await.1, None, "not run early");
    let delivered = wait_delivered(&app, "e-1", Duration::from_secs(5)).await;
    assert!(
        delivered >= job.run_at,
        "delivered {} ms early",
        (job.run_at - delivered).num_milliseconds()
    );
    assert_eq!(tiers_depth(&app).await, 0);
    // No relay running: publish the invocations the delivery enqueued.
    app.relay_all().await;
    app.settle().await;
    assert_eq!(app.runs_by_job("e-1").await, vec![("job".to_string(), 1)]);
}

/// Messages waiting in the delay tiers, all of them.
async fn tiers_depth(app: &TestApp) -> u32 {
    let mut total = 0;
    for (level, _, ttl) in tiers::tiers() {
        total += app.depth_of(&app.topology.delay_queue(level, ttl)).await;
    }
    total
}

/// The queues a message was dead-lettered from (its `x-death` header), and the first of
/// them (`x-first-death-queue`): the tier it entered.
fn tiers_passed(properties: &BasicProperties) -> (Vec<String>, Option<String>) {
    use lapin::types::AMQPValue;
    let headers = properties.headers().clone().unwrap_or_default();
    let first = match headers.inner().get("x-first-death-queue") {
        Some(AMQPValue::LongString(q)) => Some(q.to_string()),
        _ => None,
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death").cloned() else {
        return (Vec::new(), first);
    };
    let queues: Vec<String> = deaths
        .as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => match t.inner().get("queue") {
                Some(AMQPValue::LongString(q)) => Some(q.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    (queues, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_leave_the_tiers_a_lead_early_for_the_worker_to_hold() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("lead", json!({}))).await;
    // Through the library, which leaves publishing to the relay (the API publishes its
    // own jobs, with the process's lead).
    let events = kongflow_events::EventsService::new(app.pool.clone());
    for (id, ms) in [("l-1", 2_500), ("l-2", 4_000)] {
        let request = kongflow_events::events::SendEvent {
            id: Some(id.into()),
            name: "lead".into(),
            ..Default::default()
        };
        let options = kongflow_events::events::SendEventOptions {
            deliver_at: Some(Utc::now() + chrono::Duration::milliseconds(ms)),
            ..Default::default()
        };
        events
            .ingest_send_event(&app.env, request, options)
            .await
            .unwrap();
    }
    // A relay routing with a lead of 1.5 s: wide, so a busy test machine cannot make the
    // messages late enough to miss it.
    let lead = Duration::from_millis(1_500);
    let topology = app.topology.clone().with_delay_lead(lead);
    let relay =
        kongflow_events::relay::Relay::new(app.pool.clone(), topology, RelayConfig::default());
    let channel = relay.open_channel(&app.amqp).await.unwrap();
    assert_eq!(relay.publish_batch(&channel).await.unwrap(), 2);

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut arrived = Vec::new();
    while arrived.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the tiers let go of both"
        );
        let Some(m) = app.get_message(JobKind::DeliverEvent).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let now = Utc::now();
        let message = JobMessage::parse(&m.delivery.data).unwrap();
        // It came through the tiers, entering at the level its delay's digits name.
        let (passed, entered) = tiers_passed(&m.properties);
        let delay_queues = format!("{}.delay.", app.topology.prefix());
        assert!(
            !passed.is_empty() && passed.iter().all(|q| q.starts_with(&delay_queues)),
            "{passed:?}"
        );
        let published_at: DateTime<Utc> =
            sqlx::query_scalar("SELECT published_at FROM queue_jobs WHERE id = $1")
                .bind(message.id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        // The delay left when the relay's claim began (`published_at` is its transaction's
        // start); the relay routes by the delay left at its publish, a little later: up to
        // 250 ms later on a busy machine, the tier the test accepts is any of that span's.
        let remaining =
            tiers::remaining_ms((message.run_at - published_at).to_std().unwrap() - lead);
        let tier_of = |remaining: u64| {
            let entry = DelayDigits::of(remaining).entry_level().unwrap();
            let level = tiers::level(entry);
            let digit = (remaining / level.unit_ms).min(level.max_digit as u64);
            app.topology.delay_queue(entry, digit * level.unit_ms)
        };
        let mut tiers_named: Vec<String> = (remaining.saturating_sub(250)..=remaining)
            .map(tier_of)
            .collect();
        tiers_named.dedup();
        assert!(
            entered.as_ref().is_some_and(|q| tiers_named.contains(q)),
            "entered at {entered:?}, not a tier its delay names ({remaining} ms: {tiers_named:?})"
        );
        // It came out before its due time, inside the lead: the worker holds it.
        assert_eq!(
            kongflow_events::worker::arrival(&message, now, lead),
            kongflow_events::worker::Arrival::Hold,
            "arrived {} ms before its due time",
            (message.run_at - now).num_milliseconds()
        );
        m.delivery
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .unwrap();
        arrived.push(message.id);
    }
    let _ = channel.close(200, "done".into()).await;
}

/// A worker process that consumes jobs with a long delay lead.
fn spawn_worker(app: &TestApp) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("worker")
        .envs(app.child_env())
        .env("DELAY_LEAD_MS", "10000")
        .env("WORKER_CONCURRENCY", "1")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kongflow-events worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_holding_a_message_loses_nothing() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("held", json!({}))).await;
    // The API publishes its job into the tiers too: that copy comes out about 8 s from now,
    // well after the original below has come back.
    app.send_event(
        &key,
        json!({"event": {"name": "held", "id": "h-1", "payload": {}}, "options": {"deliverAt": at(8_000)}}),
    )
    .await;
    let job = deliver_job(&app, "h-1").await;
    // Straight to the work queue, 8 s early: a worker with a 10 s lead holds it.
    publish_to_work_queue(&app, &job).await;

    let mut first = spawn_worker(&app);
    let work_queue = app.env_queue(JobKind::DeliverEvent);
    wait_until(
        "the worker to take the message",
        Duration::from_secs(10),
        || async { app.depth_of(&work_queue).await == 0 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(delivery(&app, "h-1").await.1, None, "held, not run");
    // A fresh job runs while the message is held. Its acknowledgement must not settle the
    // held one (a `multiple` ack would: its delivery tag is lower), or the kill below
    // would lose it.
    app.send_event(
        &key,
        json!({"event": {"name": "held", "id": "n-1", "payload": {}}}),
    )
    .await;
    wait_until("the fresh event's run", Duration::from_secs(10), || async {
        !app.runs_by_job("n-1").await.is_empty()
    })
    .await;
    assert_eq!(delivery(&app, "h-1").await.1, None, "still held");
    first.kill().await.unwrap();
    wait_until(
        "the messages back in the queue",
        Duration::from_secs(10),
        || async { app.depth_of(&work_queue).await >= 1 },
    )
    .await;
    // What the killed worker held comes back: the held message (and the fresh one, if the
    // kill came between its commit and its ack).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut back = Vec::new();
    while let Some(m) = app.get_message(JobKind::DeliverEvent).await {
        back.push(m);
    }
    let held = back
        .iter()
        .find(|m| JobMessage::parse(&m.delivery.data).unwrap().id == job.id)
        .expect("the held message came back");
    assert!(
        held.delivery.redelivered,
        "the message back is the one the killed worker held, not the tiers' copy"
    );
    for m in back {
        m.delivery
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(delivery(&app, "h-1").await.1, None);

    let mut second = spawn_worker(&app);
    let delivered = wait_delivered(&app, "h-1", Duration::from_secs(15)).await;
    assert!(delivered >= job.run_at, "delivered early");
    // Held, not sent back: a message sent back would still sit in a tier (it was 8 s early).
    assert_eq!(tiers_depth(&app).await, 0, "the second worker held it");
    // No relay running: publish the invocation (and a duplicate of the delivery, which
    // finds its job completed).
    app.relay_all().await;
    app.settle().await;
    assert_eq!(app.runs_by_job("h-1").await, vec![("job".to_string(), 1)]);
    assert_eq!(app.runs_by_job("n-1").await, vec![("job".to_string(), 1)]);
    second.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_comes_out_of_the_tiers_on_its_environments_shard() {
    // The API publishes into the tiers; no worker, so the messages stay where they land.
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let topology = &app.topology;
    let mut n = 0;
    let (other, other_key) = loop {
        let (env, key) = app.new_env(&format!("other{n}")).await;
        if topology.shard_count() == 1 || topology.shard_of(env.id) != topology.shard_of(app.env.id)
        {
            break (env, key);
        }
        n += 1;
    };
    for (key, id) in [(&app.api_key, "mine"), (&other_key, "theirs")] {
        app.put_job(key, "job", job_body("later", json!({}))).await;
        app.send_event(
            key,
            json!({"event": {"name": "later", "id": id, "payload": {}}, "options": {"deliverAfter": 1}}),
        )
        .await;
    }
    // The queue of the environment's shard where a HIGH job (the default) goes.
    let queue_of =
        |env: uuid::Uuid| topology.queue_for(JobKind::DeliverEvent, topology.shard_of(env), None);
    wait_until("both out of the tiers", Duration::from_secs(10), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 2
    })
    .await;
    if topology.shard_count() == 1 {
        // One queue holds both: nothing to tell apart.
        return;
    }
    for (env, id) in [(app.env.id, "mine"), (other.id, "theirs")] {
        let got = app
            .channel
            .basic_get(
                queue_of(env).as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .expect("the message is on its environment's shard");
        let message = JobMessage::parse(&got.delivery.data).unwrap();
        assert_eq!(message.id, deliver_job(&app, id).await.id, "{id}");
    }
    assert_eq!(app.queue_depth(JobKind::DeliverEvent).await, 0);
}
