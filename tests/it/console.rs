//! The operator console over HTTP, as a browser speaks to it: sign-in with the operator
//! token (a tenant's key refused, failed sign-ins throttled), the session cookie, the form
//! token and the origin check on every change, values escaped, and each page's actions
//! changing what the service does. `tests/browser/` drives the same pages in Chromium.

use std::time::Duration;

use kongflow_events::config::HttpConfig;
use kongflow_events::dispatchers::{self, EventRule, JobRegistration};
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use serde_json::json;

use crate::helpers::{TestApp, wait_until};

const TOKEN: &str = "the-console-test-operator-token";

async fn app_with_token() -> TestApp {
    TestApp::builder()
        .http(HttpConfig {
            operator_token: Some(TOKEN.parse().unwrap()),
            ..HttpConfig::default()
        })
        .start()
        .await
}

/// A client that follows no redirects, so each answer is seen as sent.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A signed-in browser: its cookie and the form token of its session.
struct Browser {
    app_url: String,
    cookie: String,
    csrf: String,
    http: reqwest::Client,
}

impl Browser {
    async fn sign_in(app: &TestApp) -> Self {
        let http = client();
        let r = http
            .post(format!("{}/console/sign-in", app.base_url))
            .form(&[("token", TOKEN)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
        for part in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
            assert!(set.contains(part), "{set}");
        }
        let cookie = set.split(';').next().unwrap().to_string();
        let mut b = Self {
            app_url: app.base_url.clone(),
            cookie,
            csrf: String::new(),
            http,
        };
        let (status, page) = b.get("/console").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        b.csrf = page
            .split("name=\"csrf\" content=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the page carries the session's form token")
            .to_string();
        b
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.app_url))
            .header(COOKIE, &self.cookie)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// POST a form as the console's own page does (its origin, the session's token), with
    /// `fields` besides; the answer's status and where it sends the browser.
    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> (StatusCode, String) {
        let mut form: Vec<(&str, &str)> = vec![("csrf", &self.csrf)];
        form.extend_from_slice(fields);
        let r = self
            .http
            .post(format!("{}{path}", self.app_url))
            .header(COOKIE, &self.cookie)
            .header(ORIGIN, &self.app_url)
            .form(&form)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let to = r
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap().to_string());
        (status, to.unwrap_or(r.text().await.unwrap()))
    }
}

/// The environment's path, as the console names it.
fn env_path(app: &TestApp) -> String {
    format!("org-{}/proj/dev", app.db_name)
}

fn env_query(app: &TestApp) -> String {
    format!("env={}", env_path(app))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_off_without_an_operator_token_and_says_so() {
    let app = TestApp::builder().start().await;
    let http = client();
    for path in ["/console", "/console/sign-in", "/console/events"] {
        let r = http
            .get(format!("{}{path}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(r.text().await.unwrap().contains("OPERATOR_TOKEN"), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_token_signs_in_and_a_session_ends_at_sign_out() {
    let app = app_with_token().await;
    let http = client();
    // Not signed in: the pages send the browser to the sign-in page, changes are refused.
    let r = http
        .get(format!("{}/console/events", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/console/sign-in");
    // A tenant's API key opens nothing: neither as a bearer nor typed into the sign-in.
    let r = http
        .get(format!("{}/console", app.base_url))
        .bearer_auth(&app.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = http
        .post(format!("{}/console/sign-in", app.base_url))
        .form(&[("token", app.api_key.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    // A made-up cookie is no session.
    let r = http
        .get(format!("{}/console", app.base_url))
        .header(COOKIE, "kongflow_console=made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);

    let b = Browser::sign_in(&app).await;
    let (status, page) = b.get("/console").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains(&env_path(&app)),
        "the switcher lists the environment"
    );
    // Signing out needs the form token too.
    let (status, _) = b.post("/console/sign-out", &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _) = b.get("/console").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "the session ended");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM console_sessions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sign_ins_are_throttled() {
    let app = app_with_token().await;
    let http = client();
    let mut statuses = Vec::new();
    for _ in 0..11 {
        let r = http
            .post(format!("{}/console/sign-in", app.base_url))
            .form(&[("token", "not-the-token-at-all")])
            .send()
            .await
            .unwrap();
        statuses.push(r.status());
    }
    assert!(
        statuses[..10]
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED),
        "{statuses:?}"
    );
    assert_eq!(statuses[10], StatusCode::TOO_MANY_REQUESTS);
    // Throttled, the right token is not even checked until the window ends.
    let r = http
        .post(format!("{}/console/sign-in", app.base_url))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_the_sessions_token_or_from_another_site_is_refused() {
    let app = app_with_token().await;
    let b = Browser::sign_in(&app).await;
    let q = env_query(&app);
    let path = format!("/console/environments/limits?{q}");
    let fields = [
        ("path", env_path(&app)),
        ("max_jobs_in_flight", "7".to_string()),
    ];
    // No form token.
    let r = b
        .http
        .post(format!("{}{path}", b.app_url))
        .header(COOKIE, &b.cookie)
        .header(ORIGIN, &b.app_url)
        .form(&fields)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // The right token, from another site.
    let mut with_token = fields.to_vec();
    with_token.push(("csrf", b.csrf.clone()));
    let r = b
        .http
        .post(format!("{}{path}", b.app_url))
        .header(COOKIE, &b.cookie)
        .header(ORIGIN, "https://evil.example")
        .form(&with_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let limit: Option<i32> =
        sqlx::query_scalar("SELECT max_jobs_in_flight FROM runtime_environments WHERE id = $1")
            .bind(app.env.id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(limit, Some(64), "nothing changed");
    // From the console itself: saved, and an empty field lifts the other limit.
    let (status, to) = b
        .post(
            &path,
            &[
                ("path", &env_path(&app)),
                ("max_jobs_in_flight", "7"),
                ("max_events_per_second", ""),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{to}");
    let limit: Option<i32> =
        sqlx::query_scalar("SELECT max_jobs_in_flight FROM runtime_environments WHERE id = $1")
            .bind(app.env.id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(limit, Some(7));
    let (_, page) = b.get(&format!("/console/environments?{q}")).await;
    assert!(page.contains("value=\"7\""), "the page shows the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_page_tells_its_story_escaped_and_cancels_a_delayed_one() {
    let app = app_with_token().await;
    app.register_job("on-order", "order.created").await;
    // A second dispatcher whose payload filter the event fails.
    dispatchers::register_job(
        &app.pool,
        &app.env,
        "only-big-orders",
        &JobRegistration {
            version: "1".into(),
            rule: EventRule {
                event_names: vec!["order.created".into()],
                source: "trigger.dev".into(),
                payload_filter: Some(json!({"size": ["big"]})),
                context_filter: None,
            },
            enabled: true,
            manual: false,
        },
    )
    .await
    .unwrap();
    let hostile = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>";
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.created", "id": "ord-1",
                         "payload": {"size": "small", "note": hostile}}}),
    )
    .await;
    wait_until("the run", Duration::from_secs(15), || async {
        !app.runs_by_job("ord-1").await.is_empty()
    })
    .await;
    let b = Browser::sign_in(&app).await;
    let q = env_query(&app);

    // Found by id, from the search form.
    let (status, to) = {
        let r = b
            .http
            .get(format!("{}/console/events?{q}&id=ord-1", b.app_url))
            .header(COOKIE, &b.cookie)
            .send()
            .await
            .unwrap();
        (
            r.status(),
            r.headers()[LOCATION].to_str().unwrap().to_string(),
        )
    };
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, page) = b.get(&to).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(!page.contains("<script>alert"), "the payload is escaped");
    assert!(!page.contains("<img src=x"), "the payload is escaped");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    let run_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM job_runs WHERE environment_id = $1")
            .bind(app.env.id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(page.contains(&run_id.to_string()), "its run is listed");
    assert!(page.contains("reached"));
    assert!(
        page.contains("not reached: "),
        "the other dispatcher, and why"
    );
    assert!(page.contains("size"), "the reason names the filter's path");
    assert!(page.contains(">delivered<"));
    assert!(
        !page.contains("Cancel event"),
        "a delivered event cannot be cancelled"
    );

    // In the listing, by name and state.
    let (_, list) = b
        .get(&format!(
            "/console/events?{q}&name=order.created&state=delivered"
        ))
        .await;
    assert!(list.contains("ord-1"));
    let (_, none) = b
        .get(&format!(
            "/console/events?{q}&name=order.created&state=delayed"
        ))
        .await;
    assert!(!none.contains("ord-1"));

    // An id with a space, a slash and a plus is found and linked as itself.
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.created", "id": "odd id/1+2", "payload": {}}}),
    )
    .await;
    let (_, list) = b
        .get(&format!("/console/events?{q}&name=order.created"))
        .await;
    assert!(list.contains("/console/events/odd%20id%2F1%2B2?"), "{list}");
    let (status, page) = b
        .get(&format!("/console/events/odd%20id%2F1%2B2?{q}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("odd id/1+2"), "{page}");

    // A delayed event: cancelled from its page, never delivered.
    let later = kongflow_events::dates::iso(chrono::Utc::now() + chrono::Duration::minutes(10));
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "order.created", "id": "ord-later", "payload": {}},
               "options": {"deliverAt": later}}),
    )
    .await;
    let (_, page) = b.get(&format!("/console/events/ord-later?{q}")).await;
    assert!(
        page.contains(">delayed<") && page.contains("Cancel event"),
        "{page}"
    );
    let (status, to) = b
        .post(&format!("/console/events/ord-later/cancel?{q}"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page) = b.get(&to).await;
    assert!(
        page.contains(">cancelled<") && page.contains("Event ord-later cancelled."),
        "{page}"
    );
    let cancelled: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT cancelled_at FROM event_records WHERE event_id = 'ord-later'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(cancelled.is_some());

    // The overview and its live part answer, with the environment's figures.
    let (status, page) = b.get(&format!("/console?{q}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("deliverEvent"), "{page}");
    let (status, live) = b.get(&format!("/console/overview.json?{q}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(live.contains("Jobs by kind"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_is_retried_from_its_page_and_bulk_retry_asks_first() {
    let app = app_with_token().await;
    app.register_job("on-ping", "ping").await;
    let later = kongflow_events::dates::iso(chrono::Utc::now() + chrono::Duration::minutes(10));
    app.send_event(
        &app.api_key,
        json!({"event": {"name": "ping", "id": "p-1", "payload": {}},
               "options": {"deliverAt": later}}),
    )
    .await;
    let job: i64 = sqlx::query_scalar("SELECT id FROM queue_jobs WHERE kind = 'deliverEvent'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let b = Browser::sign_in(&app).await;
    let q = env_query(&app);
    let (_, list) = b.get(&format!("/console/jobs?{q}&kind=deliverEvent")).await;
    assert!(list.contains(&format!("/console/jobs/{job}")), "{list}");
    let (status, to) = b
        .post(&format!("/console/jobs/{job}/cancel?{q}"), &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page) = b.get(&to).await;
    assert!(page.contains(">cancelled<"), "{page}");

    // Bulk retry: first the count and a confirmation, nothing changed yet.
    let (status, confirm) = b
        .post(
            &format!("/console/jobs/retry-matching?{q}"),
            &[("state", "cancelled"), ("kind", "deliverEvent")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        confirm.contains("Retry <strong>1</strong> job(s)"),
        "{confirm}"
    );
    let state: String = sqlx::query_scalar("SELECT state::text FROM queue_jobs WHERE id = $1")
        .bind(job)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "cancelled");
    // Retried from its page: it runs now, and its event reaches its run.
    let (status, _) = b.post(&format!("/console/jobs/{job}/retry?{q}"), &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    wait_until("the retried job's run", Duration::from_secs(15), || async {
        !app.runs_by_job("p-1").await.is_empty()
    })
    .await;
    let (_, page) = b.get(&format!("/console/jobs/{job}?{q}")).await;
    assert!(page.contains(">completed<"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_the_events_the_rate_limit_refused() {
    let app = app_with_token().await;
    kongflow_events::tenants::limits(
        &app.pool,
        &env_path(&app),
        kongflow_events::tenants::SetLimits {
            max_events_per_second: Some(Some(1)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut refused = 0;
    for i in 0..5 {
        let (status, _) = app
            .request(
                reqwest::Method::POST,
                "/api/v1/events",
                Some(&app.api_key),
                Some(json!({"event": {"name": "x", "id": format!("r-{i}"), "payload": {}}})),
            )
            .await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    assert!(refused >= 3, "{refused} refused");
    let b = Browser::sign_in(&app).await;
    let (_, page) = b.get(&format!("/console?{}", env_query(&app))).await;
    assert!(
        page.contains(&format!("data-key=\"rate-limited\">{refused}<")),
        "{page}"
    );
}
