//! Event filters against the reference: trigger.dev v2's `eventFilterMatches` from
//! `@trigger.dev/core` 2.3.x (npm), run by `tests/sdk/filter-oracle.mjs` on generated
//! filters and payloads.

use kongflow_events::events::filter::{dispatcher_matches, event_filter_matches, validate_filter};
use serde_json::{Map, Value, json};

/// xorshift64: the same cases on every run.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

const KEYS: &[&str] = &["a", "b", "n", "s", "list", "obj", "0", "length"];
const STRINGS: &[&str] = &[
    "abc", "ABC", "Abc", "ábc", "abC ", "", "e\u{301}", "é", "É", "E", "ß", "SS", "ss", "σ", "ς",
    "Σ", "i", "I", "İ", "ı", "straße", "STRASSE", "x", "xyz", "a\u{0}b", "ab", "😀",
];
const NUMBERS: &[f64] = &[-2.0, 0.0, 1.0, 1.5, 2.0, 3.0, 10.0, 100.0];

fn scalar(g: &mut Gen) -> Value {
    match g.below(5) {
        0 | 1 => json!(g.pick(STRINGS)),
        2 => json!(g.pick(NUMBERS)),
        3 => json!(g.below(2) == 0),
        _ => Value::Null,
    }
}

/// A string, number or boolean (what operators take).
fn value(g: &mut Gen) -> Value {
    match g.below(3) {
        0 => json!(g.pick(STRINGS)),
        1 => json!(g.pick(NUMBERS)),
        _ => json!(g.below(2) == 0),
    }
}

fn payload(g: &mut Gen, depth: usize) -> Value {
    let mut map = Map::new();
    for _ in 0..g.below(5) {
        let value = match g.below(if depth > 1 { 4 } else { 6 }) {
            0..=2 => scalar(g),
            3 => Value::Array((0..g.below(4)).map(|_| scalar(g)).collect()),
            4 => payload(g, depth + 1),
            _ => Value::Array((0..g.below(3)).map(|_| payload(g, depth + 1)).collect()),
        };
        map.insert(g.pick(KEYS).to_string(), value);
    }
    Value::Object(map)
}

fn content_filter(g: &mut Gen) -> Value {
    match g.below(13) {
        0 => json!({"$startsWith": g.pick(STRINGS)}),
        1 => json!({"$endsWith": g.pick(STRINGS)}),
        2 => json!({"$ignoreCaseEquals": g.pick(STRINGS)}),
        3 => json!({"$exists": g.below(2) == 0}),
        4 => json!({"$isNull": g.below(2) == 0}),
        5 => {
            if g.below(2) == 0 {
                json!({"$anythingBut": value(g)})
            } else {
                json!({"$anythingBut": [g.pick(STRINGS), g.pick(STRINGS)]})
            }
        }
        6 => json!({"$gt": g.pick(NUMBERS)}),
        7 => json!({"$lt": g.pick(NUMBERS)}),
        8 => json!({"$gte": g.pick(NUMBERS)}),
        9 => json!({"$lte": g.pick(NUMBERS)}),
        10 => {
            let (a, b) = (g.pick(NUMBERS), g.pick(NUMBERS));
            json!({"$between": [a.min(b), a.max(b)]})
        }
        11 => json!({"$includes": value(g)}),
        _ => json!({"$not": value(g)}),
    }
}

fn filter(g: &mut Gen, depth: usize) -> Value {
    let mut map = Map::new();
    for _ in 0..1 + g.below(3) {
        let value = match g.below(if depth > 1 { 5 } else { 6 }) {
            0 => Value::Array(
                (0..1 + g.below(3))
                    .map(|_| json!(g.pick(STRINGS)))
                    .collect(),
            ),
            1 => Value::Array(
                (0..1 + g.below(3))
                    .map(|_| json!(g.pick(NUMBERS)))
                    .collect(),
            ),
            2 => Value::Array(
                (0..1 + g.below(2))
                    .map(|_| json!(g.below(2) == 0))
                    .collect(),
            ),
            3 | 4 => Value::Array((0..1 + g.below(2)).map(|_| content_filter(g)).collect()),
            _ => filter(g, depth + 1),
        };
        map.insert(g.pick(KEYS).to_string(), value);
    }
    Value::Object(map)
}

/// A pattern likely to pass for `v` (and sometimes not).
fn pattern_for(g: &mut Gen, v: &Value, depth: usize) -> Value {
    match v {
        Value::String(s) => {
            let chars: Vec<char> = s.chars().collect();
            let cut = if chars.is_empty() {
                0
            } else {
                g.below(chars.len() + 1)
            };
            let head: String = chars[..cut].iter().collect();
            let tail: String = chars[cut..].iter().collect();
            match g.below(8) {
                0 => json!([s, g.pick(STRINGS)]),
                1 => json!([{"$startsWith": head}]),
                2 => json!([{"$endsWith": tail}]),
                3 => json!([{"$ignoreCaseEquals": s.to_uppercase()}]),
                4 => json!([{"$ignoreCaseEquals": s.to_lowercase()}]),
                5 => json!([{"$exists": true}, {"$not": g.pick(STRINGS)}]),
                6 => json!([{"$anythingBut": [g.pick(STRINGS), g.pick(STRINGS)]}]),
                _ => json!([{"$ignoreCaseEquals": g.pick(STRINGS)}]),
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap();
            match g.below(5) {
                0 => json!([x, g.pick(NUMBERS)]),
                1 => json!([{"$gte": x}]),
                2 => json!([{"$between": [x - 1.0, x + 1.0]}]),
                3 => json!([{"$lt": x + 1.0}, {"$gt": x - 1.0}]),
                _ => json!([{"$anythingBut": g.pick(NUMBERS)}]),
            }
        }
        Value::Bool(b) => json!([*b]),
        Value::Null => json!([{"$isNull": g.below(4) != 0}]),
        Value::Array(items) => match items.get(g.below(items.len().max(1))) {
            Some(Value::Object(_)) if depth < 3 => filter_for(g, &items[0], depth + 1),
            Some(item) if !item.is_null() && !item.is_array() && !item.is_object() => {
                json!([{"$includes": item}])
            }
            _ => json!([{"$exists": true}]),
        },
        Value::Object(_) if depth < 3 => filter_for(g, v, depth + 1),
        _ => json!([{"$exists": g.below(2) == 0}]),
    }
}

/// A filter built from a payload's own fields, with random parts mixed in.
fn filter_for(g: &mut Gen, payload: &Value, depth: usize) -> Value {
    let Value::Object(map) = payload else {
        return filter(g, depth);
    };
    let keys: Vec<&String> = map.keys().collect();
    let mut out = Map::new();
    for _ in 0..1 + g.below(2) {
        if keys.is_empty() || g.below(5) == 0 {
            let random = filter(g, depth + 1);
            out.extend(random.as_object().unwrap().clone());
        } else {
            let k = keys[g.below(keys.len())];
            out.insert(k.clone(), pattern_for(g, &map[k], depth));
        }
    }
    Value::Object(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_match_exactly_as_the_reference_implementation() {
    let dir = format!("{}/tests/sdk", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{dir}/node_modules/@trigger.dev/core")).exists(),
        "run `npm ci` in tests/sdk (scripts/test.sh does)"
    );
    let mut g = Gen(0x2545_F491_4F6C_DD1D);
    let mut cases = Vec::new();
    for i in 0..5_000 {
        let p = payload(&mut g, 0);
        let f = if i % 3 == 0 {
            filter(&mut g, 0)
        } else {
            filter_for(&mut g, &p, 0)
        };
        assert!(
            validate_filter(&f).is_ok(),
            "generated filters are valid: {f}"
        );
        let case = match i % 20 {
            0 => json!({"filter": f}),
            1 => json!({"payload": null, "filter": f}),
            _ => json!({"payload": p, "filter": f}),
        };
        cases.push(case);
    }
    // Whole dispatchers, as trigger.dev's EventMatcher evaluates them: the event against
    // `{payload: filter, context: {}}` (array payloads then match element by element).
    let generated = cases.len();
    for i in 0..generated {
        let c = cases[i].clone();
        let payload = c.get("payload").cloned().unwrap_or(Value::Null);
        let payload = if i % 7 == 0 {
            Value::Array(vec![payload.clone(), json!({"a": "abc"})])
        } else {
            payload
        };
        cases.push(json!({
            "dispatcher": true,
            "payload": {"payload": payload, "context": null},
            "filter": {"payload": c["filter"], "context": {}},
        }));
    }
    // The reference, by hand: the edge cases the issue names.
    cases.push(json!({"filter": {}}));
    cases.push(json!({"payload": null, "filter": {}}));
    cases.push(json!({"payload": {"list": [{"a": 1}, {"a": 2}]}, "filter": {"list": {"a": [2]}}}));

    let mut child = tokio::process::Command::new("node")
        .arg("filter-oracle.mjs")
        .current_dir(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node runs");
    let input = serde_json::to_vec(&cases).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &input)
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let expected: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(expected.len(), cases.len());

    let mut mismatches = Vec::new();
    let (mut matched, mut not) = (0, 0);
    for (case, want) in cases.iter().zip(&expected) {
        let want = want
            .as_bool()
            .unwrap_or_else(|| panic!("the reference threw on a valid filter: {case}"));
        let got = if case.get("dispatcher").is_some() {
            dispatcher_matches(
                Some(&case["filter"]["payload"]),
                None,
                "JSON",
                &case["payload"]["payload"],
                &Value::Null,
            )
        } else {
            event_filter_matches(case.get("payload"), &case["filter"])
        };
        if want {
            matched += 1;
        } else {
            not += 1;
        }
        if got != want {
            mismatches.push(format!("{case} -> reference {want}, ours {got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ, e.g.:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches[..mismatches.len().min(15)].join("\n")
    );
    eprintln!("{} cases: {matched} match, {not} do not", cases.len());
    // The generator reaches both outcomes often.
    assert!(matched > 500 && not > 500, "{matched} match, {not} do not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_filter_is_refused_at_registration_with_its_path() {
    let app = crate::helpers::TestApp::builder().start().await;
    let key = app.api_key.clone();
    for (trigger, needle) in [
        (
            json!({"event": "x", "payload": {"a": [{"$gt": "3"}]}}),
            "trigger.payload.a[0].$gt: must be a number",
        ),
        (
            json!({"event": "x", "context": {"user": {"plan": "pro"}}}),
            "trigger.context.user.plan: must be a list",
        ),
        (
            json!({"event": "x", "payload": {"a": [{"$sortOf": 1}]}}),
            "trigger.payload.a[0]: unknown operator \"$sortOf\"",
        ),
        (
            json!({"event": "x", "payload": [1]}),
            "trigger.payload: must be an object",
        ),
    ] {
        let (status, body) = app
            .request(
                reqwest::Method::PUT,
                "/api/v1/jobs/bad",
                Some(&key),
                Some(json!({"version": "1.0.0", "trigger": trigger})),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(needle), "{error} does not say {needle}");
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "nothing registered");
}
