//! EPHEMERAL dispatchers: the webhook is signed, retried, dead-lettered, refused for inner
//! addresses, never redirected, never sent for an expired dispatcher, and sent once however
//! many events match. Receivers are real HTTP servers on loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use kongflow_events::amqp::JobMessage;
use kongflow_events::app::Roles;
use kongflow_events::ledger::JobKind;
use kongflow_events::worker::{Disposition, Worker};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, test_worker_config, wait_until};

/// What a receiver answers, request after request (the last answer repeats).
#[derive(Debug, Clone)]
enum Answer {
    Status(u16),
    /// Never answers.
    Hang,
    /// 302 to this URL.
    Redirect(String),
    /// This status after this many milliseconds.
    Slow(u64, u16),
    /// This status with this body, byte for byte.
    Body(u16, Vec<u8>),
}

#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone)]
struct Receiver {
    answers: Arc<Vec<Answer>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    /// A receiver on a free loopback port; returns it and its URL.
    async fn start(answers: Vec<Answer>) -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        (Self::serve(listener, answers), url)
    }

    /// A receiver on a listener of the test's own.
    fn serve(listener: tokio::net::TcpListener, answers: Vec<Answer>) -> Self {
        let me = Self {
            answers: Arc::new(answers),
            received: Arc::default(),
        };
        let app = Router::new().fallback(answer).with_state(me.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        me
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn answer(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let n = {
        let mut got = r.received.lock().unwrap();
        got.push(Received { headers, body });
        got.len()
    };
    match r.answers[(n - 1).min(r.answers.len() - 1)].clone() {
        Answer::Status(code) => {
            (StatusCode::from_u16(code).unwrap(), format!("answer {n}")).into_response()
        }
        Answer::Hang => std::future::pending().await,
        Answer::Redirect(to) => (StatusCode::FOUND, [("location", to)], "moved").into_response(),
        Answer::Slow(ms, code) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            StatusCode::from_u16(code).unwrap().into_response()
        }
        Answer::Body(code, body) => (StatusCode::from_u16(code).unwrap(), body).into_response(),
    }
}

/// Create an ephemeral dispatcher; returns the answer.
async fn create(app: &TestApp, body: Value) -> (StatusCode, Value) {
    app.request(
        Method::POST,
        "/api/v1/event-dispatchers/ephemeral",
        Some(&app.api_key),
        Some(body),
    )
    .await
}

async fn get_dispatcher(app: &TestApp, id: &str) -> (StatusCode, Value) {
    app.request(
        Method::GET,
        &format!("/api/v1/event-dispatchers/{id}"),
        Some(&app.api_key),
        None,
    )
    .await
}

async fn view(app: &TestApp, id: &str) -> Value {
    let (status, v) = get_dispatcher(app, id).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// The webhook job's (state, attempt), once there is one.
async fn webhook_job(app: &TestApp) -> Option<(String, i32)> {
    sqlx::query_as(
        "SELECT state::text, attempt FROM queue_jobs WHERE kind = 'events.deliverWebhook'",
    )
    .fetch_optional(&app.pool)
    .await
    .unwrap()
}

/// Check a request's Standard Webhooks signature with `secret`.
fn assert_signed(r: &Received, secret: &str) {
    let header = |name: &str| {
        r.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let (id, ts) = (header("webhook-id"), header("webhook-timestamp"));
    let ts_secs: i64 = ts.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - ts_secs).abs() < 60);
    let key = B64
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&r.body);
    let expected = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    let signatures = header("webhook-signature");
    assert!(
        signatures.split(' ').any(|s| s == expected),
        "signature {signatures} is not {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_signed_retries_until_it_answers_2xx() {
    let app = TestApp::builder().start().await;
    let (rx, url) = Receiver::start(vec![
        Answer::Status(500),
        Answer::Status(500),
        Answer::Status(200),
    ])
    .await;
    let (status, created) = create(
        &app,
        json!({"url": url, "name": "order.paid", "filter": {"total": [{"$gt": 10}]},
               "accountId": "acct-1", "timeoutInSeconds": 600}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let secret = created["secret"].as_str().expect("a secret at creation");
    let id = created["id"].as_str().unwrap().to_string();
    // A second creation with the same URL is the same dispatcher, as first given.
    let (_, again) = create(&app, json!({"url": url, "name": "order.paid"})).await;
    assert_eq!(again["id"], created["id"]);
    assert_eq!(again["created"], false);
    assert_eq!(again["secret"], created["secret"], "{again}");
    assert_eq!(again["expiresAt"], created["expiresAt"]);

    // Filtered out: too small.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.paid", "id": "small", "payload": {"total": 5}}}),
    )
    .await;
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.paid", "id": "big", "payload": {"total": 50},
               "context": {"k": 1}}, "options": {"accountId": "acct-1"}}),
    )
    .await;
    wait_until(
        "the dispatcher to be delivered",
        Duration::from_secs(20),
        || async { view(&app, &id).await["status"] == "delivered" },
    )
    .await;
    let got = rx.all();
    assert_eq!(got.len(), 3, "three attempts");
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.headers["webhook-id"].clone())
        .collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one webhook-id for every attempt"
    );
    for r in &got {
        assert_signed(r, secret);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["id"], "big");
        assert_eq!(body["name"], "order.paid");
        assert_eq!(body["source"], "trigger.dev");
        assert_eq!(body["payload"], json!({"total": 50}));
        assert_eq!(body["context"], json!({"k": 1}));
        assert_eq!(body["accountId"], "acct-1");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(r.headers["content-type"], "application/json");
    }
    let v = view(&app, &id).await;
    let statuses: Vec<Value> = v["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!(500), json!(500), json!(200)], "{v}");
    assert!(v["attempts"][0]["error"].as_str().unwrap().contains("500"));
    assert_eq!(v["attempts"][2]["error"], Value::Null);
    assert_eq!(webhook_job(&app).await, Some(("completed".into(), 3)));
    // A repeat of the first event's match does nothing more: the dispatcher is spent.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.paid", "id": "late", "payload": {"total": 99}}}),
    )
    .await;
    app.settle_with_errors().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.count(), 3);
    // The URL is free again: a new dispatcher, with a new secret.
    let (_, renewed) = create(&app, json!({"url": url, "name": "order.paid"})).await;
    assert_ne!(renewed["id"], created["id"]);
    assert_eq!(renewed["created"], true);
    assert_ne!(renewed["secret"].as_str(), Some(secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_times_out_each_attempt_and_is_dead_lettered() {
    let mut config = test_worker_config();
    config.webhook.webhook_timeout = Duration::from_millis(300);
    let app = TestApp::builder().worker(config).start().await;
    let (rx, url) = Receiver::start(vec![Answer::Hang]).await;
    let (_, created) = create(&app, json!({"url": url, "name": "ping"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    app.send_event(&app.api_key, json!({"event": {"name": "ping", "id": "p1"}}))
        .await;
    wait_until(
        "the webhook job to be discarded",
        Duration::from_secs(30),
        || async {
            webhook_job(&app)
                .await
                .is_some_and(|(s, _)| s == "discarded")
        },
    )
    .await;
    assert_eq!(webhook_job(&app).await, Some(("discarded".into(), 5)));
    assert_eq!(rx.count(), 5, "one request per attempt");
    let v = view(&app, &id).await;
    let attempts = v["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 5, "{v}");
    for a in attempts {
        assert_eq!(a["status"], Value::Null);
        assert!(
            a["error"].as_str().unwrap().contains("no answer within"),
            "{a}"
        );
        assert!(a["durationMs"].as_i64().unwrap() >= 250, "{a}");
    }
    assert_eq!(v["status"], "failed");
    wait_until("the dead letter", Duration::from_secs(10), || async {
        app.depth_of(&app.topology.dead_queue()).await == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_addresses_are_refused_without_a_request_when_the_allow_list_is_off() {
    let mut config = test_worker_config();
    config.webhook.webhook_allow_nets = None;
    let app = TestApp::builder().worker(config).start().await;
    let (rx, url) = Receiver::start(vec![Answer::Status(200)]).await;
    // By name (resolved to loopback), and by the metadata address itself.
    let by_name = url.replace("127.0.0.1", "localhost");
    for (n, (url, why)) in [
        (by_name.as_str(), "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("inner.{n}");
        let (status, created) = create(&app, json!({"url": url, "name": name})).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        app.send_event(
            &app.api_key,
            json!({"event": {"name": name, "id": format!("e{n}")}}),
        )
        .await;
        wait_until(
            "the refusal to be recorded",
            Duration::from_secs(20),
            || async {
                !view(&app, &id).await["attempts"]
                    .as_array()
                    .unwrap()
                    .is_empty()
            },
        )
        .await;
        let v = view(&app, &id).await;
        let a = &v["attempts"][0];
        assert_eq!(a["status"], Value::Null, "{v}");
        let error = a["error"].as_str().unwrap();
        assert!(error.contains("refused") && error.contains(why), "{error}");
        wait_until(
            "the dispatcher to be failed",
            Duration::from_secs(10),
            || async { view(&app, &id).await["status"] == "failed" },
        )
        .await;
    }
    app.settle_with_errors().await;
    // A refusal is final: one attempt each, discarded, and nothing reached the receiver.
    let jobs: Vec<(String, i32)> = sqlx::query_as(
        "SELECT state::text, attempt FROM queue_jobs WHERE kind = 'events.deliverWebhook'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(jobs, vec![("discarded".to_string(), 1); 2]);
    assert_eq!(rx.count(), 0, "no request was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_not_followed() {
    let app = TestApp::builder().start().await;
    let (inner, inner_url) = Receiver::start(vec![Answer::Status(200)]).await;
    let (rx, url) = Receiver::start(vec![Answer::Redirect(inner_url)]).await;
    let (_, created) = create(&app, json!({"url": url, "name": "moved"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "moved", "id": "m1"}}),
    )
    .await;
    wait_until("two attempts", Duration::from_secs(20), || async {
        view(&app, &id).await["attempts"].as_array().unwrap().len() >= 2
    })
    .await;
    let v = view(&app, &id).await;
    assert_eq!(v["attempts"][0]["status"], 302);
    assert!(
        v["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("redirects are not followed"),
        "{v}"
    );
    assert!(rx.count() >= 2);
    assert_eq!(inner.count(), 0, "the redirect's target got nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_dispatcher_delivers_nothing() {
    let app = TestApp::builder().start().await;
    let (rx, url) = Receiver::start(vec![Answer::Status(200)]).await;
    for bad in [9, 60 * 60 * 24 * 366] {
        let (status, v) = create(
            &app,
            json!({"url": url, "name": "x", "timeoutInSeconds": bad}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"].as_str().unwrap().contains("timeoutInSeconds"),
            "{v}"
        );
    }
    for bad in ["ftp://example.com/", "http://user:pw@example.com/", "nope"] {
        let (status, v) = create(&app, json!({"url": bad, "name": "x"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (_, created) = create(
        &app,
        json!({"url": url, "name": "late", "timeoutInSeconds": 10}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    // Ten seconds pass (the test moves its expiry instead of waiting).
    sqlx::query(
        "UPDATE event_dispatchers SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
    )
    .bind(&id)
    .execute(&app.pool)
    .await
    .unwrap();
    // The dry run says why it would not take an event, and the listing shows it.
    let (_, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&app.api_key),
            Some(json!({"event": {"name": "late"}})),
        )
        .await;
    assert_eq!(dry["misses"][0]["reason"], "expired", "{dry}");
    let (_, listed) = app
        .request(Method::GET, "/api/v1/dispatchers", Some(&app.api_key), None)
        .await;
    assert_eq!(
        listed["dispatchers"][0]["dispatchableType"], "EPHEMERAL",
        "{listed}"
    );
    assert_eq!(listed["dispatchers"][0]["url"], url.as_str());
    app.send_event(&app.api_key, json!({"event": {"name": "late", "id": "l1"}}))
        .await;
    wait_until(
        "the event to be delivered",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT delivered_at IS NOT NULL FROM event_records WHERE event_id = 'l1'",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap()
        },
    )
    .await;
    app.settle().await;
    assert_eq!(webhook_job(&app).await, None);
    assert_eq!(rx.count(), 0);
    assert_eq!(view(&app, &id).await["status"], "expired");
    // Expired, it gives its URL up to a new dispatcher.
    let (_, renewed) = create(&app, json!({"url": url, "name": "late"})).await;
    assert_eq!(renewed["created"], true);
    // Retention deletes a dispatcher spent longer ago than it keeps events, not a live one.
    let keep = Duration::from_secs(30 * 86_400);
    let retain = || kongflow_events::dispatchers::delete_spent(&app.pool, keep, 100);
    let deleted: u64 = retain().await.unwrap();
    assert_eq!(deleted, 0);
    sqlx::query(
        "UPDATE event_dispatchers SET expires_at = now() - interval '31 days' WHERE id = $1::uuid",
    )
    .bind(&id)
    .execute(&app.pool)
    .await
    .unwrap();
    let deleted: u64 = retain().await.unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(get_dispatcher(&app, &id).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        view(&app, renewed["id"].as_str().unwrap()).await["status"],
        "waiting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_matching_one_dispatcher_deliver_once() {
    let app = TestApp::builder().start().await;
    let (rx, url) = Receiver::start(vec![Answer::Status(204)]).await;
    let (_, created) = create(&app, json!({"url": url, "name": ["a", "b"]})).await;
    let id = created["id"].as_str().unwrap().to_string();
    // Twenty matching events at once, by bulk and one by one, racing to fire it.
    let bulk: Vec<Value> = (0..10)
        .map(|i| json!({"name": "a", "id": format!("bulk{i}")}))
        .collect();
    let (status, v) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&app.api_key),
            Some(json!({"events": bulk})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let singles = (0..10).map(|i| {
        app.send_event(
            &app.api_key,
            json!({"event": {"name": "b", "id": format!("one{i}")}}),
        )
    });
    futures_util::future::join_all(singles).await;
    wait_until("the delivery", Duration::from_secs(20), || async {
        view(&app, &id).await["status"] == "delivered"
    })
    .await;
    app.settle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.count(), 1, "one delivery");
    let webhooks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs WHERE kind = 'events.deliverWebhook'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(webhooks, 1);
    // Once fired it no longer matches: between one and twenty invocations ran (as many as
    // events delivered before the first invocation committed), every one completed, and
    // one webhook came of them.
    let (invocations, settled): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'completed')
         FROM queue_jobs WHERE kind = 'events.invokeDispatcher'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!((1..=20).contains(&invocations), "{invocations}");
    assert_eq!(settled, invocations);
}

/// The API alone: no relay or worker, the test publishes and runs each step.
async fn http_only() -> TestApp {
    TestApp::builder()
        .roles(Roles {
            http: true,
            ..Roles::NONE
        })
        .start()
        .await
}

/// Every message of `kind` waiting, parsed (acknowledged: the test runs them by hand).
async fn take_messages(app: &TestApp, kind: JobKind) -> Vec<JobMessage> {
    let mut got = Vec::new();
    while let Some(m) = app.get_message(kind).await {
        got.push(JobMessage::parse(&m.delivery.data).unwrap());
        m.delivery.ack(Default::default()).await.unwrap();
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_invocations_fire_once_and_one_expired_by_then_fires_not() {
    // No relay or worker of its own: the test publishes and runs each step, so the ten
    // invocations of one dispatcher run in ten transactions at once.
    let app = http_only().await;
    let (_, created) = create(&app, json!({"url": "http://127.0.0.1:9/a", "name": "race"})).await;
    let racing = created["id"].as_str().unwrap().to_string();
    let (_, created) = create(&app, json!({"url": "http://127.0.0.1:9/b", "name": "late"})).await;
    let late = created["id"].as_str().unwrap().to_string();
    for i in 0..10 {
        app.send_event(
            &app.api_key,
            json!({"event": {"name": "race", "id": format!("r{i}")}}),
        )
        .await;
    }
    app.send_event(&app.api_key, json!({"event": {"name": "late", "id": "l"}}))
        .await;
    // The API publishes its own jobs right after its commit (or leaves them to a relay).
    app.relay_all().await;
    wait_until(
        "eleven deliveries queued",
        Duration::from_secs(10),
        || async { app.queue_depth(JobKind::DeliverEvent).await == 11 },
    )
    .await;
    let worker = app.worker();
    app.drain_with(&worker, JobKind::DeliverEvent).await;
    // Matched while live; expired before its invocation runs.
    sqlx::query("UPDATE event_dispatchers SET expires_at = now() WHERE id = $1::uuid")
        .bind(&late)
        .execute(&app.pool)
        .await
        .unwrap();
    app.relay_all().await;
    let invocations = take_messages(&app, JobKind::InvokeDispatcher).await;
    assert_eq!(invocations.len(), 11);
    let runs = invocations.into_iter().map(|m| worker.process(vec![Ok(m)]));
    for d in futures_util::future::join_all(runs).await {
        assert_eq!(d.unwrap(), vec![Disposition::Ack]);
    }
    let fired: Vec<(String,)> =
        sqlx::query_as("SELECT args->>'id' FROM queue_jobs WHERE kind = 'events.deliverWebhook'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        fired,
        vec![(racing.clone(),)],
        "one webhook, for the live dispatcher"
    );
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue_jobs WHERE kind = 'events.invokeDispatcher' AND state = 'completed'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(completed, 11);
    assert_eq!(view(&app, &late).await["status"], "expired");
    assert_eq!(view(&app, &racing).await["status"], "firing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_message_run_again_while_it_is_sent_sends_once() {
    let app = http_only().await;
    let (rx, url) = Receiver::start(vec![Answer::Slow(500, 200)]).await;
    let (_, created) = create(&app, json!({"url": url, "name": "twice"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    app.send_event(&app.api_key, json!({"event": {"name": "twice", "id": "t"}}))
        .await;
    let worker = Worker::new(app.pool.clone(), app.topology.clone(), test_worker_config());
    for kind in [JobKind::DeliverEvent, JobKind::InvokeDispatcher] {
        // The API publishes its own jobs right after its commit; the relay, the worker's.
        app.relay_all().await;
        wait_until("the job's message", Duration::from_secs(10), || async {
            app.queue_depth(kind).await == 1
        })
        .await;
        app.drain_with(&worker, kind).await;
    }
    app.relay_all().await;
    let webhook = take_messages(&app, JobKind::DeliverWebhook).await;
    assert_eq!(webhook.len(), 1);
    // The same message again while the first is being sent (a redelivery racing it), and
    // both at once: one request.
    let first = {
        let (worker, message) = (worker.clone(), webhook[0].clone());
        tokio::spawn(async move { worker.process(vec![Ok(message)]).await })
    };
    wait_until("the first request", Duration::from_secs(10), || async {
        rx.count() == 1
    })
    .await;
    let (again, at_once) = tokio::join!(
        worker.process(vec![Ok(webhook[0].clone())]),
        worker.process(vec![Ok(webhook[0].clone())]),
    );
    assert_eq!(again.unwrap(), vec![Disposition::Ack]);
    assert_eq!(at_once.unwrap(), vec![Disposition::Ack]);
    assert_eq!(first.await.unwrap().unwrap(), vec![Disposition::Ack]);
    assert_eq!(rx.count(), 1);
    assert_eq!(webhook_job(&app).await, Some(("completed".into(), 1)));
    assert_eq!(view(&app, &id).await["status"], "delivered");
    // And once more, after: the job is completed, nothing is sent.
    assert_eq!(
        worker.process(vec![Ok(webhook[0].clone())]).await.unwrap(),
        vec![Disposition::Ack]
    );
    assert_eq!(rx.count(), 1);
}

/// A second environment of the test, on the same shard as its first (the same queues and
/// consumers), with its key.
async fn neighbour(app: &TestApp) -> String {
    let shard = app.topology.shard_of(app.env.id);
    for i in 0..64 {
        let (env, key) = app.new_env(&format!("n{i}")).await;
        if app.topology.shard_of(env.id) == shard {
            return key;
        }
    }
    panic!("no environment on shard {shard} in 64 tries");
}

/// Create an ephemeral dispatcher in the environment of `key`; returns its id.
async fn create_with(app: &TestApp, key: &str, body: Value) -> String {
    let (status, v) = app
        .request(
            Method::POST,
            "/api/v1/event-dispatchers/ephemeral",
            Some(key),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receivers_nul_and_control_bytes_are_stored_clean_and_its_job_retried() {
    let app = TestApp::builder().start().await;
    // A NUL (Postgres text refuses it), other control characters, an escape sequence and
    // bytes that are not UTF-8.
    let nasty = b"bad\0news\x01\x1b[31m red\xff\xfe end\n\tline".to_vec();
    let (rx, url) = Receiver::start(vec![
        Answer::Body(500, nasty.clone()),
        Answer::Body(500, nasty),
        Answer::Status(200),
    ])
    .await;
    let key = app.api_key.clone();
    let id = create_with(&app, &key, json!({"url": url, "name": "nul"})).await;
    app.send_event(&key, json!({"event": {"name": "nul", "id": "n1"}}))
        .await;
    wait_until(
        "the dispatcher to be delivered",
        Duration::from_secs(20),
        || async { view(&app, &id).await["status"] == "delivered" },
    )
    .await;
    assert_eq!(rx.count(), 3);
    assert_eq!(webhook_job(&app).await, Some(("completed".into(), 3)));
    let v = view(&app, &id).await;
    for a in &v["attempts"].as_array().unwrap()[..2] {
        let error = a["error"].as_str().unwrap();
        assert!(
            error.contains("bad") && error.contains("news") && error.contains("end"),
            "{error:?}"
        );
        assert!(
            !error
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{error:?}"
        );
    }
    // The same worker sends another tenant's webhook after it.
    let (_, other) = app.new_env("other").await;
    let (rx2, url2) = Receiver::start(vec![Answer::Status(200)]).await;
    create_with(&app, &other, json!({"url": url2, "name": "next"})).await;
    app.send_event(&other, json!({"event": {"name": "next", "id": "x"}}))
        .await;
    wait_until(
        "the other tenant's webhook",
        Duration::from_secs(20),
        || async { rx2.count() == 1 },
    )
    .await;
    app.settle_with_errors().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_cannot_be_recorded_still_counts_against_its_job() {
    let app = TestApp::builder().start().await;
    // The database refuses to record a failed attempt (as it refused one with a NUL in it):
    // a trigger of this test's own.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_attempt() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.status = 500 THEN RAISE EXCEPTION 'refused by the test'; END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_attempt BEFORE INSERT ON webhook_attempts
           FOR EACH ROW EXECUTE FUNCTION refuse_attempt();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (rx, url) = Receiver::start(vec![Answer::Status(500)]).await;
    let key = app.api_key.clone();
    let id = create_with(&app, &key, json!({"url": url, "name": "unrecorded"})).await;
    app.send_event(&key, json!({"event": {"name": "unrecorded", "id": "u"}}))
        .await;
    // Retried with backoff and discarded after its last attempt, like any failing job.
    wait_until(
        "the webhook job to be discarded",
        Duration::from_secs(30),
        || async {
            webhook_job(&app)
                .await
                .is_some_and(|(s, _)| s == "discarded")
        },
    )
    .await;
    assert_eq!(webhook_job(&app).await, Some(("discarded".into(), 5)));
    assert_eq!(rx.count(), 5, "one request per attempt");
    let errors: Value =
        sqlx::query_scalar("SELECT errors FROM queue_jobs WHERE kind = 'events.deliverWebhook'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let errors = errors.as_array().unwrap();
    assert_eq!(errors.len(), 5, "{errors:?}");
    assert!(
        errors[0]["error"].as_str().unwrap().contains("500"),
        "{errors:?}"
    );
    wait_until(
        "the dispatcher to be failed",
        Duration::from_secs(10),
        || async { view(&app, &id).await["status"] == "failed" },
    )
    .await;
    // Another tenant's webhook goes out all the same.
    let (_, other) = app.new_env("other").await;
    let (rx2, url2) = Receiver::start(vec![Answer::Status(200)]).await;
    create_with(&app, &other, json!({"url": url2, "name": "next"})).await;
    app.send_event(&other, json!({"event": {"name": "next", "id": "x"}}))
        .await;
    wait_until(
        "the other tenant's webhook",
        Duration::from_secs(20),
        || async { rx2.count() == 1 },
    )
    .await;
}

/// An EPHEMERAL dispatcher `name` at a receiver answering 200, an event for it, and its
/// delivery and invocation run by hand: the webhook job's message is out. Returns the
/// receiver, the dispatcher's id and the worker.
async fn up_to_the_webhook(app: &TestApp, name: &str) -> (Receiver, String, Worker) {
    let (rx, url) = Receiver::start(vec![Answer::Status(200)]).await;
    let (_, created) = create(app, json!({"url": url, "name": name})).await;
    let id = created["id"].as_str().unwrap().to_string();
    app.send_event(&app.api_key, json!({"event": {"name": name, "id": name}}))
        .await;
    let worker = Worker::new(app.pool.clone(), app.topology.clone(), test_worker_config());
    for kind in [JobKind::DeliverEvent, JobKind::InvokeDispatcher] {
        app.relay_all().await;
        wait_until("the job's message", Duration::from_secs(10), || async {
            app.queue_depth(kind).await == 1
        })
        .await;
        app.drain_with(&worker, kind).await;
    }
    app.relay_all().await;
    (rx, id, worker)
}

/// Backends of the test's database waiting for a lock.
async fn lock_waiters(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_message_that_arrives_while_the_relay_holds_its_row_is_sent_once() {
    let app = http_only().await;
    let (rx, id, worker) = up_to_the_webhook(&app, "held").await;
    let webhook = take_messages(&app, JobKind::DeliverWebhook).await;
    assert_eq!(webhook.len(), 1);
    // A relay (the reconciler's republish) holds the job's row locked until its confirms
    // come, and the message it publishes arrives before it commits.
    let mut relay = app.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM queue_jobs WHERE id = $1 FOR UPDATE")
        .bind(webhook[0].id)
        .execute(&mut *relay)
        .await
        .unwrap();
    let running = {
        let (worker, message) = (worker.clone(), webhook[0].clone());
        tokio::spawn(async move { worker.process(vec![Ok(message)]).await })
    };
    wait_until(
        "the worker to wait for the row (or to be done with it)",
        Duration::from_secs(10),
        || async { running.is_finished() || lock_waiters(&app).await > 0 },
    )
    .await;
    relay.commit().await.unwrap();
    assert_eq!(running.await.unwrap().unwrap(), vec![Disposition::Ack]);
    assert_eq!(rx.count(), 1, "the webhook was sent once");
    assert_eq!(webhook_job(&app).await, Some(("completed".into(), 1)));
    assert_eq!(view(&app, &id).await["status"], "delivered");
    // The message once more: nothing is sent.
    assert_eq!(
        worker.process(vec![Ok(webhook[0].clone())]).await.unwrap(),
        vec![Disposition::Ack]
    );
    assert_eq!(rx.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_whose_row_stays_locked_past_the_lease_wait_is_sent_later() {
    let app = http_only().await;
    let (rx, id, worker) = up_to_the_webhook(&app, "stuck").await;
    // The webhook's row held locked longer than the lease waits for it.
    let job: i64 =
        sqlx::query_scalar("SELECT id FROM queue_jobs WHERE kind = 'events.deliverWebhook'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM queue_jobs WHERE id = $1 FOR UPDATE")
        .bind(job)
        .execute(&mut *holder)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(
        worker
            .clone()
            .run(app.store.amqp_url.clone(), shutdown.clone()),
    );
    wait_until(
        "the worker to wait for the row",
        Duration::from_secs(10),
        || async { lock_waiters(&app).await > 0 },
    )
    .await;
    wait_until(
        "the worker to give up waiting",
        kongflow_events::ledger::run::LEASE_LOCK_WAIT + Duration::from_secs(5),
        || async { lock_waiters(&app).await == 0 },
    )
    .await;
    assert_eq!(rx.count(), 0);
    holder.commit().await.unwrap();
    // The message went back into the tiers; it comes again and is sent, once.
    wait_until("the webhook", Duration::from_secs(10), || async {
        rx.count() == 1
    })
    .await;
    wait_until("the job to complete", Duration::from_secs(10), || async {
        webhook_job(&app).await == Some(("completed".into(), 1))
    })
    .await;
    assert_eq!(view(&app, &id).await["status"], "delivered");
    shutdown.cancel();
    running.await.unwrap();
    assert_eq!(rx.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_environments_hanging_webhooks_leave_room_for_anothers() {
    let timeout = Duration::from_secs(6);
    let mut config = test_worker_config();
    config.webhook.webhook_concurrency = 4;
    config.webhook.webhook_concurrency_per_environment = 2;
    config.webhook.webhook_timeout = timeout;
    // Each consumer of the shard gives the flooding environment its share.
    let share = config.worker_concurrency * config.webhook.webhook_concurrency_per_environment;
    let app = TestApp::builder().worker(config).start().await;
    let other = neighbour(&app).await;
    let (hanging, hang_url) = Receiver::start(vec![Answer::Hang]).await;
    let key = app.api_key.clone();
    for i in 0..12 {
        create_with(
            &app,
            &key,
            json!({"url": format!("{hang_url}/{i}"), "name": "flood"}),
        )
        .await;
    }
    app.send_event(&key, json!({"event": {"name": "flood", "id": "f"}}))
        .await;
    wait_until(
        "the flood's requests to hang",
        Duration::from_secs(10),
        || async { hanging.count() >= share },
    )
    .await;
    let (rx, url) = Receiver::start(vec![Answer::Status(200)]).await;
    create_with(&app, &other, json!({"url": url, "name": "quiet"})).await;
    let sent = std::time::Instant::now();
    app.send_event(&other, json!({"event": {"name": "quiet", "id": "q"}}))
        .await;
    wait_until("the other environment's webhook", timeout, || async {
        rx.count() == 1
    })
    .await;
    let took = sent.elapsed();
    assert!(took < timeout / 2, "the other environment waited {took:?}");
    assert!(
        hanging.count() <= share,
        "the flooding environment has {} requests out, more than its share of {share}",
        hanging.count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fired_ephemeral_dispatcher_cannot_be_enabled_and_a_second_event_sends_nothing() {
    let app = http_only().await;
    let (rx, url) = Receiver::start(vec![Answer::Status(200)]).await;
    let (_, created) = create(&app, json!({"url": url, "name": "once"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    // Two events matched while it is live: two invocations.
    for e in ["e1", "e2"] {
        app.send_event(&app.api_key, json!({"event": {"name": "once", "id": e}}))
            .await;
    }
    let worker = Worker::new(app.pool.clone(), app.topology.clone(), test_worker_config());
    app.relay_all().await;
    wait_until("two deliveries", Duration::from_secs(10), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 2
    })
    .await;
    app.drain_with(&worker, JobKind::DeliverEvent).await;
    app.relay_all().await;
    let invocations = take_messages(&app, JobKind::InvokeDispatcher).await;
    assert_eq!(invocations.len(), 2);
    // The first fires it.
    assert_eq!(
        worker
            .process(vec![Ok(invocations[0].clone())])
            .await
            .unwrap(),
        vec![Disposition::Ack]
    );
    assert_eq!(view(&app, &id).await["status"], "firing");
    // Spent: it cannot be enabled again.
    let enable = format!("/api/v1/dispatchers/{id}/enable");
    let (status, v) = app
        .request(Method::POST, &enable, Some(&app.api_key), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["error"].as_str().unwrap().contains("fired"), "{v}");
    // As an older build's enable left it: enabled, and fired. The second invocation must
    // not fire it again, nor may an event sent now.
    sqlx::query("UPDATE event_dispatchers SET enabled = true WHERE id = $1::uuid")
        .bind(&id)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        worker
            .process(vec![Ok(invocations[1].clone())])
            .await
            .unwrap(),
        vec![Disposition::Ack]
    );
    app.send_event(&app.api_key, json!({"event": {"name": "once", "id": "e3"}}))
        .await;
    for kind in [
        JobKind::DeliverEvent,
        JobKind::InvokeDispatcher,
        JobKind::DeliverWebhook,
    ] {
        app.relay_all().await;
        app.drain_with(&worker, kind).await;
    }
    let webhooks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs WHERE kind = 'events.deliverWebhook'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(webhooks, 1, "one webhook job");
    assert_eq!(rx.count(), 1, "one webhook sent");
    assert_eq!(view(&app, &id).await["status"], "delivered");
    // An expired one cannot be enabled either; a live one can, and disabling is always
    // allowed.
    let (_, live) = create(&app, json!({"url": format!("{url}/2"), "name": "later"})).await;
    let live = live["id"].as_str().unwrap().to_string();
    let path = |id: &str, what: &str| format!("/api/v1/dispatchers/{id}/{what}");
    for what in ["disable", "enable"] {
        let (status, v) = app
            .request(Method::POST, &path(&live, what), Some(&app.api_key), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{what}: {v}");
    }
    sqlx::query("UPDATE event_dispatchers SET expires_at = now() WHERE id = $1::uuid")
        .bind(&live)
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, v) = app
        .request(
            Method::POST,
            &path(&live, "enable"),
            Some(&app.api_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    let (status, _) = app
        .request(
            Method::POST,
            &path(&id, "disable"),
            Some(&app.api_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// A resolver that answers one address the first time it is asked and another after: a
/// DNS rebinding between the guard's check and the connection.
#[derive(Debug)]
struct Rebinding {
    first: std::net::IpAddr,
    then: std::net::IpAddr,
    asked: std::sync::atomic::AtomicUsize,
}

impl reqwest::dns::Resolve for Rebinding {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let asked = self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ip = if asked == 0 { self.first } else { self.then };
        Box::pin(async move {
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once((ip, 0).into()));
            Ok(addrs)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_rebound_to_loopback_after_the_check_is_not_followed() {
    use kongflow_events::webhooks::{Guard, Request, Resolver, Sender, new_secret, parse_nets};
    // The checked address: 127.0.0.2, allowed, standing for a public one. The address the
    // name turns to after the check: 127.0.0.1, inside and refused. Both listen on one port.
    let (checked, inside) = loop {
        let a = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            break (a, b);
        }
    };
    let port = checked.local_addr().unwrap().port();
    let public = Receiver::serve(checked, vec![Answer::Status(200)]);
    let inner = Receiver::serve(inside, vec![Answer::Status(200)]);
    let resolver = Arc::new(Rebinding {
        first: "127.0.0.2".parse().unwrap(),
        then: "127.0.0.1".parse().unwrap(),
        asked: Default::default(),
    });
    let sender = Sender {
        guard: Guard {
            allow: parse_nets("127.0.0.2/32").unwrap(),
        },
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(2),
        resolver: Resolver::new(resolver.clone()),
    };
    let url = format!("http://rebind.test:{port}/hook");
    let outcome = sender
        .send(Request {
            url: &url,
            msg_id: "msg_rebind",
            secret: &new_secret(),
            body: b"{}".to_vec(),
        })
        .await;
    assert_eq!(
        inner.count(),
        0,
        "the request followed the rebinding inside"
    );
    assert!(outcome.succeeded(), "{outcome:?}");
    assert_eq!(public.count(), 1, "the request went to the checked address");
    assert_eq!(
        resolver.asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the name was looked up once, for the check"
    );
}
