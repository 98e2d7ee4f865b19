//! A node of a three-node RabbitMQ cluster lost in the middle of traffic, on quorum queues.
//!
//! Needs the cluster of `scripts/cluster.sh` (three nodes on 5681-5683 beside the machine's
//! own broker): `scripts/cluster-test.sh` starts it, runs this test with `AMQP_URL` listing
//! the three nodes and `TEST_QUEUE_TYPE=quorum`, and stops it. Ignored in a plain
//! `cargo test`, which has no cluster.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kongflow_events::config::QueueType;
use kongflow_events::ledger::JobKind;
use serde_json::json;

use crate::helpers::{NO_ROLES, TestApp, collect_stderr, queue_type};

const EVENTS: usize = 10_000;
/// Events offered per second: the sending lasts 40 s, so the outage falls inside it.
const RATE: f64 = 250.0;
/// Every fifth event is delayed, by 2 to 30 s.
const DELAYED_EVERY: usize = 5;
/// The leader is stopped once this many events are acknowledged (10 s in).
const STOP_AFTER: usize = 2_500;
/// How long the node stays down.
const OUTAGE: Duration = Duration::from_secs(20);

fn cluster(args: &[&str]) -> String {
    let out =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
            .args(args)
            .output()
            .expect("run scripts/cluster.sh");
    assert!(
        out.status.success(),
        "scripts/cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sends the test's events, each to one of the processes in turn.
struct Sender {
    http: reqwest::Client,
    bases: Vec<String>,
    key: String,
    acked: Arc<Mutex<Vec<String>>>,
    failures: Mutex<usize>,
}

impl Sender {
    /// Event `i` (every fifth delayed), sent until acknowledged (20 tries, 0.5 s apart).
    async fn send(&self, i: usize) {
        let id = format!("c-{i}");
        let mut body = json!({"event": {"name": "cluster", "id": id, "payload": {"i": i}}});
        if i.is_multiple_of(DELAYED_EVERY) {
            body["options"] = json!({"deliverAfter": 2 + (i * 7) % 29});
        }
        let base = &self.bases[i % self.bases.len()];
        for _ in 0..20 {
            let r = self
                .http
                .post(format!("{base}/api/v1/events"))
                .bearer_auth(&self.key)
                .json(&body)
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status().is_success()) {
                self.acked.lock().unwrap().push(id);
                return;
            }
            *self.failures.lock().unwrap() += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the three-node cluster: scripts/cluster-test.sh runs it"]
async fn a_cluster_node_lost_mid_traffic_loses_nothing_and_runs_nothing_twice() {
    assert_eq!(
        queue_type(),
        QueueType::Quorum,
        "run through scripts/cluster-test.sh (TEST_QUEUE_TYPE=quorum)"
    );
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    assert!(
        app.store.amqp_url.contains(":5681/") && app.store.amqp_url.contains(":5683/"),
        "run through scripts/cluster-test.sh (AMQP_URL must list the cluster's nodes)"
    );
    app.register_job("job", "cluster").await;

    // Two processes, each with every role, as two pods would be.
    let mut children = Vec::new();
    let mut bases = Vec::new();
    let mut logs = Vec::new();
    for _ in 0..2 {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
            .args(["all", "--http", &format!("127.0.0.1:{port}")])
            // `/readyz` is also beside the API, where this test looks for it.
            .envs(app.child_env())
            .env(
                "RUST_LOG",
                std::env::var("CLUSTER_CHILD_LOG").unwrap_or("warn".into()),
            )
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        logs.push(collect_stderr(&mut child));
        children.push(child);
        bases.push(format!("http://127.0.0.1:{port}"));
    }
    // Ready within 180 s (every quorum queue is a Raft group the cluster creates), or the
    // failure shows what the processes said.
    for (i, base) in bases.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if matches!(app.http.get(format!("{base}/readyz")).send().await,
                 Ok(r) if r.status().is_success())
            {
                break;
            }
            let exited = children[i].try_wait().unwrap();
            if exited.is_some() || Instant::now() >= deadline {
                panic!(
                    "process {i} not ready ({}); its stderr:\n{}",
                    exited.map_or("timed out after 180 s".into(), |s| format!("exited: {s}")),
                    logs[i].lock().unwrap().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let work_queue = app.topology.queue_for(
        JobKind::DeliverEvent,
        app.topology.shard_of(app.env.id),
        None,
    );
    let leader = cluster(&["leader", &work_queue]);

    // 10,000 events at a steady rate, 16 clients, alternating between the processes; a
    // send that fails is sent again with the same id (the API is idempotent on it). The
    // leader is stopped once STOP_AFTER are acknowledged and started again OUTAGE later,
    // while the sending goes on.
    let sender = Arc::new(Sender {
        http: app.http.clone(),
        bases,
        key: app.api_key.clone(),
        acked: Arc::default(),
        failures: Mutex::new(0),
    });
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    let started = Instant::now();
    let mut sends = Vec::with_capacity(EVENTS);
    let (mut stop, mut start) = (None, None);
    let mut stopped_at = None;
    let mut new_leader = None;
    for i in 0..EVENTS {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / RATE)).into()).await;
        if stop.is_none() && sender.acked.lock().unwrap().len() >= STOP_AFTER {
            let leader = leader.clone();
            stopped_at = Some(started.elapsed());
            stop = Some(tokio::task::spawn_blocking(move || {
                cluster(&["stop", &leader])
            }));
        }
        if let Some(at) = stopped_at
            && start.is_none()
            && started.elapsed() >= at + OUTAGE
        {
            new_leader = Some(cluster(&["leader", &work_queue]));
            let leader = leader.clone();
            start = Some(tokio::task::spawn_blocking(move || {
                cluster(&["start", &leader])
            }));
        }
        let permit = limit.clone().acquire_owned().await.unwrap();
        let sender = sender.clone();
        sends.push(tokio::spawn(async move {
            sender.send(i).await;
            drop(permit);
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    let stopped_at = stopped_at.expect("the leader was stopped during the sending");
    stop.unwrap().await.unwrap();
    let new_leader = new_leader.expect("the node was started again during the sending");
    assert_ne!(
        new_leader, leader,
        "another node leads {work_queue} meanwhile"
    );
    start.unwrap().await.unwrap();
    let back_at = started.elapsed();
    let acked = sender.acked.lock().unwrap().clone();
    assert_eq!(acked.len(), EVENTS, "every event acknowledged in the end");

    // Every acknowledged event runs, once.
    let runs_of = |ids: Vec<String>| {
        let pool = app.pool.clone();
        async move {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT e.event_id, count(r.id) FROM event_records e
                 LEFT JOIN job_runs r ON r.event_record_id = e.id
                 WHERE e.event_id = ANY($1) GROUP BY e.event_id",
            )
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows.into_iter().collect::<HashMap<_, _>>()
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            let runs = runs_of(acked.clone()).await;
            if acked
                .iter()
                .all(|id| runs.get(id).copied().unwrap_or(0) >= 1)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let done_at = started.elapsed();
    let runs = runs_of(acked.clone()).await;
    let lost = acked
        .iter()
        .filter(|id| runs.get(*id).copied().unwrap_or(0) == 0)
        .count();
    let duplicates: i64 = runs.values().map(|n| (n - 1).max(0)).sum();
    let attempts_over_one: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM queue_jobs WHERE attempt > 1 OR jsonb_array_length(errors) > 0",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    // Lateness of each delayed event: its run minus its due time; and when each was due,
    // relative to the outage.
    // Delayed events are timed from their due time, the others from their storing.
    let rows: Vec<(bool, f64)> = sqlx::query_as(
        "SELECT e.deliver_at > e.created_at + interval '1 second',
                extract(epoch FROM r.created_at - greatest(e.deliver_at, e.created_at))::float8 * 1000
         FROM event_records e JOIN job_runs r ON r.event_record_id = e.id
         WHERE e.event_id = ANY($1)",
    )
    .bind(&acked)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let (delayed, now): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(d, _)| *d);
    let sorted = |rows: Vec<(bool, f64)>| {
        let mut v: Vec<f64> = rows.into_iter().map(|(_, ms)| ms).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (lateness, immediate) = (sorted(delayed), sorted(now));
    // Where the latest immediate runs spent their time: the stages of the five slowest.
    let slowest: Vec<(f64, f64, f64, f64)> = sqlx::query_as(
        "SELECT extract(epoch FROM j.published_at - e.created_at)::float8,
                extract(epoch FROM j.attempted_at - j.published_at)::float8,
                extract(epoch FROM r.created_at - j.attempted_at)::float8,
                extract(epoch FROM r.created_at - e.created_at)::float8
         FROM event_records e
         JOIN queue_jobs j ON j.kind = 'deliverEvent' AND j.args->>'id' = e.id::text
         JOIN job_runs r ON r.event_record_id = e.id
         WHERE e.event_id = ANY($1) AND e.deliver_at <= e.created_at + interval '1 second'
         ORDER BY 4 DESC LIMIT 5",
    )
    .bind(&acked)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    println!(
        "slowest immediate runs, seconds (stored to published, published to taken, taken to \
         run, total): {slowest:.1?}"
    );
    let send_failures = *sender.failures.lock().unwrap();
    println!(
        "cluster: {} events ({} delayed 2-30 s), node {leader} (leader of {work_queue}) stopped at \
         {:.1} s for {:.1} s (back at {:.1} s, leader meanwhile node {new_leader}); all runs by \
         {:.1} s; lost {lost}, duplicates {duplicates}, jobs with a second attempt or an error \
         {attempts_over_one}, sends retried {send_failures}; delayed runs late by p50 {:.0} / \
         p99 {:.0} / max {:.0} ms (early by at most {:.0} ms); immediate ingest-to-run p50 {:.0} / \
         p99 {:.0} / max {:.0} ms",
        acked.len(),
        lateness.len(),
        stopped_at.as_secs_f64(),
        (back_at - stopped_at).as_secs_f64(),
        back_at.as_secs_f64(),
        done_at.as_secs_f64(),
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        lateness.last().copied().unwrap_or(f64::NAN),
        -lateness.first().copied().unwrap_or(0.0).min(0.0),
        percentile(&immediate, 0.5),
        percentile(&immediate, 0.99),
        immediate.last().copied().unwrap_or(f64::NAN),
    );
    // Each process's log, for a run to be read afterwards.
    for (n, log) in logs.iter().enumerate() {
        let path = format!(
            "{}/target/cluster-logs/process-{n}.log",
            env!("CARGO_MANIFEST_DIR")
        );
        let _ = std::fs::create_dir_all(std::path::Path::new(&path).parent().unwrap());
        let _ = std::fs::write(&path, log.lock().unwrap().join("\n"));
    }
    if finished.is_err() || lost > 0 {
        // Where the missing ones stand: the ledger's unfinished jobs, and the broker's queues.
        let jobs: Vec<(String, String, bool, i64)> = sqlx::query_as(
            "SELECT kind, state::text, published_at IS NOT NULL, count(*) FROM queue_jobs
             WHERE state <> 'completed' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        eprintln!("unfinished jobs (kind, state, published, count): {jobs:?}");
        let queues = std::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "-n",
                "kfc2@localhost",
                "list_queues",
                "name",
                "leader",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
                "--no-table-headers",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let prefix = &app.store.amqp_prefix;
        eprintln!(
            "this test's queues with messages or consumers:\n{}",
            queues
                .lines()
                .filter(|l| l.starts_with(prefix.as_str()) && !l.ends_with("\t0\t0\t0"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        for (n, log) in logs.iter().enumerate() {
            let log = log.lock().unwrap();
            eprintln!(
                "process {n} (whole log in target/cluster-logs), last lines:\n{}",
                log[log.len().saturating_sub(30)..].join("\n")
            );
        }
    }
    assert_eq!(lost, 0, "every acknowledged event runs");
    assert_eq!(duplicates, 0, "no event runs twice");
    assert_eq!(lateness.len(), EVENTS / DELAYED_EVERY);
    // On time within the outage: no delayed run comes later after its due time than the
    // node was out (from its stop until it was back in the cluster) and the catch-up after
    // it (CATCH_UP: the consumers reconnecting and the backlog of the outage draining on
    // two loaded cores; once 1.2 s past the outage in a full run), and none comes early by
    // more than the delay lead.
    const CATCH_UP_MS: f64 = 5_000.0;
    let worst = lateness.last().copied().unwrap_or(0.0);
    let outage_ms = (back_at - stopped_at).as_millis() as f64;
    assert!(
        worst < outage_ms + CATCH_UP_MS,
        "a delayed run came {worst:.0} ms late, past the {outage_ms:.0} ms outage and \
         {CATCH_UP_MS:.0} ms of catch-up"
    );
    assert!(lateness.first().copied().unwrap_or(0.0) > -1_000.0);

    for mut c in children {
        c.kill().await.unwrap();
    }
}
