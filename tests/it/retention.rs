//! Storage that stays bounded: old settled events go with their runs, due ones stay; an
//! environment deleted takes its data with it and nobody else's. The row-by-row retention
//! of plain tables (a database not sliced yet) runs here; on sliced tables, where it works
//! in the slices that cannot be dropped yet, in `slices.rs`.

use std::time::Duration;

use kongflow_events::app::Roles;
use kongflow_events::config::RelayConfig;
use kongflow_events::relay::Relay;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, job_body, wait_until};

async fn count(app: &TestApp, sql: &'static str, env: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(env)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn events_of(app: &TestApp, env: Uuid) -> i64 {
    count(
        app,
        "SELECT count(*) FROM event_records WHERE environment_id = $1",
        env,
    )
    .await
}

async fn runs_of(app: &TestApp, env: Uuid) -> i64 {
    count(
        app,
        "SELECT count(*) FROM job_runs WHERE environment_id = $1",
        env,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_settled_events_go_with_their_runs_in_batches_and_due_ones_stay() {
    let app = TestApp::builder()
        .roles(Roles::ALL)
        .plain_tables()
        .start()
        .await;
    let env = app.env.id;
    app.put_job(&app.api_key, "job", job_body("kept", json!({})))
        .await;
    for i in 0..7 {
        app.send_event(
            &app.api_key,
            json!({"event": {"name": "kept", "id": format!("e-{i}")}}),
        )
        .await;
    }
    // Due in a day: not delivered, however old it is.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "kept", "id": "later"}, "options": {"deliverAfter": 86_400}}),
    )
    .await;
    // Cancelled: settled.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "kept", "id": "called-off"}, "options": {"deliverAfter": 86_400}}),
    )
    .await;
    let cancelled = app
        .http
        .post(format!("{}/api/v1/events/called-off/cancel", app.base_url))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    assert!(cancelled.status().is_success());
    wait_until("seven runs", Duration::from_secs(20), || async {
        runs_of(&app, env).await == 7
    })
    .await;
    // A recent event stays too.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "kept", "id": "fresh"}}),
    )
    .await;
    wait_until("the fresh run", Duration::from_secs(20), || async {
        runs_of(&app, env).await == 8
    })
    .await;
    sqlx::query(
        "UPDATE event_records SET created_at = now() - interval '31 days'
         WHERE environment_id = $1 AND event_id <> 'fresh'",
    )
    .bind(env)
    .execute(&app.pool)
    .await
    .unwrap();

    let relay = Relay::new(
        app.pool.clone(),
        app.topology.clone(),
        RelayConfig {
            maintenance: kongflow_events::config::MaintenanceConfig {
                retention_batch_size: 3,
                ..Default::default()
            },
            ..RelayConfig::default()
        },
    );
    let batches = relay.maintenance().retain_events().await.unwrap();
    let events: u64 = batches.iter().map(|b| b.events).sum();
    let runs: u64 = batches.iter().map(|b| b.runs).sum();
    assert_eq!((events, runs), (8, 7), "{batches:?}");
    assert!(
        batches.iter().all(|b| b.events <= 3),
        "bounded statements: {batches:?}"
    );
    assert_eq!(batches.len(), 3, "{batches:?}");
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM event_records WHERE environment_id = $1 ORDER BY event_id",
    )
    .bind(env)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(left, ["fresh", "later"]);
    assert_eq!(runs_of(&app, env).await, 1);
    // RETENTION_EVENTS_MS=0 keeps everything.
    let forever = Relay::new(
        app.pool.clone(),
        app.topology.clone(),
        RelayConfig {
            maintenance: kongflow_events::config::MaintenanceConfig {
                retention_events: std::time::Duration::ZERO,
                ..Default::default()
            },
            ..RelayConfig::default()
        },
    );
    sqlx::query("UPDATE event_records SET created_at = now() - interval '400 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert!(
        forever
            .maintenance()
            .retain_events()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(events_of(&app, env).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_environment_takes_its_data_and_nobody_elses() {
    let app = TestApp::builder().roles(Roles::ALL).start().await;
    let (gone, gone_key) = app.new_env("doomed").await;
    let (kept, kept_key) = (app.env.id, app.api_key.clone());
    for key in [&gone_key, &kept_key] {
        app.put_job(key, "job", job_body("tick", json!({}))).await;
        for i in 0..5 {
            app.send_event(
                key,
                json!({"event": {"name": "tick", "id": format!("t-{i}")}}),
            )
            .await;
        }
        app.send_event(
            key,
            json!({"event": {"name": "tick", "id": "later"}, "options": {"deliverAfter": 3600}}),
        )
        .await;
    }
    wait_until(
        "both environments' runs",
        Duration::from_secs(20),
        || async { runs_of(&app, gone.id).await == 5 && runs_of(&app, kept).await == 5 },
    )
    .await;
    let path = format!("{}-doomed/proj/env", app.db_name);
    let run = |args: Vec<String>| {
        let envs = app.child_env();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
                .args(args)
                .envs(envs)
                .output()
                .await
                .unwrap()
        }
    };
    // Without --yes, nothing happens.
    let refused = run(vec!["env".into(), "delete".into(), path.clone()]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(events_of(&app, gone.id).await, 6);
    let keys_of_gone = || {
        count(
            &app,
            "SELECT count(*) FROM event_keys WHERE environment_id = $1",
            gone.id,
        )
    };
    assert_eq!(keys_of_gone().await, 6);

    let out = run(vec![
        "env".into(),
        "delete".into(),
        path.clone(),
        "--yes".into(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("6 events, 5 runs, 1 queued jobs cancelled"),
        "{stdout}"
    );
    assert_eq!(events_of(&app, gone.id).await, 0);
    assert_eq!(runs_of(&app, gone.id).await, 0);
    assert_eq!(keys_of_gone().await, 0);
    let live = count(
        &app,
        "SELECT count(*) FROM queue_jobs WHERE environment_id = $1
         AND state IN ('scheduled', 'available', 'retryable')",
        gone.id,
    )
    .await;
    assert_eq!(live, 0, "its delayed job is cancelled");
    let status = app
        .http
        .post(format!("{}/api/v1/events", app.base_url))
        .bearer_auth(&gone_key)
        .json(&json!({"event": {"name": "tick", "id": "after"}}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED, "its key is gone");
    // The other environment is whole.
    assert_eq!(events_of(&app, kept).await, 6);
    assert_eq!(runs_of(&app, kept).await, 5);
    let again = run(vec!["env".into(), "delete".into(), path, "--yes".into()]).await;
    assert!(String::from_utf8_lossy(&again.stderr).contains("no environment"));
    app.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_events_whose_delivery_gave_up_go_after_the_retention() {
    // No worker: the delivery jobs stay where the test puts them.
    let app = TestApp::builder()
        .roles(crate::helpers::HTTP_ONLY)
        .plain_tables()
        .start()
        .await;
    let env = app.env.id;
    for id in ["gave-up", "job-gone", "still-trying", "gave-up-lately"] {
        app.send_event(&app.api_key, json!({"event": {"name": "n", "id": id}}))
            .await;
    }
    let job_of = "SELECT j.id FROM queue_jobs j JOIN event_records e ON j.args->>'id' = e.id::text
                  WHERE j.kind = 'deliverEvent' AND e.event_id = ANY($1)";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE queue_jobs SET state = 'discarded', finalized_at = now() WHERE id IN ({job_of})"
    )))
    .bind(&["gave-up", "gave-up-lately"][..])
    .execute(&app.pool)
    .await
    .unwrap();
    // The ledger's own retention removed this one's job already.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM queue_jobs WHERE id IN ({job_of})"
    )))
    .bind(&["job-gone"][..])
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE event_records SET created_at = now() - interval '31 days',
                deliver_at = now() - interval '31 days'
         WHERE event_id <> 'gave-up-lately'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let batches = app.relay().maintenance().retain_events().await.unwrap();
    let events: u64 = batches.iter().map(|b| b.events).sum();
    assert_eq!(events, 2, "{batches:?}");
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM event_records WHERE environment_id = $1 ORDER BY event_id",
    )
    .bind(env)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    // Delivery still trying, or gave up within the retention: kept.
    assert_eq!(left, ["gave-up-lately", "still-trying"]);
}
