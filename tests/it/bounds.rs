//! Bounded work: what one request, one event or one client can cost the service, each
//! bound reached and checked by what it counts, not by timing.

use std::time::Duration;

use kongflow_events::config::HttpConfig;
use kongflow_events::events::filter::EVAL_BUDGET;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{HTTP_ONLY, TestApp, job_body, wait_until};

/// `{"a": {"a": ... leaf}}`, `depth` levels of `a`.
fn nest(depth: usize, leaf: Value) -> Value {
    (0..depth).fold(leaf, |inner, _| json!({ "a": inner }))
}

async fn dispatchers(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM event_dispatchers")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_past_a_limit_get_400_naming_it_and_store_nothing() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    let many_keys: serde_json::Map<String, Value> =
        (0..501).map(|i| (format!("k{i}"), json!([i]))).collect();
    let long_values: Vec<String> = (0..10)
        .map(|i| format!("{i}{}", "v".repeat(2_000)))
        .collect();
    let names: Vec<String> = (0..101).map(|i| format!("e{i}")).collect();
    let cases = [
        (
            json!({"version": "1", "trigger": {"event": "e", "payload": nest(16, json!({"z": ["x"]}))}}),
            "at most 16 objects deep",
        ),
        (
            json!({"version": "1", "trigger": {"event": "e", "payload": many_keys}}),
            "at most 1000 keys and list members",
        ),
        (
            json!({"version": "1", "trigger": {"event": "e", "context": {"a": long_values}}}),
            "at most 16384 are accepted",
        ),
        (
            json!({"version": "1", "trigger": {"event": names}}),
            "at most 100 event names",
        ),
        (
            json!({"version": "1", "trigger": {"event": "n".repeat(256)}}),
            "each name in trigger.event must be 1 to 255 characters",
        ),
        (
            json!({"version": "1", "trigger": {"event": "e", "source": "s".repeat(256)}}),
            "trigger.source must be 1 to 255 characters",
        ),
        // Once a 500: the unique index on versions cannot hold a key this long.
        (
            json!({"version": "v".repeat(3_000), "trigger": {"event": "e"}}),
            "version must be 1 to 255 characters",
        ),
    ];
    for (body, needle) in cases {
        let (status, answer) = app
            .request(Method::PUT, "/api/v1/jobs/limited", Some(&key), Some(body))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(needle), "{error:?} should say {needle:?}");
    }
    // Just inside the limits is fine.
    let fits = json!({"version": "1", "trigger": {"event": "e",
        "payload": nest(15, json!({"z": ["x"]}))}});
    app.put_job(&key, "deep", fits).await;

    let jobs: Vec<String> = (0..101).map(|i| format!("j{i}")).collect();
    let (status, answer) = app
        .request(
            Method::PUT,
            "/api/v1/dynamic-triggers/wide",
            Some(&key),
            Some(json!({ "jobs": jobs })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("at most 100 jobs"),
        "{answer}"
    );

    // Dispatchers per environment: 1,000 at most; the ones it has can still change.
    sqlx::query(
        "INSERT INTO event_dispatchers
             (id, environment_id, event_names, dispatchable_type, dispatchable_id, target_id)
         SELECT gen_random_uuid(), $1, ARRAY['filler'], 'JOB_VERSION', 'filler-' || i, gen_random_uuid()
         FROM generate_series(1, 999) AS i",
    )
    .bind(app.env.id)
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(dispatchers(&app).await, 1_000);
    let (status, answer) = app
        .request(
            Method::PUT,
            "/api/v1/jobs/one-too-many",
            Some(&key),
            Some(job_body("e", json!({}))),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("(1000)"),
        "{answer}"
    );
    app.put_job(&key, "deep", job_body("e2", json!({}))).await;
    assert_eq!(dispatchers(&app).await, 1_000);
    let jobs: Vec<String> = sqlx::query_scalar("SELECT slug FROM jobs")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        jobs,
        vec!["deep".to_string()],
        "only the job inside the limits"
    );

    // Listing pages through them all.
    let mut seen = std::collections::HashSet::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/dispatchers?limit=300&after={a}"),
            None => "/api/v1/dispatchers?limit=300".to_string(),
        };
        let (status, page) = app.request(Method::GET, &path, Some(&key), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for d in page["dispatchers"].as_array().unwrap() {
            assert!(seen.insert(d["id"].as_str().unwrap().to_string()));
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (1_000, 4));
    let (_, page) = app
        .request(Method::GET, "/api/v1/dispatchers", Some(&key), None)
        .await;
    assert_eq!(page["dispatchers"].as_array().unwrap().len(), 100);
    let (status, _) = app
        .request(
            Method::GET,
            "/api/v1/dispatchers?after=nope",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The dry run counts every dispatcher of the event's name (not the one of `e2`) and
    // lists at most 100 of each outcome.
    let (status, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(json!({"event": {"name": "filler"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (dry["matchCount"].as_i64(), dry["missCount"].as_i64()),
        (Some(999), Some(0))
    );
    assert_eq!(dry["matches"].as_array().unwrap().len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_costs_one_walk_and_a_costly_event_is_given_up_alone() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();

    // The shape that once took 2^depth walks, at the deepest a filter may be.
    let filter = nest(15, json!({"z": ["no"]}));
    app.put_job(&key, "deep", job_body("deep", json!({ "payload": filter })))
        .await;
    let (status, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(json!({"event": {"name": "deep", "payload": nest(15, json!({"z": "yes"}))}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!(
        dry["misses"][0]["reason"],
        format!("filter failed at payload{}.z", ".a".repeat(15))
    );
    // 16 keys and one list member, once each (context's empty filter costs nothing).
    assert_eq!(dry["steps"], 17);

    // 900 `$not` checks over a 2,000-element array: 1.8 million steps, past the budget.
    let nots: Vec<Value> = (1..=900).map(|i| json!({ "$not": -i })).collect();
    app.put_job(
        &key,
        "costly",
        job_body("costly", json!({"payload": {"tags": nots}})),
    )
    .await;
    app.put_job(&key, "plain", job_body("plain", json!({})))
        .await;
    let tags: Vec<i32> = (0..2_000).collect();
    let (_, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(json!({"event": {"name": "costly", "payload": {"tags": tags}}})),
        )
        .await;
    let reason = dry["misses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dispatcher"]["job"] == "costly")
        .unwrap()["reason"]
        .clone();
    assert_eq!(
        reason,
        format!("filter evaluation passed its budget of {EVAL_BUDGET} steps")
    );
    assert!(dry["steps"].as_u64().unwrap() > EVAL_BUDGET);

    app.send_event(
        &key,
        json!({"event": {"name": "costly", "id": "costly-1", "payload": {"tags": tags}}}),
    )
    .await;
    app.send_event(&key, json!({"event": {"name": "plain", "id": "plain-1"}}))
        .await;
    wait_until("the plain event's run", Duration::from_secs(20), || async {
        app.runs_by_job("plain-1").await.len() == 1
    })
    .await;
    wait_until("the costly event given up", Duration::from_secs(20), || async {
        let state: Option<String> = sqlx::query_scalar(
            "SELECT j.state::text FROM queue_jobs j JOIN event_records e ON j.args->>'id' = e.id::text
             WHERE e.event_id = 'costly-1' AND j.kind = 'deliverEvent'",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        state.as_deref() == Some("discarded")
    })
    .await;
    let (attempt, error): (i32, String) = sqlx::query_as(
        "SELECT j.attempt, j.errors->0->>'error' FROM queue_jobs j
         JOIN event_records e ON j.args->>'id' = e.id::text WHERE e.event_id = 'costly-1'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempt, 1, "a permanent failure is not retried");
    assert!(error.contains("budget"), "{error}");
    assert!(app.runs_by_job("costly-1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_events_dispatchers_share_one_step_budget() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    // Two dispatchers of 400 `$not` checks over a 2,000-element array: 800,000 steps each,
    // within the budget alone, past it together.
    let nots: Vec<Value> = (1..=400).map(|i| json!({ "$not": -i })).collect();
    for job in ["half-1", "half-2"] {
        app.put_job(
            &key,
            job,
            job_body("halves", json!({"payload": {"tags": nots}})),
        )
        .await;
    }
    let tags: Vec<i32> = (0..2_000).collect();
    app.send_event(
        &key,
        json!({"event": {"name": "halves", "id": "halves-1", "payload": {"tags": tags}}}),
    )
    .await;
    wait_until("the event given up", Duration::from_secs(20), || async {
        let state: Option<String> = sqlx::query_scalar(
            "SELECT j.state::text FROM queue_jobs j JOIN event_records e ON j.args->>'id' = e.id::text
             WHERE e.event_id = 'halves-1' AND j.kind = 'deliverEvent'",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        state.as_deref() == Some("discarded")
    })
    .await;
    let error: String = sqlx::query_scalar(
        "SELECT j.errors->0->>'error' FROM queue_jobs j
         JOIN event_records e ON j.args->>'id' = e.id::text WHERE e.event_id = 'halves-1'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(error.contains("budget"), "{error}");
    assert!(app.runs_by_job("halves-1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_call_is_sized_event_by_event_before_it_is_parsed() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    let big = "a".repeat(700 * 1024);
    let (status, body) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({"events": [
                {"name": "bulk", "id": "small"},
                {"name": "bulk", "id": "big", "payload": big}
            ]})),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("events[1]: its JSON is"),
        "{body}"
    );
    // Past the bulk body limit: refused before anything is read into events.
    let events: Vec<Value> = (0..20)
        .map(|i| json!({"name": "bulk", "id": format!("b{i}"), "payload": "p".repeat(450 * 1024)}))
        .collect();
    let (status, body) = app
        .request(
            Method::POST,
            "/api/v1/events/bulk",
            Some(&key),
            Some(json!({ "events": events })),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM event_records")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

/// Open a connection and send the head of a `POST /api/v1/events` whose body never
/// comes: the request holds its place until the request timeout.
async fn stalled_send(app: &TestApp) -> TcpStream {
    let addr = app.base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"event\":",
        app.api_key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Everything the server sends until it closes the connection (at most 10 s).
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_bound_the_api_answers_503_with_retry_after() {
    let config = HttpConfig {
        http_max_in_flight: 1,
        // The stalled request must outlast the wait below.
        http_request_timeout: std::time::Duration::from_millis(120_000),
        http_body_timeout: std::time::Duration::from_millis(120_000),
        ..HttpConfig::default()
    };
    let app = TestApp::builder()
        .roles(HTTP_ONLY)
        .http(config)
        .start()
        .await;
    let probe = || async {
        app.http
            .get(format!("{}/api/v1/events/nope", app.base_url))
            .bearer_auth(&app.api_key)
            .send()
            .await
            .unwrap()
    };
    // The stalled request holds the one place once the server has read its head (on a
    // machine busy with the whole suite that took over 20 s once). A stalled connection
    // that never came to hold it (seen once in a few hundred runs) is replaced by another.
    let mut stalled = stalled_send(&app).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut opened = std::time::Instant::now();
    while probe().await.status() != StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for a 503"
        );
        if opened.elapsed() > Duration::from_secs(15) {
            stalled = stalled_send(&app).await;
            opened = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = probe().await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("in flight"));
    // Operators' routes are not counted.
    let health = app
        .http
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // The body arrives (a bad one): the request ends and its place is free again.
    stalled.write_all(&[b' '; 991]).await.unwrap();
    let answer = read_to_close_or_response(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(probe().await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_gets_408() {
    let config = HttpConfig {
        http_request_timeout: std::time::Duration::from_millis(500),
        ..HttpConfig::default()
    };
    let app = TestApp::builder()
        .roles(HTTP_ONLY)
        .http(config)
        .start()
        .await;
    let mut stalled = stalled_send(&app).await;
    let answer = read_to_close_or_response(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("HTTP_REQUEST_TIMEOUT_MS"), "{answer}");
}

/// The response the server sends, whether or not it then closes the connection.
async fn read_to_close_or_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&out);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_string)
                            })
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        if len.is_some_and(|len| body.len() >= len) {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed() {
    let config = HttpConfig {
        http_header_timeout: std::time::Duration::from_millis(300),
        ..HttpConfig::default()
    };
    let app = TestApp::builder()
        .roles(HTTP_ONLY)
        .http(config)
        .start()
        .await;
    let addr = app.base_url.trim_start_matches("http://").to_string();

    // Headers that never end.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut slow).await;
    assert!(!answer.contains("200 OK"), "{answer}");

    // A kept-alive connection that goes quiet after its answer.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_to_close_or_response(&mut idle).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(!first.to_ascii_lowercase().contains("connection: close"));
    let rest = read_to_close(&mut idle).await;
    assert_eq!(rest, "", "closed with nothing more said");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_add_no_metric_series() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    for method in ["BREW", "WHEN", "FOO1"] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let _ = app
            .http
            .request(m, format!("{}/healthz", app.base_url))
            .send()
            .await
            .unwrap();
    }
    let text = kongflow_events::metrics::metrics().render();
    for method in ["BREW", "WHEN", "FOO1"] {
        assert!(!text.contains(&format!("method=\"{method}\"")));
    }
    assert!(
        text.contains("method=\"other\""),
        "invented methods count as other"
    );
}

/// The TCP connections process `pid` holds open to port `port`, read from `/proc`.
/// The port of the test broker (`AMQP_URL`'s first node).
fn broker_port() -> u16 {
    let url = crate::helpers::amqp_url();
    let authority = url
        .split('@')
        .next_back()
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    authority
        .rsplit_once(':')
        .map_or(5672, |(_, p)| p.parse().unwrap())
}

fn connections_to(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let remote = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        // Fields: sl, local, remote, state (01: established), ..., inode (the 10th).
        .filter(|f| {
            f.len() > 9 && f[2].ends_with(&remote) && f[3] == "01" && inodes.contains(&f[9])
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_readiness_from_its_probe_and_escapes_callers_text_in_logs() {
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    let (child, base) = app.start_child("serve", &[("RUST_LOG", "info")]).await;
    // Many probes, one broker connection: the answer is the last probe's.
    for _ in 0..50 {
        let r = app.http.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let pid = child.id().unwrap();
    assert_eq!(
        connections_to(pid, broker_port()),
        1,
        "one connection held for readiness"
    );

    // A caller's id with a line break cannot forge a log line.
    let r = app
        .http
        .post(format!("{base}/api/v1/events"))
        .bearer_auth(&app.api_key)
        .json(&json!({"event": {"name": "x", "id": "evil\nINFO forged line"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(r"evil\nINFO forged line"), "{stderr}");
    assert!(
        !stderr.lines().any(|l| l.starts_with("INFO forged line")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_stay_out_of_help_and_errors() {
    let bin = env!("CARGO_BIN_EXE_kongflow-events");
    let out = tokio::process::Command::new(bin)
        .arg("--help")
        .env("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/x")
        .env("AMQP_URL", "amqp://guest:hunter3@127.0.0.1:1/%2f")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[env: DATABASE_URL]"), "{help}");
    assert!(!help.contains("hunter"), "{help}");
    // A login the broker refuses: the error says so, without the password.
    let out = tokio::process::Command::new(bin)
        .arg("topology")
        .env("AMQP_URL", "amqp://guest:hunter3@127.0.0.1:5672/%2f")
        .env("RUST_LOG", "debug")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ACCESS_REFUSED"), "{stderr}");
    assert!(!stderr.contains("hunter3"), "{stderr}");
}

/// Open a connection and send the head of `method path` with `auth` (a whole
/// `Authorization` header line, or nothing) announcing a 100,000-byte JSON body, and one
/// byte of it: the rest never comes.
async fn slow_body(app: &TestApp, method: &str, path: &str, auth: Option<&str>) -> TcpStream {
    let addr = app.base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = auth.map(|a| format!("{a}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// A send of `key`'s environment, answered within `within`: its status.
async fn send_within(app: &TestApp, key: &str, id: &str, within: Duration) -> StatusCode {
    let send = app
        .http
        .post(format!("{}/api/v1/events", app.base_url))
        .bearer_auth(key)
        .json(&json!({"event": {"name": "prompt", "id": id}}))
        .send();
    tokio::time::timeout(within, send)
        .await
        .unwrap_or_else(|_| panic!("{id} not answered within {within:?}"))
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_without_credentials_are_never_read_and_hold_no_place() {
    let config = HttpConfig {
        http_max_in_flight: 8,
        http_request_timeout: std::time::Duration::from_millis(120_000),
        operator_token: Some("an-operator-token-of-length".parse().unwrap()),
        ..HttpConfig::default()
    };
    let app = TestApp::builder()
        .roles(HTTP_ONLY)
        .http(config)
        .start()
        .await;
    let operator = "/api/v1/operator/environments/a/b/c/limits";
    let mut held = Vec::new();
    for i in 0..12 {
        // No token, a wrong token, a wrong API key: each answered 401 at once, its body
        // never waited for.
        let (method, path, auth) = match i % 3 {
            0 => ("PUT", operator, None),
            1 => (
                "PUT",
                operator,
                Some("Authorization: Bearer wrong-token-wrong-token"),
            ),
            _ => ("POST", "/api/v1/events", Some("Authorization: Bearer nope")),
        };
        let mut stream = slow_body(&app, method, path, auth).await;
        let answer = read_to_close_or_response(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{method} {path}: {answer:?}"
        );
        held.push(stream);
    }
    // Many more of them at once, never read: an authenticated client is served at once.
    for _ in 0..24 {
        held.push(slow_body(&app, "PUT", operator, None).await);
    }
    for i in 0..3 {
        let status = send_within(
            &app,
            &app.api_key,
            &format!("ok-{i}"),
            // Refused, it would be answered 503 at once or wait for the 2-minute timeout.
            Duration::from_secs(15),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_environments_slow_bodies_hold_only_its_share_of_the_places() {
    // The slow bodies hold their places for the whole test: with the default body timeout
    // (5 s) they were answered 408 and let go before a loaded machine saw them held.
    let config = HttpConfig {
        http_max_in_flight: 8,
        http_request_timeout: std::time::Duration::from_millis(120_000),
        http_body_timeout: std::time::Duration::from_millis(120_000),
        ..HttpConfig::default()
    };
    let app = TestApp::builder()
        .roles(HTTP_ONLY)
        .http(config)
        .start()
        .await;
    let (_, other) = app.new_env("neighbour").await;
    let auth = format!("Authorization: Bearer {}", app.api_key);
    // Slow bodies until the server has read enough of their heads that its own
    // environment is refused. (Twelve at once were not always enough: a key not yet known
    // is looked up one request at a time here, and on a loaded machine the others were
    // answered 503 after 250 ms instead of taking a place.)
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..4 {
            held.push(slow_body(&app, "POST", "/api/v1/events", Some(&auth)).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let probe = app
            .http
            .get(format!("{}/api/v1/events/nope", app.base_url))
            .bearer_auth(&app.api_key)
            .send()
            .await
            .unwrap();
        if probe.status() == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        // Served (404), or its key's lookup waited out (503): not all places are taken yet.
        assert!(
            [StatusCode::NOT_FOUND, StatusCode::SERVICE_UNAVAILABLE].contains(&probe.status()),
            "{}",
            probe.status()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the environment's places were never all taken ({} slow bodies)",
            held.len()
        );
    }
    // Another environment is served at once.
    for i in 0..3 {
        let status = send_within(
            &app,
            &other,
            &format!("theirs-{i}"),
            Duration::from_secs(15),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_come_gets_408_after_the_body_timeout() {
    let config = HttpConfig {
        http_request_timeout: std::time::Duration::from_millis(120_000),
        http_body_timeout: std::time::Duration::from_millis(1_000),
        ..HttpConfig::default()
    };
    let app = TestApp::builder()
        .roles(HTTP_ONLY)
        .http(config)
        .start()
        .await;
    let started = std::time::Instant::now();
    let mut stalled = stalled_send(&app).await;
    let answer = read_to_close_or_response(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("HTTP_BODY_TIMEOUT_MS"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_cap_do_not_keep_a_client_waiting() {
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = format!("http://127.0.0.1:{port}");
    // Open files: 64 at first, 256 at most; the process raises its own limit to the most
    // and keeps its connections below it, its database and broker sockets beside them.
    let mut child = tokio::process::Command::new("bash")
        .args([
            "-c",
            "ulimit -Sn 64 && ulimit -Hn 256 && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_kongflow-events"),
            "serve",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .envs(app.child_env())
        // Idle sockets, unless closed to make room, are closed after a minute.
        .env("HTTP_HEADER_TIMEOUT_MS", "60000")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until("the child to serve", Duration::from_secs(30), || async {
        matches!(app.http.get(format!("{base}/api/openapi.json")).send().await,
                 Ok(r) if r.status() == StatusCode::OK)
    })
    .await;
    // More idle connections than the process may hold.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // A client on a fresh connection is served at once, its event stored.
    for i in 0..3 {
        let fresh = reqwest::Client::new();
        let send = fresh
            .post(format!("{base}/api/v1/events"))
            .bearer_auth(&app.api_key)
            .json(&json!({"event": {"name": "fresh", "id": format!("fresh-{i}")}}))
            .send();
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), send)
            .await
            .unwrap_or_else(|_| panic!("not answered within 10 s beside 300 idle connections"))
            .unwrap();
        assert_eq!(
            answer.status(),
            StatusCode::OK,
            "after {:?}",
            started.elapsed()
        );
    }
    drop(idle);
    child.kill().await.unwrap();
    let _ = child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_operator_tokens_are_throttled_per_client_and_in_all() {
    const TOKEN: &str = "the-operator-token-of-this-test";
    let config = HttpConfig {
        operator_token: Some(TOKEN.parse().unwrap()),
        ..HttpConfig::default()
    };
    let app = TestApp::builder()
        .roles(HTTP_ONLY)
        .http(config)
        .start()
        .await;
    let path = format!(
        "{}/api/v1/operator/environments/org-{}/proj/dev/limits",
        app.base_url, app.db_name
    );
    // A client of its own loopback address.
    let from = |last: u8| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, last]))
            .build()
            .unwrap()
    };
    let attempt = |client: reqwest::Client, token: &'static str| {
        let path = path.clone();
        async move {
            let r = client.get(path).bearer_auth(token).send().await.unwrap();
            let retry = r.headers().get("retry-after").cloned();
            (r.status(), retry, r.text().await.unwrap())
        }
    };
    let mallory = from(2);
    for _ in 0..10 {
        let (status, _, body) = attempt(mallory.clone(), "a-guess-at-the-token-0000").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    // Past ten failures in a minute: refused unchecked, even the right token.
    let (status, retry, body) = attempt(mallory.clone(), TOKEN).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry: u64 = retry.unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(body.contains("failed attempts"), "{body}");
    // Another client is not held back by it.
    let (status, _, body) = attempt(from(3), TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A hundred failures in all, from many addresses: every attempt waits.
    for last in 10..19 {
        for _ in 0..10 {
            let (status, _, _) = attempt(from(last), "a-guess-at-the-token-0000").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
    }
    let (status, retry, body) = attempt(from(30), TOKEN).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(retry.is_some());
}

/// `n` EPHEMERAL dispatchers of `name` in the test's environment, each `state`: `fired`
/// (delivered), `expired` (never fired) or `live`.
async fn ephemerals(app: &TestApp, name: &str, n: i32, state: &str) {
    let (expires, fired) = match state {
        "fired" => ("now() + interval '1 hour'", "now() - interval '1 minute'"),
        "expired" => ("now() - interval '1 minute'", "NULL"),
        _ => ("now() + interval '1 hour'", "NULL"),
    };
    let delivered = if state == "fired" { "now()" } else { "NULL" };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO event_dispatchers
             (id, environment_id, event_names, dispatchable_type, dispatchable_id, target_id,
              url, secret, expires_at, fired_at, delivered_at, enabled, created_at)
         SELECT g.id, $1, ARRAY[$2], 'EPHEMERAL',
                CASE WHEN $3 = 'live' THEN 'https://r.example/' || g.id ELSE 'spent:' || g.id END,
                g.id, 'https://r.example/' || g.id, 's', {expires}, {fired}, {delivered},
                $3 <> 'fired', now() - make_interval(secs => g.i)
         FROM (SELECT gen_random_uuid() AS id, i FROM generate_series(1, $4) AS i) g"
    )))
    .bind(app.env.id)
    .bind(name)
    .bind(state)
    .bind(n)
    .execute(&app.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_reads_only_the_live_dispatchers_of_the_events_name() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "takes-x", job_body("x", json!({}))).await;
    app.put_job(&key, "takes-y", job_body("y", json!({}))).await;
    // Thousands spent, of the name and of others: none of them is read.
    ephemerals(&app, "x", 3_000, "fired").await;
    ephemerals(&app, "y", 1_000, "expired").await;
    ephemerals(&app, "x", 150, "expired").await;
    ephemerals(&app, "x", 2, "live").await;
    let (status, dry) = app
        .request(
            Method::POST,
            "/api/v1/events/match",
            Some(&key),
            Some(json!({"event": {"name": "x"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    // The job and the live ones take it; of the expired ones of its name, the newest
    // hundred say why not.
    assert_eq!(dry["matchCount"], 3, "{}", dry["matchCount"]);
    assert_eq!(dry["missCount"], 100, "{}", dry["missCount"]);
    let misses = dry["misses"].as_array().unwrap();
    assert!(misses.iter().all(|m| m["reason"] == "expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_dispatchers_are_capped_live_and_spent() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    let create = |i: usize| {
        app.request(
            Method::POST,
            "/api/v1/event-dispatchers/ephemeral",
            Some(&key),
            Some(json!({"url": format!("https://r.example/new-{i}"), "name": "x"})),
        )
    };
    // Spent ones past the most kept go, oldest first, as new ones come.
    ephemerals(&app, "x", 1_200, "fired").await;
    ephemerals(&app, "x", 99, "live").await;
    let (status, body) = create(0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let spent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM event_dispatchers WHERE dispatchable_type = 'EPHEMERAL'
           AND fired_at IS NOT NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(spent, 1_000);
    // A hundred live at most.
    let (status, body) = create(1).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("100 live ephemeral"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_versions_dynamic_triggers_and_delivery_times_are_capped() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    // deliverAt at most ten years ahead, as deliverAfter.
    let ahead = |years: i64| {
        (chrono::Utc::now() + chrono::Duration::days(365 * years))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    for (at, ok) in [
        ("9999-01-01T00:00:00.000Z".to_string(), false),
        (ahead(11), false),
        (ahead(9), true),
    ] {
        let (status, body) = app
            .request(
                Method::POST,
                "/api/v1/events",
                Some(&key),
                Some(json!({"event": {"name": "far", "id": format!("far-{at}")},
                            "options": {"deliverAt": at}})),
            )
            .await;
        if ok {
            assert_eq!(status, StatusCode::OK, "{at}: {body}");
        } else {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{at}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains("deliverAt"),
                "{body}"
            );
        }
    }

    // The newest 100 versions of a job are kept.
    app.put_job(&key, "many", job_body("v", json!({}))).await;
    sqlx::query(
        "INSERT INTO job_versions (id, job_id, environment_id, version, trigger, updated_at)
         SELECT gen_random_uuid(), j.id, j.environment_id, 'old-' || i, '{}',
                now() - make_interval(secs => i)
         FROM jobs j, generate_series(1, 150) AS i WHERE j.slug = 'many'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let mut latest = job_body("v", json!({}));
    latest["version"] = json!("newest");
    app.put_job(&key, "many", latest).await;
    let versions: Vec<String> =
        sqlx::query_scalar("SELECT version FROM job_versions ORDER BY updated_at DESC")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(versions.len(), 100);
    assert_eq!(versions[0], "newest");
    assert!(versions.contains(&"1.0.0".to_string()));
    assert!(!versions.contains(&"old-150".to_string()));

    // At most 1,000 dynamic triggers; the ones there are can still change.
    sqlx::query(
        "INSERT INTO dynamic_triggers (id, environment_id, slug)
         SELECT gen_random_uuid(), $1, 'dt-' || i FROM generate_series(1, 1000) AS i",
    )
    .bind(app.env.id)
    .execute(&app.pool)
    .await
    .unwrap();
    let put = |id: &'static str| {
        let (app, key) = (&app, key.clone());
        async move {
            app.request(
                Method::PUT,
                &format!("/api/v1/dynamic-triggers/{id}"),
                Some(&key),
                Some(json!({"jobs": ["many"]})),
            )
            .await
        }
    };
    let (status, body) = put("one-too-many").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("(1000)"), "{body}");
    let (status, body) = put("dt-7").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
