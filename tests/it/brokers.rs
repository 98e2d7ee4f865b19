//! Several broker addresses in `AMQP_URL`: a node that is gone is skipped, by every role.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{NO_ROLES, TestApp, amqp_url, job_body, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_given_a_dead_node_first_connects_to_the_next_and_delivers() {
    let app = TestApp::spawn_with(NO_ROLES).await;
    // Port 1 refuses at once: a node that is down. Listed first and last, so whichever node
    // a connection starts from, it meets the dead one.
    let dead = "amqp://guest:guest@127.0.0.1:1/%2f";
    let nodes = format!("{dead},{},{dead}", amqp_url());
    let (mut child, base) = app
        .spawn_ready("all", &[("AMQP_URL", nodes.as_str())])
        .await;
    // Read its log as it goes (a full pipe would stop the process).
    let mut stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut text).await;
        String::from_utf8_lossy(&text).into_owned()
    });
    let registered = app
        .http
        .put(format!("{base}/api/v1/jobs/job"))
        .bearer_auth(&app.api_key)
        .json(&job_body("two.nodes", json!({})))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success(), "{}", registered.status());
    let sent = app
        .http
        .post(format!("{base}/api/v1/events"))
        .bearer_auth(&app.api_key)
        .json(&json!({"event": {"name": "two.nodes", "id": "n-1", "payload": {}}}))
        .send()
        .await
        .unwrap();
    assert!(sent.status().is_success(), "{}", sent.status());
    wait_until("the run", Duration::from_secs(20), || async {
        app.runs_by_job("n-1").await == vec![("job".to_string(), 1)]
    })
    .await;
    child.kill().await.unwrap();
    // The skipped node is logged without the password of any node.
    let stderr = log.await.unwrap();
    assert!(stderr.contains("trying the next"), "{stderr}");
    assert!(!stderr.contains("guest:guest"), "{stderr}");
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gone_is_said_with_the_nodes_redacted() {
    let app = TestApp::spawn_with(NO_ROLES).await;
    let nodes = "amqp://guest:hunter2@127.0.0.1:1/%2f,amqp://guest:hunter3@127.0.0.1:2/%2f";
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
            .arg("topology")
            .envs(app.child_env())
            .env("AMQP_URL", nodes)
            .output(),
    )
    .await
    .expect("gives up by itself")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("hunter"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:2"), "{stderr}");
    app.finish().await;
}
