//! AMQP ingest benchmark against a running pipeline (`kongflow-events all`).
//!
//! Flat out (no `--rate`): first the baseline, RabbitMQ alone: `--concurrency` publishers
//! (one connection each, publisher confirms) send N messages of the same size to a plain
//! queue that one consumer drains; then the same N send-event messages to the ingest
//! exchange. Prints both rates (first publish to last message consumed, and to last event
//! stored), their ratio, and the end-to-end rate (to the last run created).
//!
//! Paced (`--rate R`): N messages offered at R per second; each carries its publish time
//! as the event's timestamp, so publish-to-run latency is read from the database (run
//! created minus event timestamp, one machine's clock).
//!
//! `cargo bench --bench ingest -- [--url U] [--events N] [--concurrency C] [--rate R]`
//! with `DATABASE_URL`, `AMQP_URL` and `AMQP_PREFIX` those of the pipeline.
//! `INGEST_BENCH_STORED_ONLY=1` stops at the last event stored, for a service that runs
//! `serve` and `ingest` but no relay or worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use serde_json::json;

// The HTTP sender of the shared set-up is not used here: events go over AMQP.
#[allow(dead_code)]
mod common;
use common::{Args, Bench, EVENT, Stages};

/// Confirms awaited per window, per publisher.
const WINDOW: usize = 500;

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn prefix() -> String {
    std::env::var("AMQP_PREFIX").unwrap_or_else(|_| "kongflow".into())
}

fn body(run: &str, i: usize) -> Vec<u8> {
    json!({"event": {"name": EVENT, "id": format!("{run}-{i}"),
                     "payload": {"kind": "bench", "i": i},
                     "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)}})
    .to_string()
    .into_bytes()
}

fn properties(key: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(
        "x-kongflow-api-key".into(),
        AMQPValue::LongString(key.into()),
    );
    h.insert("x-kongflow-version".into(), AMQPValue::LongInt(1));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(h)
}

async fn confirming_channel() -> anyhow::Result<(lapin::Connection, Channel)> {
    let conn = kongflow_events::amqp::connect(&amqp_url(), "kongflow-bench").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

/// `publishers` connections publish messages `0..n` (message `i` from publisher
/// `i % publishers`) to `exchange`/`key`, awaiting confirms a window at a time. With
/// `rate`, message `i` is sent at `i / rate` seconds.
async fn publish_all(
    exchange: String,
    key: String,
    n: usize,
    publishers: usize,
    rate: Option<f64>,
    make: Arc<dyn Fn(usize) -> (Vec<u8>, BasicProperties) + Send + Sync>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (exchange, key, make) = (exchange.clone(), key.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let (conn, channel) = confirming_channel().await?;
            let mut pending = Vec::with_capacity(WINDOW);
            for i in (p..n).step_by(publishers) {
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let (body, props) = make(i);
                pending.push(
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            &body,
                            props,
                        )
                        .await?,
                );
                if pending.len() >= WINDOW || rate.is_some() {
                    for c in pending.drain(..) {
                        anyhow::ensure!(
                            matches!(c.await?, Confirmation::Ack(None)),
                            "not confirmed"
                        );
                    }
                }
            }
            for c in pending {
                anyhow::ensure!(matches!(c.await?, Confirmation::Ack(None)), "not confirmed");
            }
            let _ = conn.close(200, "done".into()).await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// RabbitMQ alone: publish `n` messages like the ingest ones to a queue of their own and
/// consume them (prefetch 1000, acknowledged in groups). Returns messages per second.
async fn raw_broker(n: usize, publishers: usize, key: &str, run: &str) -> anyhow::Result<f64> {
    let (conn, channel) = confirming_channel().await?;
    let queue = format!("{}.bench-raw.{run}", prefix());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut seen = 0;
        while seen < n {
            let d = consumer.next().await.expect("consumer open")?;
            seen += 1;
            if seen % 100 == 0 || seen == n {
                d.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
        anyhow::Ok(())
    });
    let (key, run_id) = (key.to_string(), run.to_string());
    publish_all(
        String::new(),
        queue.clone(),
        n,
        publishers,
        None,
        Arc::new(move |i| (body(&run_id, i), properties(&key))),
    )
    .await?;
    consume.await??;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(rate)
}

async fn count(bench: &Bench, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql)
        .bind(bench.env_id)
        .fetch_one(&bench.pool)
        .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse(50_000, 16, None);
    let bench = Bench::setup(&args.url, &args.database_url, 1).await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let n = args.events;
    let exchange = format!("{}.ingest", prefix());
    let key = bench.key.clone();
    let run_id = run.clone();
    let make: Arc<dyn Fn(usize) -> (Vec<u8>, BasicProperties) + Send + Sync> =
        Arc::new(move |i| (body(&run_id, i), properties(&key)));

    if let Some(rate) = args.rate {
        println!(
            "offering {n} messages at {rate} events/s, {} publishers",
            args.concurrency
        );
        let stages = Stages::scrape(&bench.http, &args.url).await?;
        publish_all(
            exchange,
            "send".into(),
            n,
            args.concurrency,
            Some(rate),
            make,
        )
        .await?;
        bench.wait_for_runs(n, Duration::from_secs(600)).await?;
        let (p50, p95, p99, max): (f64, f64, f64, f64) = sqlx::query_as(
            r#"SELECT percentile_cont(0.50) WITHIN GROUP (ORDER BY d)::float8,
                      percentile_cont(0.95) WITHIN GROUP (ORDER BY d)::float8,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY d)::float8,
                      max(d)::float8
               FROM (SELECT EXTRACT(EPOCH FROM r.created_at - e.timestamp) AS d
                     FROM job_runs r JOIN event_records e ON e.id = r.event_record_id
                     WHERE r.environment_id = $1) t"#,
        )
        .bind(bench.env_id)
        .fetch_one(&bench.pool)
        .await?;
        println!(
            "publish-to-run: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            p50 * 1e3,
            p95 * 1e3,
            p99 * 1e3,
            max * 1e3
        );
        Stages::scrape(&bench.http, &args.url)
            .await?
            .print_since(&stages);
        return Ok(());
    }

    println!("{n} messages, {} publishers", args.concurrency);
    let raw = raw_broker(n, args.concurrency, &bench.key, &run).await?;
    println!("rabbitmq alone (publish + consume): {raw:>8.0} messages/s");

    let started = Instant::now();
    publish_all(exchange, "send".into(), n, args.concurrency, None, make).await?;
    let published = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while (count(
        &bench,
        "SELECT count(*) FROM event_records WHERE environment_id = $1",
    )
    .await? as usize)
        < n
    {
        anyhow::ensure!(Instant::now() < deadline, "events not all stored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stored = started.elapsed();
    let stored_only = std::env::var("INGEST_BENCH_STORED_ONLY").is_ok_and(|v| v == "1");
    if !stored_only {
        bench.wait_for_runs(n, Duration::from_secs(600)).await?;
    }
    let ran = started.elapsed();
    let ingest = n as f64 / stored.as_secs_f64();
    println!(
        "published with confirms:            {:>8.0} messages/s",
        n as f64 / published.as_secs_f64()
    );
    println!(
        "amqp ingest (publish to stored):    {ingest:>8.0} events/s = {:.2} x rabbitmq alone",
        ingest / raw
    );
    if !stored_only {
        println!(
            "end to end (publish to last run):   {:>8.0} events/s",
            n as f64 / ran.as_secs_f64()
        );
    }
    Ok(())
}
