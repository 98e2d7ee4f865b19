//! How long a test's setup and its cleanup take, twenty tests one after another (not part
//! of the suite: `cargo test --test it setup_timing -- --ignored --nocapture`).

use std::time::Instant;

use crate::helpers::{NO_ROLES, TestApp};

fn summary(what: &str, times: &[f64]) {
    let total: f64 = times.iter().sum();
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "{what} of 20 tests: total {total:.0} ms, mean {:.0} ms, median {:.0} ms, min {:.0} ms, max {:.0} ms; each: {times:.0?}",
        total / 20.0,
        sorted[10],
        sorted[0],
        sorted[19]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn setup_time_of_twenty_tests() {
    let mut setup = Vec::new();
    let mut teardown = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let app = TestApp::builder().roles(NO_ROLES).start().await;
        setup.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        drop(app);
        teardown.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    summary("setup", &setup);
    summary("teardown", &teardown);
}
