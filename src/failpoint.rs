//! Crash points for the tests that kill a process in the middle of its work.
//!
//! `KONGFLOW_FAILPOINTS` holds a comma-separated list of names. When a named point is
//! reached the process aborts on the spot, as a `kill -9` would end it: no destructors, no
//! acknowledgements, no commits. Unset in production, the check is a cached lookup.

use std::sync::OnceLock;

/// The worker has committed a batch and is about to acknowledge its messages.
pub const WORKER_AFTER_COMMIT: &str = "worker-after-commit";
/// The relay has its publisher confirms and is about to mark the jobs published.
pub const RELAY_AFTER_CONFIRM: &str = "relay-after-confirm";

fn active() -> &'static [String] {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        std::env::var("KONGFLOW_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

/// Abort the process if the failpoint `name` is active.
pub fn hit(name: &str) {
    if active().iter().any(|n| n == name) {
        eprintln!("failpoint {name} hit: aborting");
        std::process::abort();
    }
}
