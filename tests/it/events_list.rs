//! Listing an environment's events (`GET /api/v1/events`): filters, pages, scoping to the
//! key's environment; and the 405 of a known route.

use std::collections::BTreeSet;

use chrono::{Duration, TimeZone, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// Ids of a page's events, in order.
fn ids(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

async fn list(app: &TestApp, key: &str, query: &str) -> Value {
    let (status, page) = app
        .request(
            Method::GET,
            &format!("/api/v1/events{query}"),
            Some(key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {page}");
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_every_event_newest_first_and_only_the_keys_environment() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    let base = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    // 120 events a second apart, in two names; two share a timestamp (ids break the tie).
    let events: Vec<Value> = (0..120)
        .map(|i| {
            let at = base + Duration::seconds(if i == 119 { 118 } else { i });
            json!({"name": if i % 3 == 0 { "listed.three" } else { "listed.other" },
                   "id": format!("e-{i:03}"), "payload": {"i": i},
                   "timestamp": kongflow_events::dates::iso(at)})
        })
        .collect();
    for chunk in events.chunks(100) {
        let (status, body) = app
            .request(
                Method::POST,
                "/api/v1/events/bulk",
                Some(&key),
                Some(json!({ "events": chunk })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Another environment's events are never shown.
    let (_, other_key) = app.new_env("other").await;
    app.send_event(
        &other_key,
        json!({"event": {"name": "listed.three", "id": "theirs"}}),
    )
    .await;

    let mut seen = Vec::new();
    let mut query = String::new();
    let mut pages = 0;
    loop {
        let page = list(&app, &key, &query).await;
        pages += 1;
        let got = ids(&page);
        assert!(got.len() <= 50);
        seen.extend(got);
        match page["next"].as_str() {
            Some(next) => query = format!("?cursor={next}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 120);
    assert_eq!(
        seen.iter().collect::<BTreeSet<_>>().len(),
        120,
        "no event twice"
    );
    assert!(!seen.contains(&"theirs".to_string()));
    // Newest first: e-118 and e-119 share the newest timestamp.
    assert_eq!(seen[2], "e-117");
    assert_eq!(seen.last().unwrap(), "e-000");

    // By name, a page of 10.
    let page = list(&app, &key, "?name=listed.three&limit=10").await;
    assert_eq!(ids(&page).len(), 10);
    assert_eq!(ids(&page)[0], "e-117");
    assert!(
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] == "listed.three" && e["source"] == "trigger.dev")
    );
    let page = list(&app, &key, "?name=listed.three&limit=500").await;
    assert_eq!(ids(&page).len(), 40);
    assert_eq!(page["next"], Value::Null);

    // A time window: since is inclusive, until exclusive.
    let window = format!(
        "?since={}&until={}",
        urlencode(&kongflow_events::dates::iso(base + Duration::seconds(10))),
        urlencode(&kongflow_events::dates::iso(base + Duration::seconds(20)))
    );
    let page = list(&app, &key, &window).await;
    assert_eq!(
        ids(&page),
        (10..20)
            .rev()
            .map(|i| format!("e-{i:03}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(page["events"][0]["payload"], json!({"i": 19}));

    // The other environment sees only its own.
    let page = list(&app, &other_key, "").await;
    assert_eq!(ids(&page), vec!["theirs"]);
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_filter_and_bad_queries_are_refused() {
    let app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    let later = kongflow_events::dates::iso(Utc::now() + Duration::hours(1));
    app.send_event(
        &key,
        json!({"event": {"name": "s", "id": "delayed"},
                                "options": {"deliverAt": later}}),
    )
    .await;
    app.send_event(
        &key,
        json!({"event": {"name": "s", "id": "cancelled"},
                                "options": {"deliverAt": later}}),
    )
    .await;
    let (status, _) = app
        .request(
            Method::POST,
            "/api/v1/events/cancelled/cancel",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    app.send_event(&key, json!({"event": {"name": "s", "id": "now"}}))
        .await;
    // The one due now is delivered (the test app runs a worker) or about to be.
    crate::helpers::wait_until("delivered", std::time::Duration::from_secs(10), || async {
        ids(&list(&app, &key, "?state=delivered").await) == vec!["now"]
    })
    .await;
    assert_eq!(
        ids(&list(&app, &key, "?state=delayed").await),
        vec!["delayed"]
    );
    assert_eq!(
        ids(&list(&app, &key, "?state=cancelled").await),
        vec!["cancelled"]
    );
    assert_eq!(
        ids(&list(&app, &key, "?state=pending").await),
        Vec::<String>::new()
    );
    let page = list(&app, &key, "?name=s").await;
    let states: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 3);

    for query in [
        "?limit=0",
        "?limit=501",
        "?limit=x",
        "?state=queued",
        "?since=yesterday",
        "?cursor=not-a-cursor",
        "?name=a%00b",
    ] {
        let (status, body) = app
            .request(
                Method::GET,
                &format!("/api/v1/events{query}"),
                Some(&key),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body["error"].is_string(), "{query}: {body}");
    }
    let (status, _) = app.request(Method::GET, "/api/v1/events", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_a_route_does_not_take_answers_405_in_json_with_allow() {
    let app = TestApp::builder().start().await;
    for (method, path, allowed) in [
        (
            Method::DELETE,
            "/api/v1/events",
            vec!["GET", "HEAD", "POST"],
        ),
        (Method::PUT, "/api/v1/events/x/cancel", vec!["POST"]),
        (Method::POST, "/api/v2/events/x", vec!["GET", "HEAD"]),
    ] {
        let resp = app
            .http
            .request(method.clone(), format!("{}{path}", app.base_url))
            .bearer_auth(&app.api_key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        let allow = resp.headers()["allow"].to_str().unwrap().to_string();
        let mut allow: Vec<&str> = allow.split(',').map(str::trim).collect();
        allow.sort();
        assert_eq!(allow, allowed, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains(method.as_str()),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_an_environments_events_a_page_at_a_time() {
    let app = TestApp::builder().start().await;
    let (env, key) = app.new_env("cli").await;
    for i in 0..3 {
        app.send_event(
            &key,
            json!({"event": {"name": "cli.listed", "id": format!("c-{i}"),
            "timestamp": kongflow_events::dates::iso(Utc::now() + Duration::seconds(i))}}),
        )
        .await;
    }
    let cli = |args: Vec<String>| {
        let envs = app.child_env();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
                .args(&args)
                .envs(envs)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let path = format!("{}-cli/proj/env", app.db_name);
    let args = |extra: &[&str]| {
        let mut args: Vec<String> = ["events", "list", "--environment", path.as_str()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let out = cli(args(&["--limit", "2"])).await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("STATE"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("c-2") && lines[1].contains("cli.listed"),
        "{out}"
    );
    assert!(lines[2].starts_with("c-1"), "{out}");
    let cursor = lines[3]
        .strip_prefix("more: --cursor ")
        .expect(&out)
        .to_string();
    let out = cli(args(&["--limit", "2", "--cursor", &cursor])).await;
    assert!(out.lines().nth(1).unwrap().starts_with("c-0"), "{out}");
    assert_eq!(out.lines().count(), 2, "the last page: {out}");
    // By id, as JSON.
    let out = cli(vec![
        "events".into(),
        "list".into(),
        "--environment".into(),
        env.id.to_string(),
        "--json".into(),
    ])
    .await;
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&page), vec!["c-2", "c-1", "c-0"]);
    assert_eq!(page["next"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_page_looks_at_a_bounded_number_of_events_and_goes_on_from_there() {
    use kongflow_events::events::list::MAX_SCANNED;
    let app = TestApp::builder()
        .roles(crate::helpers::HTTP_ONLY)
        .start()
        .await;
    let key = app.api_key.clone();
    // More events than a page looks at: the one named `rare` is the oldest.
    sqlx::query(
        "INSERT INTO event_records (id, environment_id, event_id, name, timestamp, deliver_at)
         SELECT uuid_v7_floor(now() + make_interval(secs => i / 1000.0)), $1, 'e-' || i, CASE WHEN i = 0 THEN 'rare' ELSE 'common' END,
                now() - make_interval(secs => 100000 - i), now()
         FROM generate_series(0, $2) AS i",
    )
    .bind(app.env.id)
    .bind(MAX_SCANNED as i32 + 50)
    .execute(&app.pool)
    .await
    .unwrap();
    // The first page looks at the newest MAX_SCANNED events: no match, and a next page.
    let first = list(&app, &key, "?name=rare").await;
    assert_eq!(ids(&first), Vec::<String>::new());
    let next = first["next"].as_str().expect("a next page").to_string();
    let second = list(&app, &key, &format!("?name=rare&cursor={next}")).await;
    assert_eq!(ids(&second), ["e-0"]);
    assert_eq!(second["next"], Value::Null, "nothing older");
    // Unfiltered pages are unaffected: full, newest first.
    let page = list(&app, &key, "?limit=3").await;
    assert_eq!(ids(&page).len(), 3);
}
