//! Event filters, with the semantics of trigger.dev v2's `eventFilterMatches`.
//!
//! A filter is a JSON object whose keys name fields of the payload (or context) and whose
//! values are either a list (of strings, numbers or booleans: the field must equal one of
//! them; of content filters such as `{"$startsWith": "a"}`: the field must pass all of
//! them) or a nested filter for a nested object (an array field matches when any element
//! does). An absent or null payload matches only the empty filter. Evaluation is total: no
//! JSON, however odd, makes it panic.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// What trigger.dev matches a dispatcher's filters against (its `EventMatcher`): for a JSON
/// event, `{payload, context}`; for a REQUEST event (a payload of `url`, `method`,
/// `headers`, `rawBody`) with a `content-type` header holding `application/json`, the same
/// with the payload `{url, method, headers, body}` (the parsed body); for any other REQUEST,
/// the request itself (so only dispatchers without filters match). `None` when the REQUEST
/// payload is not a request, or its JSON body does not parse: it matches nothing.
pub fn match_subject(payload_type: &str, payload: &Value, context: &Value) -> Option<Value> {
    if payload_type != "REQUEST" {
        return Some(serde_json::json!({"payload": payload, "context": context}));
    }
    let request = parse_request(payload)?;
    let content_type = request
        .headers
        .get("content-type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if content_type.contains("application/json") {
        let body: Value = serde_json::from_str(request.raw_body).ok()?;
        Some(serde_json::json!({
            "payload": {
                "url": request.url,
                "method": request.method,
                "headers": request.headers,
                "body": body,
            },
            "context": context,
        }))
    } else {
        Some(serde_json::json!({
            "url": request.url,
            "method": request.method,
            "headers": request.headers,
            "rawBody": request.raw_body,
        }))
    }
}

struct RawRequest<'a> {
    url: &'a str,
    method: &'a str,
    headers: &'a Map<String, Value>,
    raw_body: &'a str,
}

/// trigger.dev's `RequestWithRawBodySchema`: url, method and rawBody strings, headers a
/// record of strings.
fn parse_request(payload: &Value) -> Option<RawRequest<'_>> {
    let headers = payload.get("headers")?.as_object()?;
    if !headers.values().all(Value::is_string) {
        return None;
    }
    Some(RawRequest {
        url: payload.get("url")?.as_str()?,
        method: payload.get("method")?.as_str()?,
        headers,
        raw_body: payload.get("rawBody")?.as_str()?,
    })
}

/// Whether a payload has the shape of a REQUEST event.
pub fn is_request_payload(payload: &Value) -> bool {
    parse_request(payload).is_some()
}

/// Most evaluation steps one event may cost, across every dispatcher it is checked
/// against. A step is one filter key looked up, one list member or array element compared,
/// one byte of a string indexed or compared without case. With the limits on filters
/// ([`MAX_FILTER_NODES`]) and payloads, only a filter built to be expensive comes near it;
/// an event that passes it is not matched (delivery gives it up as a permanent failure, the
/// dry run says so) instead of holding a worker.
pub const EVAL_BUDGET: u64 = 1_000_000;

/// The evaluation of one event went over its step budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("filter evaluation passed its budget of {0} steps")]
pub struct OverBudget(pub u64);

/// Evaluates filters in one walk: each filter node is checked against each payload node it
/// reaches at most once, so the work is at most (filter size) × (payload size), and the path
/// of the first mismatch is found in the same walk (written only on a failure). Counts its
/// steps, so tests assert the bound by counting instead of timing, and stops at its budget.
#[derive(Debug, Clone)]
pub struct Evaluator {
    steps: u64,
    budget: u64,
}

impl Default for Evaluator {
    fn default() -> Self {
        Self::new(EVAL_BUDGET)
    }
}

/// Where a walk failed: the filter keys from the failure up (deepest first). Empty for a
/// failure at the walk's own root, or when the caller did not ask for the path.
type Trail<'f> = Vec<&'f str>;

impl Evaluator {
    pub fn new(budget: u64) -> Self {
        Self { steps: 0, budget }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn step(&mut self, n: usize) -> Result<(), OverBudget> {
        self.steps = self.steps.saturating_add(n as u64);
        if self.steps > self.budget {
            Err(OverBudget(self.budget))
        } else {
            Ok(())
        }
    }

    /// `eventFilterMatches(payload, filter)`; `None` stands for JavaScript's `undefined`.
    pub fn matches(&mut self, payload: Option<&Value>, filter: &Value) -> Result<bool, OverBudget> {
        Ok(self.walk(payload, filter, false)?.is_none())
    }

    /// Where `filter` first fails on `payload` (`path`, then `.key` for each level), or
    /// `None` when it matches: the answer to "why didn't my job run?".
    pub fn first_mismatch(
        &mut self,
        payload: Option<&Value>,
        filter: &Value,
        path: &str,
    ) -> Result<Option<String>, OverBudget> {
        Ok(self
            .walk(payload, filter, true)?
            .map(|trail| join_path(path, &trail)))
    }

    /// Where a dispatcher's filters first fail on an event (`payload.repo`, `context.user`;
    /// `request` when a REQUEST payload cannot be matched at all), `None` when they pass.
    ///
    /// trigger.dev evaluates `eventFilterMatches(subject, {payload: pf ?? {}, context: cf ?? {}})`
    /// (see [`match_subject`]); this is the same, part by part, without copying the event.
    pub fn dispatcher_mismatch(
        &mut self,
        payload_filter: Option<&Value>,
        context_filter: Option<&Value>,
        payload_type: &str,
        payload: &Value,
        context: &Value,
    ) -> Result<Option<String>, OverBudget> {
        if payload_type == "REQUEST" {
            let Some(subject) = match_subject(payload_type, payload, context) else {
                return Ok(Some("request".to_string()));
            };
            return self.parts_mismatch(
                subject.get("payload"),
                subject.get("context"),
                payload_filter,
                context_filter,
            );
        }
        self.parts_mismatch(Some(payload), Some(context), payload_filter, context_filter)
    }

    fn parts_mismatch(
        &mut self,
        payload: Option<&Value>,
        context: Option<&Value>,
        payload_filter: Option<&Value>,
        context_filter: Option<&Value>,
    ) -> Result<Option<String>, OverBudget> {
        let empty = Value::Object(Map::new());
        for (key, actual, filter) in [
            ("payload", payload, payload_filter),
            ("context", context, context_filter),
        ] {
            let filter = match filter {
                None | Some(Value::Null) => &empty,
                Some(f) => f,
            };
            let failed = match actual {
                // A nested filter against an array: some element must pass.
                Some(Value::Array(elems)) => (!self.any_element(elems, filter)?).then(Vec::new),
                other => self.walk(other, filter, true)?,
            };
            if let Some(trail) = failed {
                return Ok(Some(join_path(key, &trail)));
            }
        }
        Ok(None)
    }

    /// Whether some element of an array passes a nested filter.
    fn any_element(&mut self, elems: &[Value], filter: &Value) -> Result<bool, OverBudget> {
        for e in elems {
            self.step(1)?;
            if self.walk(Some(e), filter, false)?.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The walk: `None` when `filter` matches `payload`, else where it failed (the trail is
    /// filled only when `want_path`).
    fn walk<'f>(
        &mut self,
        payload: Option<&Value>,
        filter: &'f Value,
        want_path: bool,
    ) -> Result<Option<Trail<'f>>, OverBudget> {
        let Value::Object(filter) = filter else {
            // A filter that is not an object cannot be registered; it matches nothing.
            return Ok(Some(Vec::new()));
        };
        let payload = match payload {
            None | Some(Value::Null) => return Ok((!filter.is_empty()).then(Vec::new)),
            Some(p) => p,
        };
        for (key, pattern) in filter {
            self.step(1)?;
            let here = || {
                if want_path {
                    vec![key.as_str()]
                } else {
                    Vec::new()
                }
            };
            let actual = self.js_index(payload, key)?;
            let actual = actual.as_deref();
            match pattern {
                Value::Array(items) => {
                    if items.is_empty() {
                        continue;
                    }
                    let all = |f: fn(&Value) -> bool| items.iter().all(f);
                    let ok =
                        if all(Value::is_string) || all(Value::is_number) || all(Value::is_boolean)
                        {
                            self.step(items.len())?;
                            items.iter().any(|item| js_strict_eq(actual, item))
                        } else {
                            self.content_filters_match(actual, items)?
                        };
                    if !ok {
                        return Ok(Some(here()));
                    }
                }
                Value::Object(_) => {
                    let failed = match actual {
                        Some(Value::Array(elems)) => {
                            (!self.any_element(elems, pattern)?).then(here)
                        }
                        other => self.walk(other, pattern, want_path)?.map(|mut trail| {
                            if want_path {
                                trail.push(key.as_str());
                            }
                            trail
                        }),
                    };
                    if failed.is_some() {
                        return Ok(failed);
                    }
                }
                // Scalars as patterns are ignored, as in the reference implementation.
                _ => {}
            }
        }
        Ok(None)
    }

    /// `value[key]` as JavaScript reads it from parsed JSON: borrowed from an object or
    /// array, made for what only exists in JavaScript (`length`, a string's code unit).
    fn js_index<'a>(
        &mut self,
        value: &'a Value,
        key: &str,
    ) -> Result<Option<Cow<'a, Value>>, OverBudget> {
        Ok(match value {
            Value::Object(map) => map.get(key).map(Cow::Borrowed),
            Value::Array(items) => {
                if key == "length" {
                    Some(Cow::Owned(Value::from(items.len())))
                } else {
                    array_index(key)
                        .and_then(|i| items.get(i))
                        .map(Cow::Borrowed)
                }
            }
            Value::String(s) => {
                // JavaScript strings index by UTF-16 code unit: counted, not copied.
                if key == "length" {
                    self.step(s.len())?;
                    Some(Cow::Owned(Value::from(s.encode_utf16().count())))
                } else if let Some(i) = array_index(key) {
                    self.step(s.len().min(i.saturating_add(1)))?;
                    s.encode_utf16()
                        .nth(i)
                        .map(|u| Cow::Owned(Value::String(String::from_utf16_lossy(&[u]))))
                } else {
                    None
                }
            }
            _ => None,
        })
    }

    fn content_filters_match(
        &mut self,
        actual: Option<&Value>,
        filters: &[Value],
    ) -> Result<bool, OverBudget> {
        for f in filters {
            self.step(1)?;
            // Non-object members of a mixed list are skipped, as in the reference.
            if let Value::Object(op) = f
                && !self.operator_within_budget(actual, op)?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// An operator object (`$endsWith`, `$includes`, ...) against a value, its scans charged
    /// to the budget first.
    fn operator_within_budget(
        &mut self,
        actual: Option<&Value>,
        op: &Map<String, Value>,
    ) -> Result<bool, OverBudget> {
        // Scans of the payload's arrays and strings cost a step per element or byte.
        match actual {
            Some(Value::Array(items))
                if op.contains_key("$includes")
                    || op.contains_key("$not")
                    || op.contains_key("$anythingBut") =>
            {
                self.step(items.len())?;
            }
            Some(Value::String(s)) if op.contains_key("$ignoreCaseEquals") => self.step(s.len())?,
            _ => {}
        }
        Ok(operator_matches(actual, op))
    }
}

/// `path` followed by the trail's keys, outermost first: `payload.user.plan`.
fn join_path(path: &str, trail: &[&str]) -> String {
    let mut out = String::from(path);
    for key in trail.iter().rev() {
        out.push('.');
        out.push_str(key);
    }
    out
}

/// Does a dispatcher with these filters match an event? An absent filter matches everything
/// (but, as in trigger.dev, an array payload only when some element passes the filter).
/// Unbounded: for tools and tests; delivery and the dry run use an [`Evaluator`] with a budget.
pub fn dispatcher_matches(
    payload_filter: Option<&Value>,
    context_filter: Option<&Value>,
    payload_type: &str,
    payload: &Value,
    context: &Value,
) -> bool {
    Evaluator::new(u64::MAX)
        .dispatcher_mismatch(
            payload_filter,
            context_filter,
            payload_type,
            payload,
            context,
        )
        .is_ok_and(|miss| miss.is_none())
}

/// `eventFilterMatches(payload, filter)`, unbounded (see [`dispatcher_matches`]).
pub fn event_filter_matches(payload: Option<&Value>, filter: &Value) -> bool {
    Evaluator::new(u64::MAX)
        .matches(payload, filter)
        .unwrap_or(false)
}

/// A canonical array index ("0", "12", not "01" or "+1").
fn array_index(key: &str) -> Option<usize> {
    if key == "0" {
        return Some(0);
    }
    if key.starts_with('0') || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

/// JavaScript's `===` (and `includes`' SameValueZero, which differs only on NaN, absent
/// from JSON) between a value read from the payload and a value from a filter. Objects and
/// arrays are never equal: they are distinct references.
fn js_strict_eq(actual: Option<&Value>, expected: &Value) -> bool {
    match (actual, expected) {
        (Some(Value::Null), Value::Null) => true,
        (Some(Value::Bool(a)), Value::Bool(b)) => a == b,
        (Some(Value::String(a)), Value::String(b)) => a == b,
        (Some(Value::Number(a)), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => false,
    }
}

fn as_number(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
}

fn operator_matches(actual: Option<&Value>, op: &Map<String, Value>) -> bool {
    let actual_str = actual.and_then(Value::as_str);
    if let Some(suffix) = op.get("$endsWith") {
        return match (actual_str, suffix.as_str()) {
            (Some(a), Some(s)) => a.ends_with(s),
            _ => false,
        };
    }
    if let Some(prefix) = op.get("$startsWith") {
        return match (actual_str, prefix.as_str()) {
            (Some(a), Some(p)) => a.starts_with(p),
            _ => false,
        };
    }
    if let Some(but) = op.get("$anythingBut") {
        if let Value::Array(list) = but
            && list.iter().any(|x| js_strict_eq(actual, x))
        {
            return false;
        }
        return !js_strict_eq(actual, but);
    }
    if let Some(exists) = op.get("$exists") {
        return if js_truthy(exists) {
            actual.is_some()
        } else {
            actual.is_none()
        };
    }
    for (name, cmp) in [
        ("$gt", f64::gt as fn(&f64, &f64) -> bool),
        ("$lt", f64::lt),
        ("$gte", f64::ge),
        ("$lte", f64::le),
    ] {
        if let Some(bound) = op.get(name) {
            return match (as_number(actual), bound.as_f64()) {
                (Some(a), Some(b)) => cmp(&a, &b),
                _ => false,
            };
        }
    }
    if let Some(between) = op.get("$between") {
        let bounds = between.as_array().map(|b| {
            (
                b.first().and_then(Value::as_f64),
                b.get(1).and_then(Value::as_f64),
            )
        });
        return match (as_number(actual), bounds) {
            (Some(a), Some((Some(lo), Some(hi)))) => a >= lo && a <= hi,
            _ => false,
        };
    }
    if let Some(needle) = op.get("$includes") {
        return match actual {
            Some(Value::Array(items)) => items.iter().any(|i| js_strict_eq(Some(i), needle)),
            _ => false,
        };
    }
    if let Some(other) = op.get("$ignoreCaseEquals") {
        return match (actual_str, other.as_str()) {
            (Some(a), Some(b)) => accent_collator().compare(a, b) == std::cmp::Ordering::Equal,
            _ => false,
        };
    }
    if let Some(is_null) = op.get("$isNull") {
        let null = matches!(actual, Some(Value::Null));
        return if js_truthy(is_null) { null } else { !null };
    }
    if let Some(not) = op.get("$not") {
        return match actual {
            Some(Value::Array(items)) => !items.iter().any(|i| js_strict_eq(Some(i), not)),
            Some(v @ (Value::Number(_) | Value::Bool(_) | Value::String(_))) => {
                !js_strict_eq(Some(v), not)
            }
            _ => false,
        };
    }
    true
}

/// Deepest nesting of objects a filter may have (`{"a": {"b": ["x"]}}` is 2 deep).
pub const MAX_FILTER_DEPTH: usize = 16;
/// Most nodes (keys and list members) in one filter.
pub const MAX_FILTER_NODES: usize = 1_000;

/// Check a filter against trigger.dev's `EventFilterSchema`: an object whose values are
/// lists of strings, of numbers, of booleans or of content filters (one known operator
/// each, with an argument of the right type), or nested filters; and against this service's
/// limits ([`MAX_FILTER_DEPTH`], [`MAX_FILTER_NODES`]). The error names the path of the first
/// bad part, from `$` (the filter itself).
pub fn validate_filter(filter: &Value) -> Result<(), String> {
    let mut nodes = 0;
    validate_at(filter, "$", 1, &mut nodes)
}

fn validate_at(filter: &Value, path: &str, depth: usize, nodes: &mut usize) -> Result<(), String> {
    let Value::Object(map) = filter else {
        return Err(format!("{path}: must be an object (an event filter)"));
    };
    if depth > MAX_FILTER_DEPTH {
        return Err(format!(
            "{path}: filters nest at most {MAX_FILTER_DEPTH} objects deep"
        ));
    }
    for (key, pattern) in map {
        let here = format!("{path}.{key}");
        *nodes += 1 + pattern.as_array().map_or(0, Vec::len);
        if *nodes > MAX_FILTER_NODES {
            return Err(format!(
                "{here}: a filter has at most {MAX_FILTER_NODES} keys and list members"
            ));
        }
        match pattern {
            Value::Object(_) => validate_at(pattern, &here, depth + 1, nodes)?,
            Value::Array(items) => {
                let all = |f: fn(&Value) -> bool| items.iter().all(f);
                if all(Value::is_string) || all(Value::is_number) || all(Value::is_boolean) {
                    continue;
                }
                for (i, item) in items.iter().enumerate() {
                    validate_content_filter(item, &format!("{here}[{i}]"))?;
                }
            }
            _ => {
                return Err(format!(
                    "{here}: must be a list (of strings, numbers, booleans or content filters) or a nested filter"
                ));
            }
        }
    }
    Ok(())
}

fn validate_content_filter(item: &Value, path: &str) -> Result<(), String> {
    let Value::Object(op) = item else {
        return Err(format!(
            "{path}: a list mixing values of different types, or holding null, is not a filter"
        ));
    };
    if op.len() != 1 {
        return Err(format!(
            "{path}: a content filter has exactly one operator, found {}",
            op.len()
        ));
    }
    let (name, arg) = op.iter().next().expect("one entry");
    let scalar = |v: &Value| v.is_string() || v.is_number() || v.is_boolean();
    let ok = match name.as_str() {
        "$startsWith" | "$endsWith" | "$ignoreCaseEquals" => arg.is_string(),
        "$exists" | "$isNull" => arg.is_boolean(),
        "$gt" | "$lt" | "$gte" | "$lte" => arg.is_number(),
        "$between" => {
            matches!(arg.as_array(), Some(b) if b.len() == 2 && b.iter().all(Value::is_number))
        }
        "$includes" | "$not" => scalar(arg),
        "$anythingBut" => {
            scalar(arg)
                || matches!(arg.as_array(), Some(list)
                    if list.iter().all(Value::is_string)
                        || list.iter().all(Value::is_number)
                        || list.iter().all(Value::is_boolean))
        }
        other => {
            return Err(format!(
                "{path}: unknown operator {other:?} (known: $startsWith, $endsWith, \
                 $ignoreCaseEquals, $exists, $isNull, $anythingBut, $gt, $lt, $gte, $lte, \
                 $between, $includes, $not)"
            ));
        }
    };
    if ok {
        Ok(())
    } else {
        let wants = match name.as_str() {
            "$startsWith" | "$endsWith" | "$ignoreCaseEquals" => "a string",
            "$exists" | "$isNull" => "a boolean",
            "$gt" | "$lt" | "$gte" | "$lte" => "a number",
            "$between" => "two numbers, [low, high]",
            "$anythingBut" => "a string, number or boolean, or a list of one of those",
            _ => "a string, number or boolean",
        };
        Err(format!("{path}.{name}: must be {wants}"))
    }
}

/// JavaScript's `a.localeCompare(b, undefined, {sensitivity: "accent"})`: the Unicode
/// collation algorithm at secondary strength, so case differs not, accents do, and
/// canonically equivalent strings are equal (ICU4X, the same root collation data as V8's
/// ICU).
fn accent_collator() -> &'static icu_collator::CollatorBorrowed<'static> {
    static COLLATOR: std::sync::OnceLock<icu_collator::CollatorBorrowed<'static>> =
        std::sync::OnceLock::new();
    COLLATOR.get_or_init(|| {
        let mut options = icu_collator::options::CollatorOptions::default();
        options.strength = Some(icu_collator::options::Strength::Secondary);
        icu_collator::Collator::try_new(Default::default(), options)
            .expect("the root collation is compiled in")
    })
}

fn js_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(payload: Value, filter: Value) -> bool {
        event_filter_matches(Some(&payload), &filter)
    }

    #[test]
    fn ignore_case_equals_compares_as_locale_compare_with_accent_sensitivity() {
        let eq = |a: &str, b: &str| m(json!({"s": a}), json!({"s": [{"$ignoreCaseEquals": b}]}));
        assert!(eq("Hello", "hELLO"));
        assert!(eq("e\u{301}", "É"), "canonically equivalent");
        assert!(eq("ς", "Σ"));
        assert!(!eq("é", "e"), "accents count");
        assert!(!eq("ß", "SS"), "as V8's ICU says");
        assert!(!eq("a", "b"));
    }

    /// `{"a": {"a": ... leaf}}`, `depth` levels of `a`.
    fn nest(depth: usize, leaf: Value) -> Value {
        (0..depth).fold(leaf, |inner, _| json!({ "a": inner }))
    }

    #[test]
    fn a_deep_mismatch_costs_one_walk_and_names_its_path() {
        // The shape that took 2^depth walks: every level matches but the innermost list.
        let filter = nest(100, json!({"z": ["no"]}));
        let payload = nest(100, json!({"z": "yes"}));
        let mut eval = Evaluator::new(u64::MAX);
        let miss = eval.first_mismatch(Some(&payload), &filter, "$").unwrap();
        assert_eq!(miss, Some(format!("${}.z", ".a".repeat(100))));
        // 101 keys looked up and one list member compared.
        assert_eq!(eval.steps(), 102);
        let mut eval = Evaluator::new(u64::MAX);
        assert!(!eval.matches(Some(&payload), &filter).unwrap());
        assert_eq!(eval.steps(), 102);
        let matching = nest(100, json!({"z": "no"}));
        let mut eval = Evaluator::new(u64::MAX);
        assert!(eval.matches(Some(&matching), &filter).unwrap());
        assert_eq!(eval.steps(), 102);
    }

    #[test]
    fn scans_of_large_arrays_cost_their_length_once() {
        let payload = json!({"tags": (0..10_000).collect::<Vec<i32>>()});
        let mut eval = Evaluator::new(u64::MAX);
        assert!(
            !eval
                .matches(Some(&payload), &json!({"tags": [{"$includes": -1}]}))
                .unwrap()
        );
        assert_eq!(eval.steps(), 1 + 1 + 10_000);
        // A nested filter against an array of 10,000 objects: each element checked once.
        let payload = json!({"users": (0..10_000).map(|i| json!({"id": i})).collect::<Vec<_>>()});
        let mut eval = Evaluator::new(u64::MAX);
        let miss = eval
            .first_mismatch(Some(&payload), &json!({"users": {"id": [-1]}}), "$")
            .unwrap();
        assert_eq!(miss.as_deref(), Some("$.users"));
        assert_eq!(eval.steps(), 1 + 10_000 * 3);
        // A string's length is counted, not copied, and costs its bytes.
        let long = "x".repeat(100_000);
        let mut eval = Evaluator::new(u64::MAX);
        assert!(
            eval.matches(
                Some(&json!({"s": long})),
                &json!({"s": {"length": [100_000]}})
            )
            .unwrap()
        );
        assert_eq!(eval.steps(), 1 + 100_000 + 1 + 1);
    }

    #[test]
    fn evaluation_stops_at_its_budget() {
        let payload = json!({"tags": (0..10_000).collect::<Vec<i32>>()});
        let filter = json!({"tags": [{"$includes": -1}]});
        let mut eval = Evaluator::new(5_000);
        assert_eq!(
            eval.matches(Some(&payload), &filter),
            Err(OverBudget(5_000))
        );
        // The budget is shared by every dispatcher an evaluator checks.
        let mut eval = Evaluator::new(25_000);
        for _ in 0..2 {
            assert!(!eval.matches(Some(&payload), &filter).unwrap());
        }
        assert_eq!(
            eval.matches(Some(&payload), &filter),
            Err(OverBudget(25_000))
        );
    }

    #[test]
    fn filters_beyond_the_limits_are_refused_naming_the_limit() {
        assert!(validate_filter(&nest(MAX_FILTER_DEPTH - 1, json!({"z": ["x"]}))).is_ok());
        let err = validate_filter(&nest(MAX_FILTER_DEPTH, json!({"z": ["x"]}))).unwrap_err();
        assert!(err.contains("at most 16 objects deep"), "{err}");
        let wide: Map<String, Value> = (0..MAX_FILTER_NODES)
            .map(|i| (format!("k{i}"), json!([i])))
            .collect();
        let err = validate_filter(&Value::Object(wide)).unwrap_err();
        assert!(err.contains("at most 1000 keys and list members"), "{err}");
        let list = json!({"k": (0..MAX_FILTER_NODES - 1).collect::<Vec<_>>()});
        assert!(validate_filter(&list).is_ok());
    }

    #[test]
    fn validation_names_the_path_of_the_bad_part() {
        assert!(validate_filter(&json!({})).is_ok());
        assert!(
            validate_filter(&json!({"a": ["x"], "b": {"c": [{"$gt": 1}], "d": [true]}})).is_ok()
        );
        for (filter, path) in [
            (json!([]), "$:"),
            (json!({"a": "x"}), "$.a:"),
            (json!({"a": null}), "$.a:"),
            (json!({"a": {"b": ["x", 1]}}), "$.a.b[0]:"),
            (json!({"a": [{"$gt": "3"}]}), "$.a[0].$gt:"),
            (json!({"a": [{"$between": [1]}]}), "$.a[0].$between:"),
            (json!({"a": [{"$nope": 1}]}), "$.a[0]: unknown operator"),
            (
                json!({"a": [{"$gt": 1, "$lt": 2}]}),
                "$.a[0]: a content filter",
            ),
            (json!({"a": [{"$startsWith": "x"}, null]}), "$.a[1]:"),
        ] {
            let err = validate_filter(&filter).unwrap_err();
            assert!(err.starts_with(path), "{filter}: {err}");
        }
    }

    #[test]
    fn lists_of_scalars_match_any_member() {
        assert!(m(json!({"a": "x"}), json!({"a": ["x", "y"]})));
        assert!(!m(json!({"a": "z"}), json!({"a": ["x", "y"]})));
        assert!(m(json!({"n": 2.0}), json!({"n": [1, 2]})));
        assert!(m(json!({"b": true}), json!({"b": [true]})));
        assert!(!m(json!({"b": "true"}), json!({"b": [true]})));
        assert!(!m(json!({}), json!({"a": ["x"]})));
        assert!(m(json!({"a": 1}), json!({"a": []})));
    }

    #[test]
    fn nested_objects_and_arrays_of_objects() {
        let f = json!({"user": {"plan": ["pro"]}});
        assert!(m(json!({"user": {"plan": "pro"}}), f.clone()));
        assert!(!m(json!({"user": {"plan": "free"}}), f.clone()));
        assert!(!m(json!({"user": null}), f.clone()));
        assert!(m(
            json!({"user": [{"plan": "free"}, {"plan": "pro"}]}),
            f.clone()
        ));
        assert!(!m(json!({}), f));
    }

    #[test]
    fn absent_or_null_payload_matches_only_the_empty_filter() {
        assert!(event_filter_matches(None, &json!({})));
        assert!(event_filter_matches(Some(&Value::Null), &json!({})));
        assert!(!event_filter_matches(
            Some(&Value::Null),
            &json!({"a": ["x"]})
        ));
    }

    #[test]
    fn content_filters() {
        assert!(m(
            json!({"s": "hello"}),
            json!({"s": [{"$startsWith": "he"}]})
        ));
        assert!(m(
            json!({"s": "hello"}),
            json!({"s": [{"$endsWith": "lo"}]})
        ));
        assert!(!m(json!({"s": 5}), json!({"s": [{"$endsWith": "5"}]})));
        assert!(m(
            json!({"s": "HeLLo"}),
            json!({"s": [{"$ignoreCaseEquals": "hello"}]})
        ));
        assert!(m(json!({"s": 1}), json!({"s": [{"$exists": true}]})));
        assert!(m(json!({}), json!({"s": [{"$exists": false}]})));
        assert!(m(json!({"s": null}), json!({"s": [{"$isNull": true}]})));
        assert!(!m(json!({}), json!({"s": [{"$isNull": true}]})));
        assert!(m(
            json!({"s": "a"}),
            json!({"s": [{"$anythingBut": ["b", "c"]}]})
        ));
        assert!(!m(json!({"s": "b"}), json!({"s": [{"$anythingBut": "b"}]})));
        assert!(m(json!({"n": 5}), json!({"n": [{"$gt": 4}, {"$lt": 6}]})));
        assert!(!m(json!({"n": 5}), json!({"n": [{"$gt": 5}]})));
        assert!(m(json!({"n": 5}), json!({"n": [{"$gte": 5}, {"$lte": 5}]})));
        assert!(m(json!({"n": 5}), json!({"n": [{"$between": [1, 5]}]})));
        assert!(!m(json!({"n": "5"}), json!({"n": [{"$between": [1, 5]}]})));
        assert!(m(
            json!({"t": ["a", "b"]}),
            json!({"t": [{"$includes": "b"}]})
        ));
        assert!(!m(json!({"t": "ab"}), json!({"t": [{"$includes": "b"}]})));
        assert!(m(json!({"s": "a"}), json!({"s": [{"$not": "b"}]})));
        assert!(!m(json!({"t": ["a", "b"]}), json!({"t": [{"$not": "b"}]})));
        assert!(!m(json!({}), json!({"t": [{"$not": "b"}]})));
    }

    #[test]
    fn javascript_indexing_of_strings_and_arrays() {
        assert!(m(json!({"s": "abc"}), json!({"s": {"length": [3]}})));
        // An array field is matched element by element, never indexed.
        assert!(!m(json!({"a": [7, 8]}), json!({"a": {"1": [8]}})));
        assert!(m(json!({"a": [[7, 8]]}), json!({"a": {"1": [8]}})));
        assert!(m(json!({"a": [{"x": 1}]}), json!({"a": {"x": [1]}})));
    }

    #[test]
    fn odd_filters_never_panic() {
        for f in [
            json!(null),
            json!([1]),
            json!({"a": null}),
            json!({"a": [{"$between": "x"}]}),
            json!({"a": [{}]}),
            json!({"a": [null, 1, "x"]}),
        ] {
            let _ = m(json!({"a": [1, {"b": 2}]}), f);
        }
        assert!(dispatcher_matches(
            None,
            None,
            "JSON",
            &Value::Null,
            &Value::Null
        ));
    }

    #[test]
    fn dispatchers_match_as_trigger_dev_event_matcher() {
        let d = |pf: Option<Value>, t: &str, payload: Value| {
            dispatcher_matches(pf.as_ref(), None, t, &payload, &Value::Null)
        };
        // An array payload passes when some element does; an empty one never.
        assert!(d(None, "JSON", json!([{"a": 1}])));
        assert!(!d(None, "JSON", json!([])));
        assert!(d(
            Some(json!({"a": [2]})),
            "JSON",
            json!([{"a": 1}, {"a": 2}])
        ));
        assert!(d(None, "JSON", json!("text")));
        // REQUEST with a JSON body: filters see the parsed body.
        let request = |ct: &str, body: &str| {
            json!({"url": "https://x.test/hook", "method": "POST",
                   "headers": {"content-type": ct}, "rawBody": body})
        };
        let on_body = Some(json!({"body": {"kind": ["push"]}, "method": ["POST"]}));
        assert!(d(
            on_body.clone(),
            "REQUEST",
            request("application/json; charset=utf-8", r#"{"kind":"push"}"#)
        ));
        assert!(!d(
            on_body.clone(),
            "REQUEST",
            request("application/json", r#"{"kind":"pull"}"#)
        ));
        // Not JSON: only dispatchers without filters match; a bad body or shape, none.
        assert!(!d(
            on_body.clone(),
            "REQUEST",
            request("text/plain", "push")
        ));
        assert!(d(None, "REQUEST", request("text/plain", "push")));
        assert!(!d(
            None,
            "REQUEST",
            request("application/json", "{not json")
        ));
        assert!(!d(None, "REQUEST", json!({"url": 1})));
        assert_eq!(
            Evaluator::default().dispatcher_mismatch(
                on_body.as_ref(),
                None,
                "REQUEST",
                &request("application/json", r#"{"kind":"pull"}"#),
                &Value::Null
            ),
            Ok(Some("payload.body.kind".to_string()))
        );
    }
}
