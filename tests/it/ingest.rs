//! AMQP ingest: requests published straight to the ingest exchange, in every form, good
//! and bad, duplicated, in bursts, and a consumer killed between commit and ack.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use kongflow_events::amqp_ingest::decode::{API_KEY_HEADER, VERSION_HEADER};
use kongflow_events::amqp_ingest::{ERROR_HEADER, REASON_HEADER, STATUS_HEADER};
use kongflow_events::app::Roles;

use kongflow_events::amqp_ingest::{ORIGINAL_SIZE_HEADER, TRUNCATED_BODY_BYTES, TRUNCATED_HEADER};
use kongflow_events::ledger::JobKind;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{TestApp, wait_until};

const INGEST_ONLY: Roles = Roles {
    ingest: true,
    ..Roles::NONE
};

/// A channel in confirm mode on the test's connection.
async fn producer(app: &TestApp) -> Channel {
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
}

/// Native-form properties: JSON, persistent, the key (if any) and the contract version.
fn native(key: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(k) = key {
        headers.insert(API_KEY_HEADER.into(), AMQPValue::LongString(k.into()));
    }
    headers.insert(VERSION_HEADER.into(), AMQPValue::LongInt(1));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Publish to the ingest exchange with `mandatory` and wait for the broker's confirm.
async fn publish(
    app: &TestApp,
    channel: &Channel,
    routing_key: &str,
    properties: BasicProperties,
    body: &[u8],
) -> Confirmation {
    channel
        .basic_publish(
            app.topology.ingest_exchange().as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap()
}

/// The next `n` messages of a consumer, acknowledged, each with its headers.
async fn take(consumer: &mut lapin::Consumer, n: usize) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages came", out.len()))
            .expect("the consumer is open")
            .unwrap();
        let _ = next.ack(BasicAckOptions::default()).await;
        out.push(next);
    }
    out
}

fn header<'a>(d: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

fn header_text(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    match header(d, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// A reply: its correlation id, the status header and the body.
fn read_reply(d: &lapin::message::Delivery) -> (String, i64, Value) {
    let status = match header(d, STATUS_HEADER) {
        Some(AMQPValue::LongInt(s)) => *s as i64,
        other => panic!("status header: {other:?}"),
    };
    let correlation = d
        .properties
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_string())
        .unwrap_or_default();
    (
        correlation,
        status,
        serde_json::from_slice(&d.data).unwrap(),
    )
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// A consumer on the rejected queue.
async fn rejected_consumer(app: &TestApp) -> lapin::Consumer {
    let channel = app.amqp.create_channel().await.unwrap();
    channel
        .basic_consume(
            app.topology.rejected_queue().as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_is_stored_answered_and_run() {
    let app = TestApp::builder().start().await;
    app.register_job("native", "order.paid").await;
    app.register_job_from("cloud", "order.shipped", "/shop")
        .await;
    let channel = producer(&app).await;
    let (replies, mut consumer) = app.reply_queue().await;
    let asks = |p: BasicProperties, c: &str| {
        p.with_reply_to(replies.as_str().into())
            .with_correlation_id(c.into())
    };

    let body = json!({"event": {"name": "order.paid", "payload": {"total": 12}},
                      "options": {"accountId": "acct-1"}});
    let props = asks(native(Some(&app.api_key)), "n").with_message_id("native-1".into());
    let c = publish(&app, &channel, "send", props, body.to_string().as_bytes()).await;
    assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");

    for (prefix, id) in [("cloudEvents_", "ce-under"), ("cloudEvents:", "ce-colon")] {
        let mut h = FieldTable::default();
        let mut put = |k: &str, v: &str| {
            h.insert(
                format!("{prefix}{k}").as_str().into(),
                AMQPValue::LongString(v.into()),
            );
        };
        put("specversion", "1.0");
        put("id", id);
        put("type", "order.shipped");
        put("source", "/shop");
        put("time", "2026-11-01T10:00:00Z");
        put("subject", "order-7");
        h.insert(
            API_KEY_HEADER.into(),
            AMQPValue::LongString(app.api_key.as_str().into()),
        );
        let props = asks(
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(h),
            id,
        );
        publish(&app, &channel, "send", props, br#"{"carrier": "ups"}"#).await;
    }

    let structured = json!({"specversion": "1.0", "id": "ce-structured", "type": "order.shipped",
                            "source": "/shop", "data": {"carrier": "dhl"}});
    let mut h = FieldTable::default();
    h.insert(
        API_KEY_HEADER.into(),
        AMQPValue::LongString(app.api_key.as_str().into()),
    );
    let props = asks(
        BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_headers(h),
        "ce-structured",
    );
    publish(
        &app,
        &channel,
        "send",
        props,
        structured.to_string().as_bytes(),
    )
    .await;

    let answers: HashMap<String, (i64, Value)> = take(&mut consumer, 4)
        .await
        .iter()
        .map(read_reply)
        .map(|(c, s, b)| (c, (s, b)))
        .collect();
    assert_eq!(answers["n"].0, 200, "{:?}", answers["n"]);
    assert_eq!(answers["n"].1["id"], "native-1");
    assert_eq!(answers["n"].1["payload"], json!({"total": 12}));
    for id in ["ce-under", "ce-colon", "ce-structured"] {
        assert_eq!(answers[id].0, 200, "{:?}", answers[id]);
        assert_eq!(answers[id].1["id"], id);
        assert_eq!(answers[id].1["name"], "order.shipped");
    }
    assert_eq!(
        answers["ce-under"].1["timestamp"],
        "2026-11-01T10:00:00.000Z"
    );
    assert_eq!(answers["ce-under"].1["context"]["subject"], "order-7");

    for (id, job) in [
        ("native-1", "native"),
        ("ce-under", "cloud"),
        ("ce-colon", "cloud"),
        ("ce-structured", "cloud"),
    ] {
        wait_until(
            &format!("a run for {id}"),
            Duration::from_secs(20),
            || async { app.runs_by_job(id).await == vec![(job.to_string(), 1)] },
        )
        .await;
    }
    let account: Option<String> = sqlx::query_scalar(
        "SELECT a.identifier FROM event_records e JOIN external_accounts a
         ON a.id = e.external_account_id WHERE e.event_id = 'native-1'",
    )
    .fetch_optional(&app.pool)
    .await
    .unwrap();
    assert_eq!(account.as_deref(), Some("acct-1"));
    app.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_rejected_with_their_reason_and_never_stop_the_consumer() {
    let app = TestApp::builder().roles(INGEST_ONLY).start().await;
    let channel = producer(&app).await;
    let (replies, mut reply_consumer) = app.reply_queue().await;
    let key = app.api_key.as_str();
    let good = |name: &str| json!({"event": {"name": name}}).to_string().into_bytes();
    let big_payload = json!({"event": {"name": "big", "payload": "x".repeat(600 * 1024)}});
    let cases: Vec<(&str, BasicProperties, Vec<u8>, &str, i64)> = vec![
        (
            "garbage",
            native(Some(key)),
            b"\x00\xff{not json".to_vec(),
            "bad_json",
            400,
        ),
        (
            "shape",
            native(Some(key)),
            br#"{"name": "flat"}"#.to_vec(),
            "bad_shape",
            400,
        ),
        (
            "wrong-key",
            native(Some("tr_dev_not_a_key")),
            good("a"),
            "unauthorized",
            401,
        ),
        ("no-key", native(None), good("a"), "missing_key", 401),
        (
            "payload",
            native(Some(key)),
            big_payload.to_string().into_bytes(),
            "too_large",
            413,
        ),
        (
            "body",
            native(Some(key)),
            vec![b' '; 3 * 1024 * 1024],
            "too_large",
            413,
        ),
        (
            "version",
            {
                let mut h = FieldTable::default();
                h.insert(API_KEY_HEADER.into(), AMQPValue::LongString(key.into()));
                h.insert(VERSION_HEADER.into(), AMQPValue::LongInt(2));
                native(None).with_headers(h)
            },
            good("a"),
            "unknown_version",
            400,
        ),
        (
            "type",
            native(Some(key)).with_content_type("text/plain".into()),
            good("a"),
            "unsupported_content_type",
            415,
        ),
        ("name", native(Some(key)), good(""), "invalid", 400),
        (
            "nul",
            native(Some(key)),
            br#"{"event": {"name": "n", "payload": "a\u0000b"}}"#.to_vec(),
            "invalid",
            400,
        ),
        // Cut short: not JSON at all, whatever shape it began.
        (
            "truncated-list",
            native(Some(key)),
            b"[1, 2".to_vec(),
            "bad_json",
            400,
        ),
        (
            "truncated-object",
            native(Some(key)),
            br#"{"event": "x""#.to_vec(),
            "bad_json",
            400,
        ),
        // A NUL in text data is refused when read, like one in JSON.
        (
            "text-nul",
            {
                let mut h = FieldTable::default();
                h.insert(API_KEY_HEADER.into(), AMQPValue::LongString(key.into()));
                for (k, v) in [
                    ("ce-specversion", "1.0"),
                    ("ce-id", "text-nul"),
                    ("ce-type", "t"),
                    ("ce-source", "/s"),
                ] {
                    h.insert(k.into(), AMQPValue::LongString(v.into()));
                }
                BasicProperties::default()
                    .with_content_type("text/plain".into())
                    .with_headers(h)
            },
            b"a\0b".to_vec(),
            "invalid",
            400,
        ),
    ];
    for (id, props, body, _, _) in &cases {
        let props = props
            .clone()
            .with_message_id((*id).into())
            .with_correlation_id((*id).into())
            .with_reply_to(replies.as_str().into());
        publish(&app, &channel, "send", props, body).await;
    }
    // The consumer goes on: a good message after the bad ones is stored.
    let props = native(Some(key))
        .with_message_id("after".into())
        .with_correlation_id("after".into())
        .with_reply_to(replies.as_str().into());
    publish(&app, &channel, "send", props, &good("after")).await;

    let expected: HashMap<&str, (&str, i64)> = cases
        .iter()
        .map(|(id, _, _, reason, status)| (*id, (*reason, *status)))
        .collect();
    let answers = take(&mut reply_consumer, cases.len() + 1).await;
    for d in &answers {
        let (correlation, status, body) = read_reply(d);
        if correlation == "after" {
            assert_eq!((status, &body["id"]), (200, &json!("after")));
            continue;
        }
        let (_, want) = expected[correlation.as_str()];
        assert_eq!(status, want, "{correlation}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
        if correlation == "text-nul" {
            assert!(
                body["error"].as_str().unwrap().contains("NUL"),
                "refused when read, not by the database: {body}"
            );
        }
    }

    let mut rejected = rejected_consumer(&app).await;
    for d in take(&mut rejected, cases.len()).await {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .to_string();
        let (reason, _) = expected[id.as_str()];
        assert_eq!(
            header_text(&d, REASON_HEADER).as_deref(),
            Some(reason),
            "{id}"
        );
        assert!(header_text(&d, ERROR_HEADER).is_some(), "{id}");
        assert!(
            header(&d, API_KEY_HEADER).is_none(),
            "{id}: the rejected copy carries the API key"
        );
        assert!(
            !String::from_utf8_lossy(&d.data).contains(key),
            "{id}: the body carries the key"
        );
        let original = &cases.iter().find(|c| c.0 == id).unwrap().2;
        if reason == "too_large" {
            // Only the beginning of a message too large is kept, and the copy says so.
            assert_eq!(
                d.data[..],
                original[..TRUNCATED_BODY_BYTES],
                "{id}: the copy keeps the body's beginning"
            );
            assert_eq!(
                header(&d, TRUNCATED_HEADER),
                Some(&AMQPValue::Boolean(true)),
                "{id}"
            );
            assert_eq!(
                header(&d, ORIGINAL_SIZE_HEADER),
                Some(&AMQPValue::LongLongInt(original.len() as i64)),
                "{id}"
            );
        } else {
            assert_eq!(&d.data, original, "{id}: the copy keeps the body");
            assert!(header(&d, TRUNCATED_HEADER).is_none(), "{id}");
        }
    }
    assert_eq!(count(&app, "SELECT count(*) FROM event_records").await, 1);
    assert_eq!(app.depth_of(&app.topology.ingest_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_per_id_however_often_and_however_it_comes() {
    let app = TestApp::builder()
        .roles(Roles {
            http: true,
            ingest: true,
            ..Roles::NONE
        })
        .start()
        .await;
    let channel = producer(&app).await;
    let (replies, mut consumer) = app.reply_queue().await;
    let key = app.api_key.clone();
    let ask = |p: BasicProperties, c: &str| {
        p.with_reply_to(replies.as_str().into())
            .with_correlation_id(c.into())
    };
    // The same message twice, with an id.
    let body = json!({"event": {"name": "twice", "payload": {"n": 1}}}).to_string();
    for c in ["id-1", "id-2"] {
        let props = ask(native(Some(&key)), c).with_message_id("dup-1".into());
        publish(&app, &channel, "send", props, body.as_bytes()).await;
    }
    // The same message twice, without one.
    let anonymous = json!({"event": {"name": "anonymous"}}).to_string();
    for c in ["anon-1", "anon-2"] {
        publish(
            &app,
            &channel,
            "send",
            ask(native(Some(&key)), c),
            anonymous.as_bytes(),
        )
        .await;
    }
    // Over HTTP first, then over AMQP.
    app.send_event(&key, json!({"event": {"name": "both", "id": "both-1"}}))
        .await;
    let both = json!({"event": {"name": "both", "id": "both-1", "payload": {"late": true}}});
    publish(
        &app,
        &channel,
        "send",
        ask(native(Some(&key)), "both"),
        both.to_string().as_bytes(),
    )
    .await;

    let answers: HashMap<String, (i64, Value)> = take(&mut consumer, 5)
        .await
        .iter()
        .map(read_reply)
        .map(|(c, s, b)| (c, (s, b)))
        .collect();
    assert!(answers.values().all(|(s, _)| *s == 200), "{answers:?}");
    assert_eq!(answers["id-1"].1, answers["id-2"].1);
    assert_eq!(answers["anon-1"].1["id"], answers["anon-2"].1["id"]);
    // The stored event answers; the resend did not replace a payload due now.
    assert_eq!(answers["both"].1["payload"], Value::Null);
    assert_eq!(count(&app, "SELECT count(*) FROM event_records").await, 3);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM queue_jobs WHERE kind = 'deliverEvent'"
        )
        .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_publish_comes_back_to_a_mandatory_producer() {
    let app = TestApp::builder().roles(INGEST_ONLY).start().await;
    let channel = producer(&app).await;
    let body = json!({"event": {"name": "lost"}}).to_string();
    match publish(
        &app,
        &channel,
        "no-such-key",
        native(Some(&app.api_key)),
        body.as_bytes(),
    )
    .await
    {
        Confirmation::Ack(Some(returned)) => {
            assert_eq!(returned.reply_code, 312, "NO_ROUTE");
        }
        other => panic!("expected the message back, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_consumer_killed_between_commit_and_ack_stores_and_runs_once() {
    // Relay and worker in this process; ingest in a child we kill.
    let app = TestApp::builder()
        .roles(Roles {
            relay: true,
            worker: true,
            ..Roles::NONE
        })
        .start()
        .await;
    app.register_job("job", "killed").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("ingest")
        .envs(app.child_env())
        .env("RUST_LOG", "error")
        .env("KONGFLOW_FAILPOINTS", "ingest-after-commit")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait for the consumer, so the message is not left to the one started later.
    wait_until("the ingest consumer", Duration::from_secs(30), || async {
        app.depth_of(&app.topology.ingest_queue()).await == 0
            && app
                .channel
                .queue_declare(
                    app.topology.ingest_queue().as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap()
                .consumer_count()
                > 0
    })
    .await;
    let channel = producer(&app).await;
    let (replies, mut consumer) = app.reply_queue().await;
    // No id: the one derived from the body must make the redelivery the same event.
    let body = json!({"event": {"name": "killed", "payload": {"k": 1}}}).to_string();
    let props = native(Some(&app.api_key))
        .with_reply_to(replies.as_str().into())
        .with_correlation_id("k".into());
    publish(&app, &channel, "send", props, body.as_bytes()).await;

    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("failpoint ingest-after-commit reached") {
                return;
            }
        }
        panic!("the child ended before its failpoint");
    })
    .await
    .expect("the child reaches its failpoint");
    assert_eq!(
        count(&app, "SELECT count(*) FROM event_records").await,
        1,
        "the batch is committed before the kill"
    );
    child.kill().await.unwrap(); // SIGKILL

    let mut next = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .arg("ingest")
        .envs(app.child_env())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The redelivered message is answered only by the consumer that handled it.
    let (_, status, reply) = read_reply(&take(&mut consumer, 1).await[0]);
    assert_eq!(status, 200, "{reply}");
    app.settle().await;
    assert_eq!(count(&app, "SELECT count(*) FROM event_records").await, 1);
    app.assert_completed_once(JobKind::DeliverEvent, 1).await;
    assert_eq!(
        app.runs_by_job(reply["id"].as_str().unwrap()).await,
        vec![("job".to_string(), 1)]
    );
    next.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_several_publishers_stores_each_good_message_once_and_rejects_each_bad_one() {
    const MESSAGES: usize = 10_000;
    const PUBLISHERS: usize = 4;
    let app = TestApp::builder().start().await;
    app.register_job("burst", "burst").await;
    // Every tenth message is bad, in one of five ways.
    let bad = |i: usize| i.is_multiple_of(10).then_some((i / 10) % 5);
    let reasons = [
        "bad_json",
        "bad_shape",
        "unauthorized",
        "missing_key",
        "invalid",
    ];
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let conn = kongflow_events::amqp::connect(&app.store.amqp_url, "burst")
            .await
            .unwrap();
        let exchange = app.topology.ingest_exchange();
        let key = app.api_key.clone();
        tasks.push(tokio::spawn(async move {
            let channel = conn.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut confirms = Vec::new();
            for i in (p..MESSAGES).step_by(PUBLISHERS) {
                let good = json!({"event": {"name": "burst", "payload": {"i": i}}}).to_string();
                let (props, body) = match bad(i) {
                    None => (native(Some(&key)), good.into_bytes()),
                    Some(0) => (native(Some(&key)), b"{{{".to_vec()),
                    Some(1) => (native(Some(&key)), br#"{"event": 1}"#.to_vec()),
                    Some(2) => (native(Some("tr_wrong")), good.into_bytes()),
                    Some(3) => (native(None), good.into_bytes()),
                    Some(_) => (
                        native(Some(&key)),
                        json!({"event": {"name": ""}}).to_string().into_bytes(),
                    ),
                };
                let props = props.with_message_id(format!("b-{i}").as_str().into());
                confirms.push(
                    channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "send".into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            &body,
                            props,
                        )
                        .await
                        .unwrap(),
                );
            }
            for c in confirms {
                assert!(matches!(c.await.unwrap(), Confirmation::Ack(None)));
            }
            let _ = conn.close(200, "done".into()).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let bad_count = (0..MESSAGES).filter(|i| bad(*i).is_some()).count();
    let good_count = (MESSAGES - bad_count) as i64;

    let mut rejected = rejected_consumer(&app).await;
    for d in take(&mut rejected, bad_count).await {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .to_string();
        let i: usize = id.trim_start_matches("b-").parse().unwrap();
        let want = reasons[bad(i).expect("only bad messages are rejected")];
        assert_eq!(
            header_text(&d, REASON_HEADER).as_deref(),
            Some(want),
            "{id}"
        );
        assert!(header(&d, API_KEY_HEADER).is_none(), "{id} carries the key");
    }
    wait_until("every good event run", Duration::from_secs(240), || async {
        count(&app, "SELECT count(*) FROM job_runs").await == good_count
    })
    .await;
    app.settle().await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM event_records").await,
        good_count
    );
    assert_eq!(
        count(&app, "SELECT count(DISTINCT event_record_id) FROM job_runs").await,
        good_count
    );
    app.assert_completed_once(JobKind::DeliverEvent, good_count as usize)
        .await;
    // Nothing more was rejected than the bad ones.
    assert_eq!(app.depth_of(&app.topology.rejected_queue()).await, 0);
}

/// `{"a": {"a": ... 1}}`, `depth` objects deep.
fn nest(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "a": inner }))
}

/// The depth limit of payloads and contexts (`events::MAX_JSON_DEPTH`), written out so this
/// test fails, rather than not compiling, on a build without it.
const DEPTH_LIMIT: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_depth_limit_holds_on_every_ingest_path() {
    assert_eq!(kongflow_events::events::MAX_JSON_DEPTH, DEPTH_LIMIT);
    let app = TestApp::builder()
        .roles(Roles {
            http: true,
            ingest: true,
            ..Roles::NONE
        })
        .start()
        .await;
    let key = app.api_key.clone();
    let names_the_limit = |v: &Value| {
        v.to_string().contains(&format!("{DEPTH_LIMIT}")) && v.to_string().contains("deep")
    };
    // HTTP, one event: payload, and context.
    // One past the limit, and past what a JSON parser takes (serde_json stops at 128): each
    // refused with the limit named.
    for (depth, status) in [
        (DEPTH_LIMIT, reqwest::StatusCode::OK),
        (DEPTH_LIMIT + 1, reqwest::StatusCode::BAD_REQUEST),
        (200, reqwest::StatusCode::BAD_REQUEST),
    ] {
        for field in ["payload", "context"] {
            let (s, v) = app
                .request(
                    reqwest::Method::POST,
                    "/api/v1/events",
                    Some(&key),
                    Some(
                        json!({"event": {"name": "deep", "id": format!("h-{field}-{depth}"),
                                          field: nest(depth)}}),
                    ),
                )
                .await;
            assert_eq!(s, status, "HTTP {field} {depth}: {v}");
            if s != reqwest::StatusCode::OK {
                assert!(names_the_limit(&v), "{v}");
            }
        }
        // HTTP bulk.
        let (s, v) = app
            .request(
                reqwest::Method::POST,
                "/api/v1/events/bulk",
                Some(&key),
                Some(
                    json!({"events": [{"name": "deep", "id": format!("b-{depth}"),
                                        "payload": nest(depth)}]}),
                ),
            )
            .await;
        assert_eq!(s, status, "bulk {depth}: {v}");
        if s != reqwest::StatusCode::OK {
            assert!(names_the_limit(&v), "{v}");
        }
    }

    // AMQP: native, CloudEvents binary, CloudEvents structured; each at the limit and one past.
    let channel = producer(&app).await;
    let (replies, mut consumer) = app.reply_queue().await;
    let keyed = || {
        let mut h = FieldTable::default();
        h.insert(
            API_KEY_HEADER.into(),
            AMQPValue::LongString(key.as_str().into()),
        );
        h
    };
    let mut sent = 0;
    for depth in [DEPTH_LIMIT, DEPTH_LIMIT + 1, 200] {
        let native_body = json!({"event": {"name": "deep", "id": format!("n-{depth}"),
                                           "payload": nest(depth)}});
        let mut binary = keyed();
        for (k, v) in [
            ("ce-specversion", "1.0".to_string()),
            ("ce-id", format!("ceb-{depth}")),
            ("ce-type", "deep".to_string()),
            ("ce-source", "/deep".to_string()),
        ] {
            binary.insert(k.into(), AMQPValue::LongString(v.as_str().into()));
        }
        let structured = json!({"specversion": "1.0", "id": format!("ces-{depth}"),
                                "type": "deep", "source": "/deep", "data": nest(depth)});
        let messages = [
            (
                format!("native-{depth}"),
                native(Some(&key)),
                native_body.to_string(),
            ),
            (
                format!("binary-{depth}"),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(binary),
                nest(depth).to_string(),
            ),
            (
                format!("structured-{depth}"),
                BasicProperties::default()
                    .with_content_type("application/cloudevents+json".into())
                    .with_headers(keyed()),
                structured.to_string(),
            ),
        ];
        for (c, props, body) in messages {
            let props = props
                .with_reply_to(replies.as_str().into())
                .with_correlation_id(c.as_str().into());
            publish(&app, &channel, "send", props, body.as_bytes()).await;
            sent += 1;
        }
    }
    let mut rejected = 0;
    for d in take(&mut consumer, sent).await {
        let (c, status, body) = read_reply(&d);
        if c.ends_with(&format!("-{DEPTH_LIMIT}")) {
            assert_eq!(status, 200, "{c}: {body}");
        } else {
            assert_eq!(status, 400, "{c}: {body}");
            assert!(names_the_limit(&body), "{c}: {body}");
            rejected += 1;
        }
    }
    assert_eq!(rejected, 6);
    let mut copies = rejected_consumer(&app).await;
    for d in take(&mut copies, 6).await {
        assert_eq!(header_text(&d, REASON_HEADER).as_deref(), Some("invalid"));
    }
    // Stored: two HTTP events and one bulk at the limit, and the three AMQP ones.
    assert_eq!(count(&app, "SELECT count(*) FROM event_records").await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_only_to_reply_queues() {
    let app = TestApp::builder().roles(INGEST_ONLY).start().await;
    let channel = producer(&app).await;
    let key = app.api_key.clone();
    // A queue anyone could name: the service's runs queue, and some other queue.
    let victim = format!("kft-victim-{}", uuid::Uuid::new_v4().simple());
    app.channel
        .queue_declare(
            victim.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let good = |id: &str| json!({"event": {"name": "reply", "id": id}}).to_string();
    for (i, target) in [app.topology.runs_queue(), victim.clone()]
        .into_iter()
        .enumerate()
    {
        for (who, props) in [
            ("wrong", native(Some("tr_dev_not_a_key"))),
            ("none", native(None)),
            ("good", native(Some(&key))),
        ] {
            let id = format!("{who}-{i}");
            let props = props
                .with_reply_to(target.as_str().into())
                .with_message_id(id.as_str().into());
            publish(&app, &channel, "send", props, good(&id).as_bytes()).await;
        }
    }
    // Direct reply-to is answered, on the channel that asked.
    let direct = app.amqp.create_channel().await.unwrap();
    let mut answers = direct
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    direct
        .basic_publish(
            app.topology.ingest_exchange().as_str().into(),
            "send".into(),
            BasicPublishOptions::default(),
            json!({"event": {"name": "reply", "id": "direct"}})
                .to_string()
                .as_bytes(),
            native(Some(&key))
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id("direct".into()),
        )
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), answers.next())
        .await
        .expect("a direct reply")
        .unwrap()
        .unwrap();
    let (c, status, body) = read_reply(&answer);
    assert_eq!((c.as_str(), status), ("direct", 200), "{body}");
    // And a queue under the reply prefix (`<AMQP_PREFIX>.reply.` by default) is answered.
    let named = format!(
        "{}.reply.{}",
        app.topology.prefix(),
        uuid::Uuid::new_v4().simple()
    );
    let reply_channel = app.amqp.create_channel().await.unwrap();
    reply_channel
        .queue_declare(
            named.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut named_consumer = reply_channel
        .basic_consume(
            named.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let props = native(Some(&key))
        .with_reply_to(named.as_str().into())
        .with_correlation_id("named".into());
    publish(&app, &channel, "send", props, good("named").as_bytes()).await;
    let (c, status, _) = read_reply(&take(&mut named_consumer, 1).await[0]);
    assert_eq!((c.as_str(), status), ("named", 200));
    // Every message before them was handled: none was answered.
    wait_until("the rejected copies", Duration::from_secs(20), || async {
        app.depth_of(&app.topology.rejected_queue()).await == 4
            && count(&app, "SELECT count(*) FROM event_records").await == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.depth_of(&app.topology.runs_queue()).await, 0);
    assert_eq!(app.depth_of(&victim).await, 0);
}

#[test]
fn the_shipped_broker_refuses_messages_far_larger_than_the_service_takes() {
    let conf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rabbitmq/rabbitmq.conf"
    ))
    .unwrap();
    let max: usize = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("max_message_size"))
        .filter_map(|v| v.trim().strip_prefix('=')?.trim().parse().ok())
        .next()
        .expect("rabbitmq.conf sets max_message_size");
    let largest = kongflow_events::amqp_ingest::decode::MAX_MESSAGE_BYTES;
    assert!(
        max > largest && max <= 8 * 1024 * 1024,
        "max_message_size {max}: above the largest message the service takes ({largest}) \
         and at most 8 MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_over_its_rate_waits_over_amqp_and_the_others_flow() {
    let app = TestApp::builder().roles(INGEST_ONLY).start().await;
    let (slow, slow_key) = app.new_env("slow").await;
    sqlx::query("UPDATE runtime_environments SET max_events_per_second = 1 WHERE id = $1")
        .bind(slow.id)
        .execute(&app.pool)
        .await
        .unwrap();
    let stored = |env: uuid::Uuid| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM event_records WHERE environment_id = $1",
            )
            .bind(env)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let channel = producer(&app).await;
    let started = std::time::Instant::now();
    // 300 messages of the 1/s environment, and among them 30 of another one.
    let mut confirms = Vec::new();
    for i in 0..300 {
        let (key, id) = if i % 10 == 5 {
            (&app.api_key, format!("fast-{i}"))
        } else {
            (&slow_key, format!("slow-{i}"))
        };
        let body = json!({"event": {"name": "tick", "id": id}}).to_string();
        confirms.push(
            channel
                .basic_publish(
                    app.topology.ingest_exchange().as_str().into(),
                    "send".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body.as_bytes(),
                    native(Some(key)),
                )
                .await
                .unwrap(),
        );
    }
    for c in confirms {
        assert!(matches!(c.await.unwrap(), Confirmation::Ack(None)));
    }
    wait_until(
        "the other environment's events",
        Duration::from_secs(10),
        || async { stored(app.env.id).await == 30 },
    )
    .await;
    let slow_stored = stored(slow.id).await;
    let elapsed = started.elapsed().as_secs_f64();
    // A second's worth at once, then one a second (and the second the batch took).
    assert!(
        (slow_stored as f64) <= 2.0 + elapsed,
        "{slow_stored} events of a 1/s environment stored in {elapsed:.2} s"
    );
    // The others wait, not lost: they come back and are stored at the rate.
    wait_until(
        "more of the 1/s environment's events",
        Duration::from_secs(10),
        || async { stored(slow.id).await >= slow_stored + 2 },
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!((stored(slow.id).await as f64) <= 2.0 + elapsed);
    assert_eq!(
        app.depth_of(&app.topology.rejected_queue()).await,
        0,
        "nothing rejected"
    );
}
