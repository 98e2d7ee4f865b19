//! Keeping a role running: restart it with exponential backoff when its connections fail.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Waits between attempts: from 100 ms, doubling to 5 s, with jitter, without end.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Run `attempt` until it returns `Ok` or `shutdown` fires, sleeping with exponential
/// backoff between failures. The backoff starts over after a run that lasted a while, so a
/// connection that drops once a day reconnects at once.
pub async fn supervise<F, Fut, E>(name: &str, shutdown: CancellationToken, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut backoff = reconnect_backoff();
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        match attempt().await {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => tracing::warn!(role = name, "stopped; starting again"),
            Err(e) => {
                crate::metrics::metrics()
                    .reconnects
                    .with_label_values(&[name])
                    .inc();
                tracing::error!(role = name, error = %e, "failed; reconnecting");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = reconnect_backoff();
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
