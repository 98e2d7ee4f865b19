//! RabbitMQ: connections, the topology, and the format of job messages.

pub mod direct;
pub mod message;
pub mod owner;
pub mod publish;
pub mod tiers;
pub mod topology;

pub use direct::{DirectPublisher, STAMPED};
pub use message::{JobMessage, Unrunnable};
pub use publish::publish_job;
pub use topology::Topology;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

/// The node addresses of an `AMQP_URL`: one URL, or several separated by commas (the nodes
/// of a cluster, each a whole URL).
pub fn addresses(url: &str) -> Vec<&str> {
    crate::config::url_list(url)
}

/// How long one node of several may take to accept a connection before the next is tried
/// (a node that is gone may drop packets rather than refuse).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The same with one node: longer, since a busy broker may be slow to answer, but bounded,
/// since a broker still booting may take the connection and never finish the handshake
/// (the caller's retry then opens a fresh one).
pub const SOLE_NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Open one connection, to the first node of `url` ([`addresses`]) that accepts it, starting
/// from a different node on each call so a process's connections spread over a cluster; a
/// node that refuses, or of several one that does not answer within [`CONNECT_TIMEOUT`], is
/// skipped. A refusal of
/// the credentials or the virtual host ends the attempt at once (a cluster shares them).
/// Callers own reconnection: the relay and the worker run inside a supervisor loop that
/// reconnects with backoff when the connection drops, which lands on the next node.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nodes = addresses(url);
    if nodes.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "AMQP_URL names no node",
        )
        .into());
    }
    let first = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut failure = None;
    for i in 0..nodes.len() {
        let node = nodes[(first + i) % nodes.len()];
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let wait = if nodes.len() > 1 {
            CONNECT_TIMEOUT
        } else {
            SOLE_NODE_CONNECT_TIMEOUT
        };
        let tls = match tls_of(node) {
            Ok(tls) => tls,
            Err(e) => return Err(e.into()),
        };
        let attempt = tokio::time::timeout(
            wait,
            Connection::connect_with_config(
                node,
                properties,
                tls,
                lapin::runtime::default_runtime()?,
            ),
        );
        let e = match attempt.await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) if is_permanent(&e) => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            )
            .into(),
        };
        if nodes.len() > 1 {
            tracing::warn!(node = %crate::config::redact_url(node), error = %e, connection = name,
                "RabbitMQ node unreachable; trying the next");
        }
        failure = Some(e);
    }
    Err(failure.expect("at least one node was tried"))
}

/// The URL parameter naming the PEM file of the CA certificates that signed an `amqps://`
/// node's certificate (RabbitMQ's own name for it; `AMQP_TLS_CA_FILE` adds it to every
/// `amqps://` URL that names none).
pub const CA_FILE_PARAM: &str = "cacertfile";

/// The TLS settings of one node's URL: for `amqps://`, the certificates of the CA file its
/// `cacertfile` names, trusted beside the public roots built in. The broker's certificate
/// is always checked, against the host the URL names. A file that cannot be read or holds
/// no certificate is an error that waiting does not fix ([`is_permanent`]).
fn tls_of(node: &str) -> std::io::Result<OwnedTLSConfig> {
    let invalid =
        |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, CaFileError(why));
    let Ok(url) = url::Url::parse(node) else {
        return Ok(OwnedTLSConfig::default());
    };
    let Some((_, path)) = url.query_pairs().find(|(k, _)| k == CA_FILE_PARAM) else {
        return Ok(OwnedTLSConfig::default());
    };
    let pem = std::fs::read_to_string(&*path).map_err(|e| {
        invalid(format!(
            "cannot read the CA file {path} ({CA_FILE_PARAM} of AMQP_URL, or \
             AMQP_TLS_CA_FILE): {e}"
        ))
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid(format!(
            "the CA file {path} ({CA_FILE_PARAM} of AMQP_URL, or \
             AMQP_TLS_CA_FILE) holds no PEM certificate"
        )));
    }
    Ok(OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pem),
    })
}

/// Connect for a role's loop, named for the role and the prefix (`kongflow-worker:P`, as
/// the broker's connection list shows it), and declare the topology.
pub async fn connect_declared(
    url: &str,
    role: &str,
    topology: &Topology,
) -> lapin::Result<Connection> {
    let conn = connect(url, &format!("kongflow-{role}:{}", topology.prefix())).await?;
    let setup = conn.create_channel().await?;
    topology.declare(&setup).await?;
    Ok(conn)
}

/// Whether connecting failed for a reason that waiting will not fix: the broker refused the
/// credentials or the virtual host, its TLS certificate is not trusted ([`is_untrusted`]),
/// or the CA file to check it with cannot be used ([`is_ca_file_error`]).
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
        || is_untrusted(e)
        || is_ca_file_error(e)
}

/// A node's CA file (`cacertfile`, `AMQP_TLS_CA_FILE`) that cannot be read or holds no
/// certificate; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CaFileError(String);

/// Whether [`connect`] gave up before connecting because of the CA file ([`CaFileError`]).
pub fn is_ca_file_error(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::IOError(io)
        if io.get_ref().is_some_and(|inner| inner.is::<CaFileError>()))
}

/// Whether the broker refused an operation because a queue or exchange it names does not
/// exist (404, a channel-level error): the topology is not declared yet.
pub fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Whether the broker's TLS certificate was refused: signed by no CA this process trusts,
/// for another host, or expired.
pub fn is_untrusted(e: &lapin::Error) -> bool {
    let text = e.to_string();
    !is_ca_file_error(e) && (text.contains("certificate") || text.contains("Certificate"))
}
