//! A rolling upgrade across the newest migration, and the rollback over it: the build
//! before that migration (`KONGFLOW_OLD_BINARY`, built by `scripts/upgrade-test.sh`) runs
//! beside this build on the schema this build migrated, as old pods do while a Deployment
//! rolls and as they do after `helm rollback` (the schema stays one migration ahead).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, wait_until};
use kongflow_events::db::slices;

/// `kongflow-events all` of the older build on this test's stores, once its `/readyz`
/// answers 200 (the schema is ahead of it: it must be ready all the same).
async fn start_old(app: &TestApp) -> (tokio::process::Child, String) {
    let binary = std::env::var("KONGFLOW_OLD_BINARY").expect("run scripts/upgrade-test.sh");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let child = tokio::process::Command::new(binary)
        .args(["all", "--http", &format!("127.0.0.1:{port}")])
        .envs(app.child_env())
        .env("KONGFLOW_NO_MIGRATE", "true")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until(
        "the older build to be ready",
        Duration::from_secs(30),
        || async {
            matches!(app.http.get(format!("{base}/readyz")).send().await,
                 Ok(r) if r.status() == StatusCode::OK)
        },
    )
    .await;
    (child, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the older build of scripts/upgrade-test.sh"]
async fn the_build_before_the_newest_migration_runs_beside_this_one_on_its_schema() {
    let rev = std::env::var("KONGFLOW_OLD_REV").unwrap_or_default();
    // Before `storage partition`: the older build names the unique constraint a sliced
    // table cannot have, so the tables are sliced once the roll is over (below).
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .plain_tables()
        .start()
        .await;
    let newest = kongflow_events::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap();
    // Mid-roll: one process of each build, both serving, relaying and working.
    let (mut old, old_base) = start_old(&app).await;
    let (mut new, new_base) = app
        .start_child("all", &[("KONGFLOW_NO_MIGRATE", "true")])
        .await;
    for (base, job) in [(&old_base, "old-job"), (&new_base, "new-job")] {
        let put = app.put_job_at(base, job, "rolled.event").await;
        assert_eq!(put, StatusCode::OK, "{rev}: {job}");
    }
    let mut sent: i64 = 0;
    let send = |base: String, id: String| {
        let (http, key) = (app.http.clone(), app.api_key.clone());
        async move {
            let r = http
                .post(format!("{base}/api/v1/events"))
                .bearer_auth(&key)
                .json(&json!({"event": {"name": "rolled.event", "id": id}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
    };
    for i in 0..60 {
        let base = if i % 2 == 0 { &old_base } else { &new_base };
        send(base.clone(), format!("roll-{i}")).await;
        sent += 1;
    }
    // Every event, whichever build took it, runs each job once.
    let runs = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*), count(DISTINCT (event_record_id, job_id)) FROM job_runs",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    wait_until("two runs per event", Duration::from_secs(60), || async {
        runs().await == (2 * sent, 2 * sent)
    })
    .await;
    // The roll ends: the older build stops; this build goes on alone (and, rolled back, the
    // older build alone would go on the same way: it ran on this schema just now).
    old.kill().await.unwrap();
    // Then the tables are sliced while this build takes events: what it stored so far
    // becomes the legacy slice.
    let sending = async {
        for i in 60..80 {
            send(new_base.clone(), format!("roll-{i}")).await;
        }
    };
    let (sliced, ()) = tokio::join!(
        kongflow_events::app::partition_storage(&app.pool, Duration::from_secs(600)),
        sending
    );
    let sliced = sliced.unwrap();
    assert!(
        matches!(sliced, slices::Partitioned::Legacy { .. }),
        "{sliced:?}"
    );
    sent += 20;
    for i in 80..100 {
        send(new_base.clone(), format!("roll-{i}")).await;
        sent += 1;
    }
    wait_until("two runs per event", Duration::from_secs(60), || async {
        runs().await == (2 * sent, 2 * sent)
    })
    .await;
    // Each run handed off, at least once, under one message id.
    app.assert_handed_off_once().await;
    let runs = runs().await.0;
    new.kill().await.unwrap();
    eprintln!("upgrade: {rev} beside this build on schema {newest}: {sent} events, {runs} runs");
}
