//! What a platform team installs: the image's Dockerfile, the broker definitions, the Helm
//! chart (rendered and validated without helm or a cluster), and the processes the chart
//! renders, run here against the real Postgres and RabbitMQ.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, wait_until};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Python of `target/chart-venv`, where `scripts/test.sh` installs the Helm SDK.
pub(crate) fn chart_python() -> String {
    let python = format!("{ROOT}/target/chart-venv/bin/python");
    assert!(
        Path::new(&python).exists(),
        "run scripts/test.sh: it installs the Helm SDK in target/chart-venv"
    );
    python
}

/// The chart's manifests rendered with these values (`scripts/chart.py render`).
pub(crate) fn render(values: &Value) -> Vec<Value> {
    let out = std::process::Command::new(chart_python())
        .args([
            &format!("{ROOT}/scripts/chart.py"),
            "render",
            &values.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_dockerfile_builds_what_ci_builds_from_files_that_exist() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let ignored = std::fs::read_to_string(format!("{ROOT}/.dockerignore")).unwrap();
    let release = std::fs::read_to_string(format!("{ROOT}/scripts/run.sh")).unwrap();
    // The release build of the scripts, minus `--quiet`: same command, features, profile.
    let ci_build = release
        .lines()
        .find(|l| l.starts_with("cargo build --release"))
        .unwrap()
        .replace(" --quiet", "");
    assert_eq!(ci_build, "cargo build --release --locked");
    let builds: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("cargo build"))
        .collect();
    assert!(!builds.is_empty());
    for line in builds {
        let command = line.trim_end().trim_end_matches('\\').trim_end();
        assert!(command.ends_with(&ci_build), "{line}");
    }
    assert!(
        dockerfile.contains("SQLX_OFFLINE=true"),
        "the offline .sqlx build"
    );
    // Every file the build copies from the context exists and is not ignored.
    let excluded: Vec<&str> = ignored
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let mut copied = 0;
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        if line.contains("--from=") {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().skip(1).collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                Path::new(ROOT).join(source).exists(),
                "COPY {source}: no such file"
            );
            assert!(
                !excluded.contains(source),
                "COPY {source}: .dockerignore leaves it out"
            );
            copied += 1;
        }
    }
    assert!(copied >= 6, "{copied}");
    // Every target Cargo.toml declares gets a stub in the dependency layer (a bench
    // declared and not stubbed stops the build: the manifest names a missing file).
    let manifest = std::fs::read_to_string(format!("{ROOT}/Cargo.toml")).unwrap();
    assert!(
        dockerfile.contains(
            r#"sed -n '/^\[\[bench\]\]/,/^$/s/^name = "\(.*\)"/benches\/\1.rs/p' Cargo.toml"#
        ),
        "the dependency layer stubs the benches Cargo.toml names"
    );
    assert!(!manifest.contains("[[example]]") && !manifest.contains("[[test]]"));
    // The bases are build arguments defaulting to the public images (scripts/image.sh
    // passes local ones).
    assert!(dockerfile.contains("\nFROM ${BUILD_IMAGE} AS build\n"));
    assert!(dockerfile.contains("ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot\n"));
    // The runtime stage: the binary and the migrations, no shell, not root.
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(runtime.starts_with("${RUNTIME_IMAGE}\n"), "{runtime}");
    assert!(runtime.contains("/src/target/release/kongflow-events"));
    assert!(runtime.contains("/src/migrations"));
    assert!(
        Path::new(ROOT)
            .join("migrations")
            .read_dir()
            .unwrap()
            .count()
            > 0
    );
    assert!(runtime.contains("USER nonroot"));
    assert!(runtime.contains(r#"ENTRYPOINT ["/usr/local/bin/kongflow-events"]"#));
}

#[test]
fn the_rabbitmq_definitions_are_what_the_code_declares() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .args(["topology", "--definitions"])
        .env_remove("AMQP_PREFIX")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/rabbitmq/definitions.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        printed, committed,
        "rabbitmq/definitions.json is stale: kongflow-events topology --definitions > rabbitmq/definitions.json"
    );
    let queues = committed["queues"].as_array().unwrap();
    let work = queues
        .iter()
        .find(|q| q["name"] == "kongflow.deliverEvent")
        .unwrap();
    assert_eq!(work["arguments"], json!({"x-max-priority": 4}));
    let tier = queues
        .iter()
        .find(|q| q["name"] == "kongflow.delay.05.3072ms")
        .unwrap();
    assert_eq!(
        tier["arguments"],
        json!({"x-message-ttl": 3072, "x-dead-letter-exchange": "kongflow.delay.04"})
    );
}

#[test]
fn the_chart_lints_renders_and_validates_and_refuses_nonsense() {
    let out = std::process::Command::new(chart_python())
        .args([&format!("{ROOT}/scripts/chart.py"), "check"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("chart ok"), "{text}");
    eprintln!("{text}");
}

/// One container of a rendered workload: its args and its environment as Kubernetes would
/// assemble it (ConfigMap, then Secret, then the container's own `env`).
pub(crate) struct Container {
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub ports: BTreeMap<String, u16>,
    /// The container's `securityContext`, as rendered.
    pub security: Value,
}

pub(crate) fn containers(manifests: &[Value], kind: &str, name_suffix: &str) -> Vec<Container> {
    let data_of = |kind: &str, field: &str| -> BTreeMap<String, String> {
        manifests
            .iter()
            .filter(|m| m["kind"] == kind)
            .flat_map(|m| m[field].as_object().cloned().unwrap_or_default())
            .map(|(k, v)| (k, v.as_str().unwrap().to_string()))
            .collect()
    };
    let config = data_of("ConfigMap", "data");
    let secret = data_of("Secret", "stringData");
    let workload = manifests
        .iter()
        .find(|m| {
            m["kind"] == kind
                && m["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .ends_with(name_suffix)
        })
        .unwrap_or_else(|| panic!("no {kind} *{name_suffix}"));
    let spec = &workload["spec"]["template"]["spec"];
    let mut all: Vec<Value> = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    all.extend(spec["containers"].as_array().cloned().unwrap());
    all.iter()
        .map(|c| {
            let mut env = config.clone();
            env.extend(secret.clone());
            for e in c["env"].as_array().into_iter().flatten() {
                env.insert(
                    e["name"].as_str().unwrap().into(),
                    e["value"].as_str().unwrap().into(),
                );
            }
            Container {
                args: c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect(),
                env,
                ports: c["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap().to_string(),
                            p["containerPort"].as_u64().unwrap() as u16,
                        )
                    })
                    .collect(),
                security: c["securityContext"].clone(),
            }
        })
        .collect()
}

/// Where the chart mounts the stores' CA certificates (`database.caCert`, `amqp.caCert`).
const TLS_MOUNTS: &str = "/etc/kongflow/tls/";

/// Start a container's process here, with only its rendered environment (and overrides).
/// A CA file the chart mounts is, here, the CA of scripts/tls-test.sh's servers.
fn start(c: &Container, overrides: &[(&str, String)]) -> tokio::process::Child {
    let mut env = c.env.clone();
    for value in env.values_mut() {
        if value.starts_with(TLS_MOUNTS) {
            let dir = std::env::var("KONGFLOW_TLS_DIR").expect("a CA mounted only under TLS");
            *value = format!("{dir}/ca.crt");
        }
    }
    for (k, v) in overrides {
        env.insert(k.to_string(), v.clone());
    }
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
        .args(&c.args)
        .env_clear()
        .envs(env)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Two ports nothing listens on now, picked by the system.
pub(crate) fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

pub(crate) async fn probes_answer(app: &TestApp, port: u16) {
    for path in ["healthz", "readyz"] {
        let url = format!("http://127.0.0.1:{port}/{path}");
        wait_until(
            &format!("{url} to answer 200"),
            Duration::from_secs(30),
            || async {
                matches!(app.http.get(&url).send().await, Ok(r) if r.status() == StatusCode::OK)
            },
        )
        .await;
    }
}

/// The default render, pointed at this test's stores and name prefix, on ports the system
/// picks (the chart's own, 3030 and 9464, may be taken by a service running here).
pub(crate) fn values_for(app: &TestApp) -> Value {
    let (http_port, metrics_port) = free_ports();
    json!({
        "ports": {"http": http_port, "metrics": metrics_port},
        "database": {"url": app.database_url},
        "amqp": {"url": app.store.amqp_url},
        "config": {
            "AMQP_PREFIX": app.store.amqp_prefix,
            "AMQP_QUEUE_EXPIRES_MS": "600000",
            "SHARD_COUNT": app.store.shard_count.to_string(),
            "AMQP_QUEUE_TYPE": app.child_env().into_iter()
                .find(|(k, _)| *k == "AMQP_QUEUE_TYPE").unwrap().1,
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_processes_the_chart_renders_run_and_deliver_an_event() {
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    let mut values = values_for(&app);
    // On the TLS servers of scripts/tls-test.sh, the chart's TLS settings: verify-full
    // with the CA from a Secret, amqps with the CA from another (the URL naming none).
    let tls = std::env::var("KONGFLOW_TLS_DIR").is_ok();
    if tls {
        values["database"]["sslMode"] = json!("verify-full");
        values["database"]["caCert"] = json!({"secret": "postgres-ca"});
        let amqps = app.store.amqp_url.split('?').next().unwrap();
        values["amqp"] = json!({"url": amqps, "caCert": {"secret": "rabbitmq-ca"}});
    }
    let manifests = render(&values);
    if tls {
        for c in containers(&manifests, "Deployment", "-worker") {
            assert_eq!(c.env["PGSSLMODE"], "verify-full");
            assert_eq!(
                c.env["PGSSLROOTCERT"],
                format!("{TLS_MOUNTS}postgres/ca.crt")
            );
            assert_eq!(
                c.env["AMQP_TLS_CA_FILE"],
                format!("{TLS_MOUNTS}amqp/ca.crt")
            );
        }
    }

    // The Job: migrations, then the topology; each exits 0.
    for c in containers(&manifests, "Job", "-migrate-1") {
        let status = tokio::time::timeout(Duration::from_secs(60), start(&c, &[]).wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{:?} failed", c.args);
    }
    // Ingest, relay and worker: each ready on the port its manifest names.
    for role in ["-ingest", "-relay", "-worker"] {
        let c = &containers(&manifests, "Deployment", role)[0];
        assert!(c.env["KONGFLOW_NO_MIGRATE"] == "true");
        let mut child = start(c, &[]);
        probes_answer(&app, c.ports["metrics"]).await;
        child.kill().await.unwrap();
        let _ = child.wait().await;
    }
    // The API on its ports; relay and worker beside it (their metrics port moved: here
    // they share one host, in the cluster each pod has its own).
    let api = &containers(&manifests, "Deployment", "-api")[0];
    let mut running = vec![start(api, &[])];
    probes_answer(&app, api.ports["metrics"]).await;
    for role in ["-ingest", "-relay", "-worker"] {
        let c = &containers(&manifests, "Deployment", role)[0];
        running.push(start(c, &[("METRICS_ADDR", "127.0.0.1:0".into())]));
    }
    // The Service sends its port to the container port named `http`.
    let service = manifests
        .iter()
        .find(|m| m["kind"] == "Service" && m["spec"]["ports"][0]["name"] == "http")
        .unwrap();
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let base = format!("http://127.0.0.1:{}", api.ports["http"]);
    let metrics_on_api = app
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        metrics_on_api.status(),
        StatusCode::NOT_FOUND,
        "metrics stay off the API port"
    );
    let put = app.put_job_at(&base, "chart-job", "chart.event").await;
    assert_eq!(put, StatusCode::OK);
    let sent = app
        .http
        .post(format!("{base}/api/v1/events"))
        .bearer_auth(&app.api_key)
        .json(&json!({"event": {"name": "chart.event", "id": "chart-1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::OK);
    wait_until("the event's run", Duration::from_secs(30), || async {
        app.runs_by_job("chart-1").await == vec![("chart-job".to_string(), 1)]
    })
    .await;
    for mut child in running {
        child.kill().await.unwrap();
        let _ = child.wait().await;
    }
}

/// KEDA scales the workers on the queues the service declares, whatever the shards and the
/// queue type: a trigger on a queue name that does not exist would read 0 forever.
#[test]
fn keda_watches_the_work_queues_the_service_declares() {
    use kongflow_events::amqp::Topology;
    use kongflow_events::config::QueueType;
    use kongflow_events::ledger::JobKind;
    for (shards, queue_type, name) in [
        (1u16, QueueType::Classic, "classic"),
        (3, QueueType::Classic, "classic"),
        (1, QueueType::Quorum, "quorum"),
        (2, QueueType::Quorum, "quorum"),
    ] {
        let values = json!({
            "database": {"url": "postgres://kongflow:secret@postgres:5432/kongflow"},
            "amqp": {"url": "amqp://kongflow:secret@rabbitmq:5672/kongflow"},
            "config": {"AMQP_PREFIX": "kf", "SHARD_COUNT": shards.to_string(), "AMQP_QUEUE_TYPE": name},
            "worker": {"keda": {"enabled": true}},
        });
        let manifests = render(&values);
        let mut watched: Vec<String> = manifests
            .iter()
            .filter(|m| m["kind"] == "ScaledObject")
            .flat_map(|m| m["spec"]["triggers"].as_array().unwrap().clone())
            .map(|t| t["metadata"]["queueName"].as_str().unwrap().to_string())
            .collect();
        watched.sort();
        let topology = Topology::new("kf")
            .with_shards(shards)
            .with_queue_type(queue_type);
        let mut declared: Vec<String> = JobKind::ALL
            .into_iter()
            .flat_map(|k| topology.queues(k))
            .collect();
        declared.sort();
        assert_eq!(watched, declared, "{shards} shards, {name}");
    }
}

/// A rollback: this build's migration Job and processes on a database a release ahead
/// (migrations this build does not know applied on top of all of its own). The Job applies
/// nothing and says so; a process is ready. An applied migration whose text differs from
/// this build's is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_build_runs_on_a_database_one_release_ahead() {
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000001, 'a later release', true, '\\x00', 1)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let migrate = || async {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kongflow-events"))
            .arg("migrate")
            .env("DATABASE_URL", &app.database_url)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap()
    };
    let out = migrate().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 migration(s) of a later release (29991231000001 to 29991231000001)"),
        "{stdout}"
    );
    let (mut child, _) = app
        .start_child("serve", &[("KONGFLOW_NO_MIGRATE", "true")])
        .await;
    child.kill().await.unwrap();
    // One of this build's own migrations changed under it: refused, not skipped.
    sqlx::query(
        "UPDATE _sqlx_migrations SET checksum = '\\x01'
         WHERE version = (SELECT min(version) FROM _sqlx_migrations)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let out = migrate().await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("modified"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
