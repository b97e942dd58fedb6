//! The object store: JSON objects keyed by group/resource/namespace/name, one
//! global resourceVersion counter, and the watch event history.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::fields::Owners;

/// (group, plural, namespace or "" when cluster-scoped, name)
pub(crate) type Key = (String, String, String, String);

pub(crate) fn key(group: &str, plural: &str, namespace: &str, name: &str) -> Key {
    (
        group.to_owned(),
        plural.to_owned(),
        namespace.to_owned(),
        name.to_owned(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as stored objects (apiVersion as written; watches convert).
pub(crate) struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub key: Key,
    pub object: Value,
    /// The object before the change, so selector watches can tell an object
    /// that stopped matching (DELETED) from one that started (ADDED).
    pub old: Option<Value>,
}

// Enough for the tests' bulk writes to stay replayable; older history is
// forgotten as if compacted.
const HISTORY_LIMIT: usize = 100_000;
// Large so that a watcher busy for a moment is not cut off, bounded so that a
// watcher that stopped reading cannot hold memory forever.
const CHANNEL_CAPACITY: usize = 16_384;

pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    /// Events at or below this resourceVersion are forgotten.
    floor: u64,
    events: broadcast::Sender<Arc<Event>>,
    /// Field ownership per stored object, for server-side apply.
    owners: HashMap<Key, Owners>,
    pub validator: kube::core::cel::Validator,
}

pub(crate) enum Since {
    /// Every retained event after the given resourceVersion.
    Events(Vec<Arc<Event>>),
    /// That resourceVersion is older than the retained history.
    Expired { floor: u64 },
}

impl Store {
    pub fn new() -> Store {
        let (events, _) = broadcast::channel(CHANNEL_CAPACITY);
        Store {
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            floor: 1,
            events,
            owners: HashMap::new(),
            validator: kube::core::cel::Validator::new(),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Objects of one resource in key order (namespace, then name), in one
    /// namespace or all.
    pub fn scan<'a>(
        &'a self,
        group: &'a str,
        plural: &'a str,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        let start = key(group, plural, namespace.unwrap_or(""), "");
        self.objects.range(start..).take_while(move |(k, _)| {
            k.0 == group && k.1 == plural && namespace.is_none_or(|ns| k.2 == ns)
        })
    }

    /// The next resourceVersion, to stamp on an object about to be committed.
    pub fn next_rv(&self) -> u64 {
        self.rv + 1
    }

    /// Stores `object` (already stamped with `next_rv`) and records the event.
    pub fn put(&mut self, key: Key, object: Value, kind: EventType) {
        let old = self.objects.insert(key.clone(), object.clone());
        self.record(key, object, old, kind);
    }

    /// Who owns which fields of a stored object.
    pub fn owners(&self, key: &Key) -> Owners {
        self.owners.get(key).cloned().unwrap_or_default()
    }

    /// Records field ownership of an object still stored.
    pub fn set_owners(&mut self, key: &Key, owners: Owners) {
        if self.objects.contains_key(key) {
            self.owners.insert(key.clone(), owners);
        }
    }

    /// Removes the object; `object` is its final state, stamped with `next_rv`.
    pub fn remove(&mut self, key: &Key, object: Value) {
        self.owners.remove(key);
        let old = self.objects.remove(key);
        self.record(key.clone(), object, old, EventType::Deleted);
    }

    fn record(&mut self, key: Key, object: Value, old: Option<Value>, kind: EventType) {
        self.rv += 1;
        let event = Arc::new(Event {
            rv: self.rv,
            kind,
            key,
            object,
            old,
        });
        self.history.push_back(event.clone());
        if self.history.len() > HISTORY_LIMIT
            && let Some(dropped) = self.history.pop_front()
        {
            self.floor = dropped.rv;
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    /// Retained events after `rv`, or why they cannot be had.
    pub fn since(&self, rv: u64) -> Since {
        if rv < self.floor {
            return Since::Expired { floor: self.floor };
        }
        Since::Events(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    /// Every retained event, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = &Arc<Event>> {
        self.history.iter()
    }

    /// Whether a list snapshot taken at `rv` can still be continued.
    pub fn retains(&self, rv: u64) -> bool {
        rv >= self.floor
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }
}
