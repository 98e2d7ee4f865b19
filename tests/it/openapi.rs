//! The OpenAPI document (`api/openapi.json`, served at `/api/openapi.json`) against the
//! routes, and the API fuzzed from it by schemathesis.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::TestApp;

/// Every `(method, path)` the router declares, read from its source.
fn routes_in_code() -> BTreeSet<(String, String)> {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/mod.rs")).unwrap();
    let flat: String = src
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(".route( \"", ".route(\"");
    let mut routes = BTreeSet::new();
    let mut rest = flat.as_str();
    while let Some(at) = rest.find(".route(\"") {
        rest = &rest[at + 8..];
        let end = rest.find('"').unwrap();
        let path = rest[..end].to_string();
        // The method router: `get(h)`, maybe chained (`get(h).put(g)`), up to the next route.
        let after = rest[end + 1..].trim_start_matches(',').trim_start();
        let methods = &after[..after.find(".route(").unwrap_or(after.len())];
        for method in ["get", "post", "put", "delete"] {
            if methods.starts_with(&format!("{method}("))
                || methods.contains(&format!(").{method}("))
            {
                routes.insert((method.to_string(), path.clone()));
            }
        }
    }
    // The probes come from ops.rs and are served beside the API too; `/metrics` only on
    // METRICS_ADDR, so it is not part of the API's document.
    let ops = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/ops.rs")).unwrap();
    assert!(ops.contains(".route(\"/metrics\", get("));
    for path in ["/healthz", "/readyz"] {
        assert!(ops.contains(&format!(".route(\"{path}\", get(")));
        routes.insert(("get".to_string(), path.to_string()));
    }
    routes
}

fn routes_in_doc(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        // OpenAPI writes {eventId}; axum {event_id}: compare the shapes.
        for method in ops.as_object().unwrap().keys() {
            routes.insert((method.clone(), path.clone()));
        }
    }
    routes
}

fn shape(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "{}" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_describes_every_route_and_is_served() {
    let doc: Value = serde_json::from_str(kongflow_events::http::OPENAPI).unwrap();
    let code: BTreeSet<(String, String)> = routes_in_code()
        .into_iter()
        .map(|(m, p)| (m, shape(&p)))
        .collect();
    let documented: BTreeSet<(String, String)> = routes_in_doc(&doc)
        .into_iter()
        .map(|(m, p)| (m, shape(&p)))
        .collect();
    assert!(code.len() >= 18, "{code:?}");
    assert_eq!(
        code.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routes without documentation"
    );
    assert_eq!(
        documented.difference(&code).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented routes that do not exist"
    );
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
