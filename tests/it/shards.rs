//! Shards: the work queues split by a stable hash of the environment, and workers that
//! consume only the shards they are given.

use std::time::Duration;

use kongflow_events::app::Roles;
use kongflow_events::ledger::JobKind;
use serde_json::json;

use crate::helpers::{TestApp, job_body, wait_until};

/// A `kongflow-events worker` child on this test's stores, with `extra` environment.
fn worker(app: &TestApp, extra: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"));
    command
        .arg("worker")
        .envs(app.child_env())
        .envs(extra.iter().copied())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_shards_runs_those_shards_jobs_and_no_others() {
    let app = TestApp::builder()
        .roles(Roles {
            http: true,
            relay: true,
            ..Roles::NONE
        })
        .start()
        .await;
    let topology = app.topology.clone();
    if topology.shard_count() < 2 {
        // TEST_SHARD_COUNT=1: one shard, nothing to split.
        return;
    }
    let mine = topology.shard_of(app.env.id);
    let mut n = 0;
    let (other, other_key) = loop {
        let (env, key) = app.new_env(&format!("elsewhere{n}")).await;
        if topology.shard_of(env.id) != mine {
            break (env, key);
        }
        n += 1;
    };
    for key in [&app.api_key, &other_key] {
        app.put_job(key, "job", job_body("tick", json!({}))).await;
    }
    let shard = mine.to_string();
    let _group = worker(&app, &[("WORKER_SHARDS", shard.as_str())])
        .spawn()
        .unwrap();
    for i in 0..5 {
        app.send_event(
            &app.api_key,
            json!({"event": {"name": "tick", "id": format!("m-{i}")}}),
        )
        .await;
        app.send_event(
            &other_key,
            json!({"event": {"name": "tick", "id": format!("o-{i}")}}),
        )
        .await;
    }
    let runs_of = |env: uuid::Uuid| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM job_runs WHERE environment_id = $1")
                .bind(env)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    wait_until("the shard's five runs", Duration::from_secs(20), || async {
        runs_of(app.env.id).await == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs_of(other.id).await, 0, "another shard's jobs ran");
    let waiting = app
        .shard_depth(JobKind::DeliverEvent, topology.shard_of(other.id))
        .await;
    assert_eq!(waiting, 5, "the other shard's jobs wait in its queue");

    // A worker for every shard takes the rest.
    let _all = worker(&app, &[]).spawn().unwrap();
    wait_until(
        "the other shard's runs",
        Duration::from_secs(20),
        || async { runs_of(other.id).await == 5 },
    )
    .await;
    app.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_a_shard_past_the_count_stops_and_says_why() {
    let app = TestApp::builder().roles(Roles::NONE).start().await;
    let past = app.topology.shard_count().to_string();
    for (shards, says) in [
        (past.as_str(), "SHARD_COUNT is"),
        ("2-1", "runs backwards"),
        ("x", "not a shard number"),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            worker(&app, &[("WORKER_SHARDS", shards)]).output(),
        )
        .await
        .expect("the worker stops by itself")
        .unwrap();
        assert!(!out.status.success(), "{shards}: {:?}", out.status);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{shards}: {stderr}");
    }
}
