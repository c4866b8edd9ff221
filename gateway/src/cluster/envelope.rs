//! What nodes send each other, in one small binary layout: a header (version, kind, origin
//! incarnation, sequence), then the kind's fields. Strings and byte strings are a `u32` length
//! and the bytes; payloads travel as they were received, so a receiving node encodes each frame
//! kind once for its own sockets exactly as a local publish would.

use crate::topics::presence::WireMeta;
use crate::topics::{Broadcast, BroadcastBody, MemberId, NodeId, Origin, TopicKey};
use bytes::{BufMut, Bytes, BytesMut};
use realtime_protocol::binary::PayloadEncoding;
use std::sync::Arc;

const VERSION: u8 = 1;

const BROADCAST_PUSH: u8 = 1;
const BROADCAST_USER: u8 = 2;
const PRESENCE_DELTA: u8 = 3;
const PRESENCE_SNAPSHOT: u8 = 4;
const HEARTBEAT: u8 = 5;

/// One presence change of one topic: what left, then what joined (a re-track is both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) topic: TopicKey,
    pub(crate) leaves: Vec<WireMeta>,
    pub(crate) joins: Vec<WireMeta>,
}

/// A node's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Heartbeat {
    pub(crate) name: Box<str>,
    /// The sequence number of the node's last presence delta.
    pub(crate) presence_seq: u64,
    /// The node is shutting down: drop its members now.
    pub(crate) leaving: bool,
}

/// A decoded message, with the incarnation that sent it and its sequence number (presence
/// deltas and snapshots: the node's presence sequence; others: 0).
#[derive(Debug)]
pub(crate) struct Envelope {
    pub(crate) origin: NodeId,
    pub(crate) seq: u64,
    pub(crate) body: Body,
}

#[derive(Debug)]
pub(crate) enum Body {
    Broadcast(Broadcast),
    Presence(Delta),
    /// The whole presence state the node owns, as of `seq`: every topic with its metas.
    Snapshot(Vec<(TopicKey, Vec<WireMeta>)>),
    Heartbeat(Heartbeat),
}

fn header(out: &mut BytesMut, kind: u8, origin: NodeId, seq: u64) {
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u64(origin.0);
    out.put_u64(seq);
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

fn put_topic(out: &mut BytesMut, topic: &TopicKey) {
    out.put_u8(u8::from(topic.private));
    put_bytes(out, topic.topic.as_bytes());
}

fn put_meta(out: &mut BytesMut, meta: &WireMeta) {
    out.put_u64(meta.owner.0);
    put_bytes(out, meta.key.as_bytes());
    put_bytes(out, meta.phx_ref.as_bytes());
    match &meta.phx_ref_prev {
        Some(prev) => {
            out.put_u8(1);
            put_bytes(out, prev.as_bytes());
        }
        None => out.put_u8(0),
    }
    put_bytes(out, meta.body.as_bytes());
}

fn put_metas(out: &mut BytesMut, metas: &[WireMeta]) {
    out.put_u32(metas.len() as u32);
    for meta in metas {
        put_meta(out, meta);
    }
}

pub(crate) fn broadcast(b: &Broadcast) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + b.topic.topic.len() + body_len(&b.body));
    match &b.body {
        BroadcastBody::Push { payload } => {
            header(&mut out, BROADCAST_PUSH, b.origin.node, 0);
            put_topic(&mut out, &b.topic);
            put_bytes(&mut out, payload.as_bytes());
        }
        BroadcastBody::User {
            event,
            metadata,
            encoding,
            payload,
        } => {
            header(&mut out, BROADCAST_USER, b.origin.node, 0);
            put_topic(&mut out, &b.topic);
            put_bytes(&mut out, event.as_bytes());
            match metadata {
                Some(m) => {
                    out.put_u8(1);
                    put_bytes(&mut out, m.as_bytes());
                }
                None => out.put_u8(0),
            }
            out.put_u8(match encoding {
                PayloadEncoding::Binary => 0,
                PayloadEncoding::Json => 1,
            });
            put_bytes(&mut out, payload);
        }
    }
    out.freeze()
}

fn body_len(body: &BroadcastBody) -> usize {
    match body {
        BroadcastBody::Push { payload } => payload.len(),
        BroadcastBody::User { event, payload, .. } => event.len() + payload.len() + 64,
    }
}

pub(crate) fn delta(origin: NodeId, seq: u64, delta: &Delta) -> Bytes {
    let mut out = BytesMut::with_capacity(128);
    header(&mut out, PRESENCE_DELTA, origin, seq);
    put_topic(&mut out, &delta.topic);
    put_metas(&mut out, &delta.leaves);
    put_metas(&mut out, &delta.joins);
    out.freeze()
}

pub(crate) fn snapshot(origin: NodeId, seq: u64, topics: &[(TopicKey, Vec<WireMeta>)]) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + topics.len() * 128);
    header(&mut out, PRESENCE_SNAPSHOT, origin, seq);
    out.put_u32(topics.len() as u32);
    for (topic, metas) in topics {
        put_topic(&mut out, topic);
        put_metas(&mut out, metas);
    }
    out.freeze()
}

pub(crate) fn heartbeat(origin: NodeId, hb: &Heartbeat) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    header(&mut out, HEARTBEAT, origin, 0);
    put_bytes(&mut out, hb.name.as_bytes());
    out.put_u64(hb.presence_seq);
    out.put_u8(u8::from(hb.leaving));
    out.freeze()
}

/// Why an envelope could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("truncated")]
    Truncated,
    #[error("unknown version {0}")]
    Version(u8),
    #[error("unknown kind {0}")]
    Kind(u8),
    #[error("not UTF-8")]
    Utf8,
}

struct Reader<'a> {
    whole: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let bytes = self.whole.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// Bytes shared with the message (no copy).
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u32()? as usize;
        let start = self.at;
        self.take(n)?;
        Ok(self.whole.slice(start..start + n))
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Utf8)
    }
    fn opt_str(&mut self) -> Result<Option<&'a str>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            _ => self.str().map(Some),
        }
    }
    fn topic(&mut self) -> Result<TopicKey, DecodeError> {
        let private = self.u8()? != 0;
        Ok(TopicKey {
            private,
            topic: Arc::from(self.str()?),
        })
    }
    fn metas(&mut self) -> Result<Vec<WireMeta>, DecodeError> {
        let n = self.u32()? as usize;
        // Each meta takes at least 25 bytes: a length that claims more than is left is a lie.
        if n > self.whole.len().saturating_sub(self.at) / 25 {
            return Err(DecodeError::Truncated);
        }
        let mut metas = Vec::with_capacity(n);
        for _ in 0..n {
            let owner = MemberId(self.u64()?);
            let key = Arc::from(self.str()?);
            let phx_ref = Box::from(self.str()?);
            let phx_ref_prev = self.opt_str()?.map(Box::from);
            let body = Box::from(self.str()?);
            metas.push(WireMeta {
                owner,
                key,
                phx_ref,
                phx_ref_prev,
                body,
            });
        }
        Ok(metas)
    }
}

pub(crate) fn decode(message: &Bytes) -> Result<Envelope, DecodeError> {
    let mut r = Reader {
        whole: message,
        at: 0,
    };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = r.u8()?;
    let origin = NodeId(r.u64()?);
    let seq = r.u64()?;
    let from = Origin {
        node: origin,
        member: None,
    };
    let body = match kind {
        BROADCAST_PUSH => {
            let topic = r.topic()?;
            let payload = r.bytes()?;
            let payload = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(payload)
                .map_err(|_| DecodeError::Utf8)?;
            Body::Broadcast(Broadcast {
                topic,
                origin: from,
                skip_origin: false,
                body: BroadcastBody::Push { payload },
            })
        }
        BROADCAST_USER => {
            let topic = r.topic()?;
            let event = Box::from(r.str()?);
            let metadata = r.opt_str()?.map(Box::from);
            let encoding = match r.u8()? {
                0 => PayloadEncoding::Binary,
                _ => PayloadEncoding::Json,
            };
            let payload = r.bytes()?;
            Body::Broadcast(Broadcast {
                topic,
                origin: from,
                skip_origin: false,
                body: BroadcastBody::User {
                    event,
                    metadata,
                    encoding,
                    payload,
                },
            })
        }
        PRESENCE_DELTA => {
            let topic = r.topic()?;
            let leaves = r.metas()?;
            let joins = r.metas()?;
            Body::Presence(Delta {
                topic,
                leaves,
                joins,
            })
        }
        PRESENCE_SNAPSHOT => {
            let n = r.u32()? as usize;
            if n > message.len() / 9 {
                return Err(DecodeError::Truncated);
            }
            let mut topics = Vec::with_capacity(n);
            for _ in 0..n {
                let topic = r.topic()?;
                topics.push((topic, r.metas()?));
            }
            Body::Snapshot(topics)
        }
        HEARTBEAT => {
            let name = Box::from(r.str()?);
            let presence_seq = r.u64()?;
            let leaving = r.u8()? != 0;
            Body::Heartbeat(Heartbeat {
                name,
                presence_seq,
                leaving,
            })
        }
        other => return Err(DecodeError::Kind(other)),
    };
    Ok(Envelope { origin, seq, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(private: bool) -> TopicKey {
        TopicKey {
            private,
            topic: Arc::from("realtime:room-1"),
        }
    }

    fn meta(owner: u64, prev: Option<&str>) -> WireMeta {
        WireMeta {
            owner: MemberId(owner),
            key: Arc::from("user-1"),
            phx_ref: Box::from("ref-a"),
            phx_ref_prev: prev.map(Box::from),
            body: Box::from("\"status\":\"online\""),
        }
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let node = NodeId(0xfeed);
        let push = Broadcast {
            topic: topic(true),
            origin: Origin {
                node,
                member: Some(MemberId(7)),
            },
            skip_origin: true,
            body: BroadcastBody::Push {
                payload: "{\"type\":\"broadcast\",\"event\":\"e\",\"payload\":{}}".into(),
            },
        };
        let e = decode(&broadcast(&push)).unwrap();
        assert_eq!(e.origin, node);
        let Body::Broadcast(b) = e.body else { panic!() };
        assert_eq!(b.topic, topic(true));
        assert!(!b.skip_origin, "self is the origin node's business");
        assert!(
            matches!(b.body, BroadcastBody::Push { payload } if payload.as_str().starts_with("{\"type\""))
        );

        let user = Broadcast {
            body: BroadcastBody::User {
                event: "cursor".into(),
                metadata: Some("{\"id\":\"x\"}".into()),
                encoding: PayloadEncoding::Binary,
                payload: Bytes::from_static(b"\x00\x01\xff"),
            },
            ..push.clone()
        };
        let Body::Broadcast(b) = decode(&broadcast(&user)).unwrap().body else {
            panic!()
        };
        match b.body {
            BroadcastBody::User {
                event,
                metadata,
                encoding,
                payload,
            } => {
                assert_eq!(&*event, "cursor");
                assert_eq!(metadata.as_deref(), Some("{\"id\":\"x\"}"));
                assert!(matches!(encoding, PayloadEncoding::Binary));
                assert_eq!(&payload[..], b"\x00\x01\xff");
            }
            other => panic!("{other:?}"),
        }

        let d = Delta {
            topic: topic(false),
            leaves: vec![meta(1, None)],
            joins: vec![meta(1, Some("ref-0")), meta(2, None)],
        };
        let e = decode(&delta(node, 42, &d)).unwrap();
        assert_eq!(e.seq, 42);
        assert!(matches!(e.body, Body::Presence(got) if got == d));

        let s = vec![(topic(false), vec![meta(3, None)]), (topic(true), vec![])];
        let Body::Snapshot(got) = decode(&snapshot(node, 9, &s)).unwrap().body else {
            panic!()
        };
        assert_eq!(got, s);

        let hb = Heartbeat {
            name: "node-a".into(),
            presence_seq: 5,
            leaving: true,
        };
        assert!(
            matches!(decode(&heartbeat(node, &hb)).unwrap().body, Body::Heartbeat(got) if got == hb)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(decode(&Bytes::new()).unwrap_err(), DecodeError::Truncated);
        assert_eq!(
            decode(&Bytes::from_static(&[9, 1])).unwrap_err(),
            DecodeError::Version(9)
        );
        let mut whole = delta(
            NodeId(1),
            1,
            &Delta {
                topic: topic(false),
                leaves: vec![],
                joins: vec![meta(1, None)],
            },
        )
        .to_vec();
        for cut in 0..whole.len() {
            assert!(decode(&Bytes::copy_from_slice(&whole[..cut])).is_err());
        }
        // A count that claims a billion metas is refused before anything is allocated.
        let at = 2 + 8 + 8 + 1 + 4 + "realtime:room-1".len();
        whole[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&Bytes::from(whole)).is_err());
    }
}
