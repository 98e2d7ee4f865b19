//! Property-based fuzzing of what reads untrusted input without a database: the filter
//! validator, the filter evaluator (and the dispatcher matcher built on it), the AMQP
//! ingest decoder and the job-message parser. Each must answer every input, garbage
//! included, without a panic, within its budget, and the same way twice.
//!
//! `PROPTEST_CASES=N cargo test --test fuzz` runs longer (256 cases per property by default).

use kongflow_events::amqp::JobMessage;
use kongflow_events::amqp_ingest::decode::{self, MAX_MESSAGE_BYTES};
use kongflow_events::events::filter::{self, Evaluator, MAX_FILTER_DEPTH};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Object keys: a few that filters and payloads share (so matches happen), and any text.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["a", "b", "name", "$gt", "$exists", "payload", ""])
            .prop_map(String::from),
        1 => any::<String>(),
    ]
}

/// Any JSON, up to a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop_oneof![Just("x".to_string()), any::<String>()].prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A content filter of trigger.dev's forms, with arguments of any type (right or wrong).
fn content_filter() -> impl Strategy<Value = Value> {
    let op = prop::sample::select(vec![
        "$startsWith",
        "$endsWith",
        "$ignoreCaseEquals",
        "$exists",
        "$isNull",
        "$anythingBut",
        "$gt",
        "$lt",
        "$gte",
        "$lte",
        "$between",
        "$includes",
        "$not",
        "$unknown",
    ]);
    (op, json_value()).prop_map(|(op, arg)| json!({ op: arg }))
}

/// Filters shaped like trigger.dev's (lists of values or of content filters, nested
/// objects), often valid, sometimes not.
fn filter_value() -> impl Strategy<Value = Value> {
    let list = prop_oneof![
        prop::collection::vec(prop_oneof![Just("x".to_string()), any::<String>()], 0..4)
            .prop_map(|v| json!(v)),
        prop::collection::vec(any::<i32>(), 0..4).prop_map(|v| json!(v)),
        prop::collection::vec(any::<bool>(), 0..3).prop_map(|v| json!(v)),
        prop::collection::vec(content_filter(), 0..4).prop_map(Value::Array),
        json_value(),
    ];
    list.prop_recursive(5, 48, 4, |inner| {
        prop::collection::btree_map(key(), inner, 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
    })
}

/// `depth` objects nested in one another.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(["x"]), |inner, _| json!({ "a": inner }))
}

proptest! {
    #[test]
    fn the_validator_answers_any_json(filter in json_value()) {
        let first = filter::validate_filter(&filter);
        prop_assert_eq!(&first, &filter::validate_filter(&filter));
        if let Err(message) = first {
            prop_assert!(message.starts_with('$'), "the error names a path: {message}");
        }
    }

    #[test]
    fn the_evaluator_answers_any_filter_on_any_payload_within_its_budget(
        filter in filter_value(),
        payload in prop::option::of(json_value()),
        budget in 1u64..5_000,
    ) {
        let mut evaluator = Evaluator::new(budget);
        let verdict = evaluator.matches(payload.as_ref(), &filter);
        // A walk that answers stayed within its budget; one over it stopped at the step
        // that crossed it (a step may charge a whole list at once).
        match verdict {
            Ok(_) => prop_assert!(evaluator.steps() <= budget, "{} steps of {budget}", evaluator.steps()),
            Err(_) => prop_assert!(evaluator.steps() <= budget + 64, "{} steps of {budget}", evaluator.steps()),
        }
        let mut again = Evaluator::new(budget);
        prop_assert_eq!(verdict.is_ok(), again.matches(payload.as_ref(), &filter).is_ok());
        let mut why = Evaluator::new(budget);
        if let (Ok(matched), Ok(mismatch)) = (verdict, why.first_mismatch(payload.as_ref(), &filter, "payload")) {
            // The dry run agrees with the verdict: a path exactly when there is no match.
            prop_assert_eq!(matched, mismatch.is_none());
        }
    }

    #[test]
    fn the_dispatcher_matcher_answers_any_event(
        payload_filter in prop::option::of(filter_value()),
        context_filter in prop::option::of(filter_value()),
        payload in json_value(),
        context in json_value(),
        request in any::<bool>(),
    ) {
        let payload_type = if request { "REQUEST" } else { "JSON" };
        let mut evaluator = Evaluator::new(10_000);
        let _ = evaluator.dispatcher_mismatch(
            payload_filter.as_ref(),
            context_filter.as_ref(),
            payload_type,
            &payload,
            &context,
        );
        prop_assert!(evaluator.steps() <= 10_000 + 64, "{} steps", evaluator.steps());
    }

    #[test]
    fn the_ingest_decoder_answers_any_message(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            json_value().prop_map(|v| serde_json::to_vec(&json!({"event": v, "options": v})).unwrap()),
        ],
        content_type in prop::option::of(prop::sample::select(vec![
            "application/json",
            "application/cloudevents+json",
            "text/plain",
            "application/json; charset=utf-8",
            "",
        ])),
        headers in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "x-kongflow-api-key", "x-kongflow-version", "ce-specversion", "ce-id",
                    "ce-type", "ce-source", "ce-time", "cloudEvents:id", "cloudEvents_type",
                    "ce-deliverafter", "ce-accountid", "other",
                ]),
                prop_oneof![
                    any::<String>().prop_map(|s| AMQPValue::LongString(s.into())),
                    any::<i64>().prop_map(AMQPValue::LongLongInt),
                    any::<bool>().prop_map(AMQPValue::Boolean),
                    Just(AMQPValue::LongString("1.0".into())),
                ],
            ),
            0..6,
        ),
    ) {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(ShortString::from(name), value);
        }
        let mut properties = BasicProperties::default().with_headers(table);
        if let Some(t) = content_type {
            properties = properties.with_content_type(t.into());
        }
        let request = decode::decode(&properties, &body);
        if let Err(rejection) = &request.send {
            prop_assert!((400..500).contains(&rejection.reason.status()));
        }
        let _ = decode::without_key(&properties);
    }

    #[test]
    fn the_job_message_parser_answers_any_bytes(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ],
    ) {
        let _ = JobMessage::parse(&body);
    }
}

#[test]
fn deep_and_huge_inputs_are_refused_without_exhausting_the_stack_or_memory() {
    // A filter one level too deep is refused; the evaluator walks a deep one within budget.
    assert!(filter::validate_filter(&nested(MAX_FILTER_DEPTH)).is_ok());
    assert!(filter::validate_filter(&nested(MAX_FILTER_DEPTH + 1)).is_err());
    let deep = nested(120);
    let mut evaluator = Evaluator::new(50);
    assert!(
        evaluator.matches(Some(&deep), &deep).is_err(),
        "over budget"
    );

    // Bodies nested 100,000 deep: serde's recursion limit answers, no stack overflow.
    let brackets = "[".repeat(100_000).into_bytes();
    let properties = BasicProperties::default().with_content_type("application/json".into());
    assert!(decode::decode(&properties, &brackets).send.is_err());
    assert!(JobMessage::parse(&brackets).is_err());
    let objects = r#"{"event":"#.repeat(50_000).into_bytes();
    assert!(decode::decode(&properties, &objects).send.is_err());

    // A body past the limit is refused before it is parsed.
    let big = vec![b'{'; MAX_MESSAGE_BYTES + 1];
    let rejection = decode::decode(&properties, &big).send.unwrap_err();
    assert_eq!(rejection.reason.status(), 413);
}
