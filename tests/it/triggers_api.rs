//! Dynamic triggers over HTTP, dispatchers enabled and disabled, the dry run, and one
//! environment trying every endpoint on another's ids.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, job_body, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_triggers_dispatchers_and_the_dry_run() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "a", job_body("other", json!({}))).await;
    app.put_job(&key, "b", job_body("other", json!({}))).await;
    let (status, body) = app
        .request(
            Method::PUT,
            "/api/v1/dynamic-triggers/repo-events",
            Some(&key),
            Some(json!({"jobs": ["a", "b"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, reg) = app
        .request(
            Method::POST,
            "/api/v1/dynamic-triggers/repo-events/registrations",
            Some(&key),
            Some(json!({"key": "repo-1", "rule": {"event": "push", "payload": {"repo": ["one"]}}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reg}");
    let dispatcher = reg["id"].as_str().unwrap().to_string();

    // An event the registration takes runs both attached jobs.
    app.send_event(
        &key,
        json!({"event": {"name": "push", "id": "p-1", "payload": {"repo": "one"}}}),
    )
    .await;
    wait_until("two runs", Duration::from_secs(10), || async {
        app.runs_by_job("p-1").await.len() == 2
    })
    .await;

    // The dry run: why a push to another repo reaches nothing.
    let (status, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(json!({"event": {"name": "push", "payload": {"repo": "two"}}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!(dry["matches"], json!([]));
    let reasons: Vec<(String, String)> = dry["misses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["dispatcher"]["id"].as_str().unwrap().to_string(),
                m["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let ours = reasons.iter().find(|(id, _)| *id == dispatcher).unwrap();
    assert_eq!(ours.1, "filter failed at payload.repo");
    assert!(
        reasons
            .iter()
            .filter(|(id, _)| *id != dispatcher)
            .all(|(_, r)| r.contains("event name")),
        "{reasons:?}"
    );
    let (_, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(json!({"event": {"name": "push", "payload": {"repo": "one"}}})),
        )
        .await;
    assert_eq!(dry["matches"][0]["dispatcher"]["id"], dispatcher.as_str());
    assert_eq!(dry["matches"][0]["dispatcher"]["key"], "repo-1");

    // Disabled: listed as such, not run, and the dry run says so.
    let (status, _) = app
        .request(
            Method::POST,
            &format!("/api/v1/dispatchers/{dispatcher}/disable"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, list) = app
        .request(Method::GET, "/api/v1/dispatchers", Some(&key), None)
        .await;
    let listed = list["dispatchers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == dispatcher.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["enabled"], false);
    assert_eq!(listed["dispatchableType"], "DYNAMIC_TRIGGER");
    assert_eq!(listed["dynamicTrigger"], "repo-events");
    app.send_event(
        &key,
        json!({"event": {"name": "push", "id": "p-2", "payload": {"repo": "one"}}}),
    )
    .await;
    let (_, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(json!({"event": {"name": "push", "payload": {"repo": "one"}}})),
        )
        .await;
    assert_eq!(dry["matches"], json!([]));
    app.settle().await;
    assert!(app.runs_by_job("p-2").await.is_empty());
    app.request(
        Method::POST,
        &format!("/api/v1/dispatchers/{dispatcher}/enable"),
        Some(&key),
        None,
    )
    .await;

    // Deleted: gone; deleting again is 404.
    let path = "/api/v1/dynamic-triggers/repo-events/registrations/repo-1";
    let (status, _) = app.request(Method::DELETE, path, Some(&key), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.request(Method::DELETE, path, Some(&key), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    app.send_event(
        &key,
        json!({"event": {"name": "push", "id": "p-3", "payload": {"repo": "one"}}}),
    )
    .await;
    app.settle().await;
    assert!(app.runs_by_job("p-3").await.is_empty());

    // A registration for an unknown trigger, or jobs that do not exist: 404.
    let (status, _) = app
        .request(
            Method::POST,
            "/api/v1/dynamic-triggers/nope/registrations",
            Some(&key),
            Some(json!({"key": "k", "rule": {"event": "push"}})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .request(
            Method::PUT,
            "/api/v1/dynamic-triggers/t2",
            Some(&key),
            Some(json!({"jobs": ["ghost"]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_environment_gets_404_on_every_endpoint() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("mine", json!({}))).await;
    app.request(
        Method::PUT,
        "/api/v1/dynamic-triggers/dt",
        Some(&key),
        Some(json!({"jobs": ["job"]})),
    )
    .await;
    let (_, reg) = app
        .request(
            Method::POST,
            "/api/v1/dynamic-triggers/dt/registrations",
            Some(&key),
            Some(json!({"key": "k", "rule": {"event": "mine"}})),
        )
        .await;
    let dispatcher = reg["id"].as_str().unwrap().to_string();
    app.send_event(&key, json!({"event": {"name": "mine", "id": "secret", "payload": {"pin": 1234}}, "options": {"deliverAfter": 3600}}))
        .await;
    let (status, ephemeral) = app
        .request(
            Method::POST,
            "/api/v1/event-dispatchers/ephemeral",
            Some(&key),
            Some(json!({"url": "https://receiver.example/hook-1234", "name": "mine"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ephemeral}");
    let ephemeral = ephemeral["id"].as_str().unwrap().to_string();
    let (status, mine) = app
        .request(
            Method::GET,
            &format!("/api/v1/event-dispatchers/{ephemeral}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the owner reads it: {mine}");

    let (_, other) = app.new_env("intruder").await;
    let probes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/api/v1/events/secret".into(), None),
        (Method::GET, "/api/v2/events/secret".into(), None),
        (Method::POST, "/api/v1/events/secret/cancel".into(), None),
        (
            Method::POST,
            "/api/v1/events/secret/cancel-runs".into(),
            None,
        ),
        (
            Method::POST,
            format!("/api/v1/dispatchers/{dispatcher}/disable"),
            None,
        ),
        (
            Method::POST,
            format!("/api/v1/dispatchers/{dispatcher}/enable"),
            None,
        ),
        (
            Method::DELETE,
            "/api/v1/dynamic-triggers/dt/registrations/k".into(),
            None,
        ),
        (
            Method::POST,
            "/api/v1/dynamic-triggers/dt/registrations".into(),
            Some(json!({"key": "k2", "rule": {"event": "mine"}})),
        ),
        (
            Method::GET,
            format!("/api/v1/event-dispatchers/{ephemeral}"),
            None,
        ),
    ];
    for (method, path, body) in probes {
        let (status, answer) = app.request(method.clone(), &path, Some(&other), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert!(!answer.to_string().contains("1234"), "{answer}");
    }
    // Lists and dry runs show only the caller's own.
    let (_, list) = app
        .request(Method::GET, "/api/v1/dispatchers", Some(&other), None)
        .await;
    assert_eq!(list["dispatchers"], json!([]));
    let (_, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&other),
            Some(json!({"event": {"name": "mine"}})),
        )
        .await;
    assert_eq!(
        (
            &dry["matches"],
            &dry["misses"],
            &dry["matchCount"],
            &dry["missCount"]
        ),
        (&json!([]), &json!([]), &json!(0), &json!(0)),
        "{dry}"
    );
    // Sending the same id in the other environment is a different event.
    let theirs = app
        .send_event(
            &other,
            json!({"event": {"name": "mine", "id": "secret", "payload": {}}}),
        )
        .await;
    assert_eq!(theirs["payload"], json!({}));
    // Nothing of the owner's changed.
    let (_, mine) = app
        .request(Method::GET, "/api/v1/events/secret", Some(&key), None)
        .await;
    assert_eq!(mine["id"], "secret");
    let (_, list) = app
        .request(Method::GET, "/api/v1/dispatchers", Some(&key), None)
        .await;
    assert!(
        list["dispatchers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["enabled"] == true)
    );
    let cancelled: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT cancelled_at FROM event_records WHERE event_id = 'secret' AND environment_id = $1",
    )
    .bind(app.env.id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(cancelled, None);
}
