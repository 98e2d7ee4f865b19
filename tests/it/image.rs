//! The image as the chart runs it. `scripts/image.sh test` builds it from the Dockerfile
//! (buildah), mounts its root filesystem read-only (with /proc, and the host's /etc/hosts
//! and /etc/resolv.conf as the kubelet mounts them) and runs these tests: each container of
//! the rendered chart runs in it with chroot, as the image's user, with only the
//! environment its manifest gives it, against the local Postgres and RabbitMQ.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::deploy::{Container, containers, probes_answer, render, values_for};
use crate::helpers::{TestApp, sigterm, wait_until};

/// The built image: its root filesystem (read-only) and its configuration.
struct Image {
    root: PathBuf,
    entrypoint: Vec<String>,
    uid: u32,
    gid: u32,
}

fn image() -> Image {
    let root = PathBuf::from(
        std::env::var("KONGFLOW_IMAGE_ROOT")
            .expect("run scripts/image.sh test: it builds the image"),
    );
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(std::env::var("KONGFLOW_IMAGE_CONFIG").unwrap()).unwrap(),
    )
    .unwrap();
    let user = config["User"].as_str().expect("the image names its user");
    let (name, group) = user.split_once(':').unwrap_or((user, user));
    let id_of = |file: &str, name: &str| -> u32 {
        name.parse().unwrap_or_else(|_| {
            let table = std::fs::read_to_string(root.join(file)).unwrap();
            table
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f[0] == name)
                .unwrap_or_else(|| panic!("{name} is not in the image's {file}"))[2]
                .parse()
                .unwrap()
        })
    };
    Image {
        uid: id_of("etc/passwd", name),
        gid: id_of("etc/group", group),
        entrypoint: serde_json::from_value(config["Entrypoint"].clone()).unwrap(),
        root,
    }
}

impl Image {
    /// A container's process in the image: `chroot` to its root as its user, the
    /// entrypoint with the container's args, only the rendered environment (and overrides).
    fn start(&self, c: &Container, overrides: &[(&str, String)]) -> tokio::process::Child {
        let mut env: BTreeMap<String, String> = c.env.clone();
        for (k, v) in overrides {
            env.insert(k.to_string(), v.clone());
        }
        tokio::process::Command::new("/usr/sbin/chroot")
            .arg(format!("--userspec={}:{}", self.uid, self.gid))
            .arg(&self.root)
            .args(&self.entrypoint)
            .args(&c.args)
            .env_clear()
            .envs(env)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }
}

/// SIGTERM, as the kubelet sends it after the preStop hook; how long the process took to
/// exit, and whether it exited 0.
async fn terminate(child: &mut tokio::process::Child) -> (Duration, bool) {
    let started = Instant::now();
    sigterm(child);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the process exits after SIGTERM")
        .unwrap();
    (started.elapsed(), status.success())
}

/// Every executable regular file under `dir` (but /proc, mounted there as in a pod).
fn executables(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() && entry.file_name() == "proc" && dir.join("proc/self").exists() {
            continue;
        } else if kind.is_dir() {
            executables(&entry.path(), found);
        } else if kind.is_file() && entry.metadata().unwrap().permissions().mode() & 0o111 != 0 {
            found.push(entry.path());
        }
    }
}

#[test]
#[ignore = "needs the image of scripts/image.sh test"]
fn the_image_runs_the_binary_as_the_charts_user_and_holds_nothing_else_that_runs() {
    let image = image();
    assert_eq!(image.entrypoint, ["/usr/local/bin/kongflow-events"]);
    // The image's user is the one the chart runs as, and not root.
    let manifests = render(&json!({
        "database": {"url": "postgres://a@b/c"}, "amqp": {"url": "amqp://a@b/%2f"}
    }));
    let pod = &manifests
        .iter()
        .find(|m| m["kind"] == "Deployment")
        .unwrap()["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true);
    assert_eq!(pod["runAsUser"], image.uid);
    assert_eq!(pod["runAsGroup"], image.gid);
    assert_ne!(image.uid, 0);
    // What can run: the binary, and the shared libraries it loads. No shell, no package
    // manager, no other program.
    let mut found = Vec::new();
    executables(&image.root, &mut found);
    let others: Vec<_> = found
        .iter()
        .map(|p| p.strip_prefix(&image.root).unwrap().to_path_buf())
        // (/etc/hosts and /etc/resolv.conf are the host's, mounted as the kubelet mounts
        // its own.)
        .filter(|p| !["etc/hosts", "etc/resolv.conf"].contains(&p.to_str().unwrap()))
        .filter(|p| {
            p != Path::new("usr/local/bin/kongflow-events")
                && !p.file_name().unwrap().to_string_lossy().contains(".so")
        })
        .collect();
    assert!(
        others.is_empty(),
        "programs besides the service: {others:?}"
    );
    for shell in [
        "bin/sh",
        "usr/bin/sh",
        "bin/bash",
        "usr/bin/apt",
        "usr/bin/dpkg",
    ] {
        assert!(!image.root.join(shell).exists(), "{shell}");
    }
    // The root is read-only, as the chart's readOnlyRootFilesystem makes it.
    let probe = std::fs::write(image.root.join("tmp/probe"), "x").unwrap_err();
    assert_eq!(
        probe.kind(),
        std::io::ErrorKind::ReadOnlyFilesystem,
        "{probe}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image of scripts/image.sh test"]
async fn the_charts_containers_run_in_the_image_deliver_and_drain_on_sigterm() {
    let image = image();
    let app = TestApp::builder()
        .roles(crate::helpers::NO_ROLES)
        .start()
        .await;
    let values = values_for(&app);
    let manifests = render(&values);
    let grace = Duration::from_secs(
        manifests
            .iter()
            .find(|m| m["kind"] == "Deployment")
            .unwrap()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap(),
    );
    // The Job's containers, in order: migrations, then the topology; each exits 0.
    for c in containers(&manifests, "Job", "-migrate-1") {
        assert_eq!(c.security["readOnlyRootFilesystem"], true);
        let status = tokio::time::timeout(Duration::from_secs(60), image.start(&c, &[]).wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{:?} failed in the image", c.args);
    }
    // The four Deployments at once, each ready on its metrics port (moved apart: here they
    // share one host, in the cluster each pod has its own).
    let mut running = BTreeMap::new();
    for role in ["-api", "-ingest", "-relay", "-worker"] {
        let c = containers(&manifests, "Deployment", role).remove(0);
        assert_eq!(c.security["readOnlyRootFilesystem"], true);
        let port = if role == "-api" {
            c.ports["metrics"]
        } else {
            crate::deploy::free_ports().0
        };
        let child = image.start(&c, &[("METRICS_ADDR", format!("127.0.0.1:{port}"))]);
        probes_answer(&app, port).await;
        running.insert(role, (c, port, child));
    }
    let base = format!("http://127.0.0.1:{}", running["-api"].0.ports["http"]);
    let put = app.put_job_at(&base, "image-job", "image.event").await;
    assert!(put.is_success());
    let send = |from: usize, n: usize| {
        let (http, base, key) = (app.http.clone(), base.clone(), app.api_key.clone());
        async move {
            for i in from..from + n {
                let r = http
                    .post(format!("{base}/api/v1/events"))
                    .bearer_auth(&key)
                    .json(&json!({"event": {"name": "image.event", "id": format!("image-{i}")}}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            }
        }
    };
    let runs = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*), count(DISTINCT event_record_id) FROM job_runs",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    send(0, 20).await;
    wait_until("20 runs", Duration::from_secs(30), || async {
        runs(app.pool.clone()).await == (20, 20)
    })
    .await;

    // A worker stopped while events arrive: it drains within the grace period and exits 0;
    // a new one takes over, and every event has its one run.
    let sending = tokio::spawn(send(20, 200));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, port, mut worker) = running.remove("-worker").unwrap();
    let (took, clean) = terminate(&mut worker).await;
    assert!(clean, "the worker exited non-zero after SIGTERM");
    assert!(
        took < grace,
        "the worker took {took:?} to drain; the grace is {grace:?}"
    );
    let replacement = image.start(&c, &[("METRICS_ADDR", format!("127.0.0.1:{port}"))]);
    running.insert("-worker", (c, port, replacement));
    sending.await.unwrap();
    wait_until(
        "220 runs, one per event",
        Duration::from_secs(60),
        || async { runs(app.pool.clone()).await == (220, 220) },
    )
    .await;

    // Every process stops cleanly within the chart's grace period.
    for (role, (_, _, mut child)) in running {
        let (took, clean) = terminate(&mut child).await;
        assert!(clean, "{role} exited non-zero after SIGTERM");
        assert!(took < grace, "{role} took {took:?}; the grace is {grace:?}");
    }
}
