//! Who owns a prefix on the broker. Two installations (two databases) given the same
//! `AMQP_PREFIX` would consume each other's job messages, and each would dead-letter the
//! other's as naming no job of its ledger. So each installation claims its prefix at start:
//! the queue `P.install` holds one message, the installation's id (`db::installation`). A
//! process whose database holds another id refuses to start, saying which variable to
//! change; job messages carry the id ([`INSTALL_HEADER`]), and a worker gives another
//! installation's message back to the queue instead of running or dead-lettering it.

use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use uuid::Uuid;

use super::Topology;
use crate::config::QueueType;

/// The header of a job message naming the installation that published it.
pub const INSTALL_HEADER: &str = "x-kongflow-install";

/// What the broker says of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours (claimed now, or before).
    Ours,
    /// Another installation's.
    Taken(Uuid),
}

/// The queue that holds the owner's id.
pub fn queue_name(topology: &Topology) -> String {
    format!("{}.install", topology.prefix())
}

/// Claim the topology's prefix for `install`, or say whose it is.
pub async fn claim(conn: &Connection, topology: &Topology, install: Uuid) -> lapin::Result<Claim> {
    let channel = conn.create_channel().await?;
    let mut args = FieldTable::default();
    if let Some(ms) = topology.queue_expires_ms() {
        args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    if topology.queue_type() == QueueType::Quorum {
        // Replicated, so a claim outlives the loss of a node.
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let name = queue_name(topology);
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    let owner = channel
        .basic_get(name.as_str().into(), BasicGetOptions { no_ack: false })
        .await?;
    let claim = match owner {
        Some(message) => {
            let text = String::from_utf8_lossy(&message.delivery.data).to_string();
            // Back where it was, for the next process to read.
            message
                .delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await?;
            match text.trim().parse::<Uuid>() {
                Ok(owner) if owner != install => Claim::Taken(owner),
                _ => Claim::Ours,
            }
        }
        None => {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channel
                .basic_publish(
                    "".into(),
                    name.as_str().into(),
                    BasicPublishOptions::default(),
                    install.to_string().as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            Claim::Ours
        }
    };
    let _ = channel.close(200, "claimed".into()).await;
    Ok(claim)
}

/// The installation a job message names, if it names one.
pub fn install_of(properties: &BasicProperties) -> Option<Uuid> {
    match properties.headers().as_ref()?.inner().get(INSTALL_HEADER)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}
