//! Metrics, health, readiness, traces, and the dashboard and alert rules that use them.
//!
//! Metrics are per process, so these tests drive a child `kongflow-events all` of their
//! own and scrape it: other tests in this binary cannot move its counters.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use kongflow_events::ledger::JobKind;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::helpers::{NO_ROLES, TestApp, job_body, wait_until};

struct Child {
    process: tokio::process::Child,
    base: String,
    /// Where it serves `/metrics` (never on the API's port).
    metrics: String,
}

async fn spawn_all(app: &TestApp, extra_env: &[(&str, &str)]) -> Child {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut env = extra_env.to_vec();
    env.push(("METRICS_ADDR", &metrics_addr));
    let (process, base) = app.start_child("all", &env).await;
    Child {
        process,
        base,
        metrics: format!("http://{metrics_addr}"),
    }
}

/// `name{labels} value` lines of a scrape, by series.
fn parse_scrape(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(app: &TestApp, base: &str) -> HashMap<String, f64> {
    let text = app
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse_scrape(&text)
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in the scrape"))
}

/// Every `kongflow_*` metric name an expression uses, histogram suffixes taken off.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("kongflow_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_the_right_amounts_and_the_dashboard_uses_only_real_ones() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let key = app.api_key.clone();
    let mut child = spawn_all(&app, &[("RUST_LOG", "warn")]).await;
    let base = child.base.clone();
    let metrics = child.metrics.clone();
    let post = |body: Value, key: Option<String>| {
        let (http, base) = (app.http.clone(), base.clone());
        async move {
            let mut r = http.post(format!("{base}/api/v1/events")).json(&body);
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r.send().await.unwrap().status()
        }
    };
    let put = app
        .http
        .put(format!("{base}/api/v1/jobs/job"))
        .bearer_auth(&key)
        .json(&job_body("metered", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let before = scrape(&app, &metrics).await;

    const N: usize = 12;
    for i in 0..N {
        let status = post(
            json!({"event": {"name": "metered", "id": format!("m-{i}"), "payload": {}}}),
            Some(key.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        post(json!({"event": {"name": ""}}), Some(key.clone())).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(json!({"event": {"name": "x"}}), None).await,
        StatusCode::UNAUTHORIZED
    );
    // Garbage on the work queue: one dead letter.
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            app.topology.exchange(JobKind::DeliverEvent).as_str().into(),
            app.work_key().as_str().into(),
            BasicPublishOptions::default(),
            b"garbage",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until("every run", Duration::from_secs(20), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM job_runs")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        n == N as i64
    })
    .await;
    app.settle().await;
    // The sampler runs every 5 s.
    wait_until("the dead-letter gauge", Duration::from_secs(15), || async {
        value(
            &scrape(&app, &metrics).await,
            "kongflow_dead_letter_queue_depth",
        ) == 1.0
    })
    .await;
    let after = scrape(&app, &metrics).await;
    let moved = |series: &str| value(&after, series) - before.get(series).copied().unwrap_or(0.0);
    let n = N as f64;
    assert_eq!(moved("kongflow_events_ingested_total{source=\"api\"}"), n);
    assert_eq!(
        moved("kongflow_events_rejected_total{reason=\"invalid\"}"),
        1.0
    );
    assert_eq!(
        moved("kongflow_events_rejected_total{reason=\"unauthorized\"}"),
        1.0
    );
    for kind in ["deliverEvent", "events.invokeDispatcher"] {
        let kq = format!("{{kind=\"{kind}\",queue=\"events\"}}");
        assert_eq!(
            moved(&format!("kongflow_jobs_inserted_total{kq}")),
            n,
            "{kind}"
        );
        assert_eq!(
            moved(&format!("kongflow_jobs_published_total{kq}")),
            n,
            "{kind}"
        );
        assert_eq!(
            moved(&format!("kongflow_jobs_started_total{kq}")),
            n,
            "{kind}"
        );
        assert_eq!(
            moved(&format!("kongflow_jobs_completed_total{kq}")),
            n,
            "{kind}"
        );
        assert_eq!(
            moved(&format!("kongflow_jobs_retried_total{kq}")),
            0.0,
            "{kind}"
        );
        let shard = app.topology.shard_of(app.env.id);
        let k = format!("{{kind=\"{kind}\",shard=\"{shard}\"}}");
        assert_eq!(
            moved(&format!("kongflow_queue_latency_seconds_count{k}")),
            n
        );
        // Every observation falls in some bucket: the +Inf bucket equals the count.
        assert_eq!(
            moved(&format!(
                "kongflow_queue_latency_seconds_bucket{{kind=\"{kind}\",shard=\"{shard}\",le=\"+Inf\"}}"
            )),
            n
        );
        assert!(moved(&format!("kongflow_queue_latency_seconds_sum{k}")) >= 0.0);
    }
    assert_eq!(
        moved("kongflow_event_latency_seconds_count{kind=\"events.invokeDispatcher\"}"),
        n
    );
    assert_eq!(
        moved("kongflow_dead_lettered_total{origin=\"unrunnable\"}"),
        1.0
    );
    assert_eq!(
        moved(
            "kongflow_http_requests_total{method=\"POST\",route=\"/api/v1/events\",status=\"200\"}"
        ),
        n
    );
    assert_eq!(
        moved(
            "kongflow_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/events\"}"
        ),
        n + 2.0
    );
    // Every step of the way is timed: each keyed request's lookup, each job message's
    // broker hop, and at least one batch of each other stage.
    let stage = |name: &str| {
        moved(&format!(
            "kongflow_stage_duration_seconds_count{{stage=\"{name}\"}}"
        ))
    };
    assert_eq!(stage("auth"), n + 1.0);
    assert_eq!(stage("group_wait"), n + 1.0);
    assert_eq!(stage("broker"), 2.0 * n);
    for name in [
        "insert",
        "commit",
        "publish",
        "take",
        "handler",
        "worker_commit",
        "ack",
    ] {
        assert!(
            (1.0..=2.0 * n).contains(&stage(name)),
            "stage {name}: {}",
            stage(name)
        );
    }
    assert_eq!(value(&after, "kongflow_outbox_backlog"), 0.0);
    assert_eq!(
        value(&after, "kongflow_amqp_connected{role=\"relay\"}"),
        2.0
    );
    assert_eq!(
        value(&after, "kongflow_amqp_connected{role=\"worker\"}"),
        1.0
    );
    assert_eq!(value(&after, "kongflow_postgres_up"), 1.0);
    assert_eq!(value(&after, "kongflow_ready"), 1.0);
    let healthz = app
        .http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), StatusCode::OK);

    // The dashboard and the alert rules use only metrics the service exports.
    let exported: BTreeSet<String> = after
        .keys()
        .map(|series| {
            let name = series.split('{').next().unwrap();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_string()
        })
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/helm/kongflow-events/files/dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(target["expr"].as_str().unwrap()));
            panels += 1;
        }
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "no hard-coded datasource"
            );
        }
    }
    assert!(panels >= 15, "{panels} queries");
    let rules = std::fs::read_to_string(format!(
        "{root}/helm/kongflow-events/files/alerts.rules.yml"
    ))
    .unwrap();
    let rule_names: BTreeSet<String> = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(metric_names)
        .collect();
    assert!(rule_names.contains("kongflow_outbox_oldest_age_seconds"));
    assert!(rule_names.contains("kongflow_ready"));
    used.extend(rule_names);
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");

    // SIGTERM: the child finishes its work and exits cleanly.
    let pid = child.process.id().unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.process.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_alert_rules_pass_promtool() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(format!(
            "{root}/helm/kongflow-events/files/alerts.rules.yml"
        ))
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_follows_an_event_through_api_relay_and_workers() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let key = app.api_key.clone();
    let mut child = spawn_all(
        &app,
        &[
            ("RUST_LOG", "warn,kongflow_events=debug"),
            ("LOG_FORMAT", "json"),
        ],
    )
    .await;
    let base = child.base.clone();
    app.http
        .put(format!("{base}/api/v1/jobs/job"))
        .bearer_auth(&key)
        .json(&job_body("traced", json!({})))
        .send()
        .await
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sent = app
        .http
        .post(format!("{base}/api/v1/events"))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"event": {"name": "traced", "id": "tr-1", "payload": {}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    wait_until("the run", Duration::from_secs(20), || async {
        !app.runs_by_job("tr-1").await.is_empty()
    })
    .await;
    app.settle().await;
    // The ledger carries it too.
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT split_part(trace_parent, '-', 2) FROM queue_jobs ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, vec![trace_id.to_string(), trace_id.to_string()]);

    let pid = child.process.id().unwrap() as i32;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let mut stderr = child.process.stderr.take().unwrap();
    let mut logs = String::new();
    tokio::time::timeout(Duration::from_secs(30), stderr.read_to_string(&mut logs))
        .await
        .unwrap()
        .unwrap();
    let _ = child.process.wait().await;
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for line in logs.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if entry["fields"]["trace_id"] == trace_id {
            seen.insert((
                entry["target"].as_str().unwrap_or("").to_string(),
                entry["fields"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            ));
        }
    }
    let has = |target: &str, message: &str| {
        seen.iter()
            .any(|(t, m)| t.starts_with(target) && m == message)
    };
    assert!(has("kongflow_events::http", "event accepted"), "{seen:?}");
    // Published by the process that committed it (the fast path), or by the relay.
    assert!(
        has("kongflow_events::amqp::direct", "job published")
            || has("kongflow_events::relay", "job published"),
        "{seen:?}"
    );
    assert!(has("kongflow_events::worker", "job started"), "{seen:?}");
    assert!(
        has(
            "kongflow_events::handlers::deliver_event",
            "event delivered"
        ),
        "{seen:?}"
    );
    assert!(has("kongflow_events::worker", "job completed"), "{seen:?}");
}
