//! HTTP details: auth, errors, tenants, the env command.

use std::time::Duration;

use kongflow_events::tenants;
use serde_json::json;

use crate::helpers::HTTP_ONLY;
use crate::helpers::{TestApp, job_body};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_bad_bodies_get_clear_errors_and_store_nothing() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let body = json!({"event": {"name": "x", "payload": {}}});
    let post = reqwest::Method::POST;

    let (s, v) = app
        .request(post.clone(), "/api/v1/events", None, Some(body.clone()))
        .await;
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("Authorization"));
    let (s, v) = app
        .request(
            post.clone(),
            "/api/v1/events",
            Some("tr_dev_nope"),
            Some(body),
        )
        .await;
    assert_eq!(s, 401);
    assert_eq!(v["error"], "invalid API key");

    let key = app.api_key.clone();
    for bad in [
        json!({"event": {"payload": {}}}),
        json!({"event": {"name": 5}}),
        json!({"event": {"name": "x"}, "options": {"deliverAt": "yesterday"}}),
        json!({"event": {"name": "x"}, "options": {"deliverAfter": -1}}),
        json!({"event": {"name": "x"}, "options": {"deliverAfter": 1e15}}),
        json!({"event": {"name": "x"}, "options": {"deliverAfter": 100_000_000_000u64}}),
        json!({"event": {"name": ""}}),
        json!([]),
    ] {
        let (s, v) = app
            .request(
                post.clone(),
                "/api/v1/events",
                Some(&key),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(s, 400, "{bad}");
        assert!(
            v["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{bad}: {v}"
        );
    }
    let raw = app
        .http
        .post(format!("{}/api/v1/events", app.base_url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM event_records")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);

    let (s, v) = app
        .request(
            reqwest::Method::PUT,
            "/api/v1/jobs/j",
            Some(&key),
            Some(json!({"version": "1", "trigger": {"event": "x", "payload": [1]}})),
        )
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("trigger.payload"));
    let (s, _) = app
        .request(reqwest::Method::GET, "/nope", Some(&key), None)
        .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_key_stops_working_within_the_key_cache_ttl() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let get = reqwest::Method::GET;
    let (_, old) = app.new_env("rotated").await;
    // Known key, unknown event: 404, and the key is now cached.
    let (s, _) = app
        .request(get.clone(), "/api/v1/events/none", Some(&old), None)
        .await;
    assert_eq!(s, 404);
    // Creating the environment again gives it a new key; the old one is refused once the
    // cache has forgotten it, and the new one works at once (it was never cached).
    let (_, new) = app.new_env("rotated").await;
    assert_ne!(old, new);
    let (s, _) = app
        .request(get.clone(), "/api/v1/events/none", Some(&new), None)
        .await;
    assert_eq!(s, 404);
    tokio::time::sleep(tenants::KEY_CACHE_TTL + Duration::from_millis(100)).await;
    let (s, v) = app
        .request(get.clone(), "/api/v1/events/none", Some(&old), None)
        .await;
    assert_eq!(s, 401, "{v}");
    // A wrong key is remembered as wrong, and stays refused.
    for _ in 0..3 {
        let (s, _) = app
            .request(
                get.clone(),
                "/api/v1/events/none",
                Some("tr_dev_wrong"),
                None,
            )
            .await;
        assert_eq!(s, 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_environments_events_are_not_found() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let key = app.api_key.clone();
    let (_, other) = app.new_env("other").await;
    app.put_job(&key, "job", job_body("e", json!({}))).await;
    app.send_event(
        &key,
        json!({"event": {"name": "e", "id": "mine", "payload": {"secret": 1}}}),
    )
    .await;
    let (s, v) = app
        .request(
            reqwest::Method::GET,
            "/api/v2/events/mine",
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert!(v["error"].is_string());
    // The same id in the other environment is a different event.
    let theirs = app
        .send_event(
            &other,
            json!({"event": {"name": "e", "id": "mine", "payload": {"x": 2}}}),
        )
        .await;
    assert_eq!(theirs["payload"], json!({"x": 2}));
    let (s, v) = app
        .request(
            reqwest::Method::GET,
            "/api/v2/events/mine",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["id"], "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_create_prints_a_working_key_last() {
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .args([
            "env",
            "create",
            &format!("{}/cli/staging", app.db_name),
            "--type",
            "STAGING",
        ])
        .envs(app.child_env())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().to_string();
    assert!(key.starts_with("tr_staging_"), "{key}");
    let log = app
        .send_event(
            &key,
            json!({"event": {"name": "hello", "payload": {"a": 1}}}),
        )
        .await;
    assert!(
        !log["id"].as_str().unwrap().is_empty(),
        "an id is generated"
    );
    let env_type: String =
        sqlx::query_scalar("SELECT e.type FROM runtime_environments e WHERE e.slug = 'staging'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(env_type, "STAGING");
    let hashes_hold_no_key: bool = sqlx::query_scalar(
        "SELECT bool_and(position($1::bytea in api_key_hash) = 0) FROM runtime_environments",
    )
    .bind(key.as_bytes())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(hashes_hold_no_key);
}

/// Run the binary to its end (at most 30 s) and return its status and stderr.
async fn run_to_end(args: &[&str], env: &[(&str, String)]) -> (std::process::ExitStatus, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the process ends by itself instead of waiting")
    .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_cannot_start_say_why_and_what_to_set() {
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    let base = crate::helpers::pg_base();
    // A database that does not exist, a role that does not exist: no retrying.
    for url in [
        format!("{base}/kf_no_such_database"),
        base.replace("postgres@", "no_such_role@") + "/postgres",
    ] {
        let (status, stderr) =
            run_to_end(&["jobs", "list"], &[("DATABASE_URL", url.clone())]).await;
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains("DATABASE_URL"), "{stderr}");
        assert!(!stderr.contains("not reachable yet"), "{stderr}");
    }
    // A broker login that is refused stops a worker at start.
    let mut env = app.child_env();
    env.retain(|(k, _)| *k != "AMQP_URL" && *k != "RUST_LOG");
    let mut refused = env.clone();
    refused.push(("AMQP_URL", "amqp://guest:wrong@127.0.0.1:5672/%2f".into()));
    let (status, stderr) = run_to_end(&["worker"], &refused).await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("AMQP_URL"), "{stderr}");
    assert!(!stderr.contains(":wrong@"), "{stderr}");
    // A second worker on the first one's metrics address says which address and how to
    // choose another.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut on_taken = env.clone();
    on_taken.retain(|(k, _)| *k != "METRICS_ADDR");
    on_taken.push(("AMQP_URL", crate::helpers::amqp_url()));
    on_taken.push(("METRICS_ADDR", addr.clone()));
    let (status, stderr) = run_to_end(&["worker"], &on_taken).await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(
        stderr.contains("METRICS_ADDR") && stderr.contains("port 0"),
        "{stderr}"
    );
    drop(taken);
}

/// `serve` and `all` take METRICS_ADDR like the other roles.
#[derive(clap::Parser)]
struct ServeFlags {
    #[command(flatten)]
    metrics: kongflow_events::config::MetricsConfig,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_off_the_api_port_by_default() {
    // Unset, METRICS_ADDR is a loopback address of its own, not the API's.
    let flags = <ServeFlags as clap::Parser>::try_parse_from(["serve"]).unwrap();
    let shown = format!("{:?}", flags.metrics.metrics_addr);
    assert!(
        shown.contains("127.0.0.1:9464"),
        "METRICS_ADDR unset: {shown}"
    );
    // A process given no metrics listener serves no metrics on the API's port; its
    // probes stay where the chart's probes look.
    let app = TestApp::builder().roles(HTTP_ONLY).start().await;
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), reqwest::StatusCode::NOT_FOUND);
    for probe in ["/healthz", "/readyz"] {
        let r = app
            .http
            .get(format!("{}{probe}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), reqwest::StatusCode::NOT_FOUND, "{probe}");
    }
}
