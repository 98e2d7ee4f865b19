//! Crash points for the tests that kill a process in the middle of its work, and handler
//! faults for the tests of retries and dead letters.
//!
//! `KONGFLOW_FAILPOINTS` holds a comma-separated list of names. When a named point is
//! reached the process aborts on the spot, as a `kill -9` would end it: no destructors, no
//! acknowledgements, no commits. Unset in production, the check is a cached lookup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The worker has committed a batch and is about to acknowledge its messages.
pub const WORKER_AFTER_COMMIT: &str = "worker-after-commit";
/// The relay has its publisher confirms and is about to mark the jobs published.
pub const RELAY_AFTER_CONFIRM: &str = "relay-after-confirm";
/// The relay has the confirms of outbox messages (the runs hand-off) and is about to delete
/// them.
pub const RELAY_AFTER_MESSAGE_CONFIRM: &str = "relay-after-message-confirm";

/// The ingest consumer has committed a batch and not yet acknowledged its messages: it
/// stops there (see [`pause`]) for a test to kill it.
pub const INGEST_AFTER_COMMIT: &str = "ingest-after-commit";

/// A process has committed jobs it publishes itself (the fast path) and not yet published
/// them.
pub const PUBLISH_AFTER_COMMIT: &str = "publish-after-commit";
/// A worker has committed runs whose hand-offs it publishes itself and not yet published
/// them.
pub const HANDOFF_PUBLISH_AFTER_COMMIT: &str = "handoff-publish-after-commit";

/// The worker has locked a batch's jobs and blocks its thread, as a runaway computation
/// would: for the test of the drain deadline.
pub const WORKER_STALL: &str = "worker-stall";

fn active() -> &'static [String] {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE.get_or_init(crate::config::failpoints)
}

/// If the failpoint `name` is active, say so on stderr and wait forever: the process stays
/// where it is until a test kills it (`kill -9`), as a crash at that point would end it.
pub async fn pause(name: &str) {
    if active().iter().any(|n| n == name) {
        eprintln!("failpoint {name} reached: pausing");
        std::future::pending::<()>().await;
    }
}

/// Abort the process if the failpoint `name` is active.
pub fn hit(name: &str) {
    if active().iter().any(|n| n == name) {
        eprintln!("failpoint {name} hit: aborting");
        std::process::abort();
    }
}

/// Block the calling thread for good if `when` and the failpoint `name` is active (it says
/// so on stderr first). Only the process's exit ends it.
pub fn stall_if(name: &str, when: bool) {
    if when && active().iter().any(|n| n == name) {
        eprintln!("failpoint {name} hit: stalling");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// A handler fault armed by a test: what the handler does instead of its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Return a retryable error.
    Error,
    /// Panic.
    Panic,
}

struct ArmedFault {
    fault: Fault,
    /// The fault fires on attempts up to and including this one.
    through_attempt: i32,
}

static ANY_ARMED: AtomicBool = AtomicBool::new(false);

fn faults() -> &'static Mutex<HashMap<String, ArmedFault>> {
    static FAULTS: OnceLock<Mutex<HashMap<String, ArmedFault>>> = OnceLock::new();
    FAULTS.get_or_init(Default::default)
}

/// Make handlers fail for every job whose `args.id` is `key`, on attempts 1 to
/// `through_attempt` (`i32::MAX`: always). Keys are ids unique to the test that arms them,
/// so tests running side by side do not see each other's faults.
pub fn arm_handler_fault(key: &str, fault: Fault, through_attempt: i32) {
    faults().lock().expect("faults lock").insert(
        key.to_string(),
        ArmedFault {
            fault,
            through_attempt,
        },
    );
    ANY_ARMED.store(true, Ordering::Release);
}

/// Take a fault off again.
pub fn disarm_handler_fault(key: &str) {
    faults().lock().expect("faults lock").remove(key);
}

/// The fault armed for a job with `args.id` `key` on attempt `attempt`, if any. With
/// nothing armed (production) this is one atomic load.
pub fn handler_fault(key: impl std::fmt::Display, attempt: i32) -> Option<Fault> {
    // Unarmed (always, outside the tests), the key is not even written out.
    if !ANY_ARMED.load(Ordering::Acquire) {
        return None;
    }
    let faults = faults().lock().expect("faults lock");
    faults
        .get(&key.to_string())
        .filter(|f| attempt <= f.through_attempt)
        .map(|f| f.fault)
}
