//! The run hand-off: every run created reaches the runs exchange once, with its event, in a
//! message the contract describes; every run `cancel-runs` cancels, too.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::examples::schema_verdicts;
use crate::helpers::{TestApp, job_body, wait_until};

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
    let app = TestApp::spawn().await;
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
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_triggers_run_is_handed_off_with_its_trace_and_no_match_hands_off_nothing() {
    // A dynamic trigger's runs are handed off like a job's; an event matching nothing
    // hands nothing off; and the hand-off carries the delivery's trace.
    let app = TestApp::spawn().await;
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
    app.finish().await;
}
