//! V2 binary frames (user broadcasts).
//!
//! Every length field is one byte, so each string is at most 255 bytes. Two kinds matter:
//!
//! - kind 3, client → server, a broadcast push: `03 jr_len ref_len topic_len event_len
//!   meta_len encoding` then join_ref, ref, topic, event, metadata (JSON object text or empty)
//!   and the payload to the end of the frame;
//! - kind 4, server → client, a user broadcast: `04 topic_len event_len meta_len encoding` then
//!   the receiver's topic, event, metadata and payload.
//!
//! Encoding `0` is a raw binary payload, `1` is UTF-8 JSON text.

use crate::frame::{DecodeError, Ref};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;

/// How a user broadcast's payload is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadEncoding {
    /// Raw bytes, handed to the app as an `ArrayBuffer`.
    Binary,
    /// UTF-8 JSON text.
    Json,
}

impl PayloadEncoding {
    fn byte(self) -> u8 {
        match self {
            PayloadEncoding::Binary => 0,
            PayloadEncoding::Json => 1,
        }
    }
}

/// A decoded kind-3 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinaryPush {
    pub join_ref: Option<Ref>,
    pub msg_ref: Option<Ref>,
    pub topic: String,
    pub event: String,
    /// Metadata JSON text as sent (`{"persist":true}` from realtime-js 2.119), possibly empty.
    pub metadata: Bytes,
    pub encoding: PayloadEncoding,
    /// The user payload; valid JSON when `encoding` is [`PayloadEncoding::Json`].
    pub payload: Bytes,
}

/// Decodes a binary frame a client sent. Only kind 3 is meaningful from a client.
pub fn decode(frame: &Bytes) -> Result<BinaryPush, DecodeError> {
    let header = frame
        .get(..7)
        .ok_or(DecodeError::Binary("frame shorter than its header"))?;
    if header[0] != KIND_USER_BROADCAST_PUSH {
        return Err(DecodeError::Binary("unsupported binary frame kind"));
    }
    let lens = [header[1], header[2], header[3], header[4], header[5]].map(usize::from);
    let encoding = match header[6] {
        0 => PayloadEncoding::Binary,
        1 => PayloadEncoding::Json,
        _ => return Err(DecodeError::Binary("unknown payload encoding")),
    };
    let mut at = 7;
    let mut take = |len: usize| -> Result<Bytes, DecodeError> {
        let end = at + len;
        if end > frame.len() {
            return Err(DecodeError::Binary("length field beyond end of frame"));
        }
        let part = frame.slice(at..end);
        at = end;
        Ok(part)
    };
    let join_ref = take(lens[0])?;
    let msg_ref = take(lens[1])?;
    let topic = take(lens[2])?;
    let event = take(lens[3])?;
    let metadata = take(lens[4])?;
    let payload = frame.slice(at..);
    let optional_ref = |b: &Bytes| -> Result<Option<Ref>, DecodeError> {
        let s = utf8(b)?;
        Ok((!s.is_empty()).then(|| Ref::from_string(s)))
    };
    if !metadata.is_empty() && serde_json::from_slice::<&RawValue>(&metadata).is_err() {
        return Err(DecodeError::Binary("metadata is not json"));
    }
    if encoding == PayloadEncoding::Json && serde_json::from_slice::<&RawValue>(&payload).is_err() {
        return Err(DecodeError::Binary("json payload is not valid json"));
    }
    Ok(BinaryPush {
        join_ref: optional_ref(&join_ref)?,
        msg_ref: optional_ref(&msg_ref)?,
        topic: utf8(&topic)?.to_owned(),
        event: utf8(&event)?.to_owned(),
        metadata,
        encoding,
        payload,
    })
}

fn utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::Binary("header string is not utf-8"))
}

/// Why a kind-4 frame could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{0} is longer than 255 bytes")]
    TooLong(&'static str),
}

/// Encodes a kind-4 user broadcast for one receiver topic (the receiver's `realtime:…` topic).
pub fn encode_user_broadcast(
    topic: &str,
    event: &str,
    metadata: &[u8],
    encoding: PayloadEncoding,
    payload: &[u8],
) -> Result<Bytes, EncodeError> {
    let len = |s: &[u8], what| u8::try_from(s.len()).map_err(|_| EncodeError::TooLong(what));
    let topic_len = len(topic.as_bytes(), "topic")?;
    let event_len = len(event.as_bytes(), "event")?;
    let meta_len = len(metadata, "metadata")?;
    let mut out =
        BytesMut::with_capacity(5 + topic.len() + event.len() + metadata.len() + payload.len());
    out.put_slice(&[
        KIND_USER_BROADCAST,
        topic_len,
        event_len,
        meta_len,
        encoding.byte(),
    ]);
    out.put_slice(topic.as_bytes());
    out.put_slice(event.as_bytes());
    out.put_slice(metadata);
    out.put_slice(payload);
    Ok(out.freeze())
}

/// Encodes a kind-3 push as realtime-js builds it (for tests and load generators).
pub fn encode_push(push: &BinaryPush) -> Result<Bytes, EncodeError> {
    let as_text = |r: &Option<Ref>| -> String {
        r.as_ref()
            .map(|r| serde_json::from_str::<String>(r.as_json()).unwrap_or_default())
            .unwrap_or_default()
    };
    let join_ref = as_text(&push.join_ref);
    let msg_ref = as_text(&push.msg_ref);
    let len = |s: &[u8], what| u8::try_from(s.len()).map_err(|_| EncodeError::TooLong(what));
    let mut out = BytesMut::with_capacity(64 + push.payload.len());
    out.put_slice(&[
        KIND_USER_BROADCAST_PUSH,
        len(join_ref.as_bytes(), "join_ref")?,
        len(msg_ref.as_bytes(), "ref")?,
        len(push.topic.as_bytes(), "topic")?,
        len(push.event.as_bytes(), "event")?,
        len(&push.metadata, "metadata")?,
        push.encoding.byte(),
    ]);
    out.put_slice(join_ref.as_bytes());
    out.put_slice(msg_ref.as_bytes());
    out.put_slice(push.topic.as_bytes());
    out.put_slice(push.event.as_bytes());
    out.put_slice(&push.metadata);
    out.put_slice(&push.payload);
    Ok(out.freeze())
}

/// Decodes a kind-4 frame (what realtime-js does with it; for tests and load generators).
pub fn decode_user_broadcast(frame: &[u8]) -> Result<UserBroadcast<'_>, DecodeError> {
    let header = frame
        .get(..5)
        .ok_or(DecodeError::Binary("frame shorter than its header"))?;
    if header[0] != KIND_USER_BROADCAST {
        return Err(DecodeError::Binary("not a kind-4 frame"));
    }
    let (t, e, m) = (
        usize::from(header[1]),
        usize::from(header[2]),
        usize::from(header[3]),
    );
    let encoding = match header[4] {
        0 => PayloadEncoding::Binary,
        1 => PayloadEncoding::Json,
        _ => return Err(DecodeError::Binary("unknown payload encoding")),
    };
    let body = &frame[5..];
    if body.len() < t + e + m {
        return Err(DecodeError::Binary("length field beyond end of frame"));
    }
    Ok(UserBroadcast {
        topic: utf8(&body[..t])?,
        event: utf8(&body[t..t + e])?,
        metadata: &body[t + e..t + e + m],
        encoding,
        payload: &body[t + e + m..],
    })
}

/// A decoded kind-4 frame, borrowing from the frame.
#[derive(Debug, PartialEq, Eq)]
pub struct UserBroadcast<'a> {
    pub topic: &'a str,
    pub event: &'a str,
    pub metadata: &'a [u8],
    pub encoding: PayloadEncoding,
    pub payload: &'a [u8],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_captured_kind3() {
        let frame = Bytes::from(hex(
            "03 01 01 0e 06 00 01 36 37 7265616c74696d653a726f6f6d31 637572736f72 7b2278223a22c3a9227d",
        ));
        let push = decode(&frame).unwrap();
        assert_eq!(push.join_ref, Some(Ref::from_string("6")));
        assert_eq!(push.msg_ref, Some(Ref::from_string("7")));
        assert_eq!(push.topic, "realtime:room1");
        assert_eq!(push.event, "cursor");
        assert!(push.metadata.is_empty());
        assert_eq!(push.encoding, PayloadEncoding::Json);
        assert_eq!(&push.payload[..], "{\"x\":\"é\"}".as_bytes());
        assert_eq!(encode_push(&push).unwrap(), frame);
    }

    #[test]
    fn encodes_captured_kind4() {
        let frame = encode_user_broadcast(
            "realtime:room1",
            "cursor",
            br#"{"id":"abc"}"#,
            PayloadEncoding::Json,
            "{\"x\":\"é\"}".as_bytes(),
        )
        .unwrap();
        let expected = hex(
            "04 0e 06 0c 01 7265616c74696d653a726f6f6d31 637572736f72 7b226964223a22616263227d 7b2278223a22c3a9227d",
        );
        assert_eq!(&frame[..], &expected[..]);
        let back = decode_user_broadcast(&frame).unwrap();
        assert_eq!(back.topic, "realtime:room1");
        assert_eq!(back.metadata, br#"{"id":"abc"}"#);
    }

    #[test]
    fn malformed_kind3_is_an_error() {
        for bad in [
            &b""[..],
            &[3, 0, 0, 0, 0, 0][..],
            &[4, 0, 0, 0, 0, 0, 1][..],
            &[3, 9, 0, 0, 0, 0, 1, b'x'][..],
            &[3, 0, 0, 0, 0, 0, 7][..],
            &[3, 0, 0, 1, 0, 0, 0, 0xff][..],
            &[3, 0, 0, 0, 0, 0, 1, b'{'][..],
            &[3, 0, 0, 0, 0, 1, 0, b'{'][..],
        ] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kind4_rejects_long_strings() {
        let long = "x".repeat(256);
        assert_eq!(
            encode_user_broadcast(&long, "e", b"", PayloadEncoding::Binary, b""),
            Err(EncodeError::TooLong("topic"))
        );
    }
}
