//! trigger.dev's v2 SDK (`@trigger.dev/sdk` 2.3.x from npm), unchanged, against the
//! service: `tests/sdk/sdk-test.mjs` (dependencies installed by `scripts/test.sh` with
//! `npm ci`).

use std::time::Duration;

use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v2_sdk_sends_gets_and_cancels_events() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = format!("{root}/tests/sdk");
    assert!(
        std::path::Path::new(&format!("{dir}/node_modules/@trigger.dev/sdk")).exists(),
        "run `npm ci` in tests/sdk (scripts/test.sh does)"
    );
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(
        &key,
        "sdk-job",
        json!({"version": "1.0.0", "trigger": {"event": ["sdk.plain", "sdk.bulk"]}}),
    )
    .await;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg("sdk-test.mjs")
            .current_dir(&dir)
            .env("KONGFLOW_URL", &app.base_url)
            .env("KONGFLOW_KEY", &key)
            .output(),
    )
    .await
    .expect("the SDK script finishes")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sdk-test.mjs failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("{\"done\":true}"), "{stdout}");
    for call in [
        "\"sendEvent\"",
        "\"getEvent\"",
        "\"cancelEvent\"",
        "\"sendEvents\"",
        "\"cancelRunsForEvent\"",
    ] {
        assert!(stdout.contains(call), "no {call} in {stdout}");
    }
    // What the SDK did, seen from the database: the cancelled event's delivery job is
    // cancelled (its due time, a minute away, has not come: a missing delivery alone would
    // prove nothing), and it has no delivery and no run.
    let (cancelled_at, delivered, job_state): (
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
        String,
    ) = sqlx::query_as(
        "SELECT e.cancelled_at, e.delivered_at, j.state::text FROM event_records e
         JOIN queue_jobs j ON j.kind = 'deliverEvent' AND j.args->>'id' = e.id::text
         WHERE e.event_id = 'sdk-later'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(cancelled_at.is_some());
    assert_eq!((delivered, job_state.as_str()), (None, "cancelled"));
    assert!(app.runs_by_job("sdk-later").await.is_empty());
}
