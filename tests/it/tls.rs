//! The stores over TLS, as managed Postgres and RabbitMQ services require it. Run by
//! `scripts/tls-test.sh`, which makes a CA for the run, a Postgres that refuses plain
//! connections and a RabbitMQ node that speaks only amqps, both with a certificate that CA
//! signed, and points the suite at them (`TEST_PG_BASE` with `PGSSLMODE=verify-full` and
//! `PGSSLROOTCERT`; `AMQP_URL` amqps with `AMQP_TLS_CA_FILE`); `KONGFLOW_TLS_DIR` holds the
//! CA and another one that signed nothing there.

use std::time::Duration;

use serde_json::json;

use crate::config::run;
use crate::helpers::{TestApp, rabbitmqctl, wait_until};

/// The run's directory of certificates: `ca.crt` (signed the servers'), `other-ca.crt`.
fn tls_dir() -> String {
    std::env::var("KONGFLOW_TLS_DIR").expect("run scripts/tls-test.sh: it sets up the TLS servers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the TLS servers of scripts/tls-test.sh"]
async fn over_verified_tls_an_event_reaches_its_run_and_no_connection_is_plain() {
    let _ = tls_dir();
    let app = TestApp::builder().start().await;
    assert!(
        app.store.amqp_url.starts_with("amqps://"),
        "{}",
        app.store.amqp_url
    );
    app.register_job("tls-job", "tls.event").await;
    // A child process too, with only the variables a deployment sets.
    let (mut child, base) = app.start_child("serve", &[]).await;
    let sent = app
        .http
        .post(format!("{base}/api/v1/events"))
        .bearer_auth(&app.api_key)
        .json(&json!({"event": {"name": "tls.event", "id": "tls-1"}}))
        .send()
        .await
        .unwrap();
    assert!(sent.status().is_success(), "{:?}", sent.text().await);
    wait_until("the event's run", Duration::from_secs(30), || async {
        app.runs_by_job("tls-1").await == vec![("tls-job".to_string(), 1)]
    })
    .await;
    // Every connection to this database, the test's and the child's, is encrypted.
    let (plain, all): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE NOT s.ssl), count(*)
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = current_database()",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(plain, 0, "of {all} connections");
    assert!(all >= 2, "{all}");
    // And the broker saw only TLS connections (it has no plain listener to take others).
    let listed = rabbitmqctl(&["list_connections", "ssl", "--no-table-headers"]);
    assert!(listed.lines().count() >= 2, "{listed}");
    assert!(listed.lines().all(|l| l.trim() == "true"), "{listed}");
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the TLS servers of scripts/tls-test.sh"]
async fn a_process_that_cannot_trust_a_server_stops_and_says_what_to_set() {
    let dir = tls_dir();
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    let other = format!("{dir}/other-ca.crt");
    let url = &app.database_url;
    // Postgres's certificate checked against a CA that did not sign it.
    let (ok, _, _, stderr) = run(
        &["migrate"],
        &[("DATABASE_URL", url), ("PGSSLROOTCERT", &other)],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("over TLS"), "{stderr}");
    assert!(
        stderr.contains("sslrootcert") && stderr.contains("PGSSLROOTCERT"),
        "{stderr}"
    );
    // The same URL with sslmode=require encrypts without checking: it connects.
    let require = format!("{url}?sslmode=require");
    let (ok, _, _, stderr) = run(
        &["migrate"],
        &[("DATABASE_URL", &require), ("PGSSLROOTCERT", &other)],
    )
    .await;
    assert!(ok, "{stderr}");
    // A plain connection is refused by the server, and the process says where to look.
    let disable = format!("{url}?sslmode=disable");
    let (ok, _, _, stderr) = run(&["migrate"], &[("DATABASE_URL", &disable)]).await;
    assert!(!ok);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");

    // RabbitMQ's certificate against the other CA: the worker stops at start-up, at once,
    // naming the variable, rather than retrying a connection that can never be trusted.
    let child_env = app.child_env();
    let plain_url = app.store.amqp_url.split('?').next().unwrap();
    let mut env: Vec<(&str, &str)> = child_env
        .iter()
        .filter(|(k, _)| *k != "AMQP_URL")
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    env.extend([
        ("AMQP_URL", plain_url),
        ("AMQP_TLS_CA_FILE", other.as_str()),
        ("KONGFLOW_NO_MIGRATE", "true"),
    ]);
    let (ok, took, _, stderr) = run(&["worker"], &env).await;
    assert!(!ok);
    assert!(took < Duration::from_secs(30), "{stderr}");
    assert!(
        stderr.contains("does not trust") && stderr.contains("AMQP_TLS_CA_FILE"),
        "{stderr}"
    );
    // A CA file that does not exist.
    let missing = format!("{dir}/no-such.crt");
    env.retain(|(k, _)| *k != "AMQP_TLS_CA_FILE");
    env.push(("AMQP_TLS_CA_FILE", &missing));
    let (ok, _, _, stderr) = run(&["worker"], &env).await;
    assert!(!ok);
    assert!(
        stderr.contains("cannot read the CA file") && stderr.contains("no-such.crt"),
        "{stderr}"
    );
}
