//! Several broker addresses in `AMQP_URL`: a node that is gone is skipped, by every role.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{NO_ROLES, TestApp, amqp_url, job_body, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_given_a_dead_node_first_connects_to_the_next_and_delivers() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    // Port 1 refuses at once: a node that is down. Listed first and last, so whichever node
    // a connection starts from, it meets the dead one.
    let dead = "amqp://guest:guest@127.0.0.1:1/%2f";
    let nodes = format!("{dead},{},{dead}", amqp_url());
    let (mut child, base) = app
        .start_child("all", &[("AMQP_URL", nodes.as_str())])
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gone_is_said_with_the_nodes_redacted() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_installation_on_a_prefix_refuses_to_start_and_its_messages_are_never_dead_lettered()
 {
    use kongflow_events::amqp::JobMessage;
    use kongflow_events::ledger::JobKind;
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let first = TestApp::builder().roles(NO_ROLES).start().await;
    // The first installation's worker claims the prefix as it starts.
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("worker")
        .envs(first.child_env())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let claim = kongflow_events::amqp::owner::queue_name(&first.topology);
    wait_until("the prefix claimed", Duration::from_secs(30), || async {
        // A passive declare closes its channel when the queue is not there yet.
        let channel = first.amqp.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                claim.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        matches!(declared, Ok(q) if q.message_count() == 1)
    })
    .await;

    // A second installation (its own database) given the first one's prefix.
    let second = TestApp::builder().roles(NO_ROLES).start().await;
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("relay")
        .envs(second.child_env())
        .env("AMQP_PREFIX", first.topology.prefix())
        .kill_on_drop(true)
        .output();
    let refused = tokio::time::timeout(Duration::from_secs(30), refused)
        .await
        .expect("the second installation stops at once")
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("AMQP_PREFIX") && said.contains("another installation"),
        "{said}"
    );

    // A message of another installation (one that started before the claim, say) reaches
    // the first one's worker: given back, never run, never dead-lettered.
    let theirs: uuid::Uuid = sqlx::query_scalar("SELECT id FROM installation")
        .fetch_one(&second.pool)
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "x-kongflow-install".into(),
        AMQPValue::LongString(theirs.to_string().into()),
    );
    let message = JobMessage {
        v: 1,
        id: 987_654_321,
        kind: JobKind::DeliverEvent.as_str().into(),
        queue: "events".into(),
        args: json!({"id": uuid::Uuid::new_v4()}),
        attempt: 0,
        run_at: chrono::Utc::now(),
    };
    let channel = first.amqp.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = channel
        .basic_publish(
            first
                .topology
                .exchange(JobKind::DeliverEvent)
                .as_str()
                .into(),
            first.work_key().as_str().into(),
            BasicPublishOptions::default(),
            &message.to_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());
    // The worker takes it and gives it back, once a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(first.depth_of(&first.topology.dead_queue()).await, 0);
    worker.kill().await.unwrap();
    wait_until(
        "the message back in its queue",
        Duration::from_secs(10),
        || async {
            first
                .depth_of(&first.env_queue(JobKind::DeliverEvent))
                .await
                == 1
        },
    )
    .await;
}
