//! Fair service across environments: an environment's due jobs beyond its share in flight
//! (`max_jobs_in_flight`) wait in the outbox, not in the broker's queues, so another
//! environment's events run after that share of work, not after the whole backlog.

use std::time::Duration;

use kongflow_events::app::Roles;
use kongflow_events::ledger::JobKind;
use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, job_body, wait_until};

const FLOOD: usize = 600;

async fn flood(app: &TestApp, key: &str, prefix: &str, events: usize) {
    for chunk in 0..events.div_ceil(100) {
        let batch: Vec<_> = (chunk * 100..((chunk + 1) * 100).min(events))
            .map(|i| json!({"name": "tick", "id": format!("{prefix}-{i}"), "payload": {}}))
            .collect();
        let (status, body) = app
            .request(
                Method::POST,
                "/api/v1/events/bulk",
                Some(key),
                Some(json!({ "events": batch })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

/// Events of an environment that have a run.
async fn with_runs(app: &TestApp, env: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT event_record_id) FROM job_runs WHERE environment_id = $1",
    )
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// An environment's jobs still in the outbox.
async fn in_outbox(app: &TestApp, env: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM queue_jobs WHERE environment_id = $1 AND published_at IS NULL",
    )
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Set the test environment's share of the workers (`max_jobs_in_flight`).
async fn set_share(app: &TestApp, jobs: i32) {
    sqlx::query("UPDATE runtime_environments SET max_jobs_in_flight = $2 WHERE id = $1")
        .bind(app.env.id)
        .bind(jobs)
        .execute(&app.pool)
        .await
        .unwrap();
}

fn spawn_worker(app: &TestApp) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("worker")
        .envs(app.child_env())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kongflow-events worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_environment_waits_in_the_outbox_while_the_others_run() {
    // The API and the relay; the worker comes later.
    let app = TestApp::builder()
        .roles(Roles {
            http: true,
            relay: true,
            ..Roles::NONE
        })
        .start()
        .await;
    let (a, a_key) = (app.env.id, app.api_key.clone());
    // B hashes to A's shard on purpose: it shares A's work queue, so shards alone would
    // leave it behind A's whole backlog.
    let mut quiet = 0;
    let (b_env, b_key) = loop {
        let (env, key) = app.new_env(&format!("quiet{quiet}")).await;
        if app.topology.shard_of(env.id) == app.topology.shard_of(a) {
            break (env, key);
        }
        quiet += 1;
    };
    app.put_job(&a_key, "job", job_body("tick", json!({})))
        .await;
    app.put_job(&b_key, "job", job_body("tick", json!({})))
        .await;
    let share: i32 =
        sqlx::query_scalar("SELECT max_jobs_in_flight FROM runtime_environments WHERE id = $1")
            .bind(a)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(share, 64, "the default share");

    flood(&app, &a_key, "a", FLOOD).await;
    // The broker holds A's share; the outbox holds the rest.
    wait_until(
        "A's share in the work queue",
        Duration::from_secs(10),
        || async { app.queue_depth(JobKind::DeliverEvent).await >= 64 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depth = app.queue_depth(JobKind::DeliverEvent).await;
    // Statements that count the room at the same moment may each fill it once: the API's
    // two group committers and the relay's two loops, at most four shares. (Seen: 64 to
    // 164.) With the share lifted, all 600 are there.
    assert!(depth <= 4 * 64, "{depth} of A's jobs in the work queue");
    let waiting = in_outbox(&app, a).await;
    assert_eq!(waiting + i64::from(depth), FLOOD as i64);
    // The gauge of the environments with the most waiting names A first.
    let (top, total) = kongflow_events::ledger::outbox::top_backlogs(&app.pool, 10)
        .await
        .unwrap();
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(total, waiting, "nobody else waits");
    let paths = kongflow_events::tenants::paths(&app.pool, &[top[0].0])
        .await
        .unwrap();
    assert!(paths[&top[0].0].ends_with("/proj/dev"), "{top:?}");
    assert_eq!(top[0].1, waiting);

    // B's events have room: they go straight to the broker, behind A's share only.
    for i in 0..5 {
        app.send_event(
            &b_key,
            json!({"event": {"name": "tick", "id": format!("b-{i}"), "payload": {}}}),
        )
        .await;
    }
    let mut worker = spawn_worker(&app);
    wait_until("B's runs", Duration::from_secs(30), || async {
        with_runs(&app, b_env.id).await == 5
    })
    .await;
    let a_done = with_runs(&app, a).await;
    assert!(
        a_done < 250,
        "B's events waited for {a_done} of A's {FLOOD} events, not for A's share"
    );
    // A still progresses, a share at a time, at the pace the worker allows, and its jobs in
    // flight stay near its share while the relay and the worker's refills both hand it room.
    let most = std::sync::atomic::AtomicI64::new(0);
    wait_until("A's runs", Duration::from_secs(60), || async {
        let in_flight: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_jobs WHERE environment_id = $1 AND kind = 'deliverEvent'
               AND published_at IS NOT NULL AND state = 'available'",
        )
        .bind(a)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        most.fetch_max(in_flight, std::sync::atomic::Ordering::Relaxed);
        with_runs(&app, a).await == FLOOD as i64
    })
    .await;
    let most_in_flight = most.into_inner();
    assert!(
        most_in_flight <= 3 * 64,
        "{most_in_flight} of A's jobs in flight at once, against a share of 64"
    );
    assert_eq!(in_outbox(&app, a).await, 0);
    app.assert_completed_once(JobKind::DeliverEvent, FLOOD + 5)
        .await;
    worker.kill().await.unwrap();
}

/// `kongflow-events env limits …` against the test's database; its status and output.
async fn env_limits(app: &TestApp, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("env")
        .arg("limits")
        .args(args)
        .envs(app.child_env())
        .output()
        .await
        .expect("run kongflow-events env limits");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environments_share_is_set_by_command_and_the_api_publishes_no_more() {
    let app = TestApp::builder()
        .roles(crate::helpers::HTTP_ONLY)
        .start()
        .await;
    let (env, key) = app.new_env("limited").await;
    let path: String = sqlx::query_scalar(
        "SELECT o.slug || '/' || p.slug || '/' || e.slug FROM runtime_environments e
         JOIN projects p ON p.id = e.project_id JOIN organizations o ON o.id = p.organization_id
         WHERE e.id = $1",
    )
    .bind(env.id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let (ok, out) = env_limits(&app, &[&path]).await;
    assert!(ok && out.contains("max jobs in flight 64"), "{out}");
    let (ok, out) = env_limits(&app, &[&path, "--max-jobs-in-flight", "3"]).await;
    assert!(ok && out.contains("max jobs in flight 3"), "{out}");
    let (ok, out) = env_limits(&app, &[&path, "--max-jobs-in-flight", "0"]).await;
    assert!(!ok && out.contains("at least 1"), "{out}");
    let (ok, out) = env_limits(&app, &["no/such/env"]).await;
    assert!(!ok && out.contains("no environment no/such/env"), "{out}");

    // Ten events in one call: the API publishes three, the others wait for room.
    app.put_job(&key, "job", job_body("tick", json!({}))).await;
    flood(&app, &key, "l", 10).await;
    let awaiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue_jobs WHERE environment_id = $1 AND awaits_room AND published_at IS NULL",
    )
    .bind(env.id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(awaiting, 7);
    wait_until("the three messages", Duration::from_secs(10), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 3
    })
    .await;

    let (ok, out) = env_limits(&app, &[&path, "--no-max-jobs-in-flight"]).await;
    assert!(ok && out.contains("max jobs in flight none"), "{out}");
    // No limit: all of the next ten go out at once.
    flood(&app, &key, "m", 10).await;
    wait_until("ten more messages", Duration::from_secs(10), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 13
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_order_the_work_inside_an_environments_share() {
    use kongflow_events::ledger::{
        InsertOpts, InvokeDispatcherArgs, JobInsert, JobPriority, QueueService,
    };
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    set_share(&app, 3).await;
    let job = |priority| {
        JobInsert::invoke_dispatcher(
            InvokeDispatcherArgs {
                id: Uuid::new_v4(),
                event_record_id: Uuid::new_v4(),
            },
            InsertOpts {
                priority,
                environment_id: Some(app.env.id),
                ..InsertOpts::default()
            },
        )
    };
    // Ten NORMAL jobs, then one CRITICAL: the share of three takes the CRITICAL one first.
    let mut jobs: Vec<JobInsert> = (0..10).map(|_| job(JobPriority::Normal)).collect();
    jobs.push(job(JobPriority::Critical));
    let mut tx = app.pool.begin().await.unwrap();
    let ids: Vec<i64> = QueueService::new()
        .enqueue_many(&mut tx, jobs)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.job.id)
        .collect();
    tx.commit().await.unwrap();
    let relay = app.relay();
    let channel = relay.open_channel(&app.amqp).await.unwrap();
    assert_eq!(relay.publish_batch(&channel).await.unwrap(), 3);
    // The share is full: nothing more until a job completes.
    assert_eq!(relay.publish_batch(&channel).await.unwrap(), 0);
    let published: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM queue_jobs WHERE published_at IS NOT NULL ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(published, vec![ids[0], ids[1], ids[10]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_over_its_ingest_rate_gets_429_with_retry_after() {
    let app = TestApp::builder()
        .roles(crate::helpers::HTTP_ONLY)
        .start()
        .await;
    let (env, key) = app.new_env("rated").await;
    let path = format!("{}-rated/proj/env", app.db_name);
    let (ok, out) = env_limits(&app, &[&path, "--max-events-per-second", "5"]).await;
    assert!(ok && out.contains("max events per second 5"), "{out}");
    let limited = || {
        kongflow_events::metrics::metrics()
            .events_rate_limited
            .with_label_values(&["http"])
            .get()
    };
    let before = limited();
    let send = |id: String| {
        app.http
            .post(format!("{}/api/v1/events", app.base_url))
            .bearer_auth(&key)
            .json(&json!({"event": {"name": "tick", "id": id, "payload": {}}}))
            .send()
    };
    // A second's worth (5) goes at once; then refusals, but for what the bucket refills
    // meanwhile (5 a second: a slow machine sends a few more before the first 429).
    let started = std::time::Instant::now();
    let mut accepted = 0;
    let refused = loop {
        let r = send(format!("r-{accepted}")).await.unwrap();
        if r.status() != StatusCode::OK {
            break r;
        }
        accepted += 1;
        assert!(accepted < 50, "never refused");
    };
    let refills = (started.elapsed().as_secs_f64() * 5.0).ceil() as i64;
    assert!(
        (5..=5 + refills).contains(&accepted),
        "{accepted} accepted, {refills} refilled"
    );
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("5 events per second"),
        "{body}"
    );
    assert!(limited() > before);
    // Nothing of the refused call was stored.
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_records WHERE environment_id = $1")
            .bind(env.id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, accepted);

    // A second later the bucket is full: a bulk call of ten goes, and leaves a debt.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    flood(&app, &key, "bulk", 10).await;
    let refused = send("debt".into()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");

    // Lifted: no more refusals.
    let (ok, _) = env_limits(&app, &[&path, "--no-max-events-per-second"]).await;
    assert!(ok);
    tokio::time::sleep(Duration::from_millis(1_100)).await; // the key cache forgets
    for i in 0..13 {
        assert_eq!(
            send(format!("lifted-{i}")).await.unwrap().status(),
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_read_and_set_limits_over_http_with_their_token_only() {
    const TOKEN: &str = "operator-token-of-this-test";
    let http = kongflow_events::config::HttpConfig {
        operator_token: Some(TOKEN.parse().unwrap()),
        ..Default::default()
    };
    let app = TestApp::builder()
        .roles(crate::helpers::HTTP_ONLY)
        .http(http)
        .start()
        .await;
    let (_env, key) = app.new_env("limited").await;
    let url = format!(
        "{}/api/v1/operator/environments/{}-limited/proj/env/limits",
        app.base_url, app.db_name
    );
    let call = |method: Method, token: Option<&str>, body: Option<serde_json::Value>| {
        let mut request = app.http.request(method, &url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    // No token, a wrong one, an environment's API key: refused, and nothing changes.
    for token in [None, Some("operator-token-of-another"), Some(key.as_str())] {
        let (status, body) = call(Method::PUT, token, Some(json!({"maxJobsInFlight": 1}))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
    }
    let (status, body) = call(Method::GET, Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"environment": format!("{}-limited/proj/env", app.db_name),
               "maxJobsInFlight": 64, "maxEventsPerSecond": null})
    );
    // A field left out stays; null lifts.
    let (_, body) = call(
        Method::PUT,
        Some(TOKEN),
        Some(json!({"maxEventsPerSecond": 2})),
    )
    .await;
    assert_eq!(
        (
            body["maxJobsInFlight"].clone(),
            body["maxEventsPerSecond"].clone()
        ),
        (json!(64), json!(2))
    );
    let (_, body) = call(
        Method::PUT,
        Some(TOKEN),
        Some(json!({"maxJobsInFlight": null})),
    )
    .await;
    assert_eq!(
        (
            body["maxJobsInFlight"].clone(),
            body["maxEventsPerSecond"].clone()
        ),
        (json!(null), json!(2))
    );
    // Nonsense is refused with the reason.
    let (status, body) = call(
        Method::PUT,
        Some(TOKEN),
        Some(json!({"maxJobsInFlight": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("at least 1"),
        "{body}"
    );
    let (status, _) = call(Method::PUT, Some(TOKEN), Some(json!({"maxJobs": 3}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let missing = url.replace("-limited/", "-nobody/");
    let response = app
        .http
        .get(&missing)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // The rate set over HTTP holds once the key cache forgets (a second).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = app
            .http
            .post(format!("{}/api/v1/events", app.base_url))
            .bearer_auth(&key)
            .json(&json!({"event": {"name": "tick", "id": format!("o-{i}"), "payload": {}}}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status());
    }
    assert_eq!(statuses[..2], [StatusCode::OK, StatusCode::OK]);
    assert!(
        statuses[2..].contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_are_off_without_a_token() {
    let app = TestApp::builder()
        .roles(crate::helpers::HTTP_ONLY)
        .start()
        .await;
    let url = format!(
        "{}/api/v1/operator/environments/org-{}/proj/dev/limits",
        app.base_url, app.db_name
    );
    let response = app
        .http
        .get(&url)
        .bearer_auth("anything-at-all-here")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("OPERATOR_TOKEN"),
        "{body}"
    );
}

/// The room in flight counts the jobs published when due (in a work queue until final).
/// A delayed job, published into the delay tiers ahead of its due time, never waited for
/// room and takes none once due: when the broker holds such jobs up past their due time (a
/// tier's hop caught by a lost cluster node), the jobs due now are not kept waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_take_no_room_in_flight() {
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    let env = app.env.id;
    set_share(&app, 10).await;
    // `n` jobs published `published_s` seconds ago, due `due_s` seconds ago.
    let plant = |published_s: f64, due_s: f64, n: i32| {
        let pool = app.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO queue_jobs (kind, args, state, environment_id, run_at, published_at)
                 SELECT 'deliverEvent', jsonb_build_object('id', gen_random_uuid()), 'available',
                        $1, now() - make_interval(secs => $3), now() - make_interval(secs => $2)
                 FROM generate_series(1, $4)",
            )
            .bind(env)
            .bind(published_s)
            .bind(due_s)
            .bind(n)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let room = || async {
        sqlx::query_scalar::<_, Option<i64>>("SELECT queue_jobs_room($1, 'deliverEvent')")
            .bind(env)
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    assert_eq!(room().await, Some(10));
    // Published a minute ahead of a due time 30 s past, or 2 s past: no room taken.
    plant(60.0, 30.0, 3).await;
    plant(60.0, 2.0, 2).await;
    assert_eq!(room().await, Some(10), "due delayed jobs take no room");
    // Published when due, 30 s ago, and not final: in a work queue, counted.
    plant(30.0, 30.0, 4).await;
    // Published by a relay a while after it was due: counted too.
    plant(5.0, 20.0, 1).await;
    assert_eq!(
        room().await,
        Some(5),
        "jobs published when due stay in flight"
    );
    // Final ones free their room.
    sqlx::query("UPDATE queue_jobs SET state = 'completed', finalized_at = now() WHERE environment_id = $1 AND published_at = run_at")
        .bind(env)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(room().await, Some(9), "final jobs take no room");
}

/// The job of an event, by the producer's id: its id, when it was published and by whom.
async fn delivery_job(
    app: &TestApp,
    event_id: &str,
) -> (i64, Option<chrono::DateTime<chrono::Utc>>, Option<i64>) {
    sqlx::query_as(
        "SELECT j.id, j.published_at, j.published_by FROM queue_jobs j
         JOIN event_records e ON e.id = (j.args->>'id')::uuid
         WHERE j.kind = 'deliverEvent' AND e.event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Whether the take of `id` (rolled back) saw jobs of its environment waiting for room.
async fn take_sees_waiting(app: &TestApp, id: i64) -> bool {
    let mut tx = app.pool.begin().await.unwrap();
    let taken = kongflow_events::ledger::run::take(&mut tx, &[id])
        .await
        .unwrap();
    assert_eq!(taken.jobs.len(), 1, "the job is live");
    tx.rollback().await.unwrap();
    taken.others_wait
}

/// A worker's batch hands the room it leaves to its environment's job waiting for room, in
/// its own transaction and with no relay running; the take tells it whether any job waits
/// (a job that waited for room itself says yes), so a batch with none skips that statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_a_batch_leaves_goes_to_the_waiting_job_without_a_relay() {
    use kongflow_events::EventsService;
    use kongflow_events::amqp::{DirectPublisher, JobMessage};
    use kongflow_events::events::{SendEvent, SendEventOptions};

    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    set_share(&app, 1).await;
    let publisher = || {
        DirectPublisher::new(
            app.store.amqp_url.clone(),
            app.topology.clone(),
            app.pool.clone(),
            Duration::from_secs(10),
        )
    };
    let events = EventsService::new(app.pool.clone()).publishing(publisher());
    let send = |id: &'static str| {
        let event = SendEvent {
            id: Some(id.into()),
            name: "tick".into(),
            payload: json!({}),
            ..Default::default()
        };
        let events = events.clone();
        let env = app.env.clone();
        async move {
            events
                .ingest_send_event(&env, event, SendEventOptions::default())
                .await
                .unwrap();
        }
    };
    send("first").await;
    send("second").await;
    let (first, first_published, _) = delivery_job(&app, "first").await;
    let (second, second_published, _) = delivery_job(&app, "second").await;
    assert!(
        first_published.is_some(),
        "a share of one publishes the first"
    );
    assert_eq!(second_published, None, "the second waits for room");
    assert!(
        take_sees_waiting(&app, first).await,
        "the first's take sees the second waiting"
    );

    // The first's batch runs on a worker that publishes what it commits: the second gets
    // the room in that batch's transaction, stamped by the worker's own publisher.
    let message = app.get_message(JobKind::DeliverEvent).await.unwrap();
    let message = JobMessage::parse(&message.delivery.data).unwrap();
    assert_eq!(message.id, first);
    let worker = app.worker().publishing(publisher());
    worker.process(vec![Ok(message)]).await.unwrap();
    let (_, second_published, stamped_by) = delivery_job(&app, "second").await;
    assert!(second_published.is_some(), "the room went to the second");
    assert!(stamped_by.is_some(), "under the worker's ticket");
    wait_until("the second's message", Duration::from_secs(5), || async {
        app.queue_depth(JobKind::DeliverEvent).await == 1
    })
    .await;

    // The second waited for room itself: its environment is at its share, and its take
    // says so without asking. A job published straight away, with nothing waiting, says
    // no: its batch skips the refill.
    assert!(take_sees_waiting(&app, second).await);
    set_share(&app, 10).await;
    send("third").await;
    let (third, third_published, _) = delivery_job(&app, "third").await;
    assert!(third_published.is_some(), "the third had room");
    assert!(!take_sees_waiting(&app, third).await, "nothing waits");
}
