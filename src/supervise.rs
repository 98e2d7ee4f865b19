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

/// [`supervise`] a role's connected loop: each attempt gets its own copy of the role, the
/// broker's URL and the shutdown token (`connected(role, url, shutdown)`).
pub async fn supervise_connected<T, F, Fut, E>(
    name: &str,
    role: T,
    url: String,
    shutdown: CancellationToken,
    connected: F,
) where
    T: Clone,
    F: Fn(T, String, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    supervise(name, shutdown.clone(), || {
        connected(role.clone(), url.clone(), shutdown.clone())
    })
    .await
}

/// Wait for a connection's consumer tasks. One failing means the connection is suspect:
/// the others are aborted (the messages they held unacknowledged come back from the
/// broker) and the first error is returned; `lost` describes a task that panicked or was
/// cancelled before any error.
pub async fn until_first_failure<E>(
    mut tasks: tokio::task::JoinSet<Result<(), E>>,
    lost: impl Fn(String) -> E,
) -> Result<(), E>
where
    E: 'static,
{
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(|e| lost(e.to_string())).and_then(|r| r);
        if let Err(e) = outcome
            && result.is_ok()
        {
            // The others then end as cancelled: the first error is the one to report.
            tasks.abort_all();
            result = Err(e);
        }
    }
    result
}
