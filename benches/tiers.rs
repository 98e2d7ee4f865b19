//! Lateness of the delay tiers alone: RabbitMQ, no database, no handlers.
//!
//! Declares the topology under a fresh prefix, publishes `--messages` (2,000) job messages
//! through `publish_job` with delays spread over `--max-ms` (5,000), consumes the work
//! queue directly and prints arrival minus due time (p50, p99, max, and by number of hops).
//!
//! `cargo bench --bench tiers -- [--messages N] [--max-ms M]` with `AMQP_URL`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use kongflow_events::amqp::publish::route;
use kongflow_events::amqp::{self, JobMessage, Topology, publish_job};
use kongflow_events::ledger::JobKind;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use rand::Rng;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut messages = 2_000usize;
    let mut max_ms = 5_000i64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--messages" => messages = it.next().expect("N").parse()?,
            "--max-ms" => max_ms = it.next().expect("M").parse()?,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefix = format!(
        "kfbench.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let topology = Topology::new(&prefix).with_queue_expiry(600_000);
    let conn = amqp::connect(&url, "kongflow-bench-tiers").await?;
    let channel = conn.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consumer_channel = conn.create_channel().await?;
    let mut consumer = consumer_channel
        .basic_consume(
            topology.queue(JobKind::DeliverEvent, 0).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // Arrivals are stamped as they come, while the publisher is still at work.
    let receiver = tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(messages);
        while arrivals.len() < messages {
            let d = tokio::time::timeout(
                Duration::from_millis(max_ms as u64 + 10_000),
                consumer.next(),
            )
            .await?
            .expect("consumer open")?;
            let arrived = Utc::now();
            let msg = JobMessage::parse(&d.data)?;
            d.ack(BasicAckOptions::default()).await?;
            arrivals.push((msg, arrived));
        }
        anyhow::Ok(arrivals)
    });

    let mut hops_of = std::collections::HashMap::new();
    for i in 0..messages {
        let ahead = rand::rng().random_range(1..=max_ms);
        let now = Utc::now();
        let msg = JobMessage {
            v: JobMessage::VERSION,
            id: i as i64,
            kind: JobKind::DeliverEvent.as_str().into(),
            queue: "events".into(),
            args: serde_json::json!({}),
            attempt: 0,
            run_at: now + chrono::Duration::milliseconds(ahead),
        };
        let to = kongflow_events::amqp::publish::Destination {
            kind: JobKind::DeliverEvent,
            queue: "events",
            shard: 0,
            priority: None,
        };
        let hops = route(&topology, to, msg.run_at, now)
            .delay
            .map(|d| d.hops())
            .unwrap_or(0);
        hops_of.insert(msg.id, hops);
        let props = BasicProperties::default().with_delivery_mode(2);
        publish_job(
            &channel,
            &topology,
            JobKind::DeliverEvent,
            0,
            &msg,
            props,
            now,
        )
        .await?
        .await?;
    }
    let mut late = Vec::with_capacity(messages);
    let mut by_hops: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (msg, arrived) in receiver.await?? {
        let ms = (arrived - msg.run_at).num_microseconds().unwrap() as f64 / 1e3;
        late.push(ms);
        by_hops.entry(hops_of[&msg.id]).or_default().push(ms);
    }
    for q in topology.all_queues() {
        let _ = channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
    for e in topology.all_exchanges() {
        let _ = channel
            .exchange_delete(e.as_str().into(), Default::default())
            .await;
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    println!(
        "{messages} messages, delays 1-{max_ms} ms: lateness p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, min {:.1} ms",
        pct(&mut late, 0.5),
        pct(&mut late, 0.99),
        pct(&mut late, 1.0),
        pct(&mut late, 0.0)
    );
    for (hops, v) in by_hops.iter_mut() {
        println!(
            "  {hops} hops: {:>5} messages, p50 {:.1} ms, max {:.1} ms",
            v.len(),
            pct(v, 0.5),
            pct(v, 1.0)
        );
    }
    Ok(())
}
