//! The run hand-off: every run created reaches the runs exchange once, with its event, in a
//! message the contract describes; every run `cancel-runs` cancels, too.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::examples::schema_verdicts;
use crate::helpers::{TestApp, job_body, rabbitmqctl, wait_until};
use kongflow_events::config::QueueType;

async fn cancel_runs(app: &TestApp, event: &str) -> (StatusCode, Value) {
    app.request(
        Method::POST,
        &format!("/api/v1/events/{event}/cancel-runs"),
        Some(&app.api_key),
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_run_created_is_handed_off_with_its_event_and_each_cancel_too() {
    let app = TestApp::builder().start().await;
    for job in ["ship", "bill"] {
        app.put_job(&app.api_key, job, job_body("order.paid", json!({})))
            .await;
    }
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.paid", "id": "o-1", "payload": {"total": 3},
                         "context": {"via": "test"}},
               "options": {"accountId": "acct-9"}}),
    )
    .await;
    wait_until("two runs", Duration::from_secs(20), || async {
        app.runs_by_job("o-1").await.len() == 2
    })
    .await;
    wait_until("the outbox to empty", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM run_handoffs")
            .fetch_one(&app.pool)
            .await
            .unwrap()
            == 0
    })
    .await;
    let created = app.take_hand_offs().await;
    assert_eq!(created.len(), 2, "{created:?}");
    let runs: Vec<(uuid::Uuid, String, String, uuid::Uuid)> = sqlx::query_as(
        "SELECT r.id, j.slug, v.version, r.dispatcher_id FROM job_runs r
         JOIN jobs j ON j.id = r.job_id JOIN job_versions v ON v.id = r.job_version_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    for (key, kind, message_id, body) in &created {
        assert_eq!(
            (key.as_str(), kind.as_str()),
            ("run.created", "run.created.v1")
        );
        let run = runs
            .iter()
            .find(|r| body["runId"] == r.0.to_string())
            .unwrap_or_else(|| panic!("no run for {body}"));
        assert_eq!(*message_id, format!("{}:created", run.0));
        assert_eq!(body["type"], "run.created");
        assert_eq!(body["version"], 1);
        assert_eq!(body["jobSlug"], run.1);
        assert_eq!(body["jobVersion"], run.2);
        assert_eq!(body["dispatcherId"], run.3.to_string());
        assert_eq!(body["environmentId"], app.env.id.to_string());
        let event = &body["event"];
        assert_eq!(event["id"], "o-1");
        assert_eq!(event["name"], "order.paid");
        assert_eq!(event["payload"], json!({"total": 3}));
        assert_eq!(event["context"], json!({"via": "test"}));
        assert_eq!(event["accountId"], "acct-9");
        assert!(body["createdAt"].as_str().unwrap().ends_with('Z'), "{body}");
    }
    // The contract's schema takes what was sent, and refuses what breaks it.
    let mut cases: Vec<Value> = created.iter().map(|m| m.3.clone()).collect();
    let mut no_run = cases[0].clone();
    no_run.as_object_mut().unwrap().remove("runId");
    let mut v2 = cases[0].clone();
    v2["version"] = json!(2);
    let mut stray = cases[0].clone();
    stray["event"]["extra"] = json!(1);
    cases.extend([no_run, v2, stray]);
    assert_eq!(
        schema_verdicts("rabbitmq/schemas/run-created.v1.schema.json", &cases).await,
        vec![true, true, false, false, false]
    );

    let (status, v) = cancel_runs(&app, "o-1").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let cancelled: Vec<Value> = v["cancelledRunIds"].as_array().unwrap().clone();
    assert_eq!(cancelled.len(), 2);
    wait_until("the cancel hand-offs", Duration::from_secs(20), || async {
        app.depth_of(&app.topology.runs_queue()).await == 2
    })
    .await;
    let mut got = app.take_hand_offs().await;
    got.sort_by(|a, b| a.2.cmp(&b.2));
    let mut expected: Vec<String> = cancelled
        .iter()
        .map(|id| format!("{}:cancelled", id.as_str().unwrap()))
        .collect();
    expected.sort();
    assert_eq!(
        got.iter().map(|m| m.2.clone()).collect::<Vec<_>>(),
        expected
    );
    for (key, kind, _, body) in &got {
        assert_eq!(
            (key.as_str(), kind.as_str()),
            ("run.cancelled", "run.cancelled.v1")
        );
        assert_eq!(body["event"]["id"], "o-1");
        assert!(body["cancelledAt"].as_str().unwrap().ends_with('Z'));
    }
    let mut cases: Vec<Value> = got.iter().map(|m| m.3.clone()).collect();
    let mut created_shape = cases[0].clone();
    created_shape["type"] = json!("run.created");
    cases.push(created_shape);
    assert_eq!(
        schema_verdicts("rabbitmq/schemas/run-cancelled.v1.schema.json", &cases).await,
        vec![true, true, false]
    );
    // Cancelling again cancels nothing, and hands nothing off.
    let (_, again) = cancel_runs(&app, "o-1").await;
    assert_eq!(again["cancelledRunIds"], json!([]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.take_hand_offs().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_triggers_run_is_handed_off_with_its_trace_and_no_match_hands_off_nothing() {
    // A dynamic trigger's runs are handed off like a job's; an event matching nothing
    // hands nothing off; and the hand-off carries the delivery's trace.
    let app = TestApp::builder().start().await;
    app.put_job(&app.api_key, "dyn-job", job_body("other", json!({})))
        .await;
    let (status, v) = app
        .request(
            Method::PUT,
            "/api/v1/dynamic-triggers/dt",
            Some(&app.api_key),
            Some(json!({"jobs": ["dyn-job"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = app
        .request(
            Method::POST,
            "/api/v1/dynamic-triggers/dt/registrations",
            Some(&app.api_key),
            Some(json!({"key": "k1", "rule": {"event": "dyn.event"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = app
        .http
        .post(format!("{}/api/v1/events", app.base_url))
        .bearer_auth(&app.api_key)
        .header("traceparent", traceparent)
        .json(&json!({"event": {"name": "dyn.event", "id": "d-1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "nobody", "id": "n-1"}}),
    )
    .await;
    wait_until("the dynamic run", Duration::from_secs(20), || async {
        app.runs_by_job("d-1").await.len() == 1
    })
    .await;
    app.settle().await;
    let got = app.take_hand_offs().await;
    assert_eq!(got.len(), 1, "{got:?}");
    let body = &got[0].3;
    assert_eq!(body["jobSlug"], "dyn-job");
    assert_eq!(body["event"]["id"], "d-1");
    let tp = body["traceparent"].as_str().expect("a traceparent");
    assert!(
        tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "the trace goes on: {tp}"
    );
}

/// A run in this test's environment (event `a-1`) and one in another environment (event
/// `b-1`), both handed off already and taken off the runs queue. Returns their ids.
async fn a_run_in_each_of_two_environments(app: &TestApp) -> (uuid::Uuid, uuid::Uuid) {
    let (_, other_key) = app.new_env("other").await;
    for (key, event) in [(&app.api_key, "a-1"), (&other_key, "b-1")] {
        app.put_job(key, "job", job_body("order.paid", json!({})))
            .await;
        app.send_event(key, json!({"event": {"name": "order.paid", "id": event}}))
            .await;
    }
    for event in ["a-1", "b-1"] {
        wait_until("the runs", Duration::from_secs(20), || async {
            app.runs_by_job(event).await.len() == 1
        })
        .await;
    }
    wait_until("the outbox to empty", Duration::from_secs(20), || async {
        waiting_hand_offs(app).await == 0
    })
    .await;
    assert_eq!(app.take_hand_offs().await.len(), 2);
    let run_of = |event: &'static str| async move {
        sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT r.id FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
             WHERE e.event_id = $1",
        )
        .bind(event)
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    (run_of("a-1").await, run_of("b-1").await)
}

async fn waiting_hand_offs(app: &TestApp) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM run_handoffs")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Hand each run off again, in this order (one statement: one batch for the relay).
async fn hand_off_again(app: &TestApp, runs: &[uuid::Uuid]) {
    sqlx::query(
        "INSERT INTO run_handoffs (run_id, kind)
         SELECT r, 'created' FROM UNNEST($1::uuid[]) WITH ORDINALITY AS t(r, n) ORDER BY n",
    )
    .bind(runs)
    .execute(&app.pool)
    .await
    .unwrap();
}

fn metric(name: &str) -> f64 {
    kongflow_events::metrics::metrics()
        .render()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_that_cannot_be_read_is_set_aside_and_the_other_tenants_go_out() {
    let app = TestApp::builder().start().await;
    let (deep, other) = a_run_in_each_of_two_environments(&app).await;
    // Nested deeper than a JSON reader's recursion limit, written past ingest (which refuses
    // it), as an old build or a hand in the database could have.
    sqlx::query(
        "UPDATE event_records SET payload = (repeat('[', 200) || repeat(']', 200))::jsonb
         WHERE event_id = 'a-1'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let before = metric("kongflow_handoffs_set_aside_total");
    hand_off_again(&app, &[deep, other]).await;
    // A relay step here (the process's own relay may take the batch first: then this one
    // finds nothing to claim); either way the step does not fail.
    let relay = app.relay();
    let channel = relay.open_channel(&app.amqp).await.unwrap();
    relay
        .publish_handoffs(&channel)
        .await
        .expect("a batch with an unreadable hand-off is no failure");
    wait_until(
        "the other tenant's hand-off published, the deep one set aside",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM run_handoffs WHERE set_aside_at IS NULL",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap()
                == 0
        },
    )
    .await;
    let got = app.take_hand_offs().await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].3["runId"], other.to_string());
    let (run, reason): (uuid::Uuid, String) =
        sqlx::query_as("SELECT run_id, set_aside_reason FROM run_handoffs")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(run, deep);
    assert!(reason.contains("recursion limit"), "{reason}");
    assert!(metric("kongflow_handoffs_set_aside_total") >= before + 1.0);
    // Set aside, it is claimed no more: later hand-offs go out without it.
    hand_off_again(&app, &[other]).await;
    wait_until("the next hand-off", Duration::from_secs(20), || async {
        app.depth_of(&app.topology.runs_queue()).await == 1
    })
    .await;
    // The relay deletes the row after the broker's confirm: the message can be counted in
    // the queue a moment before.
    wait_until(
        "only the set-aside row to stay",
        Duration::from_secs(10),
        || async { waiting_hand_offs(&app).await == 1 },
    )
    .await;
    let _ = channel.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_the_broker_returns_stays_until_the_runs_queue_is_back() {
    let app = TestApp::builder().start().await;
    let (run, _) = a_run_in_each_of_two_environments(&app).await;
    // The relay step's channel first: opening it declares the topology, binding included.
    let relay = app.relay();
    let channel = relay.open_channel(&app.amqp).await.unwrap();
    // Unbind the runs queue (another queue keeps the exchange): a hand-off now comes back.
    let keeper = crate::helpers::private_queue(&app.channel).await;
    let bind = |queue: String, key: &'static str| {
        let channel = app.channel.clone();
        let exchange = app.topology.runs_exchange();
        async move {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.into(),
                    lapin::options::QueueBindOptions::default(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .unwrap()
        }
    };
    bind(keeper.name().as_str().to_string(), "elsewhere").await;
    app.channel
        .queue_unbind(
            app.topology.runs_queue().as_str().into(),
            app.topology.runs_exchange().as_str().into(),
            kongflow_events::amqp::topology::RUNS_BINDING.into(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    hand_off_again(&app, &[run]).await;
    for _ in 0..3 {
        assert_eq!(relay.publish_handoffs(&channel).await.unwrap(), 0);
        assert_eq!(
            waiting_hand_offs(&app).await,
            1,
            "a returned hand-off stays in the outbox"
        );
    }
    // A run created now: the worker's own publish of its hand-off comes back too, and the
    // hand-off goes to the relay (its stamp cleared), where it waits with the other.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.paid", "id": "a-2"}}),
    )
    .await;
    wait_until(
        "the new run's hand-off left to the relay",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM run_handoffs WHERE published_by IS NULL",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap()
                == 2
        },
    )
    .await;
    assert_eq!(relay.publish_handoffs(&channel).await.unwrap(), 0);
    assert_eq!(waiting_hand_offs(&app).await, 2);
    // The queue bound again: the hand-off goes out, once.
    bind(
        app.topology.runs_queue(),
        kongflow_events::amqp::topology::RUNS_BINDING,
    )
    .await;
    wait_until(
        "the hand-off published",
        Duration::from_secs(20),
        || async {
            relay.publish_handoffs(&channel).await.unwrap();
            waiting_hand_offs(&app).await == 0
        },
    )
    .await;
    let got = app.take_hand_offs().await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].3["runId"], run.to_string());
    assert_eq!(got[1].3["event"]["id"], "a-2");
    let _ = channel.close(200, "done".into()).await;
}

/// The runs queue's policy set to `definition` for the test (cleared when dropped), once
/// the broker shows it on the queue (it applies policies in the background).
struct RunsPolicy(String);

impl RunsPolicy {
    async fn set(app: &TestApp, definition: &str) -> RunsPolicy {
        let policy = app.topology.runs_policy("/");
        let name = policy["name"].as_str().unwrap().to_string();
        rabbitmqctl(&[
            "set_policy",
            "--apply-to",
            "queues",
            &name,
            policy["pattern"].as_str().unwrap(),
            definition,
        ]);
        let set = RunsPolicy(name);
        let queue = app.topology.runs_queue();
        wait_until(
            "the policy on the runs queue",
            Duration::from_secs(10),
            || async {
                rabbitmqctl(&["list_queues", "name", "policy", "--no-table-headers"])
                    .lines()
                    .any(|l| l.starts_with(&queue) && l.contains(&set.0))
            },
        )
        .await;
        set
    }
}

impl Drop for RunsPolicy {
    fn drop(&mut self) {
        rabbitmqctl(&["clear_policy", &self.0]);
    }
}

/// The runs queue at its bound (the definitions' policy, with 3 messages here): the broker
/// refuses the hand-offs past it, which wait in `run_handoffs`; none is lost, and each goes
/// out as a runs service drains the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_runs_queue_bound_hand_offs_wait_in_postgres_and_go_out_as_it_drains() {
    let app = TestApp::builder().start().await;
    assert_eq!(
        app.topology.runs_policy("/")["definition"],
        json!({"max-length": kongflow_events::amqp::topology::RUNS_QUEUE_BOUND, "overflow": "reject-publish"})
    );
    let _policy = RunsPolicy::set(&app, r#"{"max-length": 3, "overflow": "reject-publish"}"#).await;
    let queue = app.topology.runs_queue();
    app.put_job(&app.api_key, "ship", job_body("order.paid", json!({})))
        .await;
    let send = |from: usize, to: usize| {
        let app = &app;
        async move {
            for i in from..to {
                app.send_event(
                    &app.api_key,
                    json!({"event": {"name": "order.paid", "id": format!("b-{i}")}}),
                )
                .await;
            }
        }
    };
    let depth = || async { app.depth_of(&queue).await as i64 };
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM run_handoffs")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    // Each run's hand-off is in the queue or, refused, in Postgres. A classic queue stops
    // at the bound exactly. A quorum queue refuses once it is over the bound: a burst
    // already on its way can take it past, by as many as were in flight.
    let limit = 3;
    let quorum = app.store.amqp_queue_type == QueueType::Quorum;
    let settled = |n: i64| async move {
        let (d, r) = (depth().await, rows().await);
        d + r == n && (d == limit || (quorum && d > limit))
    };
    send(0, 10).await;
    wait_until(
        "the first 10 in the queue or Postgres, the queue at its bound",
        Duration::from_secs(30),
        || settled(10),
    )
    .await;
    let over = depth().await;
    // Past the bound, the broker takes no more: the next ones all wait in Postgres, and
    // the relay's offers keep being refused. Nothing is lost.
    send(10, 15).await;
    wait_until(
        "the next 5 refused, waiting in Postgres",
        Duration::from_secs(30),
        || settled(15),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(depth().await, over);
    assert_eq!(rows().await, 15 - over);
    assert!(rows().await >= 5);
    // A runs service drains the queue: every run comes out, at least once, and the
    // outbox empties.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 15 || rows().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} runs handed off, {} rows left",
            seen.len(),
            rows().await
        );
        while let Some(m) = app
            .channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
            seen.insert(body["runId"].as_str().unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs: std::collections::BTreeSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM job_runs")
            .fetch_all(&app.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    assert_eq!(seen, runs);
}

/// An installation with no runs service gives the runs queue's policy a `message-ttl` of 0
/// (docs/deploy.md): the broker takes each hand-off (so it leaves Postgres) and keeps none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_runs_service_the_policys_ttl_keeps_nothing_and_postgres_keeps_nothing() {
    let app = TestApp::builder().start().await;
    let _policy = RunsPolicy::set(
        &app,
        r#"{"max-length": 1000000, "overflow": "reject-publish", "message-ttl": 0}"#,
    )
    .await;
    app.put_job(&app.api_key, "ship", job_body("order.paid", json!({})))
        .await;
    for i in 0..5 {
        app.send_event(
            &app.api_key,
            json!({"event": {"name": "order.paid", "id": format!("t-{i}")}}),
        )
        .await;
    }
    wait_until(
        "5 runs, their hand-offs out of Postgres",
        Duration::from_secs(30),
        || async {
            let (runs, rows): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM job_runs), (SELECT count(*) FROM run_handoffs)",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            runs == 5 && rows == 0
        },
    )
    .await;
    let depth = app.depth_of(&app.topology.runs_queue()).await;
    assert_eq!(depth, 0, "the queue keeps nothing");
}
