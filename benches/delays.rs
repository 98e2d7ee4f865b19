//! Lateness of delayed delivery under load.
//!
//! Sends `--events` (10,000) events, each with a `deliverAt` between 1 and 60 seconds after
//! its own send (as fast as `--concurrency` clients go, or paced evenly over `--spread`
//! seconds), while other clients send immediate events at `--rate` (200) events/s for the
//! whole time. Waits for every run, then prints, for the delayed events:
//! - delivery lateness: the event's `deliveredAt` (the deliverEvent job's start) minus its
//!   `deliverAt`;
//! - run lateness: its run's creation minus its `deliverAt` (one more trip through the
//!   outbox, relay and worker);
//!
//! as p50, p99 and max, and how many were delivered early (must be 0); delivery lateness
//! also for the events due after the last delayed send (when the sends no longer load the
//! machine). All times are by the
//! database's clock except `deliverAt`, set by this process on the same machine.
//!
//! `cargo bench --bench delays -- [--url U] [--events N] [--rate R] [--concurrency C]`
//! with `DATABASE_URL` pointing at the pipeline's database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use serde_json::json;
use tokio::sync::Semaphore;

#[allow(dead_code)]
mod common;
use common::{Args, Bench};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse(10_000, 32, Some(200.0));
    let rate = args.rate.unwrap_or(200.0);
    let bench = Arc::new(Bench::setup(&args.url, &args.database_url, args.concurrency).await?);
    println!(
        "scheduling {} events 1-60 s ahead, with {} immediate events/s alongside",
        args.events, rate
    );

    // Immediate traffic until the last delayed event is due.
    let stop = Arc::new(AtomicBool::new(false));
    let immediate = Arc::new(AtomicUsize::new(0));
    let background = {
        let (bench, stop, immediate, rate) = (bench.clone(), stop.clone(), immediate.clone(), rate);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sends = Vec::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let (bench, immediate) = (bench.clone(), immediate.clone());
                sends.push(tokio::spawn(async move {
                    if bench.send(format!("now{i}"), None).await {
                        immediate.fetch_add(1, Ordering::Relaxed);
                    }
                }));
                i += 1;
            }
            for s in sends {
                let _ = s.await;
            }
            i
        })
    };

    let limit = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = Vec::with_capacity(args.events);
    let started = Instant::now();
    for i in 0..args.events {
        if args.spread > 0.0 {
            let due =
                started + Duration::from_secs_f64(args.spread * i as f64 / args.events as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = limit.clone().acquire_owned().await?;
        let bench = bench.clone();
        let ahead_ms = rand::rng().random_range(1_000..=60_000);
        tasks.push(tokio::spawn(async move {
            let at = Utc::now() + chrono::Duration::milliseconds(ahead_ms);
            let ok = bench
                .send(
                    format!("later{i}"),
                    Some(json!({"deliverAt": kongflow_events::dates::iso(at)})),
                )
                .await;
            drop(permit);
            ok
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if !t.await? {
            failed += 1;
        }
    }
    anyhow::ensure!(failed == 0, "{failed} delayed sends failed");
    let sends_ended = Utc::now();
    println!(
        "delayed events sent in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let last_due = Duration::from_secs(61) + Duration::from_secs_f64(args.spread);
    tokio::time::sleep_until((started + last_due).into()).await;
    stop.store(true, Ordering::Relaxed);
    let offered = background.await?;
    let sent = immediate.load(Ordering::Relaxed);
    anyhow::ensure!(sent == offered, "{} immediate sends failed", offered - sent);
    bench
        .wait_for_runs(args.events + sent, Duration::from_secs(120))
        .await?;

    let (p50, p99, max, early): (f64, f64, f64, i64) = sqlx::query_as(
        r#"SELECT percentile_cont(0.50) WITHIN GROUP (ORDER BY l)::float8,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY l)::float8,
                  max(l)::float8, count(*) FILTER (WHERE l < 0)
           FROM (SELECT EXTRACT(EPOCH FROM delivered_at - deliver_at) AS l
                 FROM event_records WHERE environment_id = $1 AND event_id LIKE 'later%') t"#,
    )
    .bind(bench.env_id)
    .fetch_one(&bench.pool)
    .await?;
    let (q50, q99, qmax, after): (f64, f64, f64, i64) = sqlx::query_as(
        r#"SELECT percentile_cont(0.50) WITHIN GROUP (ORDER BY l)::float8,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY l)::float8,
                  max(l)::float8, count(*)
           FROM (SELECT EXTRACT(EPOCH FROM delivered_at - deliver_at) AS l
                 FROM event_records WHERE environment_id = $1 AND event_id LIKE 'later%'
                   AND deliver_at > $2) t"#,
    )
    .bind(bench.env_id)
    .bind(sends_ended)
    .fetch_one(&bench.pool)
    .await?;
    let (r50, r99, rmax): (f64, f64, f64) = sqlx::query_as(
        r#"SELECT percentile_cont(0.50) WITHIN GROUP (ORDER BY l)::float8,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY l)::float8,
                  max(l)::float8
           FROM (SELECT EXTRACT(EPOCH FROM r.created_at - e.deliver_at) AS l
                 FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
                 WHERE r.environment_id = $1 AND e.event_id LIKE 'later%') t"#,
    )
    .bind(bench.env_id)
    .fetch_one(&bench.pool)
    .await?;
    let (i50, i99): (f64, f64) = sqlx::query_as(
        r#"SELECT percentile_cont(0.50) WITHIN GROUP (ORDER BY l)::float8,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY l)::float8
           FROM (SELECT EXTRACT(EPOCH FROM r.created_at - e.created_at) AS l
                 FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
                 WHERE r.environment_id = $1 AND e.event_id LIKE 'now%') t"#,
    )
    .bind(bench.env_id)
    .fetch_one(&bench.pool)
    .await?;
    println!(
        "delivery lateness: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({early} early)",
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    println!(
        "  due after the last delayed send ({after}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        q50 * 1e3,
        q99 * 1e3,
        qmax * 1e3
    );
    println!(
        "run lateness:      p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r50 * 1e3,
        r99 * 1e3,
        rmax * 1e3
    );
    println!(
        "immediate events:  {sent}, ingest-to-run p50 {:.1} ms, p99 {:.1} ms",
        i50 * 1e3,
        i99 * 1e3
    );
    Ok(())
}
