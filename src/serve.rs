//! Serving a router over HTTP/1 with the timeouts and the connection cap a public listener
//! needs, and a graceful stop: `axum::serve` has neither a header-read timeout nor a cap,
//! so connections are served here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client may take to send a request's headers, counted from the
    /// connection's start or from the end of the previous response: a slow client cannot
    /// hold a connection by trickling headers, and an idle keep-alive connection is closed
    /// after it too.
    pub header_timeout: Duration,
    /// Most connections open at once (see [`serve`]).
    pub max_connections: usize,
}

/// An open connection, as the cap sees it.
struct Open {
    /// Asks the connection to close.
    stop: CancellationToken,
    /// Whether a request has come on it: one that never sent one is closed at once when
    /// asked, one that did after its answer.
    spoke: Arc<AtomicBool>,
}

type OpenConnections = Arc<Mutex<BTreeMap<u64, Open>>>;

/// Serve `router` on `listener` until `shutdown`, then let the requests in flight finish
/// (the process's drain deadline bounds how long). Each request carries the client's
/// address as `ConnectInfo<SocketAddr>`.
///
/// At most `limits.max_connections` connections are open at once. At the cap, the next
/// connection is not accepted (it waits in the kernel's listen backlog, holding no file
/// of this process) until one closes; meanwhile the open ones are asked to close, oldest
/// first, every 50 ms: first those that never sent a request (closed at once: idle
/// sockets opened to exhaust the cap go first, a client that sends its request as it
/// connects is not among them), then any other (closed after its answer, so no request is
/// cut). A client on a fresh connection is so served within milliseconds however many
/// idle sockets are open, and the process's own database and broker connections never
/// run short of files.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open: OpenConnections = Arc::default();
    let connections = TaskTracker::new();
    let mut next_id: u64 = 0;
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = take_slot(&slots, &open) => slot,
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // A connection reset before accept, out of file descriptors: wait a
                    // little instead of spinning, and go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let stop = shutdown.child_token();
        let spoke = Arc::new(AtomicBool::new(false));
        open.lock().expect("connections lock").insert(
            id,
            Open {
                stop: stop.clone(),
                spoke: spoke.clone(),
            },
        );
        let service = {
            let router = router.clone();
            let spoke = spoke.clone();
            hyper::service::service_fn(move |mut request: hyper::Request<_>| {
                spoke.store(true, Ordering::Relaxed);
                request.extensions_mut().insert(ConnectInfo(peer));
                router.clone().call(request)
            })
        };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let registered = Registered {
            id,
            open: open.clone(),
        };
        connections.spawn(async move {
            let _slot = slot;
            let _registered = registered;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    if !spoke.load(Ordering::Relaxed) {
                        // Never sent a request: closed now.
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // Timeouts and resets end connections with an error: nothing to act on.
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    // The connections' tokens are children of `shutdown`: each is closing now.
    connections.close();
    connections.wait().await;
    Ok(())
}

/// A place for one more connection: at once below the cap; at it, once the oldest
/// connections asked to close have (see [`serve`]).
async fn take_slot(slots: &Arc<Semaphore>, open: &OpenConnections) -> OwnedSemaphorePermit {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return slot;
    }
    loop {
        ask_oldest_to_close(open);
        if let Ok(Ok(slot)) =
            tokio::time::timeout(Duration::from_millis(50), slots.clone().acquire_owned()).await
        {
            return slot;
        }
    }
}

/// Ask the oldest connection that never sent a request to close, or failing one, the
/// oldest not yet asked.
fn ask_oldest_to_close(open: &OpenConnections) {
    let open = open.lock().expect("connections lock");
    let waiting = |c: &&Open| !c.stop.is_cancelled();
    let chosen = open
        .values()
        .filter(waiting)
        .find(|c| !c.spoke.load(Ordering::Relaxed))
        .or_else(|| open.values().find(waiting));
    if let Some(c) = chosen {
        c.stop.cancel();
    }
}

/// Takes a connection off the open ones when its task ends.
struct Registered {
    id: u64,
    open: OpenConnections,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&self.id);
        }
    }
}

/// The address a request came from, if the listener said.
pub fn peer(request: &axum::extract::Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}
