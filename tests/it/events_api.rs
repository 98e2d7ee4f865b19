//! trigger.dev v2's event calls beyond a single send: bulk, v1 get, cancel runs, resending
//! an id, and the limits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, job_body, wait_until};

fn at(ms_from_now: i64) -> String {
    kongflow_events::dates::iso(Utc::now() + chrono::Duration::milliseconds(ms_from_now))
}

fn date(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

async fn events_stored(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM event_records")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_sends_store_all_or_nothing_and_answer_event_logs() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("bulk", json!({}))).await;
    let (status, logs) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({"events": [
                {"name": "bulk", "id": "b-1", "payload": {"n": 1}},
                {"name": "bulk", "id": "b-2", "payload": {"n": 2}},
                {"name": "bulk", "id": "b-1", "payload": {"n": 3}}
            ]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{logs}");
    let logs = logs.as_array().unwrap();
    assert_eq!(logs.len(), 3);
    assert_eq!(logs[0]["id"], "b-1");
    assert_eq!(logs[0]["payload"], json!({"n": 1}));
    assert_eq!(logs[2]["payload"], json!({"n": 1}), "the id is stored once");
    assert_eq!(events_stored(&app).await, 2);
    wait_until("both runs", Duration::from_secs(10), || async {
        app.runs_by_job("b-1").await.len() == 1 && app.runs_by_job("b-2").await.len() == 1
    })
    .await;

    // One bad event: nothing of the call is stored, and the error names it.
    let (status, body) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({"events": [
                {"name": "bulk", "id": "b-3"},
                {"name": "", "id": "b-4"}
            ]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("events[1]"),
        "{body}"
    );
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"name": "bulk", "id": format!("x-{i}")}))
        .collect();
    let (status, body) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({ "events": too_many })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("at most 100"),
        "{body}"
    );
    let (status, _) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({"events": "no"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(events_stored(&app).await, 2);

    // The v1 and v2 gets answer the event with its runs.
    for path in ["/api/v1/events/b-2", "/api/v2/events/b-2"] {
        let (status, got) = app.request(Method::GET, path, Some(&key), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got["id"], "b-2");
        assert_eq!(got["runs"].as_array().unwrap().len(), 1, "{got}");
        assert_eq!(got["runs"][0]["status"], "QUEUED");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_runs_cancels_queued_runs_once_and_only_in_the_environment() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "one", job_body("cr", json!({}))).await;
    app.put_job(&key, "two", job_body("cr", json!({}))).await;
    app.send_event(&key, json!({"event": {"name": "cr", "id": "cr-1"}}))
        .await;
    wait_until("two runs", Duration::from_secs(10), || async {
        app.runs_by_job("cr-1").await.len() == 2
    })
    .await;
    let (_, other_key) = app.new_env("other").await;
    let (status, body) = app
        .request(
            Method::POST,
            "/api/v1/events/cr-1/cancel-runs",
            Some(&other_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    let (status, body) = app
        .request(
            Method::POST,
            "/api/v1/events/cr-1/cancel-runs",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["cancelledRunIds"].as_array().unwrap().len(), 2);
    assert_eq!(body["failedToCancelRunIds"], json!([]));
    let (_, got) = app
        .request(Method::GET, "/api/v2/events/cr-1", Some(&key), None)
        .await;
    for run in got["runs"].as_array().unwrap() {
        assert_eq!(run["status"], "CANCELED");
        assert!(run["completedAt"].is_string());
    }
    let (_, again) = app
        .request(
            Method::POST,
            "/api/v1/events/cr-1/cancel-runs",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(again["cancelledRunIds"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_an_id_follows_trigger_dev_rules() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("re", json!({}))).await;

    // Delivered: returned as it is.
    app.send_event(
        &key,
        json!({"event": {"name": "re", "id": "done", "payload": {"v": 1}}}),
    )
    .await;
    wait_until("the delivery", Duration::from_secs(10), || async {
        app.runs_by_job("done").await.len() == 1
    })
    .await;
    let again = app
        .send_event(
            &key,
            json!({"event": {"name": "re", "id": "done", "payload": {"v": 2}}}),
        )
        .await;
    assert_eq!(again["payload"], json!({"v": 1}));

    // Pending and due within 5 s: unchanged.
    let soon = app
        .send_event(
            &key,
            json!({"event": {"name": "re", "id": "soon", "payload": {"v": 1}}, "options": {"deliverAt": at(3_000)}}),
        )
        .await;
    let soon_again = app
        .send_event(
            &key,
            json!({"event": {"name": "re", "id": "soon", "payload": {"v": 2}}, "options": {"deliverAt": at(60_000)}}),
        )
        .await;
    assert_eq!(soon_again["payload"], json!({"v": 1}));
    assert_eq!(soon_again["deliverAt"], soon["deliverAt"]);

    // Pending and due later: takes the new payload and time; delivered once, at the new time.
    app.send_event(
        &key,
        json!({"event": {"name": "re", "id": "later", "payload": {"v": 1}}, "options": {"deliverAt": at(60_000)}}),
    )
    .await;
    let moved = app
        .send_event(
            &key,
            json!({"event": {"name": "re", "id": "later", "payload": {"v": 2}, "context": {"c": 1}},
                   "options": {"deliverAt": at(1_000)}}),
        )
        .await;
    assert_eq!(moved["payload"], json!({"v": 2}));
    assert_eq!(moved["context"], json!({"c": 1}));
    let new_due = date(&moved["deliverAt"]);
    assert!((new_due - Utc::now()).num_milliseconds() < 1_500);
    wait_until("the moved delivery", Duration::from_secs(10), || async {
        app.runs_by_job("later").await.len() == 1
    })
    .await;
    let (_, got) = app
        .request(Method::GET, "/api/v1/events/later", Some(&key), None)
        .await;
    assert_eq!(got["runs"].as_array().unwrap().len(), 1);

    // Pending, moved later: its first message comes out at the old time and is dropped.
    app.send_event(
        &key,
        json!({"event": {"name": "re", "id": "pushed", "payload": {}}, "options": {"deliverAt": at(5_500)}}),
    )
    .await;
    let pushed = app
        .send_event(
            &key,
            json!({"event": {"name": "re", "id": "pushed", "payload": {"v": 9}}, "options": {"deliverAfter": 3600}}),
        )
        .await;
    assert_eq!(pushed["payload"], json!({"v": 9}));
    tokio::time::sleep(Duration::from_millis(7_000)).await;
    assert!(
        app.runs_by_job("pushed").await.is_empty(),
        "ran at the old time"
    );
    let delivered: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT delivered_at FROM event_records WHERE event_id = 'pushed'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(delivered, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_400_or_413_and_store_nothing() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    let long = "n".repeat(256);
    for (body, status, needle) in [
        (
            json!({"event": {"name": long}}),
            StatusCode::BAD_REQUEST,
            "255",
        ),
        (
            json!({"event": {"name": "x", "id": long}}),
            StatusCode::BAD_REQUEST,
            "255",
        ),
        (
            json!({"event": {"name": "x", "id": ""}}),
            StatusCode::BAD_REQUEST,
            "id",
        ),
        (
            json!({"event": {"name": "x", "payload": {"big": "a".repeat(600 * 1024)}}}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "524288",
        ),
    ] {
        let (got, body) = app
            .request(Method::POST, "/api/v1/events", Some(&key), Some(body))
            .await;
        assert_eq!(got, status, "{body}");
        assert!(body["error"].as_str().unwrap().contains(needle), "{body}");
    }
    // A body past the HTTP limit: 413 before any parsing.
    let huge = json!({"event": {"name": "x", "payload": "a".repeat(3 * 1024 * 1024)}});
    let (got, body) = app
        .request(Method::POST, "/api/v1/events", Some(&key), Some(huge))
        .await;
    assert_eq!(got, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"].is_string());
    assert_eq!(events_stored(&app).await, 0);
    // Just under the payload limit is fine.
    let fits = json!({"event": {"name": "x", "payload": "a".repeat(500 * 1024)}});
    let (got, _) = app
        .request(Method::POST, "/api/v1/events", Some(&key), Some(fits))
        .await;
    assert_eq!(got, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_events_are_matched_on_their_parsed_json_body() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(
        &key,
        "on-push",
        job_body(
            "hook",
            json!({"payload": {"body": {"action": ["push"]}, "method": ["POST"]}}),
        ),
    )
    .await;
    let request = |id: &str, ct: &str, body: &str| {
        json!({"event": {"name": "hook", "id": id, "payloadType": "REQUEST",
                         "payload": {"url": "https://hooks.test/gh", "method": "POST",
                                     "headers": {"content-type": ct}, "rawBody": body}}})
    };
    app.send_event(
        &key,
        request("push", "application/json", r#"{"action":"push"}"#),
    )
    .await;
    app.send_event(
        &key,
        request("pull", "application/json", r#"{"action":"pull"}"#),
    )
    .await;
    app.send_event(&key, request("text", "text/plain", "push"))
        .await;
    wait_until("the push run", Duration::from_secs(10), || async {
        app.runs_by_job("push").await.len() == 1
    })
    .await;
    app.settle().await;
    assert!(app.runs_by_job("pull").await.is_empty());
    assert!(app.runs_by_job("text").await.is_empty());
    // The dry run says why.
    let (_, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(request("x", "application/json", r#"{"action":"pull"}"#)),
        )
        .await;
    assert_eq!(
        dry["misses"][0]["reason"],
        "filter failed at payload.body.action"
    );
    // A REQUEST payload that is not a request, or an unknown type: 400.
    for bad in [
        json!({"event": {"name": "hook", "payloadType": "REQUEST", "payload": {"url": "x"}}}),
        json!({"event": {"name": "hook", "payloadType": "XML", "payload": {}}}),
    ] {
        let (status, body) = app
            .request(Method::POST, "/api/v1/events", Some(&key), Some(bad))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_call_failing_in_the_database_on_its_second_event_stores_nothing() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    // Valid to the API, refused by the database: a trigger of this test's own.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.event_id = 'boom' THEN RAISE EXCEPTION 'refused by the test'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_boom BEFORE INSERT ON event_records
           FOR EACH ROW EXECUTE FUNCTION refuse_boom();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, body) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({"events": [
                {"name": "bulk", "id": "fine"},
                {"name": "bulk", "id": "boom"},
                {"name": "bulk", "id": "also-fine"}
            ]})),
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(
        body["error"], "internal error",
        "no internals in the answer"
    );
    let (events, jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM event_records), (SELECT count(*) FROM queue_jobs)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((events, jobs), (0, 0));
    // The same call without the refused event stores both.
    let (status, _) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({"events": [{"name": "bulk", "id": "fine"}, {"name": "bulk", "id": "also-fine"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events_stored(&app).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_racing_deliveries_leave_each_event_cancelled_or_delivered_never_both() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("race", json!({}))).await;
    // 60 events due at the same instant; their cancels land from 300 ms before it to
    // 900 ms after, 20 ms apart: the early ones find the event pending, the late ones
    // delivered, and those in between race the worker's delivery transaction.
    let due_in = 2_000;
    let due = Utc::now() + chrono::Duration::milliseconds(due_in);
    let n = 60;
    for i in 0..n {
        app.send_event(
            &key,
            json!({"event": {"name": "race", "id": format!("r-{i}")},
                   "options": {"deliverAt": kongflow_events::dates::iso(due)}}),
        )
        .await;
    }
    let mut cancels = Vec::new();
    for i in 0..n {
        let at = due + chrono::Duration::milliseconds(-300 + 20 * i as i64);
        let (http, base, key) = (app.http.clone(), app.base_url.clone(), key.clone());
        cancels.push(tokio::spawn(async move {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            let r = http
                .post(format!("{base}/api/v1/events/r-{i}/cancel"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut answers = Vec::new();
    for c in cancels {
        answers.push(c.await.unwrap());
    }
    app.settle().await;
    let (mut cancelled, mut delivered) = (0, 0);
    for (i, (status, log)) in answers.iter().enumerate() {
        // A deadlock or a lock timeout would be a 500 here.
        assert_eq!(*status, StatusCode::OK, "cancel r-{i}: {log}");
        let id = format!("r-{i}");
        let (cancelled_at, delivered_at, job_state): (
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
            String,
        ) = sqlx::query_as(
            "SELECT e.cancelled_at, e.delivered_at, j.state::text FROM event_records e
             JOIN queue_jobs j ON j.kind = 'deliverEvent' AND j.args->>'id' = e.id::text
             WHERE e.event_id = $1",
        )
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let runs = app.runs_by_job(&id).await;
        match (cancelled_at, delivered_at) {
            (Some(_), None) => {
                cancelled += 1;
                assert_eq!(job_state, "cancelled", "{id}");
                assert!(runs.is_empty(), "{id} cancelled but ran: {runs:?}");
                assert!(log["cancelledAt"].is_string(), "{id}: {log}");
            }
            (None, Some(_)) => {
                delivered += 1;
                assert_eq!(job_state, "completed", "{id}");
                assert_eq!(runs, vec![("job".to_string(), 1)], "{id}");
                assert!(log["cancelledAt"].is_null(), "{id} answered {log}");
                assert!(log["deliveredAt"].is_string(), "{id} answered {log}");
            }
            other => panic!("{id}: cancelled and delivered {other:?}"),
        }
    }
    eprintln!("{cancelled} cancelled, {delivered} delivered");
    assert!(
        cancelled > 0 && delivered > 0,
        "both sides of the race were reached"
    );
}
