//! The subscription index: table OID → the bindings of every channel subscribed to it.
//!
//! Copy-on-write per table (`Arc<Vec<…>>`), so a batch reads a snapshot without holding a lock.
//! A channel's bindings are replaced in one critical section: a batch sees either the old set
//! or the new one, never neither.

use super::payload::{Shape, ShapeSpec};
use super::subscription::TableBinding;
use super::visibility::Viewer;
use crate::topics::{Member, MemberId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

/// One binding of one channel on one table.
#[derive(Debug)]
pub(crate) struct Subscription {
    /// The channel: its outbox, serializer, topic and read flags.
    pub(crate) member: Arc<Member>,
    pub(crate) binding: TableBinding,
    pub(crate) viewer: Arc<Viewer>,
    /// The payload shape, computed once at subscribe time.
    pub(crate) shape: Shape,
}

pub(crate) type TableSubs = Arc<Vec<Arc<Subscription>>>;

#[derive(Debug, Default)]
struct Tables {
    by_table: HashMap<u32, TableSubs>,
    by_member: HashMap<MemberId, Vec<u32>>,
}

/// Table OID → subscriptions.
#[derive(Debug, Default)]
pub(crate) struct Index {
    tables: RwLock<Tables>,
    interned: Mutex<Interned>,
}

/// Equal shapes and equal viewers are shared, so a batch compares them by pointer and groups
/// subscribers without hashing claims or column lists per change.
#[derive(Debug, Default)]
struct Interned {
    shapes: Vec<Weak<ShapeSpec>>,
    viewers: HashMap<Arc<str>, Weak<Viewer>>,
}

impl Interned {
    fn shape(&mut self, shape: Shape) -> Shape {
        self.shapes.retain(|w| w.strong_count() > 0);
        for weak in &self.shapes {
            if let Some(existing) = weak.upgrade().map(Shape::from_spec)
                && existing == shape
            {
                return existing;
            }
        }
        self.shapes.push(shape.downgrade());
        shape
    }

    fn viewer(&mut self, viewer: Arc<Viewer>) -> Arc<Viewer> {
        if let Some(existing) = self.viewers.get(&viewer.group).and_then(Weak::upgrade) {
            return existing;
        }
        if self.viewers.len() > 1024 {
            self.viewers.retain(|_, w| w.strong_count() > 0);
        }
        self.viewers
            .insert(viewer.group.clone(), Arc::downgrade(&viewer));
        viewer
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Index {
    /// Replaces a channel's subscriptions with `subs` (all of one member), atomically.
    pub(crate) fn replace(&self, member: MemberId, mut subs: Vec<Subscription>) {
        {
            let mut interned = lock(&self.interned);
            for sub in &mut subs {
                sub.shape = interned.shape(sub.shape.clone());
                sub.viewer = interned.viewer(sub.viewer.clone());
            }
        }
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        let mut oids: Vec<u32> = subs.iter().map(|s| s.binding.access.oid).collect();
        oids.sort_unstable();
        oids.dedup();
        let old = tables.by_member.remove(&member).unwrap_or_default();
        let mut touched = old.clone();
        touched.extend(oids.iter().copied());
        touched.sort_unstable();
        touched.dedup();
        let subs: Vec<Arc<Subscription>> = subs.into_iter().map(Arc::new).collect();
        for oid in touched {
            // This member's bindings on the table stay adjacent (one run per channel), which
            // the batch relies on to find a channel's bindings.
            let mut next: Vec<Arc<Subscription>> = tables
                .by_table
                .get(&oid)
                .map(|entry| {
                    entry
                        .iter()
                        .filter(|s| s.member.id != member)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            next.extend(subs.iter().filter(|s| s.binding.access.oid == oid).cloned());
            if next.is_empty() {
                tables.by_table.remove(&oid);
            } else {
                tables.by_table.insert(oid, Arc::new(next));
            }
        }
        if !oids.is_empty() {
            tables.by_member.insert(member, oids);
        }
    }

    /// Removes a channel's subscriptions.
    pub(crate) fn remove(&self, member: MemberId) {
        self.replace(member, Vec::new());
    }

    /// Every channel with a subscription, once each.
    pub(crate) fn members(&self) -> Vec<Arc<Member>> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let mut seen = std::collections::HashSet::new();
        tables
            .by_table
            .values()
            .flat_map(|subs| subs.iter())
            .filter(|s| seen.insert(s.member.id))
            .map(|s| s.member.clone())
            .collect()
    }

    pub(crate) fn snapshot(&self, oid: u32) -> Option<TableSubs> {
        self.tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_table
            .get(&oid)
            .cloned()
    }
}
