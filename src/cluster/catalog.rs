//! The cluster's objects as the controller sees them. Fed by the watch
//! streams, each object is validated once per change and indexed by the
//! scope it applies at, so a reconcile builds its instance's snapshot
//! without listing anything, and a change maps to exactly the instances it
//! affects (the old and the new version of the object both count: a binding
//! moved from one type to another affects both).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::RwLock;

use kube::api::DynamicObject;
use kube::runtime::watcher;
use serde_json::Value;

use crate::crd::{AgentInstanceStatus, ObjectStatus, SECRETS_LABEL, Scope};
use crate::engine::secrets::{LabelledSecrets, SecretRef, SecretValue};
use crate::engine::snapshot::{InvalidObject, ObjectKey, Snapshot};
use crate::host::manifest::{self, Object};

/// The kinds the catalog follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// AgentInstance.
    Instance,
    /// PluginBinding.
    Binding,
    /// PluginMarketplace.
    Marketplace,
    /// McpServer.
    Mcp,
    /// A Secret labelled `agentenv.io/secrets: "true"`.
    Secret,
    /// An agent pod (labelled `agentenv.io/instance`).
    Pod,
}

impl Kind {
    /// The kind's name in messages and `validate`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Instance => "AgentInstance",
            Kind::Binding => "PluginBinding",
            Kind::Marketplace => "PluginMarketplace",
            Kind::Mcp => "McpServer",
            Kind::Secret => "Secret",
            Kind::Pod => "Pod",
        }
    }
}

/// Label on an agent pod naming its AgentInstance (in the pod's namespace).
pub const INSTANCE_LABEL: &str = "agentenv.io/instance";

/// One custom object, validated.
#[derive(Clone, Debug)]
struct Entry {
    validated: Result<Object, InvalidObject>,
    /// What a reconcile depends on; a change of anything else (status,
    /// resourceVersion, managed fields) affects no instance.
    fingerprint: u64,
    generation: Option<i64>,
    /// The status as served, for bindings, marketplaces and MCP servers;
    /// an instance's is in [`Inner::instance_status`].
    status: Option<ObjectStatus>,
}

/// An instance's status as served, kept small: the entries of its last
/// render (a few dozen per instance, most of its size) as one JSON text,
/// read back only when a pass needs them.
#[derive(Clone, Debug)]
struct SeenStatus {
    /// `metadata.resourceVersion` of the object it came with.
    version: Option<String>,
    /// The status without `rendered.entries`.
    status: AgentInstanceStatus,
    /// `rendered.entries`, as JSON.
    entries: Box<str>,
}

impl SeenStatus {
    fn new(version: Option<String>, status: Value) -> SeenStatus {
        let mut status: AgentInstanceStatus = serde_json::from_value(status).unwrap_or_default();
        let entries = status
            .rendered
            .as_mut()
            .map(|r| std::mem::take(&mut r.entries))
            .unwrap_or_default();
        SeenStatus {
            version,
            status,
            entries: serde_json::to_string(&entries)
                .unwrap_or_default()
                .into_boxed_str(),
        }
    }

    fn full(&self) -> AgentInstanceStatus {
        let mut status = self.status.clone();
        if let Some(r) = status.rendered.as_mut() {
            r.entries = serde_json::from_str(&self.entries).unwrap_or_default();
        }
        status
    }
}

/// An agent pod as far as the boot handshake and restarts care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// Being deleted.
    pub terminating: bool,
    /// `status.phase` is `Running` (or no status is reported yet).
    pub running: bool,
}

#[derive(Default)]
struct Inner {
    objects: HashMap<(Kind, ObjectKey), Entry>,
    by_scope: HashMap<(String, Scope), BTreeSet<(Kind, ObjectKey)>>,
    unscoped: HashMap<String, BTreeSet<(Kind, ObjectKey)>>,
    by_type: HashMap<(String, String), BTreeSet<String>>,
    by_namespace: HashMap<String, BTreeSet<String>>,
    /// Instances by [`crate::engine::snapshot::env_dir_key`]; ordered, so the env
    /// dirs inside one are a range.
    env_paths: BTreeMap<String, BTreeSet<ObjectKey>>,
    secrets: HashMap<String, BTreeMap<String, BTreeMap<String, SecretValue>>>,
    secret_refs: HashMap<ObjectKey, BTreeSet<SecretRef>>,
    /// Per namespace, bumped by every Secret change: a pass that read an
    /// older generation may have missed a change meant for it.
    secret_generation: HashMap<String, u64>,
    pods: HashMap<ObjectKey, BTreeMap<String, PodInfo>>,
    /// Per kind, the keys not seen again since a re-list began.
    relisting: HashMap<Kind, HashSet<ObjectKey>>,
    /// Instances' statuses as served; see [`Catalog::take_instance_status`].
    instance_status: HashMap<ObjectKey, SeenStatus>,
    /// Counts changes of custom objects other than their status.
    object_changes: u64,
}

/// See the module docs.
#[derive(Default)]
pub struct Catalog {
    inner: RwLock<Inner>,
    /// Bumped by every change that can change a binding's, marketplace's or
    /// MCP server's status: one of those objects or an instance added,
    /// removed or changed in what it depends on. Status echoes do not count.
    changes: std::sync::atomic::AtomicU64,
}

/// Drops what no reconcile reads and what can dwarf the object itself:
/// managed fields (a map of every field each manager set) and kubectl's
/// `last-applied-configuration` annotation (a copy of the whole object, on
/// everything applied client-side).
pub fn slim(obj: &mut DynamicObject) {
    obj.metadata.managed_fields = None;
    if let Some(a) = obj.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// What a watch delivered for one object, converted for the catalog.
pub enum Item {
    /// A custom object (as served) of one of the four kinds.
    Custom(Box<DynamicObject>),
    /// A labelled Secret's data (decoded).
    Secret(BTreeMap<String, SecretValue>),
    /// An agent pod.
    Pod {
        /// The instance it belongs to (`agentenv.io/instance`).
        instance: String,
        /// The pod.
        info: PodInfo,
    },
}

fn fingerprint(parts: &[&Value]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.to_string().hash(&mut h);
    }
    h.finish()
}

impl Catalog {
    /// Takes one watch event; returns the instances it affects.
    pub fn on_event<K>(
        &self,
        kind: Kind,
        event: &watcher::Event<K>,
        convert: impl Fn(&K) -> Option<(ObjectKey, Item)>,
    ) -> Vec<ObjectKey> {
        let mut inner = self.inner.write().expect("catalog lock");
        let before = inner.object_changes;
        let affected = Self::apply(&mut inner, kind, event, convert);
        if inner.object_changes != before {
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        affected
    }

    /// How many changes could have changed an object's status so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn apply<K>(
        inner: &mut Inner,
        kind: Kind,
        event: &watcher::Event<K>,
        convert: impl Fn(&K) -> Option<(ObjectKey, Item)>,
    ) -> Vec<ObjectKey> {
        match event {
            watcher::Event::Init => {
                let keys = inner.keys_of(kind);
                inner.relisting.insert(kind, keys);
                Vec::new()
            }
            watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                let Some((key, item)) = convert(obj) else {
                    return Vec::new();
                };
                if let Some(seen) = inner.relisting.get_mut(&kind) {
                    seen.remove(&key);
                }
                inner.upsert(kind, key, item)
            }
            watcher::Event::Delete(obj) => match convert(obj) {
                Some((key, _)) => inner.remove(kind, &key),
                None => Vec::new(),
            },
            watcher::Event::InitDone => {
                let gone = inner.relisting.remove(&kind).unwrap_or_default();
                gone.iter().flat_map(|k| inner.remove(kind, k)).collect()
            }
        }
    }

    /// Takes the status out of an AgentInstance as served, keeping it in a
    /// compact form: the controller's cache of instances then holds only
    /// their metadata and spec. Called on each object before that cache
    /// sees it. Managed fields are dropped too: nothing reads them.
    pub fn take_instance_status(&self, obj: &mut DynamicObject) {
        slim(obj);
        let status = obj.data.as_object_mut().and_then(|o| o.remove("status"));
        let (Some(ns), Some(name)) = (&obj.metadata.namespace, &obj.metadata.name) else {
            return;
        };
        let seen = SeenStatus::new(
            obj.metadata.resource_version.clone(),
            status.unwrap_or(Value::Null),
        );
        self.inner
            .write()
            .expect("catalog lock")
            .instance_status
            .insert(ObjectKey::new(ns, name), seen);
    }

    /// Records a status this replica wrote for an instance whose served
    /// status was at `version`: until the write's echo (or anything newer)
    /// arrives, it is what the instance's status is. A pass can start from
    /// a cached object older than its own last status write (a file event
    /// of that very render queues it at once); comparing with what was
    /// served then would write every render's status twice.
    pub fn wrote_instance_status(
        &self,
        key: &ObjectKey,
        version: Option<&str>,
        status: &AgentInstanceStatus,
    ) {
        let mut inner = self.inner.write().expect("catalog lock");
        if let Some(seen) = inner.instance_status.get_mut(key)
            && seen.version.as_deref() == version
        {
            let version = seen.version.take();
            *seen = SeenStatus::new(
                version,
                serde_json::to_value(status).expect("statuses serialize"),
            );
        }
    }

    /// An instance's status as last served (or as this replica wrote it
    /// since; see [`Catalog::wrote_instance_status`]), with the
    /// resourceVersion served last.
    pub fn instance_status(&self, key: &ObjectKey) -> (Option<String>, AgentInstanceStatus) {
        let inner = self.inner.read().expect("catalog lock");
        match inner.instance_status.get(key) {
            Some(seen) => (seen.version.clone(), seen.full()),
            None => (None, AgentInstanceStatus::default()),
        }
    }

    /// Remembers which secrets an instance's entries refer to, so a Secret
    /// change passes exactly the instances that use it. `seen` is the
    /// namespace's Secret generation the pass read ([`Catalog::snapshot_for`]);
    /// true when a Secret changed since, so the instance must pass again (the
    /// change was mapped with the refs it had before).
    pub fn record_secret_refs(
        &self,
        key: &ObjectKey,
        refs: BTreeSet<SecretRef>,
        seen: u64,
    ) -> bool {
        let mut inner = self.inner.write().expect("catalog lock");
        inner.secret_refs.insert(key.clone(), refs);
        inner
            .secret_generation
            .get(&key.namespace)
            .copied()
            .unwrap_or(0)
            != seen
    }

    /// A snapshot holding what one instance's pass needs: the instance, the
    /// objects at its scopes, the invalid objects holding it back, another
    /// instance using the same env dir (so the engine reports the
    /// collision) and its namespace's labelled Secrets. `None` when the
    /// instance is unknown. With it, the namespace's Secret generation.
    pub fn snapshot_for(&self, key: &ObjectKey) -> Option<(Snapshot, u64)> {
        let inner = self.inner.read().expect("catalog lock");
        let generation = inner
            .secret_generation
            .get(&key.namespace)
            .copied()
            .unwrap_or(0);
        let entry = inner.objects.get(&(Kind::Instance, key.clone()))?;
        let mut snap = Snapshot::default();
        let add = |snap: &mut Snapshot, k: &ObjectKey, e: &Entry| match &e.validated {
            Ok(Object::Instance(o)) => {
                snap.instances.insert(k.clone(), o.clone());
            }
            Ok(Object::Binding(o)) => {
                snap.bindings.insert(k.clone(), o.clone());
            }
            Ok(Object::Marketplace(o)) => {
                snap.marketplaces.insert(k.clone(), o.clone());
            }
            Ok(Object::Mcp(o)) => {
                snap.mcp_servers.insert(k.clone(), o.clone());
            }
            Err(inv) => snap.invalid.push(inv.clone()),
        };
        add(&mut snap, key, entry);
        if let Ok(Object::Instance(inst)) = &entry.validated {
            // One instance whose env dir clashes with this one's is enough
            // for the pass to refuse it and name the other.
            let path = crate::engine::snapshot::env_dir_key(key, inst);
            for other in inner.clashing(&path) {
                if other != key
                    && let Some(e) = inner.objects.get(&(Kind::Instance, other.clone()))
                {
                    add(&mut snap, other, e);
                    break;
                }
            }
            let ns = key.namespace.clone();
            let scopes = [
                Scope::Type(inst.spec.agent_type.clone()),
                Scope::Instance(key.name.clone()),
            ];
            let keys = scopes
                .into_iter()
                .filter_map(|s| inner.by_scope.get(&(ns.clone(), s)))
                .chain(inner.unscoped.get(&ns))
                .flatten();
            for (kind, k) in keys {
                if let Some(e) = inner.objects.get(&(*kind, k.clone())) {
                    add(&mut snap, k, e);
                }
            }
            for (name, data) in inner.secrets.get(&ns).into_iter().flatten() {
                snap.secrets.insert(&ns, name, data.clone());
            }
        }
        Some((snap, generation))
    }

    /// The labelled Secrets of one namespace.
    pub fn secrets_of(&self, namespace: &str) -> LabelledSecrets {
        let inner = self.inner.read().expect("catalog lock");
        let mut out = LabelledSecrets::default();
        for (name, data) in inner.secrets.get(namespace).into_iter().flatten() {
            out.insert(namespace, name, data.clone());
        }
        out
    }

    /// Every known instance.
    pub fn instances(&self) -> Vec<ObjectKey> {
        let inner = self.inner.read().expect("catalog lock");
        inner.keys_of(Kind::Instance).into_iter().collect()
    }

    /// Instances whose env dir a change at `rel` touches.
    pub fn instances_at(&self, rel: &str) -> Vec<ObjectKey> {
        let inner = self.inner.read().expect("catalog lock");
        crate::engine::snapshot::touched(&inner.env_paths, rel)
            .into_iter()
            .flat_map(|keys| keys.iter().cloned())
            .collect()
    }

    /// The pods of an instance, by name.
    pub fn pods_of(&self, key: &ObjectKey) -> Vec<PodInfo> {
        let inner = self.inner.read().expect("catalog lock");
        inner
            .pods
            .get(key)
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every PluginBinding, PluginMarketplace and McpServer with what its
    /// status needs: validity, how many instances it applies to, the
    /// conflicts it takes part in, its generation and its current status.
    pub fn object_statuses(&self) -> Vec<ObjectReport> {
        let inner = self.inner.read().expect("catalog lock");
        let mut conflicts: HashMap<(Kind, ObjectKey), Vec<String>> = HashMap::new();
        let empty = crate::engine::resolve::Layer::default();
        let builtin = crate::engine::builtin::Builtin::default();
        for ((ns, scope), keys) in &inner.by_scope {
            let mut layer = crate::engine::resolve::Layer::default();
            for (kind, k) in keys {
                match inner.objects.get(&(*kind, k.clone())).map(|e| &e.validated) {
                    Some(Ok(Object::Binding(o))) => layer.bindings.push(o),
                    Some(Ok(Object::Marketplace(o))) => layer.marketplaces.push(o),
                    Some(Ok(Object::Mcp(o))) => layer.mcp_servers.push(o),
                    _ => {}
                }
            }
            let declared = match scope {
                Scope::Type(t) => {
                    crate::engine::resolve::resolve_declared(&builtin, t, &layer, &empty)
                }
                Scope::Instance(_) => {
                    crate::engine::resolve::resolve_declared(&builtin, "", &empty, &layer)
                }
            };
            for c in &declared.conflicts {
                for id in std::iter::once(&c.winner).chain(&c.losers) {
                    let kind = match id.kind {
                        "PluginBinding" => Kind::Binding,
                        "PluginMarketplace" => Kind::Marketplace,
                        _ => Kind::Mcp,
                    };
                    conflicts
                        .entry((kind, ObjectKey::new(ns, &id.name)))
                        .or_default()
                        .push(c.to_string());
                }
            }
        }
        let mut out = Vec::new();
        for ((kind, key), e) in &inner.objects {
            if matches!(kind, Kind::Instance | Kind::Secret | Kind::Pod) {
                continue;
            }
            let scope = match &e.validated {
                Ok(Object::Binding(o)) => o.spec.target.scope(),
                Ok(Object::Marketplace(o)) => o.spec.target.scope(),
                Ok(Object::Mcp(o)) => o.spec.target.scope(),
                _ => None,
            };
            let instances = match &scope {
                Some(Scope::Type(t)) => inner
                    .by_type
                    .get(&(key.namespace.clone(), t.clone()))
                    .map_or(0, BTreeSet::len),
                Some(Scope::Instance(n)) => usize::from(
                    inner
                        .by_namespace
                        .get(&key.namespace)
                        .is_some_and(|s| s.contains(n)),
                ),
                None => 0,
            };
            let mut c = conflicts.remove(&(*kind, key.clone())).unwrap_or_default();
            c.sort();
            c.dedup();
            out.push(ObjectReport {
                kind: *kind,
                key: key.clone(),
                invalid: e.validated.as_ref().err().map(|i| i.message.clone()),
                instances,
                conflicts: c,
                generation: e.generation,
                status: e.status.clone().unwrap_or_default(),
            });
        }
        out.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
        out
    }
}

/// What an object's status is computed from.
#[derive(Clone, Debug)]
pub struct ObjectReport {
    /// Kind.
    pub kind: Kind,
    /// namespace/name.
    pub key: ObjectKey,
    /// Why it is invalid.
    pub invalid: Option<String>,
    /// How many instances it applies to.
    pub instances: usize,
    /// Conflicts it takes part in.
    pub conflicts: Vec<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `.status` as served.
    pub status: ObjectStatus,
}

impl Inner {
    fn keys_of(&self, kind: Kind) -> HashSet<ObjectKey> {
        match kind {
            Kind::Secret => self
                .secrets
                .iter()
                .flat_map(|(ns, s)| s.keys().map(move |n| ObjectKey::new(ns, n)))
                .collect(),
            Kind::Pod => self
                .pods
                .iter()
                .flat_map(|(inst, pods)| {
                    pods.keys().map(move |p| ObjectKey::new(&inst.namespace, p))
                })
                .collect(),
            _ => self
                .objects
                .keys()
                .filter(|(k, _)| *k == kind)
                .map(|(_, key)| key.clone())
                .collect(),
        }
    }

    fn upsert(&mut self, kind: Kind, key: ObjectKey, item: Item) -> Vec<ObjectKey> {
        match item {
            Item::Custom(obj) => self.upsert_custom(kind, key, *obj),
            Item::Secret(data) => {
                let old = self
                    .secrets
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(key.name.clone(), data.clone());
                if old.as_ref() == Some(&data) {
                    return Vec::new();
                }
                *self
                    .secret_generation
                    .entry(key.namespace.clone())
                    .or_default() += 1;
                let mut names: BTreeSet<&String> = data.keys().collect();
                names.extend(old.iter().flat_map(|o| o.keys()));
                self.using_secret(&key, names)
            }
            Item::Pod { instance, info } => {
                let owner = ObjectKey::new(&key.namespace, instance);
                let pods = self.pods.entry(owner.clone()).or_default();
                // Moved to another instance by a label change.
                let old = pods.insert(key.name.clone(), info.clone());
                let mut affected = Vec::new();
                for (other, p) in self.pods.iter_mut() {
                    if *other != owner
                        && other.namespace == key.namespace
                        && p.remove(&key.name).is_some()
                    {
                        affected.push(other.clone());
                    }
                }
                if old.as_ref() != Some(&info) {
                    affected.push(owner);
                }
                affected
            }
        }
    }

    fn upsert_custom(&mut self, kind: Kind, key: ObjectKey, obj: DynamicObject) -> Vec<ObjectKey> {
        let mut doc = serde_json::to_value(&obj).unwrap_or(Value::Null);
        doc["metadata"]["namespace"] = Value::String(key.namespace.clone());
        let status = doc
            .as_object_mut()
            .and_then(|o| o.remove("status"))
            .filter(|_| kind != Kind::Instance)
            .and_then(|s| serde_json::from_value(s).ok());
        let meta = &obj.metadata;
        let fingerprint = fingerprint(&[
            &doc["spec"],
            &serde_json::to_value(&meta.annotations).unwrap_or_default(),
            &serde_json::to_value(&meta.deletion_timestamp).unwrap_or_default(),
            &serde_json::to_value(&meta.finalizers).unwrap_or_default(),
        ]);
        let source = format!("{} {key}", kind.name());
        let entry = Entry {
            validated: manifest::validate(kind.name(), &doc, &source),
            fingerprint,
            generation: meta.generation,
            status,
        };
        let old = self.objects.get(&(kind, key.clone())).cloned();
        let changed = old
            .as_ref()
            .is_none_or(|o| o.fingerprint != entry.fingerprint || o.generation != entry.generation);
        if changed {
            self.object_changes += 1;
        }
        if let Some(o) = &old {
            self.unindex(kind, &key, o);
        }
        self.index(kind, &key, &entry, &doc);
        self.objects.insert((kind, key.clone()), entry.clone());
        if !changed {
            return Vec::new();
        }
        let mut affected = old
            .map(|o| self.affected(kind, &key, &o))
            .unwrap_or_default();
        affected.extend(self.affected(kind, &key, &entry));
        affected.sort();
        affected.dedup();
        affected
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey) -> Vec<ObjectKey> {
        match kind {
            Kind::Secret => {
                let old = self
                    .secrets
                    .get_mut(&key.namespace)
                    .and_then(|s| s.remove(&key.name));
                match old {
                    Some(data) => {
                        *self
                            .secret_generation
                            .entry(key.namespace.clone())
                            .or_default() += 1;
                        self.using_secret(key, data.keys().collect())
                    }
                    None => Vec::new(),
                }
            }
            Kind::Pod => {
                let mut affected = Vec::new();
                for (inst, pods) in self.pods.iter_mut() {
                    if inst.namespace == key.namespace && pods.remove(&key.name).is_some() {
                        affected.push(inst.clone());
                    }
                }
                affected
            }
            _ => {
                let Some(old) = self.objects.remove(&(kind, key.clone())) else {
                    return Vec::new();
                };
                self.object_changes += 1;
                self.unindex(kind, key, &old);
                let mut affected = self.affected(kind, key, &old);
                if kind == Kind::Instance {
                    affected.retain(|k| k != key);
                    self.secret_refs.remove(key);
                    self.pods.remove(key);
                    self.instance_status.remove(key);
                }
                affected
            }
        }
    }

    /// Instances in `key`'s namespace that refer to the Secret `key` or to
    /// one of its data keys by bare name.
    fn using_secret(&self, key: &ObjectKey, names: BTreeSet<&String>) -> Vec<ObjectKey> {
        self.by_namespace
            .get(&key.namespace)
            .into_iter()
            .flatten()
            .map(|n| ObjectKey::new(&key.namespace, n))
            .filter(|inst| {
                // Never passed yet: its first pass is queued anyway.
                self.secret_refs.get(inst).is_some_and(|refs| {
                    refs.iter().any(|r| match r {
                        SecretRef::Keyed { secret, .. } => *secret == key.name,
                        SecretRef::Bare(n) => names.contains(n),
                    })
                })
            })
            .collect()
    }

    /// The scopes an object applies at (read from the document as served
    /// when it is invalid, so it still holds back what it targets).
    fn scopes(entry: &Entry) -> Vec<Scope> {
        match &entry.validated {
            Ok(Object::Binding(o)) => o.spec.target.scope().into_iter().collect(),
            Ok(Object::Marketplace(o)) => o.spec.target.scope().into_iter().collect(),
            Ok(Object::Mcp(o)) => o.spec.target.scope().into_iter().collect(),
            Ok(Object::Instance(_)) => Vec::new(),
            Err(inv) => inv.scope.clone(),
        }
    }

    fn instance_type(entry: &Entry, doc: Option<&Value>) -> Option<String> {
        match &entry.validated {
            Ok(Object::Instance(i)) => Some(i.spec.agent_type.clone()),
            _ => doc.and_then(|d| d["spec"]["agentType"].as_str().map(str::to_owned)),
        }
    }

    fn index(&mut self, kind: Kind, key: &ObjectKey, entry: &Entry, doc: &Value) {
        let ns = key.namespace.clone();
        if kind == Kind::Instance {
            self.by_namespace
                .entry(ns.clone())
                .or_default()
                .insert(key.name.clone());
            if let Some(t) = Self::instance_type(entry, Some(doc)) {
                self.by_type
                    .entry((ns, t))
                    .or_default()
                    .insert(key.name.clone());
            }
            if let Ok(Object::Instance(i)) = &entry.validated {
                self.env_paths
                    .entry(crate::engine::snapshot::env_dir_key(key, i))
                    .or_default()
                    .insert(key.clone());
            }
            return;
        }
        let scopes = Self::scopes(entry);
        if scopes.is_empty() && entry.validated.is_err() {
            self.unscoped
                .entry(ns)
                .or_default()
                .insert((kind, key.clone()));
            return;
        }
        for s in scopes {
            self.by_scope
                .entry((ns.clone(), s))
                .or_default()
                .insert((kind, key.clone()));
        }
    }

    fn unindex(&mut self, kind: Kind, key: &ObjectKey, entry: &Entry) {
        let ns = &key.namespace;
        if kind == Kind::Instance {
            if let Some(s) = self.by_namespace.get_mut(ns) {
                s.remove(&key.name);
            }
            // Names only mean something within their namespace: an
            // instance of the same name elsewhere stays indexed.
            for ((n, _), names) in self.by_type.iter_mut() {
                if n == ns {
                    names.remove(&key.name);
                }
            }
            self.by_type.retain(|_, v| !v.is_empty());
            for keys in self.env_paths.values_mut() {
                keys.remove(key);
            }
            self.env_paths.retain(|_, v| !v.is_empty());
            return;
        }
        let k = (kind, key.clone());
        if let Some(s) = self.unscoped.get_mut(ns) {
            s.remove(&k);
        }
        for s in Self::scopes(entry) {
            if let Some(set) = self.by_scope.get_mut(&(ns.clone(), s)) {
                set.remove(&k);
            }
        }
        self.by_scope.retain(|_, v| !v.is_empty());
    }

    /// Instances whose env dir is `path` (an env dir key), holds it or lies
    /// inside it.
    fn clashing<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a ObjectKey> + 'a {
        let holders = path
            .match_indices('/')
            .filter_map(|(i, _)| self.env_paths.get(&path[..i]));
        let inner = format!("{path}/");
        let within = self
            .env_paths
            .range(inner.clone()..)
            .take_while(move |(dir, _)| dir.starts_with(&inner))
            .map(|(_, keys)| keys);
        self.env_paths
            .get(path)
            .into_iter()
            .chain(holders)
            .chain(within)
            .flatten()
    }

    /// Instances one version of an object affects.
    fn affected(&self, kind: Kind, key: &ObjectKey, entry: &Entry) -> Vec<ObjectKey> {
        let ns = &key.namespace;
        let in_ns = |name: &String| ObjectKey::new(ns, name);
        if kind == Kind::Instance {
            let mut out = vec![key.clone()];
            // Instances whose env dir clashes with its own report (or stop
            // reporting) the clash.
            if let Ok(Object::Instance(i)) = &entry.validated {
                let path = crate::engine::snapshot::env_dir_key(key, i);
                out.extend(self.clashing(&path).cloned());
            }
            return out;
        }
        let scopes = Self::scopes(entry);
        if scopes.is_empty() && entry.validated.is_err() {
            return self
                .by_namespace
                .get(ns)
                .into_iter()
                .flatten()
                .map(in_ns)
                .collect();
        }
        let mut out = Vec::new();
        for s in scopes {
            match s {
                Scope::Type(t) => out.extend(
                    self.by_type
                        .get(&(ns.clone(), t))
                        .into_iter()
                        .flatten()
                        .map(in_ns),
                ),
                Scope::Instance(n) => {
                    if self.by_namespace.get(ns).is_some_and(|s| s.contains(&n)) {
                        out.push(in_ns(&n));
                    }
                }
            }
        }
        out
    }
}

/// Reads a watched Secret: only labelled ones count (the watch selects them,
/// this guards against a selector the server ignored). Values that are not
/// UTF-8 text are left out: no placeholder can use them.
pub fn secret_item(s: &k8s_openapi::api::core::v1::Secret) -> Option<(ObjectKey, Item)> {
    let meta = &s.metadata;
    let key = ObjectKey::new(meta.namespace.clone()?, meta.name.clone()?);
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(SECRETS_LABEL))
        .is_some_and(|v| v == "true");
    let mut data = BTreeMap::new();
    if labelled {
        for (k, v) in s.data.iter().flatten() {
            if let Ok(text) = String::from_utf8(v.0.clone()) {
                data.insert(k.clone(), SecretValue::new(text));
            }
        }
        for (k, v) in s.string_data.iter().flatten() {
            data.insert(k.clone(), SecretValue::new(v.clone()));
        }
    }
    Some((key, Item::Secret(data)))
}

/// Reads a watched pod.
pub fn pod_item(p: &k8s_openapi::api::core::v1::Pod) -> Option<(ObjectKey, Item)> {
    let meta = &p.metadata;
    let key = ObjectKey::new(meta.namespace.clone()?, meta.name.clone()?);
    let instance = meta.labels.as_ref()?.get(INSTANCE_LABEL)?.clone();
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    Some((
        key,
        Item::Pod {
            instance,
            info: PodInfo {
                name: meta.name.clone()?,
                uid: meta.uid.clone().unwrap_or_default(),
                terminating: meta.deletion_timestamp.is_some(),
                running: phase.is_none_or(|p| p == "Running"),
            },
        },
    ))
}

/// Reads a watched custom object.
pub fn custom_item(o: &DynamicObject) -> Option<(ObjectKey, Item)> {
    let key = ObjectKey::new(o.metadata.namespace.clone()?, o.metadata.name.clone()?);
    Some((key, Item::Custom(Box::new(o.clone()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::DynamicObject;
    use serde_json::json;

    fn object(kind: &str, ns: &str, name: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "agentenv.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .unwrap()
    }

    fn apply(catalog: &Catalog, kind: Kind, obj: DynamicObject) -> Vec<ObjectKey> {
        catalog.on_event(kind, &watcher::Event::Apply(obj), custom_item)
    }

    /// Instances of one name in two namespaces: a change to one leaves the
    /// other where an object of its own namespace finds it.
    #[test]
    fn an_instance_changed_in_one_namespace_leaves_its_namesake_in_another_indexed() {
        let catalog = Catalog::default();
        let alice = |ns: &str| object("AgentInstance", ns, "alice", json!({"agentType": "coder"}));
        apply(&catalog, Kind::Instance, alice("team-a"));
        apply(&catalog, Kind::Instance, alice("team-b"));
        let mut changed = alice("team-a");
        changed.metadata.finalizers = Some(vec!["agentenv.io/env-dir".into()]);
        apply(&catalog, Kind::Instance, changed);

        let server = object(
            "McpServer",
            "team-b",
            "forgejo",
            json!({"target": {"agentType": "coder"}, "stdio": {"command": "forgejo-mcp"}}),
        );
        assert_eq!(
            apply(&catalog, Kind::Mcp, server),
            [ObjectKey::new("team-b", "alice")]
        );
    }
}
