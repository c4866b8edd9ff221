//! Presence with Phoenix.Presence semantics, per topic, owned by this node.
//!
//! The state maps a presence key to its metas. Each channel (a [`MemberId`]) tracks at most one
//! meta under its channel's key; several channels with the same key give one key with several
//! metas. Every meta carries a `phx_ref` unique to that track, and `phx_ref_prev` when it
//! replaced an earlier meta of the same channel.
//!
//! Changes produce a [`Diff`] value (joins and leaves), which the registry encodes once and fans
//! out as `presence_diff` to every member of the topic, the tracker included. A diff costs
//! O(changed); the join-time `presence_state` costs O(members). Diffs are plain values, so a
//! cluster could replicate them later.
//!
//! A meta's user payload is stored as the canonical JSON text of the object's members, ready to
//! be spliced into frames; nothing is re-serialized per diff or per recipient.

use super::member::MemberId;
use realtime_protocol::frame::push_json_str;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One meta in the state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    owner: MemberId,
    phx_ref: Box<str>,
    phx_ref_prev: Option<Box<str>>,
    /// The members of the user's meta object as JSON text, without braces (`"a":1,"b":2`).
    body: Box<str>,
}

impl Meta {
    fn render(&self, out: &mut String) {
        out.push_str("{\"phx_ref\":");
        push_json_str(out, &self.phx_ref);
        if let Some(prev) = &self.phx_ref_prev {
            out.push_str(",\"phx_ref_prev\":");
            push_json_str(out, prev);
        }
        if !self.body.is_empty() {
            out.push(',');
            out.push_str(&self.body);
        }
        out.push('}');
    }
}

/// What changed: metas that joined and metas that left, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Diff {
    joins: Vec<(Arc<str>, Meta)>,
    leaves: Vec<(Arc<str>, Meta)>,
}

impl Diff {
    /// The `presence_diff` payload: `{"joins":{key:{"metas":[…]}},"leaves":{…}}`.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push_str("{\"joins\":");
        render_grouped(&mut out, &self.joins);
        out.push_str(",\"leaves\":");
        render_grouped(&mut out, &self.leaves);
        out.push('}');
        out
    }
}

fn render_grouped(out: &mut String, entries: &[(Arc<str>, Meta)]) {
    out.push('{');
    let mut done = vec![false; entries.len()];
    let mut first_key = true;
    for i in 0..entries.len() {
        if done[i] {
            continue;
        }
        let key = &entries[i].0;
        if !first_key {
            out.push(',');
        }
        first_key = false;
        push_json_str(out, key);
        out.push_str(":{\"metas\":[");
        let mut first = true;
        for j in i..entries.len() {
            if !done[j] && entries[j].0 == *key {
                done[j] = true;
                if !first {
                    out.push(',');
                }
                first = false;
                entries[j].1.render(out);
            }
        }
        out.push_str("]}");
    }
    out.push('}');
}

/// Presence state of one topic.
#[derive(Debug, Default)]
pub(crate) struct PresenceState {
    by_key: HashMap<Arc<str>, Vec<Meta>>,
    /// Which key each tracking channel is under.
    owners: HashMap<MemberId, Arc<str>>,
}

impl PresenceState {
    /// Tracks (or re-tracks) `owner`'s meta under `key`. `body` is the user object's members as
    /// JSON text. Returns the diff, or `None` when nothing changed.
    pub(crate) fn track(&mut self, owner: MemberId, key: &Arc<str>, body: &str) -> Option<Diff> {
        let mut diff = Diff::default();
        let mut prev = None;
        if let Some(old_key) = self.owners.get(&owner).cloned() {
            let metas = self.by_key.get_mut(&old_key)?;
            let i = metas.iter().position(|m| m.owner == owner)?;
            if old_key == *key && &*metas[i].body == body {
                return None;
            }
            let old = metas.remove(i);
            if metas.is_empty() {
                self.by_key.remove(&old_key);
            }
            prev = Some(old.phx_ref.clone());
            diff.leaves.push((old_key, old));
        }
        let meta = Meta {
            owner,
            phx_ref: new_ref(),
            phx_ref_prev: prev,
            body: body.into(),
        };
        self.by_key
            .entry(key.clone())
            .or_default()
            .push(meta.clone());
        self.owners.insert(owner, key.clone());
        diff.joins.push((key.clone(), meta));
        Some(diff)
    }

    /// Removes `owner`'s meta. Returns the diff, or `None` when it tracked nothing.
    pub(crate) fn untrack(&mut self, owner: MemberId) -> Option<Diff> {
        let key = self.owners.remove(&owner)?;
        let metas = self.by_key.get_mut(&key)?;
        let i = metas.iter().position(|m| m.owner == owner)?;
        let old = metas.remove(i);
        if metas.is_empty() {
            self.by_key.remove(&key);
        }
        Some(Diff {
            joins: Vec::new(),
            leaves: vec![(key, old)],
        })
    }

    /// The `presence_state` payload: `{key:{"metas":[…]}}` (`{}` when empty).
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(16 + self.owners.len() * 64);
        out.push('{');
        for (i, (key, metas)) in self.by_key.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_str(&mut out, key);
            out.push_str(":{\"metas\":[");
            for (j, meta) in metas.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                meta.render(&mut out);
            }
            out.push_str("]}");
        }
        out.push('}');
        out
    }
}

/// A `phx_ref`: unique within the process (a random base and a counter), base64url.
fn new_ref() -> Box<str> {
    use base64::Engine;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(rand::random::<u64>);
    let n = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(n.to_be_bytes())
        .into_boxed_str()
}

/// The members of a JSON object's canonical text, without the braces: `{"a":1}` → `"a":1`.
/// `None` when the value is not an object.
pub(crate) fn object_body(value: &serde_json::Value) -> Option<String> {
    let object = value.as_object()?;
    let text = serde_json::Value::Object(object.clone()).to_string();
    Some(text[1..text.len() - 1].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};
    use std::collections::BTreeMap;

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    #[test]
    fn track_retrack_untrack() {
        let mut s = PresenceState::default();
        let a = MemberId(1);
        let d = s.track(a, &key("u1"), "\"n\":1").unwrap();
        let v: Value = serde_json::from_str(&d.render()).unwrap();
        let r1 = v["joins"]["u1"]["metas"][0]["phx_ref"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(v["joins"]["u1"]["metas"][0]["n"], 1);
        assert_eq!(v["leaves"], json!({}));
        assert!(
            s.track(a, &key("u1"), "\"n\":1").is_none(),
            "same payload is a no-op"
        );
        let d = s.track(a, &key("u1"), "\"n\":2").unwrap();
        let v: Value = serde_json::from_str(&d.render()).unwrap();
        assert_eq!(v["joins"]["u1"]["metas"][0]["phx_ref_prev"], json!(r1));
        assert_eq!(v["leaves"]["u1"]["metas"][0]["phx_ref"], json!(r1));
        assert_eq!(v["leaves"]["u1"]["metas"][0]["n"], 1);
        let d = s.untrack(a).unwrap();
        let v: Value = serde_json::from_str(&d.render()).unwrap();
        assert_eq!(v["leaves"]["u1"]["metas"][0]["n"], 2);
        assert_eq!(s.render(), "{}");
        assert!(s.untrack(a).is_none());
    }

    #[test]
    fn shared_key_gives_several_metas() {
        let mut s = PresenceState::default();
        s.track(MemberId(1), &key("k"), "\"d\":\"phone\"");
        s.track(MemberId(2), &key("k"), "\"d\":\"laptop\"");
        let v: Value = serde_json::from_str(&s.render()).unwrap();
        assert_eq!(v["k"]["metas"].as_array().unwrap().len(), 2);
        s.untrack(MemberId(1));
        let v: Value = serde_json::from_str(&s.render()).unwrap();
        assert_eq!(v["k"]["metas"][0]["d"], "laptop");
    }

    #[test]
    fn empty_meta_renders_just_refs() {
        let mut s = PresenceState::default();
        let d = s.track(MemberId(1), &key("k\"q"), "").unwrap();
        let v: Value = serde_json::from_str(&d.render()).unwrap();
        assert!(v["joins"]["k\"q"]["metas"][0]["phx_ref"].is_string());
        assert_eq!(
            object_body(&json!({"b":1,"a":[1]})).unwrap(),
            "\"a\":[1],\"b\":1"
        );
        assert_eq!(object_body(&json!([1])), None);
    }

    /// Memory per tracked presence: the resident memory 200,000 presences add to the process
    /// (large enough to drown what tests running beside it allocate), beyond the meta's text.
    #[test]
    fn memory_per_tracked_presence_is_bounded() {
        const N: usize = 200_000;
        let meta = r#""online_at":"2025-01-01T00:00:00.000Z","status":"online","user_id":"2b7f3c1e-8f0a-4d3b-9a51-2c7e4f1d6a90""#;
        let keys: Vec<Arc<str>> = (0..N).map(|i| Arc::from(format!("user-{i:05}"))).collect();
        let _measuring = crate::test_support::MEASURING
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = crate::test_support::resident_bytes();
        let mut state = PresenceState::default();
        for (i, key) in keys.iter().enumerate() {
            state.track(MemberId(i as u64), key, meta);
        }
        let per_presence = crate::test_support::resident_bytes().saturating_sub(before) / N;
        let overhead = per_presence.saturating_sub(meta.len());
        println!(
            "presence: {per_presence} bytes per tracked presence ({} bytes of meta, {overhead} of state)",
            meta.len()
        );
        assert!(
            per_presence > 0 && overhead < 512,
            "{per_presence} bytes per presence"
        );
        drop(state);
    }

    /// An observer as realtime-js keeps it: key → metas by phx_ref, updated by state and diffs.
    #[derive(Default)]
    struct Observer(BTreeMap<String, BTreeMap<String, Value>>);

    impl Observer {
        fn apply_state(&mut self, state: &str) {
            self.0.clear();
            let v: Value = serde_json::from_str(state).unwrap();
            self.add(&v);
        }
        fn add(&mut self, v: &Value) {
            for (k, entry) in v.as_object().unwrap() {
                for m in entry["metas"].as_array().unwrap() {
                    let r = m["phx_ref"].as_str().unwrap().to_owned();
                    let mut m = m.clone();
                    m.as_object_mut().unwrap().remove("phx_ref");
                    m.as_object_mut().unwrap().remove("phx_ref_prev");
                    self.0.entry(k.clone()).or_default().insert(r, m);
                }
            }
        }
        fn apply_diff(&mut self, diff: &str) {
            let v: Value = serde_json::from_str(diff).unwrap();
            self.add(&v["joins"]);
            for (k, entry) in v["leaves"].as_object().unwrap() {
                for m in entry["metas"].as_array().unwrap() {
                    if let Some(metas) = self.0.get_mut(k) {
                        metas.remove(m["phx_ref"].as_str().unwrap());
                        if metas.is_empty() {
                            self.0.remove(k);
                        }
                    }
                }
            }
        }
        fn view(&self) -> BTreeMap<String, Vec<Value>> {
            self.0
                .iter()
                .map(|(k, m)| (k.clone(), m.values().cloned().collect()))
                .collect()
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Track { who: u8, key: u8, n: u8 },
        Untrack { who: u8 },
        Join,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 0u8..3, 0u8..3).prop_map(|(who, key, n)| Op::Track { who, key, n }),
            (0u8..6).prop_map(|who| Op::Untrack { who }),
            Just(Op::Join),
        ]
    }

    proptest! {
        /// Any sequence of track, re-track, untrack and leave (untrack on close), observed by
        /// observers that joined at any point (state, then every later diff), ends with every
        /// observer's view equal to the truth.
        #[test]
        fn observers_converge(ops in prop::collection::vec(op(), 0..60)) {
            let mut state = PresenceState::default();
            let mut observers: Vec<Observer> = Vec::new();
            for op in ops {
                let diff = match op {
                    Op::Track { who, key, n } => {
                        state.track(MemberId(who.into()), &Arc::from(format!("k{key}")), &format!("\"n\":{n}"))
                    }
                    Op::Untrack { who } => state.untrack(MemberId(who.into())),
                    Op::Join => {
                        let mut o = Observer::default();
                        o.apply_state(&state.render());
                        observers.push(o);
                        None
                    }
                };
                if let Some(diff) = diff {
                    let text = diff.render();
                    for o in &mut observers {
                        o.apply_diff(&text);
                    }
                }
            }
            let mut truth = Observer::default();
            truth.apply_state(&state.render());
            for o in &observers {
                prop_assert_eq!(o.view(), truth.view());
            }
        }
    }
}
