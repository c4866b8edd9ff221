//! Broadcasts from the database: an INSERT into `realtime.messages` (`realtime.send`,
//! `realtime.broadcast_changes`) arrives through the change source like any change and is
//! delivered to this node's members of the topic, with meta `{id}`. Every node reads the change
//! log itself, so this never goes through the bus.

use crate::topics::{Outgoing, Registry, TopicKey};
use realtime_protocol::binary::PayloadEncoding;
use realtime_wal_listener::{Relation, TupleValue};
use std::sync::Arc;
use tracing::debug;

/// Whether a relation is `realtime.messages` (or one of its partitions).
pub(crate) fn is_messages(relation: &Relation) -> bool {
    relation.schema == "realtime" && relation.table.starts_with("messages")
}

/// Delivers one inserted `realtime.messages` row; false when the row is not a broadcast this
/// gateway can deliver.
pub(crate) fn deliver(registry: &Registry, relation: &Relation, new: &[TupleValue]) -> bool {
    let get = |name: &str| {
        relation
            .columns
            .iter()
            .position(|c| c.name == name)
            .and_then(|i| new.get(i))
    };
    let text = |name: &str| get(name).and_then(TupleValue::as_str);
    let (Some(topic), Some(event), Some(id), Some(private)) =
        (text("topic"), text("event"), text("id"), text("private"))
    else {
        return false;
    };
    if text("extension") != Some("broadcast") || text("inserted_at").is_none() {
        return false;
    }
    let key = TopicKey {
        private: private == "t",
        topic: Arc::from(format!("realtime:{topic}")),
    };
    let meta = format!("{{\"id\":{}}}", realtime_protocol::frame::json_str(id));
    let bytes;
    let (encoding, payload) = if let Some(payload) = text("payload") {
        (PayloadEncoding::Json, payload.as_bytes())
    } else if let Some(hex) = text("binary_payload") {
        let Some(decoded) = decode_bytea_hex(hex) else {
            return false;
        };
        bytes = decoded;
        (PayloadEncoding::Binary, bytes.as_slice())
    } else {
        return false;
    };
    let message = Outgoing::User {
        event,
        metadata: Some(&meta),
        encoding,
        payload,
    };
    let delivery = registry.deliver_stored(&key, &message, id);
    debug!(
        delivered = delivery.delivered,
        "broadcast from the database"
    );
    true
}

/// `\x0102…` → bytes.
fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytea_hex() {
        assert_eq!(decode_bytea_hex("\\x0aff"), Some(vec![10, 255]));
        assert_eq!(decode_bytea_hex("\\x0"), None);
        assert_eq!(decode_bytea_hex("0a"), None);
    }
}
