//! End-to-end benchmark of a running pipeline (`kongflow-events all` or separate roles).
//!
//! Creates a fresh environment, registers one job over HTTP, sends N events (each matching
//! the job's dispatcher) with concurrent clients, waits for N runs, and prints:
//! - ingest rate (events acknowledged per second) and each request's latency, p50 and p99
//!   (as the client sees it),
//! - end-to-end rate (first send to last run created),
//! - ingest-to-run latency p50, p95, p99 (run created minus event stored, both by the
//!   database's clock),
//! - where the time went: the service's stage timings (`/metrics`) over the run.
//!
//! `cargo bench --bench pipeline -- [--url U] [--events N] [--concurrency C] [--rate R]`
//! with `DATABASE_URL` pointing at the pipeline's database. `--rate` offers R events/s
//! instead of sending as fast as the clients can.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

mod common;
use common::{Args, Bench, Stages};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse(20_000, 64, None);
    let bench = Arc::new(Bench::setup(&args.url, &args.database_url, args.concurrency).await?);
    println!(
        "sending {} events, {} clients{}",
        args.events,
        args.concurrency,
        args.rate
            .map(|r| format!(", offered at {r} events/s"))
            .unwrap_or_default()
    );
    let stages_before = Stages::scrape(&bench.http, &args.url).await?;
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = Vec::with_capacity(args.events);
    for i in 0..args.events {
        if let Some(rate) = args.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = limit.clone().acquire_owned().await?;
        let bench = bench.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = bench.send(format!("e{i}"), None).await;
            drop(permit);
            (ok, sent.elapsed())
        }));
    }
    let mut failed = 0;
    let mut requests = Vec::with_capacity(args.events);
    for t in tasks {
        let (ok, took) = t.await?;
        if !ok {
            failed += 1;
        }
        requests.push(took);
    }
    requests.sort_unstable();
    let request_at =
        |q: f64| requests[((requests.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    let ingest = started.elapsed();
    anyhow::ensure!(failed == 0, "{failed} sends failed");

    bench
        .wait_for_runs(args.events, Duration::from_secs(300))
        .await?;
    let env_id = bench.env_id;
    // End to end: from the first send to the last run's creation, both by the database clock
    // (the first event's stored time stands for the first send).
    let (span, p50, p95, p99, max): (f64, f64, f64, f64, f64) = sqlx::query_as(
        r#"SELECT EXTRACT(EPOCH FROM max(r.created_at) - min(e.created_at))::float8,
                  percentile_cont(0.50) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM r.created_at - e.created_at))::float8,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM r.created_at - e.created_at))::float8,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM r.created_at - e.created_at))::float8,
                  max(EXTRACT(EPOCH FROM r.created_at - e.created_at))::float8
           FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
           WHERE r.environment_id = $1"#,
    )
    .bind(env_id)
    .fetch_one(&bench.pool)
    .await?;
    let n = args.events as f64;
    println!(
        "ingest:        {:>8.0} events/s ({n} in {:.2} s)",
        n / ingest.as_secs_f64(),
        ingest.as_secs_f64()
    );
    println!(
        "request:       p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        request_at(0.5),
        request_at(0.99),
        request_at(1.0)
    );
    println!(
        "end to end:    {:>8.0} events/s ({n} runs in {span:.2} s)",
        n / span
    );
    println!(
        "ingest-to-run: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50 * 1e3,
        p95 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    // A long run also shows whether the figures hold as the tables grow: each minute alone.
    if span > 120.0 {
        let windows: Vec<(i32, i64, f64, f64)> = sqlx::query_as(
            r#"WITH d AS (
                   SELECT e.created_at AS at, EXTRACT(EPOCH FROM r.created_at - e.created_at) AS d
                   FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
                   WHERE r.environment_id = $1)
               SELECT (EXTRACT(EPOCH FROM at - (SELECT min(at) FROM d)) / 60)::int4 AS minute,
                      count(*),
                      percentile_cont(0.50) WITHIN GROUP (ORDER BY d)::float8,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY d)::float8
               FROM d GROUP BY 1 ORDER BY 1"#,
        )
        .bind(env_id)
        .fetch_all(&bench.pool)
        .await?;
        println!("by minute (events, ingest-to-run p50, p99):");
        for (minute, count, p50, p99) in windows {
            println!(
                "  {minute:>3}  {count:>7}  {:>7.1} ms  {:>7.1} ms",
                p50 * 1e3,
                p99 * 1e3
            );
        }
    }
    Stages::scrape(&bench.http, &args.url)
        .await?
        .print_since(&stages_before);
    Ok(())
}
