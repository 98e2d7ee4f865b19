//! The structural rules of ARCHITECTURE.md, checked on the source: the modules import
//! each other without a cycle, only the ledger writes the job table, every table has one
//! owning module, the only one whose SQL writes it, and the worker names no job kind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for `lib.rs` and `main.rs`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The top-level modules a file names through `crate::` paths.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // `use crate::{a, b::c}` as well as `crate::a::f()` anywhere.
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The items at the group's own level: `a::{X, Y}` and `b` in `{a::{X, Y}, b}`.
            let mut depth = 0;
            let mut items = vec![String::new()];
            for c in group.chars() {
                match c {
                    '}' if depth == 0 => break,
                    ',' if depth == 0 => items.push(String::new()),
                    _ => {
                        depth += (c == '{') as i32 - (c == '}') as i32;
                        items.last_mut().unwrap().push(c);
                    }
                }
            }
            for item in items {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        let entry = graph.entry(from.clone()).or_default();
        for to in uses(&text) {
            if to != from && modules.contains(&to) {
                entry.insert(to);
            }
        }
    }
    graph
}

/// The cycles of a graph: its strongly connected components of more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    // Two modules are in one component when each reaches the other.
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for (m, r) in &reaches {
        let component: BTreeSet<String> = r
            .iter()
            .filter(|o| reaches.get(o).is_some_and(|back| back.contains(*m)))
            .cloned()
            .collect();
        if component.len() > 1 && !out.contains(&component) {
            out.push(component);
        }
    }
    out
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the scan found the modules: {graph:?}");
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "import cycles: {found:?}\ngraph: {graph:#?}"
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    graph.entry("c".into()).or_default().insert("a".into());
    graph.entry("d".into()).or_default().insert("a".into());
    let found = cycles(&graph);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0], ["a", "b", "c"].map(String::from).into());
    assert_eq!(
        uses("use crate::{ledger::{Job, JobKind}, trace};\nlet x = crate::metrics::metrics();"),
        ["ledger", "trace", "metrics"].map(String::from).into()
    );
}

#[test]
fn only_the_ledger_names_the_job_table() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let outside: Vec<String> = files
        .iter()
        .filter(|f| module_of(&src, f).as_deref() != Some("ledger"))
        .filter(|f| std::fs::read_to_string(f).unwrap().contains("queue_jobs"))
        .map(|f| f.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert!(
        outside.is_empty(),
        "queue_jobs named outside the ledger: {outside:?}"
    );
}

#[test]
fn the_worker_names_no_job_kind() {
    // It asks `handlers::Handlers::execution` how a kind runs (its unit tests aside).
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src.join("worker"), &mut files);
    assert!(!files.is_empty(), "src/worker/ has no file");
    let kinds = kongflow_events::ledger::JobKind::ALL;
    let mut named = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for kind in kinds {
            let variant = format!("JobKind::{kind:?}");
            let string = format!("\"{}\"", kind.as_str());
            for name in [variant, string] {
                if code.contains(&name) {
                    named.push(format!(
                        "{}: {name}",
                        f.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
        for args in ["JobArgs::", "webhook"] {
            if code.to_lowercase().contains(&args.to_lowercase()) {
                named.push(format!(
                    "{}: {args}",
                    f.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(named.is_empty(), "the worker names job kinds: {named:?}");
}

/// Each table of `migrations/` and the one top-level module of `src/` whose SQL names it:
/// the module that writes it and answers for its rows (ARCHITECTURE.md, "Tables and their
/// owners").
const OWNERS: &[(&str, &str)] = &[
    ("queue_jobs", "ledger"),
    ("job_publishers", "ledger"),
    ("installation", "db"),
    ("organizations", "tenants"),
    ("projects", "tenants"),
    ("runtime_environments", "tenants"),
    ("external_accounts", "tenants"),
    ("event_records", "events"),
    ("event_keys", "events"),
    ("event_keys_gone", "db"),
    ("job_runs", "runs"),
    ("run_handoffs", "runs"),
    ("jobs", "dispatchers"),
    ("job_versions", "dispatchers"),
    ("dynamic_triggers", "dispatchers"),
    ("dynamic_trigger_jobs", "dispatchers"),
    ("event_dispatchers", "dispatchers"),
    ("webhook_attempts", "dispatchers"),
    ("console_sessions", "console"),
];

/// Reads of a table outside its owner, each a join in a statement that needs the rows it
/// reads in the same round trip (table, reading file under `src/`, why). No other module
/// writes a table, nor reads one outside this list.
const READS_ELSEWHERE: &[(&str, &str, &str)] = &[
    // Storing events: whether a key that is taken is stale (its slice dropped, the key not
    // yet forgotten), in the statement that stores the keys and the events.
    (
        "event_keys_gone",
        "events/mod.rs",
        "the stale keys a send takes over",
    ),
    // Creating runs: which job versions an invocation's dispatcher targets, and that its
    // event is of the dispatcher's environment, in the statement that inserts the runs.
    (
        "event_dispatchers",
        "runs/mod.rs",
        "the dispatchers an invocation names",
    ),
    (
        "event_records",
        "runs/mod.rs",
        "the events an invocation names",
    ),
    (
        "job_versions",
        "runs/mod.rs",
        "a JOB_VERSION dispatcher's version",
    ),
    (
        "jobs",
        "runs/mod.rs",
        "a DYNAMIC_TRIGGER's jobs' latest versions",
    ),
    (
        "dynamic_trigger_jobs",
        "runs/mod.rs",
        "a DYNAMIC_TRIGGER's jobs",
    ),
    // A run.cancelled hand-off's message names its event. (A run.created message is built
    // by the SQL function `run_created_message`, from its run's event, job, version and
    // account: migrations/20261206000002_handoffs_published_by_their_creator.sql.)
    (
        "event_records",
        "runs/handoff.rs",
        "the event's id in a cancelled run's message",
    ),
    // Firing an EPHEMERAL dispatcher (its event must be of its environment) and its
    // webhook's body.
    (
        "event_records",
        "dispatchers/state.rs",
        "the event a dispatcher fires for",
    ),
    (
        "external_accounts",
        "dispatchers/state.rs",
        "the event's account in a webhook",
    ),
];

/// The tables `migrations/` creates.
fn migration_tables() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for (keyword, name) in sql_references(&text) {
            // Tables are named in lower case (`RETURNS TABLE AS` is not one).
            if keyword == "TABLE" && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                out.insert(name);
            }
        }
    }
    out
}

/// Each `KEYWORD table` of a text: the SQL keywords that name a table (`FROM`, `JOIN`,
/// `INTO`, `UPDATE`, `TABLE`, `TRUNCATE`) in upper case, as this code base writes its SQL,
/// and the word after them. `DELETE FROM` is reported as `DELETE`.
fn sql_references(text: &str) -> Vec<(String, String)> {
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut out = Vec::new();
    for (i, pair) in words.windows(2).enumerate() {
        let keyword = match pair[0] {
            "FROM" if i > 0 && words[i - 1] == "DELETE" => "DELETE",
            k @ ("FROM" | "JOIN" | "INTO" | "UPDATE" | "TABLE" | "TRUNCATE") => k,
            _ => continue,
        };
        out.push((keyword.to_string(), pair[1].to_string()));
    }
    out
}

#[test]
fn every_table_has_one_owner_and_only_it_writes_the_table() {
    let owners: BTreeMap<&str, &str> = OWNERS.iter().copied().collect();
    let tables = migration_tables();
    let mapped: BTreeSet<String> = owners.keys().map(|t| t.to_string()).collect();
    assert_eq!(
        tables, mapped,
        "the map covers exactly the tables of migrations/"
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut reads_seen = BTreeSet::new();
    for file in &files {
        let module = module_of(&src, file);
        let rel = file.strip_prefix(&src).unwrap().display().to_string();
        let text = std::fs::read_to_string(file).unwrap();
        for (keyword, table) in sql_references(&text) {
            let Some(owner) = owners.get(table.as_str()) else {
                continue;
            };
            if module.as_deref() == Some(*owner) {
                continue;
            }
            // The storage layout's code changes the sliced tables' structure (ALTER, LOCK,
            // DROP TABLE) and counts a slice it drops; their rows stay their owners'.
            let layout = rel == "db/slices.rs" && (keyword == "TABLE" || keyword == "FROM");
            if layout {
                continue;
            }
            let read = keyword == "FROM" || keyword == "JOIN";
            let allowed = READS_ELSEWHERE
                .iter()
                .any(|(t, f, _)| *t == table && *f == rel);
            if read && allowed {
                reads_seen.insert((table.clone(), rel.clone()));
            } else {
                wrong.push(format!("{rel}: {keyword} {table} (owned by {owner})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "tables named outside their owner: {wrong:#?}"
    );
    // The list stays true: every exception is still needed.
    for (table, file, _) in READS_ELSEWHERE {
        assert!(
            reads_seen.contains(&(table.to_string(), file.to_string())),
            "{file} no longer reads {table}: drop it from READS_ELSEWHERE"
        );
    }
}

#[test]
fn the_sql_scan_finds_writes_and_reads() {
    let found = sql_references(
        "r#\"DELETE FROM job_runs WHERE id IN (SELECT id FROM job_runs)\"#; from prose; \
         INSERT INTO run_handoffs ... UPDATE event_dispatchers d ... JOIN jobs j",
    );
    let found: Vec<(&str, &str)> = found
        .iter()
        .map(|(k, t)| (k.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("DELETE", "job_runs"),
            ("FROM", "job_runs"),
            ("INTO", "run_handoffs"),
            ("UPDATE", "event_dispatchers"),
            ("JOIN", "jobs")
        ]
    );
}
