//! RabbitMQ: connections, the topology, and the format of job messages.

pub mod direct;
pub mod message;
pub mod publish;
pub mod tiers;
pub mod topology;

pub use direct::DirectPublisher;
pub use message::JobMessage;
pub use publish::publish_job;
pub use topology::Topology;

use lapin::{Connection, ConnectionProperties};

/// Open one connection. Callers own reconnection: the relay and the worker run inside a
/// supervisor loop that reconnects with backoff when the connection drops.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
}

/// Whether connecting failed for a reason that waiting will not fix: the broker refused the
/// credentials or the virtual host.
pub fn is_permanent(e: &lapin::Error) -> bool {
    let text = e.to_string();
    [
        "ACCESS_REFUSED",
        "ACCESS-REFUSED",
        "NOT_ALLOWED",
        "NOT-ALLOWED",
    ]
    .iter()
    .any(|refusal| text.contains(refusal))
}
