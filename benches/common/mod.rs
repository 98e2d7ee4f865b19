//! What both benchmarks need: a fresh environment with one job registered over HTTP, and a
//! way to send events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kongflow_events::tenants::{self, EnvironmentType};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// Command-line arguments shared by the benchmarks:
/// `[--url U] [--events N] [--concurrency C] [--rate R] [--spread S] [--unfair] [--share N]
/// [--rate-of-a R]`.
pub struct Args {
    pub url: String,
    pub events: usize,
    pub concurrency: usize,
    pub rate: Option<f64>,
    /// Seconds over which to pace the delayed sends of `benches/delays.rs` (0: at once).
    pub spread: f64,
    /// `benches/fairness.rs`: lift the environments' share in flight (no fairness).
    pub unfair: bool,
    /// `benches/fairness.rs`: every environment's share in flight (`max_jobs_in_flight`).
    pub share: Option<i32>,
    /// `benches/fairness.rs`: the flooding environment's `max_events_per_second`.
    pub rate_of_a: Option<i32>,
    pub database_url: String,
}

impl Args {
    /// Parse the process's arguments over these defaults; `DATABASE_URL` names the
    /// pipeline's database.
    pub fn parse(events: usize, concurrency: usize, rate: Option<f64>) -> Self {
        let mut args = Args {
            url: "http://127.0.0.1:3030".into(),
            events,
            concurrency,
            rate,
            spread: 0.0,
            unfair: false,
            share: None,
            rate_of_a: None,
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://localhost/kongflow".into()),
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
            match a.as_str() {
                "--url" => args.url = val(),
                "--events" => args.events = val().parse().expect("--events N"),
                "--concurrency" => args.concurrency = val().parse().expect("--concurrency C"),
                "--rate" => args.rate = Some(val().parse().expect("--rate R")),
                "--spread" => args.spread = val().parse().expect("--spread S"),
                "--unfair" => args.unfair = true,
                "--share" => args.share = Some(val().parse().expect("--share N")),
                "--rate-of-a" => args.rate_of_a = Some(val().parse().expect("--rate-of-a R")),
                "--bench" => {}
                other => panic!("unknown argument {other}"),
            }
        }
        args
    }
}

/// The event name the benchmark job listens to.
pub const EVENT: &str = "bench.event";

pub struct Bench {
    pub pool: PgPool,
    pub env_id: Uuid,
    pub key: String,
    pub url: String,
    pub http: reqwest::Client,
}

impl Bench {
    /// A fresh environment on the pipeline at `url` (database at `database_url`), with one
    /// job whose filter every benchmark event passes.
    pub async fn setup(url: &str, database_url: &str, clients: usize) -> anyhow::Result<Self> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(database_url)
            .await?;
        let run = Uuid::new_v4().simple().to_string();
        let env = tenants::create_environment(
            &pool,
            &format!("bench/bench/run-{}", &run[..12]),
            EnvironmentType::Development,
        )
        .await?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(clients)
            .build()?;
        let resp = http
            .put(format!("{url}/api/v1/jobs/bench-job"))
            .bearer_auth(&env.api_key)
            .json(&json!({"version": "1.0.0",
                          "trigger": {"event": EVENT, "payload": {"kind": ["bench"]}}}))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "register job: {}",
            resp.text().await?
        );
        Ok(Self {
            pool,
            env_id: env.environment.id,
            key: env.api_key,
            url: url.to_string(),
            http,
        })
    }

    /// Send one event (`POST /api/v1/events`); true on success.
    pub async fn send(&self, id: String, options: Option<Value>) -> bool {
        let mut body = json!({"event": {"name": EVENT, "id": id, "payload": {"kind": "bench"}}});
        if let Some(o) = options {
            body["options"] = o;
        }
        let r = self
            .http
            .post(format!("{}/api/v1/events", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await;
        matches!(r, Ok(r) if r.status().is_success())
    }

    /// Wait until the environment has `n` runs (at most `timeout`).
    pub async fn wait_for_runs(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let runs: i64 =
                sqlx::query_scalar("SELECT count(*) FROM job_runs WHERE environment_id = $1")
                    .bind(self.env_id)
                    .fetch_one(&self.pool)
                    .await?;
            if runs as usize >= n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {runs} of {n} runs after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The service's stage histograms (`kongflow_stage_duration_seconds`) at one moment: per
/// stage, its cumulative bucket counts by upper bound, and its sum.
#[derive(Default)]
pub struct Stages(BTreeMap<String, (Vec<(f64, f64)>, f64)>);

impl Stages {
    /// Read them from the service's `/metrics`: at `METRICS_URL` when set (where the
    /// service's `METRICS_ADDR` is), else at `url`.
    pub async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<Self> {
        let url = std::env::var("METRICS_URL").unwrap_or_else(|_| url.to_string());
        let text = http
            .get(format!("{url}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let mut stages: BTreeMap<String, (Vec<(f64, f64)>, f64)> = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("kongflow_stage_duration_seconds_") else {
                continue;
            };
            let label = |name: &str| {
                let start = rest
                    .find(&format!("{name}=\""))
                    .map(|i| i + name.len() + 2)?;
                let end = rest[start..].find('"')? + start;
                Some(rest[start..end].to_string())
            };
            let (Some(stage), Some(value)) = (
                label("stage"),
                rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                continue;
            };
            let entry = stages.entry(stage).or_default();
            if rest.starts_with("bucket") {
                let le =
                    label("le").map_or(f64::INFINITY, |le| le.parse().unwrap_or(f64::INFINITY));
                entry.0.push((le, value));
            } else if rest.starts_with("sum") {
                entry.1 = value;
            }
        }
        for (buckets, _) in stages.values_mut() {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(Self(stages))
    }

    /// Print, per stage, what happened between `before` and `self`: observations, mean, and
    /// p50 and p99 interpolated within buckets as Prometheus does.
    pub fn print_since(&self, before: &Stages) {
        println!("stages (count, mean, p50, p99):");
        for (stage, (buckets, sum)) in &self.0 {
            let (old, old_sum) = before.0.get(stage).cloned().unwrap_or_default();
            let delta: Vec<(f64, f64)> = buckets
                .iter()
                .map(|(le, c)| {
                    let was = old.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
                    (*le, c - was)
                })
                .collect();
            let count = delta.last().map_or(0.0, |(_, c)| *c);
            if count < 1.0 {
                continue;
            }
            let quantile = |q: f64| {
                let rank = q * count;
                let mut lower = (0.0, 0.0);
                for &(le, c) in &delta {
                    if c >= rank {
                        if le.is_infinite() {
                            return lower.0;
                        }
                        let within = if c > lower.1 {
                            (rank - lower.1) / (c - lower.1)
                        } else {
                            1.0
                        };
                        return lower.0 + (le - lower.0) * within;
                    }
                    lower = (le, c);
                }
                lower.0
            };
            println!(
                "  {stage:<14} {count:>8.0}  {:>7.2} ms  {:>7.2} ms  {:>7.2} ms",
                (sum - old_sum) / count * 1e3,
                quantile(0.5) * 1e3,
                quantile(0.99) * 1e3
            );
        }
    }
}
