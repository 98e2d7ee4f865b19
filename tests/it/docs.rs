//! The documents stay true to the code: every path ARCHITECTURE.md and docs/ name in
//! backquotes (`ledger::run::lease`, `crash::a_worker_killed_...`, `Relay::publish_handoffs`)
//! names a module, item or test that exists.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_tree(path: &Path, out: &mut String) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            read_tree(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push_str(&std::fs::read_to_string(path).unwrap());
        out.push('\n');
    }
}

/// The source of module `dir`/`name`: `name.rs` and everything under `name/`.
fn module_text(dir: &Path, name: &str) -> Option<(String, PathBuf)> {
    let file = dir.join(format!("{name}.rs"));
    let folder = dir.join(name);
    if !file.is_file() && !folder.is_dir() {
        return None;
    }
    let mut text = String::new();
    if file.is_file() {
        read_tree(&file, &mut text);
    }
    if folder.is_dir() {
        read_tree(&folder, &mut text);
    }
    Some((text, folder))
}

/// Whether `text` defines `name`: an item, a module, a macro or an enum variant.
fn defines(text: &str, name: &str) -> bool {
    const ITEMS: [&str; 9] = [
        "fn ",
        "struct ",
        "enum ",
        "trait ",
        "const ",
        "type ",
        "static ",
        "mod ",
        "macro_rules! ",
    ];
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let whole = |at: usize| !text[at + name.len()..].starts_with(is_ident);
    for (at, _) in text.match_indices(name) {
        if !whole(at) || text[..at].ends_with(is_ident) {
            continue;
        }
        let before = &text[..at];
        if ITEMS.iter().any(|k| before.ends_with(k)) {
            return true;
        }
        // An enum variant or a field: first on its line, then `,`, `(`, `{` or `:`.
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let after = text[at + name.len()..].trim_start();
        if before[line_start..].trim().is_empty()
            && (after.starts_with([',', '(', '{']) || after.starts_with(": "))
        {
            return true;
        }
    }
    false
}

/// What is wrong with a path a document names, if anything; `None` for a path outside this
/// crate (another crate's, say), which is not checked.
fn check(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split("::").collect();
    let first = segments[0];
    let tests = root().join("tests");
    // A test: `module::test_name`, in tests/it/ or a test binary of its own.
    // A name that is both (`ledger::JobKind`, `ledger::a_test`) is found in either.
    let mut not_a_test = None;
    for file in [
        tests.join("it").join(format!("{first}.rs")),
        tests.join(format!("{first}.rs")),
    ] {
        if segments.len() == 2 && file.is_file() {
            let text = std::fs::read_to_string(&file).unwrap();
            if defines(&text, segments[1]) {
                return None;
            }
            not_a_test = Some(format!("no test `{}` in {}", segments[1], file.display()));
        }
    }
    check_source(path, &segments).or_else(|| {
        let src = root().join("src");
        // Neither a test nor (for a module of src/) an item: the test's absence is the news.
        not_a_test.filter(|_| module_text(&src, first).is_none())
    })
}

/// What is wrong with a path into this crate's source, if anything.
fn check_source(path: &str, segments: &[&str]) -> Option<String> {
    let first = segments[0];
    let src = root().join("src");
    let mut all = String::new();
    read_tree(&src, &mut all);
    // `Type::item`: the type and the item are defined somewhere in the crate.
    if first.starts_with(char::is_uppercase) {
        if !defines(&all, first) {
            // Another crate's type (`PgPool::begin`): not ours to check.
            return None;
        }
        let missing: Vec<&&str> = segments[1..].iter().filter(|s| !defines(&all, s)).collect();
        return (!missing.is_empty()).then(|| format!("`{path}`: nothing defines {missing:?}"));
    }
    // `module::sub::item`: descend the modules as far as they go, then the items.
    let (mut text, mut dir) = module_text(&src, first)?;
    for (i, seg) in segments.iter().enumerate().skip(1) {
        if let Some((t, d)) = module_text(&dir, seg) {
            text = t;
            dir = d;
            continue;
        }
        let missing: Vec<&&str> = segments[i..]
            .iter()
            .filter(|s| !defines(&text, s))
            .collect();
        return (!missing.is_empty()).then(|| {
            format!(
                "`{path}`: {missing:?} not defined in module `{}`",
                segments[..i].join("::")
            )
        });
    }
    None
}

/// The `a::b` paths in backquotes of a markdown text.
fn named_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, quoted) in text.split('`').enumerate() {
        let is_path = quoted.contains("::")
            && quoted
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == ':');
        if i % 2 == 1 && is_path && !quoted.starts_with(':') && !quoted.ends_with(':') {
            out.push(quoted.to_string());
        }
    }
    out
}

#[test]
fn every_path_the_documents_name_exists() {
    let mut docs = vec![root().join("ARCHITECTURE.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") && !path.ends_with("benchmarks-history.md") {
            docs.push(path);
        }
    }
    let mut checked = 0;
    let mut wrong = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for path in named_paths(&text) {
            checked += 1;
            if let Some(why) = check(&path) {
                wrong.push(format!(
                    "{}: {why}",
                    doc.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    assert!(checked > 50, "the scan found the paths ({checked})");
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "names in the documents that the code no longer has:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_tells_a_missing_name_from_a_present_one() {
    assert_eq!(check("ledger::JobKind"), None);
    assert!(check("ledger::no_such_function").is_some());
    assert!(check("structure::no_such_test").is_some());
    assert_eq!(check("structure::the_module_graph_has_no_cycle"), None);
    assert_eq!(
        check("serde_json::Value"),
        None,
        "another crate's path is not checked"
    );
    assert!(defines("pub fn lease(", "lease"));
    assert!(!defines("pub fn lease_all(", "lease"));
    assert!(defines("enum A {\n    Created,\n}", "Created"));
}

/// docs/scaling.md's deployment table is what `scripts/scale-plan.py` prints from the costs
/// kept beside it (docs/scaling-costs.json): a new measurement changes both, or the test
/// says which line differs.
#[test]
fn the_scaling_plan_in_the_docs_is_what_the_script_prints() {
    let out = std::process::Command::new("python3")
        .arg(root().join("scripts/scale-plan.py"))
        .output()
        .expect("python3 runs scripts/scale-plan.py");
    assert!(
        out.status.success(),
        "scale-plan.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = printed
        .lines()
        .filter(|l| l.contains(" | ") && !l.starts_with('-'))
        .collect();
    assert!(
        rows.iter().any(|l| l.trim_start().starts_with("100,000 |")),
        "the plan has a row for 100,000 events/s:\n{printed}"
    );
    let doc = std::fs::read_to_string(root().join("docs/scaling.md")).unwrap();
    for row in &rows {
        assert!(
            doc.lines().any(|l| l == *row),
            "docs/scaling.md does not show this line of scale-plan.py's table:\n{row}\n\
             (run `python3 scripts/scale-plan.py` and copy its table)"
        );
    }
    for line in printed.lines().filter(|l| l.contains("events/s (CPU")) {
        let figure = line.split(": ").nth(1).unwrap().split(' ').next().unwrap();
        assert!(
            doc.contains(figure),
            "docs/scaling.md does not give one primary's {figure} events/s"
        );
    }
}
