//! Presence with Phoenix.Presence semantics, per topic, owned by this node.
//!
//! The state maps a presence key to its metas. Each channel (a [`MemberId`]) tracks at most one
//! meta under its channel's key; several channels with the same key give one key with several
//! metas. Every meta carries a `phx_ref` unique to that track, and `phx_ref_prev` when it
//! replaced an earlier meta of the same channel.
//!
//! Changes produce a [`Diff`] value (joins and leaves), which the registry encodes once and fans
//! out as `presence_diff` to every member of the topic, the tracker included. A diff costs
//! O(changed); the join-time `presence_state` costs O(members).
//!
//! In a cluster the state also holds the metas other nodes own (`Owner::Remote`), copied from
//! their diffs ([`WireMeta`]): `presence_state` is then the whole cluster's, and a remote diff
//! becomes a local `presence_diff` with the same `phx_ref`s. Applying a remote change twice, or
//! removing a meta that is already gone, changes nothing, so a snapshot and the diffs around it
//! may overlap.
//!
//! A meta's user payload is stored as the canonical JSON text of the object's members, ready to
//! be spliced into frames; nothing is re-serialized per diff or per recipient.

use super::bus::NodeId;
use super::member::MemberId;
use realtime_protocol::frame::push_json_str;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Who holds a meta: a channel of this node, or a channel of another node (by its incarnation
/// and that node's member id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Owner {
    Local(MemberId),
    Remote(NodeId, MemberId),
}

/// One meta as it travels between nodes: the owner is the origin node's member id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WireMeta {
    pub(crate) owner: MemberId,
    pub(crate) key: Arc<str>,
    pub(crate) phx_ref: Box<str>,
    pub(crate) phx_ref_prev: Option<Box<str>>,
    pub(crate) body: Box<str>,
}

/// One meta in the state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    owner: Owner,
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

    /// This node's part of the diff, for the other nodes: (leaves, joins).
    pub(crate) fn wire(&self) -> (Vec<WireMeta>, Vec<WireMeta>) {
        let local = |entries: &[(Arc<str>, Meta)]| {
            entries
                .iter()
                .filter_map(|(key, meta)| match meta.owner {
                    Owner::Local(owner) => Some(meta.wire(owner, key)),
                    Owner::Remote(..) => None,
                })
                .collect()
        };
        (local(&self.leaves), local(&self.joins))
    }

    fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    fn some(self) -> Option<Diff> {
        (!self.is_empty()).then_some(self)
    }
}

impl Meta {
    fn wire(&self, owner: MemberId, key: &Arc<str>) -> WireMeta {
        WireMeta {
            owner,
            key: key.clone(),
            phx_ref: self.phx_ref.clone(),
            phx_ref_prev: self.phx_ref_prev.clone(),
            body: self.body.clone(),
        }
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
    owners: HashMap<Owner, Arc<str>>,
}

impl PresenceState {
    /// Tracks (or re-tracks) `owner`'s meta under `key`. `body` is the user object's members as
    /// JSON text. Returns the diff, or `None` when nothing changed.
    pub(crate) fn track(&mut self, owner: MemberId, key: &Arc<str>, body: &str) -> Option<Diff> {
        let owner = Owner::Local(owner);
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
        let (key, old) = self.remove(Owner::Local(owner))?;
        Some(Diff {
            joins: Vec::new(),
            leaves: vec![(key, old)],
        })
    }

    fn remove(&mut self, owner: Owner) -> Option<(Arc<str>, Meta)> {
        let key = self.owners.remove(&owner)?;
        let metas = self.by_key.get_mut(&key)?;
        let i = metas.iter().position(|m| m.owner == owner)?;
        let old = metas.remove(i);
        if metas.is_empty() {
            self.by_key.remove(&key);
        }
        Some((key, old))
    }

    /// The meta `owner` holds now, with its key.
    fn held(&self, owner: Owner) -> Option<(&Arc<str>, &Meta)> {
        let key = self.owners.get(&owner)?;
        let meta = self.by_key.get(key)?.iter().find(|m| m.owner == owner)?;
        Some((key, meta))
    }

    fn insert(&mut self, owner: Owner, meta: &WireMeta) -> (Arc<str>, Meta) {
        let held = Meta {
            owner,
            phx_ref: meta.phx_ref.clone(),
            phx_ref_prev: meta.phx_ref_prev.clone(),
            body: meta.body.clone(),
        };
        self.by_key
            .entry(meta.key.clone())
            .or_default()
            .push(held.clone());
        self.owners.insert(owner, meta.key.clone());
        (meta.key.clone(), held)
    }

    /// Applies a diff node `node` made of its own metas; returns what changed here.
    pub(crate) fn apply_remote(
        &mut self,
        node: NodeId,
        leaves: &[WireMeta],
        joins: &[WireMeta],
    ) -> Option<Diff> {
        let mut diff = Diff::default();
        for meta in leaves {
            let owner = Owner::Remote(node, meta.owner);
            if self
                .held(owner)
                .is_some_and(|(_, held)| held.phx_ref == meta.phx_ref)
            {
                diff.leaves.extend(self.remove(owner));
            }
        }
        for meta in joins {
            let owner = Owner::Remote(node, meta.owner);
            match self.held(owner) {
                Some((_, held)) if held.phx_ref == meta.phx_ref => continue,
                Some(_) => diff.leaves.extend(self.remove(owner)),
                None => {}
            }
            diff.joins.push(self.insert(owner, meta));
        }
        diff.some()
    }

    /// Makes node `node`'s metas here exactly `metas` (a snapshot of what it owns).
    pub(crate) fn replace_remote(&mut self, node: NodeId, metas: &[WireMeta]) -> Option<Diff> {
        let wanted: HashMap<MemberId, &WireMeta> = metas.iter().map(|m| (m.owner, m)).collect();
        let gone: Vec<Owner> = self
            .owners
            .keys()
            .filter(|owner| match owner {
                Owner::Remote(n, member) if *n == node => wanted.get(member).is_none_or(|w| {
                    self.held(**owner)
                        .is_none_or(|(_, held)| held.phx_ref != w.phx_ref)
                }),
                _ => false,
            })
            .copied()
            .collect();
        let mut diff = Diff::default();
        for owner in gone {
            diff.leaves.extend(self.remove(owner));
        }
        for meta in metas {
            let owner = Owner::Remote(node, meta.owner);
            if self.held(owner).is_none() {
                diff.joins.push(self.insert(owner, meta));
            }
        }
        diff.some()
    }

    /// Removes every meta node `node` owns (the node is gone).
    #[cfg(test)]
    pub(crate) fn remove_node(&mut self, node: NodeId) -> Option<Diff> {
        self.replace_remote(node, &[])
    }

    /// The metas this node's channels hold.
    pub(crate) fn local_metas(&self) -> Vec<WireMeta> {
        self.by_key
            .iter()
            .flat_map(|(key, metas)| {
                metas.iter().filter_map(move |meta| match meta.owner {
                    Owner::Local(owner) => Some(meta.wire(owner, key)),
                    Owner::Remote(..) => None,
                })
            })
            .collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.owners.is_empty()
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

    #[test]
    fn remote_metas_join_leave_and_go_with_their_node() {
        let (a, b) = (NodeId(1), NodeId(2));
        let mut origin = PresenceState::default();
        let mut here = PresenceState::default();
        here.track(MemberId(1), &key("k"), "\"n\":0");
        let d = origin.track(MemberId(7), &key("k"), "\"n\":1").unwrap();
        let (leaves, joins) = d.wire();
        let seen = here.apply_remote(a, &leaves, &joins).unwrap();
        assert_eq!(seen.render(), d.render(), "the same diff, the same refs");
        assert!(
            here.apply_remote(a, &leaves, &joins).is_none(),
            "twice is once"
        );
        let v: Value = serde_json::from_str(&here.render()).unwrap();
        assert_eq!(v["k"]["metas"].as_array().unwrap().len(), 2);
        assert_eq!(here.local_metas().len(), 1, "only this node's own");
        // Another node's member with the same member id is another owner.
        here.apply_remote(b, &[], &joins).unwrap();
        let d = origin.track(MemberId(7), &key("k"), "\"n\":2").unwrap();
        let (leaves, joins) = d.wire();
        let seen = here.apply_remote(a, &leaves, &joins).unwrap();
        assert_eq!(seen.render(), d.render());
        let gone = here.remove_node(a).unwrap();
        let v: Value = serde_json::from_str(&gone.render()).unwrap();
        assert_eq!(v["leaves"]["k"]["metas"][0]["n"], 2);
        assert_eq!(v["joins"], json!({}));
        assert!(here.remove_node(a).is_none());
        let v: Value = serde_json::from_str(&here.render()).unwrap();
        assert_eq!(
            v["k"]["metas"].as_array().unwrap().len(),
            2,
            "b's and ours stay"
        );
    }

    #[derive(Clone, Debug)]
    enum ClusterOp {
        Track {
            who: u8,
            key: u8,
            n: u8,
        },
        Untrack {
            who: u8,
        },
        /// The diff is lost on the way (a full queue, a cut).
        Lose,
        /// The diff arrives twice.
        Twice,
        /// The receiver asks for a snapshot and replaces its copy.
        Snapshot,
    }

    fn cluster_op() -> impl Strategy<Value = ClusterOp> {
        prop_oneof![
            4 => (0u8..5, 0u8..3, 0u8..3).prop_map(|(who, key, n)| ClusterOp::Track { who, key, n }),
            2 => (0u8..5).prop_map(|who| ClusterOp::Untrack { who }),
            1 => Just(ClusterOp::Lose),
            1 => Just(ClusterOp::Twice),
            1 => Just(ClusterOp::Snapshot),
        ]
    }

    proptest! {
        /// A node's copy of another node's presence, fed its diffs (some lost, some twice) and
        /// now and then a snapshot, ends equal to the origin's state once a snapshot follows the
        /// last loss; an observer on the receiving node, fed the receiver's diffs, sees the same.
        #[test]
        fn a_copy_converges_after_a_snapshot(ops in prop::collection::vec(cluster_op(), 0..60)) {
            let node = NodeId(9);
            let mut origin = PresenceState::default();
            let mut copy = PresenceState::default();
            let mut observer = Observer::default();
            observer.apply_state(&copy.render());
            let mut lose = false;
            let mut twice = false;
            for op in ops {
                let diff = match op {
                    ClusterOp::Track { who, key, n } => origin.track(
                        MemberId(who.into()),
                        &Arc::from(format!("k{key}")),
                        &format!("\"n\":{n}"),
                    ),
                    ClusterOp::Untrack { who } => origin.untrack(MemberId(who.into())),
                    ClusterOp::Lose => { lose = true; None }
                    ClusterOp::Twice => { twice = true; None }
                    ClusterOp::Snapshot => {
                        if let Some(d) = copy.replace_remote(node, &origin.local_metas()) {
                            observer.apply_diff(&d.render());
                        }
                        None
                    }
                };
                if let Some(diff) = diff {
                    let (leaves, joins) = diff.wire();
                    if !std::mem::take(&mut lose) {
                        for _ in 0..if std::mem::take(&mut twice) { 2 } else { 1 } {
                            if let Some(d) = copy.apply_remote(node, &leaves, &joins) {
                                observer.apply_diff(&d.render());
                            }
                        }
                    }
                }
            }
            if let Some(d) = copy.replace_remote(node, &origin.local_metas()) {
                observer.apply_diff(&d.render());
            }
            let mut truth = Observer::default();
            truth.apply_state(&origin.render());
            let mut got = Observer::default();
            got.apply_state(&copy.render());
            prop_assert_eq!(got.view(), truth.view());
            prop_assert_eq!(observer.view(), truth.view());
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
