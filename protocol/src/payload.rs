//! Typed payloads of client pushes, and builders for the server's payloads.
//!
//! The reference server casts a join payload leniently: an invalid field is logged and the join
//! goes on with whatever could be cast. Booleans accept JSON booleans or the strings
//! `"true"`/`"false"` in any case; unknown keys are ignored. The parsers here do the same and
//! never fail on a join: a field that cannot be cast takes its default.

use crate::frame::{json_str, push_json_str};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// `phx_join` payload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JoinPayload {
    /// Whether a `config` object was sent (the "new API"; without it the legacy topic-encoded
    /// postgres subscription applies).
    pub has_config: bool,
    pub broadcast: BroadcastConfig,
    pub presence: PresenceConfig,
    /// `config.postgres_changes`, in binding order, `null` entries dropped.
    pub postgres_changes: Vec<PostgresChangesEntry>,
    pub private: bool,
    /// The channel token: `user_token` when present (it wins), else `access_token`.
    pub access_token: Option<String>,
    /// The payload did not have the expected shape somewhere (logged as `InvalidJoinPayload`).
    pub invalid: bool,
}

/// `config.broadcast`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BroadcastConfig {
    pub ack: bool,
    pub self_broadcast: bool,
    pub replay: Option<ReplayConfig>,
    pub replication_ready: bool,
}

/// `config.broadcast.replay`, kept as sent: the join validates it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayConfig {
    pub since: Value,
    pub limit: Value,
}

/// `config.presence`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PresenceConfig {
    pub enabled: bool,
    /// `""` when none was given: the server then generates a key per join.
    pub key: String,
}

/// One `config.postgres_changes` entry: the raw object (echoed verbatim in the join reply) and
/// its parsed value.
#[derive(Clone, Debug)]
pub struct PostgresChangesEntry {
    pub raw: Box<RawValue>,
    pub value: Value,
}

impl PartialEq for PostgresChangesEntry {
    fn eq(&self, other: &Self) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl PostgresChangesEntry {
    /// The entry as the join reply echoes it: the client's object unchanged, plus `"id"`.
    pub fn echo_with_id(&self, id: u32) -> String {
        let text = self.raw.get().trim_end();
        match (self.value.as_object(), text.strip_suffix('}')) {
            (Some(map), Some(body)) if !map.is_empty() => format!("{body},\"id\":{id}}}"),
            _ => format!("{{\"id\":{id}}}"),
        }
    }
}

impl JoinPayload {
    /// Casts a `phx_join` payload as leniently as the reference server.
    pub fn parse(payload: &RawValue) -> JoinPayload {
        #[derive(Deserialize)]
        struct Top<'a> {
            #[serde(borrow, default)]
            config: Option<&'a RawValue>,
            #[serde(default)]
            access_token: Option<Value>,
            #[serde(default)]
            user_token: Option<Value>,
        }
        #[derive(Deserialize)]
        struct Config<'a> {
            #[serde(default)]
            broadcast: Option<Value>,
            #[serde(default)]
            presence: Option<Value>,
            #[serde(borrow, default)]
            postgres_changes: Option<&'a RawValue>,
            #[serde(default)]
            private: Option<Value>,
        }

        let mut out = JoinPayload::default();
        let Ok(top) = object::<Top<'_>>(payload.get()) else {
            out.invalid = true;
            return out;
        };
        let token = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        out.access_token = token(top.user_token).or(token(top.access_token));
        let Some(config) = top.config else {
            return out;
        };
        if config.get() == "null" {
            return out;
        }
        out.has_config = true;
        let Ok(config) = object::<Config<'_>>(config.get()) else {
            out.invalid = true;
            return out;
        };
        if let Some(b) = config.broadcast.as_ref().and_then(Value::as_object) {
            out.broadcast.ack = lenient_bool(b.get("ack"));
            out.broadcast.self_broadcast = lenient_bool(b.get("self"));
            out.broadcast.replication_ready = lenient_bool(b.get("replication_ready"));
            if let Some(replay) = b.get("replay").filter(|v| !v.is_null()) {
                out.broadcast.replay = Some(ReplayConfig {
                    since: replay.get("since").cloned().unwrap_or(Value::Null),
                    limit: replay.get("limit").cloned().unwrap_or(Value::Null),
                });
            }
        }
        if let Some(p) = config.presence.as_ref().and_then(Value::as_object) {
            out.presence.enabled = lenient_bool(p.get("enabled"));
            if let Some(Value::String(key)) = p.get("key") {
                out.presence.key = key.clone();
            }
        }
        out.private = lenient_bool(config.private.as_ref());
        if let Some(raw) = config.postgres_changes {
            match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
                Ok(entries) => {
                    for entry in entries {
                        if entry.get() == "null" {
                            continue;
                        }
                        let value = serde_json::from_str(entry.get()).unwrap_or(Value::Null);
                        out.postgres_changes.push(PostgresChangesEntry {
                            raw: entry.to_owned(),
                            value,
                        });
                    }
                }
                Err(_) if raw.get() == "null" => {}
                Err(_) => out.invalid = true,
            }
        }
        out
    }
}

/// Deserializes a struct only from a JSON object (serde would also take an array).
fn object<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, ()> {
    if !text.trim_start().starts_with('{') {
        return Err(());
    }
    serde_json::from_str(text).map_err(|_| ())
}

fn lenient_bool(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// `access_token` push payload: `{"access_token": <string | null>}`.
pub fn parse_access_token(payload: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct AccessToken {
        #[serde(default)]
        access_token: Option<Value>,
    }
    match object::<AccessToken>(payload.get()) {
        Ok(AccessToken {
            access_token: Some(Value::String(s)),
        }) => Some(s),
        _ => None,
    }
}

/// A `presence` push: `{"type":"presence","event":"track"|"untrack","payload":{…}}`.
#[derive(Clone, Debug, PartialEq)]
pub enum PresencePush {
    /// `payload` is the meta; `None` when it was missing (the reference then uses `{}`).
    Track(Option<Value>),
    Untrack,
    /// Any other `event`: answered with an error reply.
    Unknown,
    /// No `event` at all: answered ok, nothing happens.
    NoEvent,
}

impl PresencePush {
    pub fn parse(payload: &RawValue) -> PresencePush {
        #[derive(Deserialize)]
        struct Push {
            #[serde(default)]
            event: Option<Value>,
            #[serde(default)]
            payload: Option<Value>,
        }
        let Ok(push) = object::<Push>(payload.get()) else {
            return PresencePush::Unknown;
        };
        match push.event {
            Some(Value::String(e)) if e.eq_ignore_ascii_case("track") => {
                PresencePush::Track(push.payload)
            }
            Some(Value::String(e)) if e.eq_ignore_ascii_case("untrack") => PresencePush::Untrack,
            None => PresencePush::NoEvent,
            _ => PresencePush::Unknown,
        }
    }
}

/// `{"status":"ok","response":<response>}`; `response` is JSON text.
pub fn reply_ok(response: &str) -> String {
    format!("{{\"status\":\"ok\",\"response\":{response}}}")
}

/// `{"status":"error","response":<response>}`; `response` is JSON text.
pub fn reply_error(response: &str) -> String {
    format!("{{\"status\":\"error\",\"response\":{response}}}")
}

/// `{"status":"error","response":{"reason":<reason>}}`.
pub fn reply_error_reason(reason: &str) -> String {
    let mut out = String::from("{\"status\":\"error\",\"response\":{\"reason\":");
    push_json_str(&mut out, reason);
    out.push_str("}}");
    out
}

/// A `system` push payload. `channel` is the sub-topic; `None` omits the key.
pub fn system(extension: &str, ok: bool, message: &str, channel: Option<&str>) -> String {
    let mut out = String::from("{\"extension\":");
    push_json_str(&mut out, extension);
    out.push_str(if ok {
        ",\"status\":\"ok\""
    } else {
        ",\"status\":\"error\""
    });
    out.push_str(",\"message\":");
    push_json_str(&mut out, message);
    if let Some(channel) = channel {
        out.push_str(",\"channel\":");
        push_json_str(&mut out, channel);
    }
    out.push('}');
    out
}

/// The payload realtime-js receives for a user broadcast on a JSON socket:
/// `{"event":…,"payload":…,"type":"broadcast"[,"meta":…]}`. `payload` and `meta` are JSON text.
pub fn user_broadcast_json(event: &str, payload: &str, meta: Option<&str>) -> String {
    let mut out = String::with_capacity(payload.len() + event.len() + 48);
    out.push_str("{\"event\":");
    push_json_str(&mut out, event);
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push_str(",\"type\":\"broadcast\"");
    if let Some(meta) = meta {
        out.push_str(",\"meta\":");
        out.push_str(meta);
    }
    out.push('}');
    out
}

/// `{"access_token": …}` as realtime-js sends it (for tests and load generators).
pub fn access_token(token: &str) -> String {
    format!("{{\"access_token\":{}}}", json_str(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn captured_join_payload() {
        let p = JoinPayload::parse(&raw(
            r#"{"config":{"broadcast":{"ack":true,"self":true},"presence":{"key":"user-1","enabled":true},"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos","filter":"id=eq.1"}],"private":false},"access_token":"USER.JWT.TOKEN"}"#,
        ));
        assert!(p.has_config && !p.invalid);
        assert!(p.broadcast.ack && p.broadcast.self_broadcast);
        assert!(p.presence.enabled);
        assert_eq!(p.presence.key, "user-1");
        assert!(!p.private);
        assert_eq!(p.access_token.as_deref(), Some("USER.JWT.TOKEN"));
        assert_eq!(p.postgres_changes.len(), 1);
        assert_eq!(
            p.postgres_changes[0].echo_with_id(7),
            r#"{"event":"INSERT","schema":"public","table":"todos","filter":"id=eq.1","id":7}"#
        );
    }

    #[test]
    fn lenient_casts() {
        let p = JoinPayload::parse(&raw(
            r#"{"config":{"broadcast":{"ack":"TRUE","self":"false","replay":{"since":1,"limit":2}},"presence":{"enabled":1},"private":"True","postgres_changes":[null,{}]},"access_token":"a","user_token":"u","other":1}"#,
        ));
        assert!(p.broadcast.ack && !p.broadcast.self_broadcast);
        assert!(!p.presence.enabled);
        assert!(p.private);
        assert_eq!(p.access_token.as_deref(), Some("u"));
        assert_eq!(p.broadcast.replay.as_ref().unwrap().since, Value::from(1));
        assert_eq!(p.postgres_changes.len(), 1);
        assert_eq!(p.postgres_changes[0].echo_with_id(3), r#"{"id":3}"#);
    }

    #[test]
    fn invalid_shapes_fall_back_to_defaults() {
        for text in [
            r#"[]"#,
            r#""x""#,
            r#"{"config":5}"#,
            r#"{"config":{"postgres_changes":3}}"#,
        ] {
            let p = JoinPayload::parse(&raw(text));
            assert!(p.invalid, "{text}");
            assert!(!p.broadcast.ack);
        }
        let p = JoinPayload::parse(&raw("{}"));
        assert!(!p.has_config && !p.invalid && p.access_token.is_none());
    }

    #[test]
    fn presence_pushes() {
        assert_eq!(
            PresencePush::parse(&raw(
                r#"{"type":"presence","event":"TRACK","payload":{"a":1}}"#
            )),
            PresencePush::Track(Some(serde_json::json!({"a":1})))
        );
        assert_eq!(
            PresencePush::parse(&raw(r#"{"event":"untrack"}"#)),
            PresencePush::Untrack
        );
        assert_eq!(
            PresencePush::parse(&raw(r#"{"event":"x"}"#)),
            PresencePush::Unknown
        );
        assert_eq!(
            PresencePush::parse(&raw(r#"{"type":"presence"}"#)),
            PresencePush::NoEvent
        );
        assert_eq!(PresencePush::parse(&raw(r#"7"#)), PresencePush::Unknown);
    }

    #[test]
    fn access_token_payloads() {
        assert_eq!(
            parse_access_token(&raw(r#"{"access_token":"t"}"#)).as_deref(),
            Some("t")
        );
        assert_eq!(parse_access_token(&raw(r#"{"access_token":null}"#)), None);
        assert_eq!(parse_access_token(&raw(r#"[]"#)), None);
    }

    #[test]
    fn server_payloads() {
        assert_eq!(reply_ok("{}"), r#"{"status":"ok","response":{}}"#);
        assert_eq!(
            reply_error_reason("unmatched topic"),
            r#"{"status":"error","response":{"reason":"unmatched topic"}}"#
        );
        assert_eq!(
            system(
                "system",
                false,
                "Token has expired 3 seconds ago",
                Some("room1")
            ),
            r#"{"extension":"system","status":"error","message":"Token has expired 3 seconds ago","channel":"room1"}"#
        );
        assert_eq!(
            user_broadcast_json("cursor", r#"{"x":1}"#, Some(r#"{"id":"a"}"#)),
            r#"{"event":"cursor","payload":{"x":1},"type":"broadcast","meta":{"id":"a"}}"#
        );
    }
}
