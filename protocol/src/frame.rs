//! Text frames: the message model and the V1 / V2 serializers.
//!
//! V1 (`vsn=1.0.0`) frames are JSON objects. A client sends `topic`, `event`, `payload`, `ref`
//! (required keys, `ref` may be `null`) and optionally `join_ref`; the server sends the same four
//! keys and never `join_ref`, so on a V1 socket `ref` is the only marker a client has to tell a
//! stale `phx_close` from a current one.
//!
//! V2 (`vsn=2.0.0`) frames are JSON arrays `[join_ref, ref, topic, event, payload]`. Arrays with
//! more than five elements are accepted (extras ignored); anything that is not an array is
//! malformed.
//!
//! `ref` and `join_ref` are echoed exactly as received, so they are kept as their raw JSON text
//! ([`Ref`]); a payload is kept as raw JSON too, so a broadcast is relayed byte for byte.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::fmt;

/// A `ref` or `join_ref`: the raw JSON text of a non-null value as the client sent it
/// (normally a decimal string such as `"6"`, quotes included).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Ref(Box<str>);

impl Ref {
    /// Keeps a raw JSON value; `null` gives `None`.
    pub fn from_raw(raw: &RawValue) -> Option<Ref> {
        let text = raw.get().trim();
        if text == "null" {
            None
        } else {
            Some(Ref(text.into()))
        }
    }

    /// A ref carried as a plain string (binary frames carry refs as UTF-8 strings).
    pub fn from_string(value: &str) -> Ref {
        let mut out = String::with_capacity(value.len() + 2);
        push_json_str(&mut out, value);
        Ref(out.into_boxed_str())
    }

    /// The raw JSON text, ready to be written into a frame.
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The serializer a socket negotiated with its `vsn` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `1.0.x`: JSON objects, text frames only.
    V1,
    /// `2.0.x`: JSON arrays, plus binary user broadcasts.
    V2,
}

impl Vsn {
    /// Maps the `vsn` query parameter: missing means `1.0.0`; `1.0.x` and `2.0.x` are accepted
    /// (Elixir's `~> 1.0.0` / `~> 2.0.0`); anything else is refused (`None`, HTTP 403).
    pub fn from_query(vsn: Option<&str>) -> Option<Vsn> {
        let Some(vsn) = vsn else {
            return Some(Vsn::V1);
        };
        let mut parts = vsn.split('.');
        let (Some(major), Some(minor), Some(patch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !numeric(major) || !numeric(minor) || !numeric(patch) || minor.parse::<u64>() != Ok(0) {
            return None;
        }
        match major.parse::<u64>() {
            Ok(1) => Some(Vsn::V1),
            Ok(2) => Some(Vsn::V2),
            _ => None,
        }
    }

    /// Decodes one text frame sent by a client.
    pub fn decode(self, text: &str) -> Result<Inbound, DecodeError> {
        match self {
            Vsn::V1 => decode_v1(text),
            Vsn::V2 => decode_v2(text),
        }
    }

    /// Encodes one frame; `payload` must be valid JSON text.
    pub fn encode(
        self,
        join_ref: Option<&Ref>,
        msg_ref: Option<&Ref>,
        topic: &str,
        event: &str,
        payload: &str,
    ) -> String {
        self.encode_with(join_ref, msg_ref, topic, event, payload.len(), |out| {
            out.push_str(payload)
        })
    }

    /// Encodes one frame whose payload `write_payload` appends (valid JSON text, about
    /// `payload_len` bytes), so a payload assembled from parts is copied once.
    pub fn encode_with(
        self,
        join_ref: Option<&Ref>,
        msg_ref: Option<&Ref>,
        topic: &str,
        event: &str,
        payload_len: usize,
        write_payload: impl FnOnce(&mut String),
    ) -> String {
        let mut out = String::with_capacity(payload_len + topic.len() + event.len() + 48);
        match self {
            Vsn::V1 => {
                out.push_str("{\"topic\":");
                push_json_str(&mut out, topic);
                out.push_str(",\"event\":");
                push_json_str(&mut out, event);
                out.push_str(",\"payload\":");
                write_payload(&mut out);
                out.push_str(",\"ref\":");
                push_ref(&mut out, msg_ref);
                out.push('}');
            }
            Vsn::V2 => {
                out.push('[');
                push_ref(&mut out, join_ref);
                out.push(',');
                push_ref(&mut out, msg_ref);
                out.push(',');
                push_json_str(&mut out, topic);
                out.push(',');
                push_json_str(&mut out, event);
                out.push(',');
                write_payload(&mut out);
                out.push(']');
            }
        }
        out
    }
}

/// A decoded client frame.
#[derive(Debug)]
pub struct Inbound {
    pub join_ref: Option<Ref>,
    pub msg_ref: Option<Ref>,
    pub topic: String,
    pub event: String,
    pub payload: Box<RawValue>,
}

/// Why a client frame could not be decoded. The reference server logs these and drops the frame;
/// the socket stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid json: {0}")]
    Json(String),
    #[error("v2 text frame is not a json array")]
    NotAnArray,
    #[error("v2 text frame has {0} elements, expected at least 5")]
    TooShort(usize),
    #[error("v1 text frame is not a json object")]
    NotAnObject,
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` has the wrong type")]
    FieldType(&'static str),
    #[error("binary frame: {0}")]
    Binary(&'static str),
}

fn decode_v1(text: &str) -> Result<Inbound, DecodeError> {
    #[derive(Deserialize)]
    struct V1In<'a> {
        #[serde(default, borrow, deserialize_with = "present")]
        topic: Option<&'a RawValue>,
        #[serde(default, borrow, deserialize_with = "present")]
        event: Option<&'a RawValue>,
        #[serde(default, borrow, deserialize_with = "present")]
        payload: Option<&'a RawValue>,
        #[serde(default, borrow, rename = "ref", deserialize_with = "present")]
        msg_ref: Option<&'a RawValue>,
        #[serde(default, borrow, deserialize_with = "present")]
        join_ref: Option<&'a RawValue>,
    }
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => Err(DecodeError::NotAnObject),
            Err(e) => Err(DecodeError::Json(e.to_string())),
        };
    }
    let frame: V1In<'_> =
        serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    let topic = string_field(
        frame.topic.ok_or(DecodeError::MissingField("topic"))?,
        "topic",
    )?;
    let event = string_field(
        frame.event.ok_or(DecodeError::MissingField("event"))?,
        "event",
    )?;
    let payload = frame.payload.ok_or(DecodeError::MissingField("payload"))?;
    let msg_ref = frame.msg_ref.ok_or(DecodeError::MissingField("ref"))?;
    Ok(Inbound {
        join_ref: frame.join_ref.and_then(Ref::from_raw),
        msg_ref: Ref::from_raw(msg_ref),
        topic,
        event,
        payload: payload.to_owned(),
    })
}

fn decode_v2(text: &str) -> Result<Inbound, DecodeError> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('[') {
        return match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => Err(DecodeError::NotAnArray),
            Err(e) => Err(DecodeError::Json(e.to_string())),
        };
    }
    let parts: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    let [join_ref, msg_ref, topic, event, payload, ..] = parts.as_slice() else {
        return Err(DecodeError::TooShort(parts.len()));
    };
    Ok(Inbound {
        join_ref: Ref::from_raw(join_ref),
        msg_ref: Ref::from_raw(msg_ref),
        topic: string_field(topic, "topic")?,
        event: string_field(event, "event")?,
        payload: (*payload).to_owned(),
    })
}

/// Deserializes a field that is present (even as `null`) into `Some`.
fn present<'de, D>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: Deserializer<'de>,
{
    <&'de RawValue>::deserialize(deserializer).map(Some)
}

fn string_field(raw: &RawValue, name: &'static str) -> Result<String, DecodeError> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| DecodeError::FieldType(name))
}

fn push_ref(out: &mut String, value: Option<&Ref>) {
    match value {
        Some(r) => out.push_str(r.as_json()),
        None => out.push_str("null"),
    }
}

/// Appends `value` as a JSON string literal.
pub fn push_json_str(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.push_str(&value[start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
        }
        start = i + 1;
    }
    out.push_str(&value[start..]);
    out.push('"');
}

/// `value` as a JSON string literal.
pub fn json_str(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    push_json_str(&mut out, value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsn_from_query() {
        assert_eq!(Vsn::from_query(None), Some(Vsn::V1));
        assert_eq!(Vsn::from_query(Some("1.0.0")), Some(Vsn::V1));
        assert_eq!(Vsn::from_query(Some("1.0.7")), Some(Vsn::V1));
        assert_eq!(Vsn::from_query(Some("2.0.0")), Some(Vsn::V2));
        for bad in [
            "",
            "1.1.0",
            "3.0.0",
            "2.0",
            "2",
            "x",
            "2.0.0.0",
            "2.0.0-rc1",
            "1.-1.0",
        ] {
            assert_eq!(Vsn::from_query(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn decode_captured_v2_join() {
        let text = r#"["6","6","realtime:room1","phx_join",{"config":{"broadcast":{"ack":true,"self":true},"presence":{"key":"user-1","enabled":true},"postgres_changes":[],"private":false},"access_token":"T"}]"#;
        let m = Vsn::V2.decode(text).unwrap();
        assert_eq!(m.join_ref.unwrap().as_json(), "\"6\"");
        assert_eq!(m.msg_ref.unwrap().as_json(), "\"6\"");
        assert_eq!(m.topic, "realtime:room1");
        assert_eq!(m.event, "phx_join");
        assert!(m.payload.get().starts_with("{\"config\""));
    }

    #[test]
    fn decode_captured_v1_heartbeat() {
        let text = r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"10"}"#;
        let m = Vsn::V1.decode(text).unwrap();
        assert!(m.join_ref.is_none());
        assert_eq!(m.msg_ref.unwrap().as_json(), "\"10\"");
        assert_eq!(m.topic, "phoenix");
    }

    #[test]
    fn v1_requires_ref_key_but_allows_null() {
        let ok = r#"{"topic":"t","event":"e","payload":{},"ref":null}"#;
        assert!(Vsn::V1.decode(ok).unwrap().msg_ref.is_none());
        let missing = r#"{"topic":"t","event":"e","payload":{}}"#;
        assert_eq!(
            Vsn::V1.decode(missing).unwrap_err(),
            DecodeError::MissingField("ref")
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(Vsn::V2.decode("{}").unwrap_err(), DecodeError::NotAnArray);
        assert_eq!(
            Vsn::V2.decode("[1,2]").unwrap_err(),
            DecodeError::TooShort(2)
        );
        assert_eq!(
            Vsn::V2.decode(r#"[null,null,1,"e",{}]"#).unwrap_err(),
            DecodeError::FieldType("topic")
        );
        assert_eq!(Vsn::V1.decode("[]").unwrap_err(), DecodeError::NotAnObject);
        assert!(matches!(Vsn::V1.decode("{"), Err(DecodeError::Json(_))));
        assert!(matches!(Vsn::V2.decode(""), Err(DecodeError::Json(_))));
    }

    #[test]
    fn v2_extra_elements_are_ignored() {
        let m = Vsn::V2
            .decode(r#"[null,"1","phoenix","heartbeat",{},"extra"]"#)
            .unwrap();
        assert_eq!(m.event, "heartbeat");
    }

    #[test]
    fn encode_shapes() {
        let r = Ref::from_string("10");
        assert_eq!(
            Vsn::V2.encode(
                None,
                Some(&r),
                "phoenix",
                "phx_reply",
                r#"{"status":"ok","response":{}}"#
            ),
            r#"[null,"10","phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            Vsn::V1.encode(Some(&r), Some(&r), "phoenix", "phx_reply", "{}"),
            r#"{"topic":"phoenix","event":"phx_reply","payload":{},"ref":"10"}"#
        );
    }

    #[test]
    fn json_strings_escape_controls() {
        assert_eq!(json_str("a\"b\\c\n\u{1}é"), r#""a\"b\\c\n\u0001é""#);
        let back: String = serde_json::from_str(&json_str("x\u{7f}\u{1f}\t")).unwrap();
        assert_eq!(back, "x\u{7f}\u{1f}\t");
    }
}
