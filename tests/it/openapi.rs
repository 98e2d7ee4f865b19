//! The OpenAPI document (generated from the handlers' types, committed as
//! `api/openapi.json`, served at `/api/openapi.json`) against the routes and the committed
//! file, and the API fuzzed from it by schemathesis.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::TestApp;

fn routes_in_doc(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            routes.insert((method.clone(), path.clone()));
        }
    }
    routes
}

/// The router and the document are made from one list (`http::routes`), so every route is
/// documented; this checks that every documented operation answers (not the fallback, not
/// 405), the probes included, and that the served document is the generated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_every_route_and_is_served() {
    let doc: Value = serde_json::from_str(&kongflow_events::http::openapi::document()).unwrap();
    let documented = routes_in_doc(&doc);
    assert!(documented.len() >= 22, "{documented:?}");
    // The probes come from probes.rs and are served beside the API too; `/metrics` only on
    // METRICS_ADDR, so it is not part of the API's document.
    let ops =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/probes.rs")).unwrap();
    assert!(ops.contains(".route(\"/metrics\", get("));
    for path in ["/healthz", "/readyz"] {
        assert!(ops.contains(&format!(".route(\"{path}\", get(")));
        assert!(documented.contains(&("get".to_string(), path.to_string())));
    }
    // Every documented operation answers (not the fallback, not 405), and the served
    // document is the one in the repository.
    let app = TestApp::builder().start().await;
    for (method, path) in routes_in_doc(&doc) {
        let concrete = path
            .split('/')
            .map(|s| if s.starts_with('{') { "x" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (status, body) = app
            .request(method.clone(), &concrete, Some(&app.api_key), None)
            .await;
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {concrete}"
        );
        assert_ne!(body["error"], "no such route", "{method} {concrete}");
    }
    let (status, served) = app
        .request(Method::GET, "/api/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, doc);
}

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.json");

/// The committed document is the generated one, byte for byte, and so is the served one.
/// `UPDATE_OPENAPI=1 cargo test --test it -- openapi::the_committed` rewrites the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_document_is_the_generated_one_and_is_served() {
    let generated = kongflow_events::http::openapi::document();
    if std::env::var_os("UPDATE_OPENAPI").is_some_and(|v| v == "1") {
        std::fs::write(COMMITTED, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap();
    assert!(
        committed == generated,
        "api/openapi.json is not the document the code generates: run \
         UPDATE_OPENAPI=1 cargo test --test it -- openapi::the_committed and commit the file"
    );
    let app = TestApp::builder().start().await;
    let served = app
        .http
        .get(format!("{}/api/openapi.json", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(served.headers()["content-type"], "application/json");
    assert!(
        served.text().await.unwrap() == committed,
        "the served document is the committed one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    let app = TestApp::builder().start().await;
    // Something to find: a job, an event, a dynamic trigger.
    app.put_job(
        &app.api_key,
        "fuzz-job",
        crate::helpers::job_body("fuzz", serde_json::json!({})),
    )
    .await;
    let out = tokio::process::Command::new(schemathesis())
        .args([
            "run",
            concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.json"),
        ])
        .args(["--url", &app.base_url])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", app.api_key),
        ])
        .args(["--checks", "not_a_server_error"])
        .args(["--max-examples", "30", "--seed", "1", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .await
        .expect("schemathesis (scripts/test.sh installs it in target/schemathesis-venv)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No half-written events: every stored event has its deliverEvent job.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM event_records e WHERE NOT EXISTS (
             SELECT 1 FROM queue_jobs q WHERE q.kind = 'deliverEvent' AND q.args->>'id' = e.id::text)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0);
}

/// schemathesis from `target/schemathesis-venv`, where `scripts/test.sh` installs it, or
/// else from the PATH.
fn schemathesis() -> String {
    let venv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/schemathesis-venv/bin/schemathesis"
    );
    if std::path::Path::new(venv).exists() {
        venv.into()
    } else {
        "schemathesis".into()
    }
}
