//! RabbitMQ restarted while delayed messages wait in the tiers.
//!
//! A test binary of its own: the restart cuts every connection to the broker, so it must not
//! overlap the other integration tests (cargo runs test binaries one after another).

#[allow(dead_code)]
#[path = "it/helpers.rs"]
mod helpers;

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;

use helpers::{TestApp, job_body, wait_until};

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_survive_a_broker_restart() {
    let mut app = TestApp::builder().start().await;
    let key = app.api_key.clone();
    app.put_job(&key, "job", job_body("restart", json!({})))
        .await;
    // Some due while the broker is down, some after it is back.
    let delays_ms = [2_000i64, 3_000, 4_000, 12_000, 15_000];
    let mut due = Vec::new();
    for (i, ms) in delays_ms.iter().enumerate() {
        let at = Utc::now() + chrono::Duration::milliseconds(*ms);
        let log = app
            .send_event(
                &key,
                json!({"event": {"name": "restart", "id": format!("r-{i}"), "payload": {}},
                       "options": {"deliverAt": kongflow_events::dates::iso(at)}}),
            )
            .await;
        due.push(
            DateTime::parse_from_rfc3339(log["deliverAt"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc),
        );
    }
    wait_until("every job published", Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM queue_jobs WHERE kind = 'deliverEvent' AND published_at IS NOT NULL",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
            == delays_ms.len() as i64
    })
    .await;

    let down = Instant::now();
    let down_at = Utc::now();
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let outage = down.elapsed();
    let up_at = Utc::now();
    eprintln!("broker down for {outage:?}");

    for (i, due) in due.iter().enumerate() {
        let id = format!("r-{i}");
        wait_until(
            "delivery after the restart",
            Duration::from_secs(60),
            || async { delivered_at(&app, &id).await.is_some() },
        )
        .await;
        let delivered = delivered_at(&app, &id).await.unwrap();
        assert!(delivered >= *due, "{id} delivered early");
        // Due during the outage: delivered once the broker is back (plus the reconnect
        // backoff, at most 5 s and jitter). Due after: on time.
        let allowed = if *due < up_at && *due > down_at {
            (up_at - *due) + chrono::Duration::seconds(10)
        } else {
            chrono::Duration::seconds(10)
        };
        let late = delivered - *due;
        eprintln!("{id}: {} ms late", late.num_milliseconds());
        assert!(late <= allowed, "{id} {} ms late", late.num_milliseconds());
    }
    app.settle().await;
    for i in 0..delays_ms.len() {
        assert_eq!(
            app.runs_by_job(&format!("r-{i}")).await,
            vec![("job".to_string(), 1)],
            "r-{i}: one run"
        );
    }
    // The test's own connection died with the broker: a new one cleans up.
    app.amqp = kongflow_events::amqp::connect(&helpers::amqp_url(), "kongflow-test")
        .await
        .unwrap();
    app.channel = app.amqp.create_channel().await.unwrap();
}

async fn delivered_at(app: &TestApp, event_id: &str) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT delivered_at FROM event_records WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}
