//! The producer examples (`examples/`), run as a user would run them against a running
//! service, and the AMQP contract's JSON Schema held to what the service accepts.
//! `scripts/test.sh` installs what they need (`target/examples-venv`,
//! `examples/node/node_modules`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use kongflow_events::amqp_ingest::STATUS_HEADER;
use kongflow_events::amqp_ingest::decode::{API_KEY_HEADER, VERSION_HEADER};
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

use crate::helpers::TestApp;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let python = root().join("target/examples-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: scripts/test.sh creates it (python3 -m venv target/examples-venv; \
         pip install -r examples/python/requirements.txt)",
        python.display()
    );
    python
}

/// Run an example to its end and return the event its `RESULT` line printed.
async fn run_example(app: &TestApp, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Value {
    let output = tokio::process::Command::new(program)
        .args(args)
        .current_dir(root())
        .env("KONGFLOW_API_KEY", &app.api_key)
        .env("AMQP_URL", &app.store.amqp_url)
        .env("AMQP_PREFIX", &app.store.amqp_prefix)
        .env("KONGFLOW_API_URL", &app.base_url)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), output)
        .await
        .expect("the example finishes")
        .expect("the example starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let result = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line last:\n{stdout}"));
    serde_json::from_str(result).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_and_node_examples_publish_and_read_their_events_back() {
    let app = TestApp::builder().start().await;
    app.register_job("order-paid", "order.paid").await;
    let python = python();
    let node_modules = root().join("examples/node/node_modules/amqplib");
    assert!(
        node_modules.exists(),
        "examples/node has no amqplib: scripts/test.sh runs npm ci --prefix examples/node"
    );
    let runs: Vec<(&str, PathBuf, &str, Option<&str>)> = vec![
        (
            "py-native",
            python.clone(),
            "examples/python/publish.py",
            None,
        ),
        (
            "py-structured",
            python.clone(),
            "examples/python/publish_cloudevent.py",
            Some("structured"),
        ),
        (
            "py-binary",
            python.clone(),
            "examples/python/publish_cloudevent.py",
            Some("binary"),
        ),
        (
            "py-amqp",
            python.clone(),
            "examples/python/publish_cloudevent.py",
            Some("amqp"),
        ),
        (
            "node",
            PathBuf::from("node"),
            "examples/node/publish.mjs",
            None,
        ),
    ];
    for (id, program, script, mode) in runs {
        let mut env = vec![("EVENT_ID", id)];
        if let Some(m) = mode {
            env.push(("CE_MODE", m));
        }
        let event = run_example(&app, &program, &[script], &env).await;
        assert_eq!(event["id"], id, "{event}");
        assert_eq!(event["name"], "order.paid", "{event}");
        assert!(
            event["runs"].as_array().is_some_and(|r| !r.is_empty()),
            "{id}: {event}"
        );
        assert_eq!(
            app.runs_by_job(id).await,
            vec![("order-paid".to_string(), 1)],
            "{id}"
        );
    }
    // The same id again is the same event, with no second run.
    run_example(
        &app,
        &python,
        &["examples/python/publish.py"],
        &[("EVENT_ID", "node")],
    )
    .await;
    assert_eq!(
        app.runs_by_job("node").await,
        vec![("order-paid".to_string(), 1)]
    );
    app.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_runs_service_starts_each_run_once_and_hears_of_cancels() {
    let app = TestApp::builder().start().await;
    for job in ["ship", "bill"] {
        app.register_job(job, "order.paid").await;
    }
    for id in ["a", "b", "c"] {
        app.send_event(
            &app.api_key,
            json!({"event": {"name": "order.paid", "id": id, "payload": {"id": id}}}),
        )
        .await;
    }
    crate::helpers::wait_until("six runs", Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM job_runs")
            .fetch_one(&app.pool)
            .await
            .unwrap()
            == 6
    })
    .await;
    app.settle().await;
    let (status, cancelled) = app
        .request(
            reqwest::Method::POST,
            "/api/v1/events/c/cancel-runs",
            Some(&app.api_key),
            None,
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{cancelled}");
    let queue = app.topology.runs_queue();
    crate::helpers::wait_until("eight hand-offs", Duration::from_secs(20), || async {
        app.depth_of(&queue).await == 8
    })
    .await;
    // A repeat, as a relay that died between confirm and commit sends it: same message.
    let first = app
        .channel
        .basic_get(queue.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("a hand-off");
    let confirm = app
        .channel
        .basic_publish(
            app.topology.runs_exchange().as_str().into(),
            first.delivery.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &first.delivery.data,
            first.delivery.properties.clone(),
        )
        .await
        .unwrap();
    drop(confirm);
    first
        .delivery
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    crate::helpers::wait_until("nine messages", Duration::from_secs(10), || async {
        app.depth_of(&queue).await == 9
    })
    .await;

    let result = run_example(
        &app,
        &python(),
        &["examples/python/runs_service.py"],
        &[("IDLE_SECONDS", "2"), ("VALIDATE", "1")],
    )
    .await;
    assert_eq!(result["refused"], json!([]), "{result}");
    assert_eq!(result["duplicates"], 1, "{result}");
    let runs: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT r.id, e.event_id FROM job_runs r JOIN event_records e ON e.id = r.event_record_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let ids = |pred: &dyn Fn(&str) -> bool| {
        let mut v: Vec<String> = runs
            .iter()
            .filter(|(_, e)| pred(e))
            .map(|(r, _)| r.to_string())
            .collect();
        v.sort();
        v
    };
    let mut cancelled_ids: Vec<String> = result["cancelled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    cancelled_ids.sort();
    assert_eq!(cancelled_ids, ids(&|e| e == "c"));
    // Started: every run of a and b, once each. Those of c were handed off before they
    // were cancelled; whether the service started them depends on which message it read
    // first (the repeat was requeued, and a quorum queue puts a requeued message at the
    // back, behind the cancels): either way none twice, and nothing that is not a run.
    let mut started: Vec<String> = result["started"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    started.sort();
    let once = started.len();
    started.dedup();
    assert_eq!(started.len(), once, "a run started twice: {result}");
    let all = ids(&|_| true);
    assert!(started.iter().all(|r| all.contains(r)), "{result}");
    for run in ids(&|e| e != "c") {
        assert!(started.contains(&run), "{run} not started: {result}");
    }
    assert_eq!(app.depth_of(&queue).await, 0);
}

/// The verdicts of a JSON Schema of `rabbitmq/schemas/` on `cases`.
pub(crate) async fn schema_verdicts(schema: &str, cases: &[Value]) -> Vec<bool> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(python())
        .arg("tests/contract/check_schema.py")
        .current_dir(root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = json!({"schema": schema, "cases": cases}).to_string();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "check_schema.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_schema_accepts_what_the_service_stores_and_refuses_what_it_rejects() {
    let app = TestApp::builder()
        .roles(kongflow_events::app::Roles {
            ingest: true,
            ..kongflow_events::app::Roles::NONE
        })
        .start()
        .await;
    // Bodies whose verdict a JSON Schema can state (not sizes, which the schema describes
    // in words).
    let long = "n".repeat(256);
    let cases = vec![
        json!({"event": {"name": "a"}}),
        json!({"event": {"name": "a", "payload": {"x": [1, 2]}, "context": {"c": 1},
                         "id": "id-1", "source": "/src", "timestamp": "2026-01-02T03:04:05Z"},
               "options": {"deliverAfter": 5, "accountId": "acct"}}),
        json!({"event": {"name": "a"}, "options": {"deliverAt": "2030-01-01T00:00:00Z"}}),
        json!({"event": {"name": "a", "payloadType": "REQUEST",
                         "payload": {"url": "https://x", "method": "POST",
                                     "headers": {"h": "v"}, "rawBody": ""}}}),
        json!({"event": {"name": "a"}, "extra": true}),
        json!({"event": {}}),
        json!({"event": {"name": ""}}),
        json!({"event": {"name": long}}),
        json!({"event": {"name": 7}}),
        json!({"event": {"name": "a", "id": ""}}),
        json!({"event": {"name": "a", "source": ""}}),
        json!({"event": {"name": "a", "payloadType": "XML"}}),
        json!({"event": {"name": "a"}, "options": {"deliverAfter": -1}}),
        json!({"event": {"name": "a"}, "options": {"deliverAfter": "5"}}),
        json!({"event": {"name": "a"}, "options": {"deliverAfter": 315_360_001}}),
        json!({"event": {"name": "a"}, "options": {"deliverAt": "tomorrow"}}),
        json!({"event": {"name": "a"}, "options": {"accountId": ""}}),
        json!({"event": {"name": "a", "timestamp": 5}}),
        json!({"name": "a"}),
        json!("event"),
    ];
    let schema = schema_verdicts("rabbitmq/schemas/send-event.v1.schema.json", &cases).await;

    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (replies, mut consumer) = app.reply_queue().await;
    let mut headers = FieldTable::default();
    headers.insert(
        API_KEY_HEADER.into(),
        AMQPValue::LongString(app.api_key.as_str().into()),
    );
    headers.insert(VERSION_HEADER.into(), AMQPValue::LongInt(1));
    for (i, case) in cases.iter().enumerate() {
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers.clone())
            .with_correlation_id(i.to_string().as_str().into())
            .with_reply_to(replies.as_str().into());
        channel
            .basic_publish(
                app.topology.ingest_exchange().as_str().into(),
                "send".into(),
                BasicPublishOptions::default(),
                case.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut service = vec![None; cases.len()];
    for _ in 0..cases.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        let i: usize = d
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        let status = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(STATUS_HEADER).cloned());
        service[i] = Some(matches!(status, Some(AMQPValue::LongInt(200))));
    }
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(
            Some(schema[i]),
            service[i],
            "case {i}: the schema says {}, the service {:?}: {case}",
            schema[i],
            service[i]
        );
    }
}
