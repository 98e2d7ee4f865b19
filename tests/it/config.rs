//! The command line's configuration and its first failures, on the real binary.

use std::time::{Duration, Instant};

/// Run the binary with `args` and `env` to its end (at most 30 s): its status, how long it
/// took, and its stdout and stderr.
pub(crate) async fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, Duration, String, String) {
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
            .args(args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command ends by itself")
    .unwrap();
    (
        out.status.success(),
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A local port nothing listens on.
async fn unused_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_with_the_database_down_fails_at_once_naming_its_address() {
    let port = unused_port().await;
    let url = format!("postgres://app:hunter2@127.0.0.1:{port}/kongflow");
    for args in [
        &["jobs", "list"][..],
        &["env", "create", "a/b/c"],
        &["migrate"],
    ] {
        let (ok, took, _, stderr) = run(args, &[("DATABASE_URL", &url)]).await;
        assert!(!ok, "{args:?}: {stderr}");
        assert!(
            took < Duration::from_secs(10),
            "{args:?} took {took:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("127.0.0.1:{port}")),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.to_lowercase().contains("connection refused"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("DATABASE_URL"), "{args:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{args:?}: {stderr}");
        assert!(!stderr.contains("pool timed out"), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_the_server_refuses_says_what_to_set_and_no_source_line() {
    // DATABASE_URL unset: the default URL, as a role the server does not know.
    let (ok, took, _, stderr) = run(
        &["jobs", "list"],
        &[("PGUSER", "kf_no_such_role"), ("USER", "kf_no_such_role")],
    )
    .await;
    assert!(!ok, "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(stderr.contains("postgres://"), "{stderr}");
    assert!(!stderr.contains(" at line "), "{stderr}");
    // Nor any other source location, whatever RUST_BACKTRACE says.
    let (_, _, _, stderr) = run(
        &["jobs", "list"],
        &[("PGUSER", "kf_no_such_role"), ("RUST_BACKTRACE", "1")],
    )
    .await;
    assert!(!stderr.contains(".rs:"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_its_settings_and_takes_durations_with_units() {
    let (ok, _, table, stderr) = run(&["config", "--markdown"], &[]).await;
    assert!(ok, "{stderr}");
    assert!(
        table.starts_with("| variable | flag | default | read by | meaning |"),
        "{table}"
    );
    assert!(table.contains("| `SHUTDOWN_DEADLINE_MS` |"), "{table}");
    let (ok, _, env_file, stderr) = run(&["config"], &[]).await;
    assert!(ok, "{stderr}");
    assert!(env_file.contains("\nRETRY_BASE_MS=1s\n"), "{env_file}");
    assert!(env_file.contains("\n# OPERATOR_TOKEN=\n"), "{env_file}");
    // A duration that does not parse stops the command before it does anything, naming
    // the setting and how to write it.
    let (ok, _, _, stderr) = run(&["relay"], &[("RELAY_POLL_INTERVAL_MS", "soon")]).await;
    assert!(!ok);
    assert!(
        stderr.contains("--relay-poll-interval") && stderr.contains("5s"),
        "{stderr}"
    );
}

/// `config` depends on no other module of the crate, and is the one module that reads the
/// environment.
#[test]
fn config_stands_alone_and_alone_reads_the_environment() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let config = std::fs::read_to_string(src.join("config.rs")).unwrap();
    assert!(
        !config.contains("crate::"),
        "src/config.rs names another module"
    );
    let mut files = vec![src.clone()];
    let mut readers = Vec::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("config.rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            if ["env::var", "var_os(", "from_default_env"]
                .iter()
                .any(|read| text.contains(read))
            {
                readers.push(path);
            }
        }
    }
    assert!(
        readers.is_empty(),
        "read the environment outside src/config.rs: {readers:?}"
    );
}
