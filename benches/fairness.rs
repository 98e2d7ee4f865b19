//! Fair service under a flood.
//!
//! Ten quiet environments send `--rate` (20) events/s each for 15 s, first with nothing
//! else running, then while environment A sends `--events` (20,000) events as fast as
//! `--concurrency` (16) clients go (bulk calls of 100 events). Prints, for each phase, the
//! quiet environments' ingest-to-run p50, p99 and max, and A's rate from its first event
//! stored to its last run. `--unfair` lifts every environment's share in flight
//! (`max_jobs_in_flight` NULL): the service as it was before fairness; `--share N` sets
//! every environment's share to N; `--rate-of-a R` holds A's ingest to R events/s (its
//! refused calls are sent again after their `Retry-After`).
//!
//! With `SHARD_COUNT` above 1 (the service's, read here too), one quiet environment at least
//! is made to hash to A's shard, and the figures of those sharing A's shard are printed
//! apart.
//!
//! `cargo bench --bench fairness -- [--url U] [--events N] [--rate R] [--concurrency C]
//! [--unfair]` with `DATABASE_URL` pointing at the pipeline's database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Semaphore;

#[allow(dead_code)]
mod common;
use common::{Args, Bench, EVENT};

const QUIET: usize = 10;
const QUIET_SECONDS: f64 = 15.0;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse(20_000, 16, Some(20.0));
    let rate = args.rate.unwrap_or(20.0);
    let flooder = Arc::new(Bench::setup(&args.url, &args.database_url, args.concurrency).await?);
    let shards: u16 = std::env::var("SHARD_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let shard_of = |b: &Bench| kongflow_events::amqp::topology::shard_of(b.env_id, shards);
    let mut quiet = Vec::new();
    for _ in 0..QUIET {
        quiet.push(Arc::new(
            Bench::setup(&args.url, &args.database_url, 4).await?,
        ));
    }
    // One quiet environment at least on A's shard: hash-sharding alone would starve it.
    while !quiet.iter().any(|q| shard_of(q) == shard_of(&flooder)) {
        quiet[QUIET - 1] = Arc::new(Bench::setup(&args.url, &args.database_url, 4).await?);
    }
    let beside: Vec<Arc<Bench>> = quiet
        .iter()
        .filter(|q| shard_of(q) == shard_of(&flooder))
        .cloned()
        .collect();
    if let Some(rate) = args.rate_of_a {
        sqlx::query("UPDATE runtime_environments SET max_events_per_second = $1 WHERE id = $2")
            .bind(rate)
            .bind(flooder.env_id)
            .execute(&flooder.pool)
            .await?;
        println!("A's ingest is held to {rate} events/s (429 and Retry-After past it)");
    }
    if args.unfair || args.share.is_some() {
        sqlx::query("UPDATE runtime_environments SET max_jobs_in_flight = $1")
            .bind(args.share.filter(|_| !args.unfair))
            .execute(&flooder.pool)
            .await?;
    }
    println!(
        "{QUIET} quiet environments at {rate} events/s each; a flood of {} events{}",
        args.events,
        match (args.unfair, args.share) {
            (true, _) => " (no shares: unfair)".to_string(),
            (false, Some(n)) => format!(" (shares of {n})"),
            (false, None) => String::new(),
        }
    );

    let each = quiet_traffic(&quiet, rate, "idle").await?;
    wait_all(&quiet, each).await?;
    report("A idle", &quiet, "idle").await?;
    if shards > 1 {
        report("  on A's shard", &beside, "idle").await?;
    }

    let flood = {
        let (a, events, clients) = (flooder.clone(), args.events, args.concurrency);
        tokio::spawn(async move { send_flood(&a, events, clients).await })
    };
    let more = quiet_traffic(&quiet, rate, "flood").await?;
    let flood_stored = flood.await??;
    wait_all(&quiet, each + more).await?;
    report("A flooding", &quiet, "flood").await?;
    if shards > 1 {
        report(
            &format!(
                "  on A's shard ({} of {QUIET}, {shards} shards)",
                beside.len()
            ),
            &beside,
            "flood",
        )
        .await?;
    }
    let (n, p50, p99, max) = latency(&quiet, "flood", Some(flood_stored)).await?;
    println!(
        "  of which sent after A's last event was stored (A's backlog draining): {n} events, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    flooder
        .wait_for_runs(args.events, Duration::from_secs(600))
        .await?;
    let (first, last): (f64, f64) = sqlx::query_as(
        r#"SELECT EXTRACT(EPOCH FROM (SELECT min(created_at) FROM event_records WHERE environment_id = $1))::float8,
                  EXTRACT(EPOCH FROM (SELECT max(created_at) FROM job_runs WHERE environment_id = $1))::float8"#,
    )
    .bind(flooder.env_id)
    .fetch_one(&flooder.pool)
    .await?;
    println!(
        "A: {} events, first stored to last run {:.1} s = {:.0} events/s",
        args.events,
        last - first,
        args.events as f64 / (last - first)
    );
    Ok(())
}

/// Every quiet environment sends `rate` events/s for [`QUIET_SECONDS`], ids `{tag}-N`.
/// Returns how many each sent.
async fn quiet_traffic(quiet: &[Arc<Bench>], rate: f64, tag: &str) -> anyhow::Result<usize> {
    let n = (rate * QUIET_SECONDS) as usize;
    let mut tasks = Vec::new();
    for (e, bench) in quiet.iter().enumerate() {
        let (bench, tag) = (bench.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            // Spread the environments' sends over each interval.
            let started = Instant::now() + Duration::from_secs_f64(e as f64 / rate / QUIET as f64);
            let mut sends = Vec::new();
            for i in 0..n {
                tokio::time::sleep_until(
                    (started + Duration::from_secs_f64(i as f64 / rate)).into(),
                )
                .await;
                let (bench, id) = (bench.clone(), format!("{tag}-{i}"));
                sends.push(tokio::spawn(async move { bench.send(id, None).await }));
            }
            let mut ok = 0;
            for s in sends {
                ok += usize::from(s.await.unwrap_or(false));
            }
            ok
        }));
    }
    for t in tasks {
        let ok = t.await?;
        anyhow::ensure!(ok == n, "{} quiet sends failed", n - ok);
    }
    Ok(n)
}

/// A's flood: bulk calls of 100 events, `clients` at a time. Returns when the last was
/// stored.
async fn send_flood(
    a: &Arc<Bench>,
    events: usize,
    clients: usize,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(clients));
    let mut calls = Vec::new();
    for chunk in 0..events.div_ceil(100) {
        let permit = limit.clone().acquire_owned().await?;
        let a = a.clone();
        calls.push(tokio::spawn(async move {
            let batch: Vec<_> = (chunk * 100..((chunk + 1) * 100).min(events))
                .map(|i| json!({"name": EVENT, "id": format!("a-{i}"), "payload": {"kind": "bench"}}))
                .collect();
            // A call refused for A's ingest rate (429) is sent again after its
            // Retry-After, as the v2 SDK does.
            let stored = loop {
                let r = a
                    .http
                    .post(format!("{}/api/v1/events/bulk", a.url))
                    .bearer_auth(&a.key)
                    .json(&json!({ "events": batch }))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                        let wait: u64 = r
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(1);
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    r => break matches!(r, Ok(r) if r.status().is_success()),
                }
            };
            drop(permit);
            stored
        }));
    }
    let mut failed = 0;
    for c in calls {
        failed += usize::from(!c.await?);
    }
    anyhow::ensure!(failed == 0, "{failed} bulk calls of the flood failed");
    println!(
        "A's flood stored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(chrono::Utc::now())
}

/// Wait until every quiet environment has `runs` runs.
async fn wait_all(quiet: &[Arc<Bench>], runs: usize) -> anyhow::Result<()> {
    for bench in quiet {
        bench.wait_for_runs(runs, Duration::from_secs(600)).await?;
    }
    Ok(())
}

async fn report(phase: &str, quiet: &[Arc<Bench>], tag: &str) -> anyhow::Result<()> {
    let (n, p50, p99, max) = latency(quiet, tag, None).await?;
    println!(
        "{phase}: quiet environments' {n} events, ingest-to-run p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    Ok(())
}

/// The quiet environments' ingest-to-run latency of the events `{tag}-N` (stored after
/// `after`, if given): count, p50, p99 and max, in seconds.
async fn latency(
    quiet: &[Arc<Bench>],
    tag: &str,
    after: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<(i64, f64, f64, f64)> {
    let envs: Vec<uuid::Uuid> = quiet.iter().map(|b| b.env_id).collect();
    Ok(sqlx::query_as(
        r#"SELECT count(*),
                  COALESCE(percentile_cont(0.50) WITHIN GROUP (ORDER BY l), 0)::float8,
                  COALESCE(percentile_cont(0.99) WITHIN GROUP (ORDER BY l), 0)::float8,
                  COALESCE(max(l), 0)::float8
           FROM (SELECT EXTRACT(EPOCH FROM r.created_at - e.created_at) AS l
                 FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
                 WHERE e.environment_id = ANY($1) AND e.event_id LIKE $2
                   AND e.created_at > COALESCE($3, '-infinity'::timestamptz)) t"#,
    )
    .bind(&envs)
    .bind(format!("{tag}-%"))
    .bind(after)
    .fetch_one(&quiet[0].pool)
    .await?)
}
