//! A consistent view of every declared object, indexed by the scope it
//! applies at, so resolving one instance touches only its own objects.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::crd::{AgentInstance, McpServer, PluginBinding, PluginMarketplace, Scope};
use crate::engine::resolve::Layer;
use crate::engine::secrets::LabelledSecrets;

/// An object, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object that breaks its schema or rules. It changes nothing; the
/// instances it would apply to are held back and report it.
#[derive(Clone, Debug, PartialEq)]
pub struct InvalidObject {
    /// Kind.
    pub kind: String,
    /// namespace/name.
    pub key: ObjectKey,
    /// Where it was read from.
    pub source: String,
    /// What is wrong, naming the field.
    pub message: String,
    /// The scopes it names; empty when it names none (then it holds back its whole namespace).
    pub scope: Vec<Scope>,
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({}): {}",
            self.kind, self.key, self.source, self.message
        )
    }
}

/// Every object of one pass.
#[derive(Default, Debug)]
pub struct Snapshot {
    /// Valid AgentInstances. Objects are shared with where they were
    /// checked (the manifest cache, the controller's catalog), not copied.
    pub instances: BTreeMap<ObjectKey, Arc<AgentInstance>>,
    /// Valid PluginBindings.
    pub bindings: BTreeMap<ObjectKey, Arc<PluginBinding>>,
    /// Valid PluginMarketplaces.
    pub marketplaces: BTreeMap<ObjectKey, Arc<PluginMarketplace>>,
    /// Valid McpServers.
    pub mcp_servers: BTreeMap<ObjectKey, Arc<McpServer>>,
    /// Objects that failed validation.
    pub invalid: Vec<InvalidObject>,
    /// Labelled Secrets.
    pub secrets: LabelledSecrets,
    /// Documents and files read but not for agent-env (a GitOps
    /// repository's Deployments, kustomizations, Helm charts), by what they are.
    pub skipped: BTreeMap<String, usize>,
    /// Where each object (by kind and key) was read, when the loader was
    /// asked to keep it.
    pub sources: BTreeMap<(String, ObjectKey), crate::host::manifest::Source>,
    derived: OnceLock<Derived>,
}

impl Clone for Snapshot {
    /// A copy without the lookups: the copy may be changed before its first pass.
    fn clone(&self) -> Snapshot {
        Snapshot {
            instances: self.instances.clone(),
            bindings: self.bindings.clone(),
            marketplaces: self.marketplaces.clone(),
            mcp_servers: self.mcp_servers.clone(),
            invalid: self.invalid.clone(),
            secrets: self.secrets.clone(),
            skipped: self.skipped.clone(),
            sources: self.sources.clone(),
            derived: OnceLock::new(),
        }
    }
}

impl Snapshot {
    /// One line saying what was skipped as not for agent-env, by kind;
    /// `None` when nothing was.
    pub fn skipped_summary(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let total: usize = self.skipped.values().sum();
        let kinds: Vec<String> = self
            .skipped
            .iter()
            .map(|(what, n)| format!("{what} {n}"))
            .collect();
        Some(format!(
            "skipped {total} not for agent-env ({}); --strict refuses them",
            kinds.join(", ")
        ))
    }
}

/// The objects of a snapshot grouped by (namespace, scope), by key: built
/// once per snapshot, so a pass over one instance of a large fleet costs
/// lookups, not a rebuild.
#[derive(Debug, Default)]
struct Derived {
    layers: HashMap<String, HashMap<Scope, LayerKeys>>,
    /// Positions in [`Snapshot::invalid`].
    invalid: HashMap<String, HashMap<Scope, Vec<usize>>>,
    invalid_unscoped: HashMap<String, Vec<usize>>,
    clashes: HashMap<ObjectKey, String>,
}

/// The objects of one layer, in key order. Held, not named: a key would be
/// two strings more per object and a map lookup per object per instance.
#[derive(Debug, Default)]
struct LayerKeys {
    bindings: Vec<Arc<PluginBinding>>,
    marketplaces: Vec<Arc<PluginMarketplace>>,
    mcp_servers: Vec<Arc<McpServer>>,
}

/// Lookups by scope into one snapshot.
pub struct ScopeIndex<'a> {
    snapshot: &'a Snapshot,
    derived: &'a Derived,
}

impl Snapshot {
    /// Indexes the objects by the scope they apply at (once per snapshot:
    /// its objects must not change after the first call).
    pub fn index(&self) -> ScopeIndex<'_> {
        ScopeIndex {
            snapshot: self,
            derived: self.derived.get_or_init(|| self.derive()),
        }
    }

    /// Instances whose env dir clashes with another's, with how (see
    /// [`env_dir_clashes`]); computed once per snapshot.
    pub fn clashes(&self) -> &HashMap<ObjectKey, String> {
        &self.derived.get_or_init(|| self.derive()).clashes
    }

    fn derive(&self) -> Derived {
        let mut d = Derived::default();
        fn layer<'m>(
            layers: &'m mut HashMap<String, HashMap<Scope, LayerKeys>>,
            ns: &str,
            scope: Scope,
        ) -> &'m mut LayerKeys {
            layers
                .entry(ns.to_owned())
                .or_default()
                .entry(scope)
                .or_default()
        }
        for (k, b) in &self.bindings {
            if let Some(s) = b.spec.target.scope() {
                layer(&mut d.layers, &k.namespace, s)
                    .bindings
                    .push(Arc::clone(b));
            }
        }
        for (k, m) in &self.marketplaces {
            if let Some(s) = m.spec.target.scope() {
                layer(&mut d.layers, &k.namespace, s)
                    .marketplaces
                    .push(Arc::clone(m));
            }
        }
        for (k, m) in &self.mcp_servers {
            if let Some(s) = m.spec.target.scope() {
                layer(&mut d.layers, &k.namespace, s)
                    .mcp_servers
                    .push(Arc::clone(m));
            }
        }
        for (i, inv) in self.invalid.iter().enumerate() {
            if inv.scope.is_empty() {
                d.invalid_unscoped
                    .entry(inv.key.namespace.clone())
                    .or_default()
                    .push(i);
            }
            for s in &inv.scope {
                d.invalid
                    .entry(inv.key.namespace.clone())
                    .or_default()
                    .entry(s.clone())
                    .or_default()
                    .push(i);
            }
        }
        d.clashes = env_dir_clashes(self);
        d
    }
}

impl<'a> ScopeIndex<'a> {
    /// The objects of `namespace` at `scope`.
    pub fn layer(&self, namespace: &str, scope: &Scope) -> Layer<'a> {
        let Some(keys) = self
            .derived
            .layers
            .get(namespace)
            .and_then(|m| m.get(scope))
        else {
            return Layer::default();
        };
        Layer {
            bindings: keys.bindings.iter().map(|o| &**o).collect(),
            marketplaces: keys.marketplaces.iter().map(|o| &**o).collect(),
            mcp_servers: keys.mcp_servers.iter().map(|o| &**o).collect(),
        }
    }

    /// Invalid objects that hold an instance back.
    pub fn blockers(
        &self,
        namespace: &str,
        agent_type: &str,
        name: &str,
    ) -> Vec<&'a InvalidObject> {
        let mut at: Vec<usize> = Vec::new();
        if let Some(by_scope) = self.derived.invalid.get(namespace) {
            for scope in [
                Scope::Type(agent_type.to_owned()),
                Scope::Instance(name.to_owned()),
            ] {
                at.extend(by_scope.get(&scope).into_iter().flatten());
            }
        }
        if let Some(objs) = self.derived.invalid_unscoped.get(namespace) {
            at.extend(objs);
        }
        let mut out: Vec<&InvalidObject> = at.iter().map(|i| &self.snapshot.invalid[*i]).collect();
        out.sort_by(|a, b| (&a.kind, &a.key).cmp(&(&b.kind, &b.key)));
        out.dedup_by(|a, b| a.kind == b.kind && a.key == b.key);
        out
    }
}

/// An instance's env dir relative to the env root.
pub fn env_path(key: &ObjectKey, instance: &AgentInstance) -> String {
    instance
        .spec
        .env_dir
        .as_ref()
        .and_then(|e| e.path.clone())
        .unwrap_or_else(|| format!("{}/{}", key.namespace, key.name))
}

/// An env dir's identity (for collisions and for mapping file events): its
/// path with empty segments dropped, so `a/b/`, `a//b` and `a/b` are one
/// directory, and in ASCII lower case, because the env root may be on a
/// case-insensitive filesystem (an NFS export of one, a host volume on a
/// laptop) where `a/B` and `a/b` are one directory too. (`.` and `..`
/// segments never get this far: the path rules refuse them.)
pub fn env_dir_key(key: &ObjectKey, instance: &AgentInstance) -> String {
    dir_identity(&env_path(key, instance))
}

fn dir_identity(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    segments.join("/").to_ascii_lowercase()
}

/// [`dir_identity`] without a copy for a path that already is one (file
/// events are matched against every env dir).
fn as_identity(path: &str) -> std::borrow::Cow<'_, str> {
    let plain = !path.starts_with('/')
        && !path.ends_with('/')
        && !path.contains("//")
        && !path.bytes().any(|b| b.is_ascii_uppercase());
    if plain {
        std::borrow::Cow::Borrowed(path)
    } else {
        std::borrow::Cow::Owned(dir_identity(path))
    }
}

/// Every instance whose env dir is the same directory as another's or lies
/// inside another's (or holds one), mapped to how, naming one other
/// instance. Such an instance is never written: two writers of one dir would
/// take each other's files for drift and runtime installs, and an env dir
/// inside another would be part of what that other agent reads.
pub fn env_dir_clashes(snapshot: &Snapshot) -> HashMap<ObjectKey, String> {
    let mut by_dir: BTreeMap<String, Vec<&ObjectKey>> = BTreeMap::new();
    for (key, inst) in &snapshot.instances {
        by_dir.entry(env_dir_key(key, inst)).or_default().push(key);
    }
    let mut out = HashMap::new();
    for (dir, keys) in &by_dir {
        for k in keys {
            if let Some(other) = keys.iter().find(|o| *o != k) {
                out.entry((*k).clone())
                    .or_insert_with(|| format!("is also used by AgentInstance {other}"));
            }
        }
        // Only ancestors need looking up: each pair is met from its inner dir.
        for (i, _) in dir.match_indices('/') {
            let Some(outer) = by_dir.get(&dir[..i]) else {
                continue;
            };
            for k in keys {
                out.entry((*k).clone()).or_insert_with(|| {
                    format!("lies inside the env dir of AgentInstance {}", outer[0])
                });
            }
            for o in outer {
                out.entry((*o).clone())
                    .or_insert_with(|| format!("holds the env dir of AgentInstance {}", keys[0]));
            }
        }
    }
    out
}

/// Whether a filesystem change at `rel` (relative to the env root) touches
/// the env dir `dir` (an [`env_dir_key`]): it is the dir, lies in it, or
/// holds it (a parent removed or replaced).
pub fn touches(dir: &str, rel: &str) -> bool {
    let rel = &*as_identity(rel);
    let within = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
    };
    dir == rel || within(dir, rel) || within(rel, dir)
}

/// The values of `dirs` (keyed by [`env_dir_key`]) whose env dir a change
/// at `rel` [`touches`], found by lookups of `rel`'s ancestors and a range
/// of its descendants rather than a scan: every file event of a large fleet
/// goes through this.
pub fn touched<'m, V>(dirs: &'m BTreeMap<String, V>, rel: &str) -> Vec<&'m V> {
    let rel = &*as_identity(rel);
    let mut out = Vec::new();
    if rel.is_empty() {
        return out;
    }
    for (i, _) in rel.match_indices('/') {
        out.extend(dirs.get(&rel[..i]));
    }
    out.extend(dirs.get(rel));
    // `0` follows `/`: the range is every key under `rel/`.
    out.extend(
        dirs.range(format!("{rel}/")..format!("{rel}0"))
            .map(|(_, v)| v),
    );
    out
}

/// A digest of everything in a snapshot one instance's render depends on:
/// its own spec, the objects at its type and instance scopes, the invalid
/// objects holding it back and its namespace's labelled Secrets. Two
/// snapshots give an instance the same digest exactly when a pass over it
/// would resolve the same, so a manifest change re-renders only the
/// instances it affects.
pub type InputDigest = [u8; 32];

/// Digests of objects kept from one [`Snapshot::input_digests`] to the
/// next. An object a reload did not parse again (its file unchanged) is the
/// very same `Arc`: its digest is looked up instead of its spec serialized
/// and hashed again, so a change to one file costs little more than that
/// file's objects. Each object is held, so its address is its own while
/// its digest is kept.
#[derive(Default)]
pub struct DigestMemo {
    instances: ObjectDigests<AgentInstance>,
    bindings: ObjectDigests<PluginBinding>,
    marketplaces: ObjectDigests<PluginMarketplace>,
    mcp_servers: ObjectDigests<McpServer>,
}

type ObjectDigests<T> = HashMap<ByAddress<T>, [u8; 32]>;

/// An `Arc` compared and hashed by what it points to's address.
struct ByAddress<T>(Arc<T>);

impl<T> PartialEq for ByAddress<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Eq for ByAddress<T> {}

impl<T> std::hash::Hash for ByAddress<T> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), h);
    }
}

fn put(h: &mut sha2::Sha256, part: &[u8]) {
    use sha2::Digest;
    h.update((part.len() as u64).to_be_bytes());
    h.update(part);
}

/// The digest of each of `objects`, from `old` where the object is the same.
fn object_digests<T, S: Serialize>(
    old: &ObjectDigests<T>,
    objects: &BTreeMap<ObjectKey, Arc<T>>,
    kind: &str,
    parts: impl Fn(&T) -> (&kube::core::ObjectMeta, &S),
) -> ObjectDigests<T> {
    use sha2::{Digest, Sha256};
    objects
        .values()
        .map(|o| {
            let o = ByAddress(Arc::clone(o));
            let digest = old.get(&o).copied().unwrap_or_else(|| {
                let (meta, spec) = parts(&o.0);
                let mut h = Sha256::new();
                put(&mut h, kind.as_bytes());
                put(&mut h, meta.name.as_deref().unwrap_or("").as_bytes());
                put(&mut h, &serde_json::to_vec(spec).expect("specs serialize"));
                h.finalize().into()
            });
            (o, digest)
        })
        .collect()
}

/// The digest of `objects[key]` (every valid object has one).
fn digest_of<T>(
    digests: &ObjectDigests<T>,
    objects: &BTreeMap<ObjectKey, Arc<T>>,
    key: &ObjectKey,
) -> Option<[u8; 32]> {
    let o = ByAddress(Arc::clone(objects.get(key)?));
    digests.get(&o).copied()
}

/// Puts the digest of each of `objects` that has one, in order.
fn put_digests<T>(h: &mut sha2::Sha256, digests: &ObjectDigests<T>, objects: &[Arc<T>]) {
    for o in objects {
        if let Some(d) = digests.get(&ByAddress(Arc::clone(o))) {
            put(h, d);
        }
    }
}

impl Snapshot {
    /// [`InputDigest`] of every valid instance; `memo` holds the digests of
    /// the snapshot before and is left holding this one's.
    pub fn input_digests(&self, memo: &mut DigestMemo) -> HashMap<ObjectKey, InputDigest> {
        use sha2::{Digest, Sha256};
        let next = DigestMemo {
            instances: object_digests(&memo.instances, &self.instances, "AgentInstance", |o| {
                (&o.metadata, &o.spec)
            }),
            bindings: object_digests(&memo.bindings, &self.bindings, "PluginBinding", |o| {
                (&o.metadata, &o.spec)
            }),
            marketplaces: object_digests(
                &memo.marketplaces,
                &self.marketplaces,
                "PluginMarketplace",
                |o| (&o.metadata, &o.spec),
            ),
            mcp_servers: object_digests(&memo.mcp_servers, &self.mcp_servers, "McpServer", |o| {
                (&o.metadata, &o.spec)
            }),
        };
        let index = self.index();
        let mut secrets: HashMap<&str, [u8; 32]> = HashMap::new();
        // A type layer is shared by every instance of the type: hashed once.
        let mut layers: HashMap<(&str, Scope), [u8; 32]> = HashMap::new();
        let mut out = HashMap::with_capacity(self.instances.len());
        for (key, inst) in &self.instances {
            let mut h = Sha256::new();
            put(
                &mut h,
                &digest_of(&next.instances, &self.instances, key)
                    .expect("each instance has a digest"),
            );
            for scope in [
                Scope::Type(inst.spec.agent_type.clone()),
                Scope::Instance(key.name.clone()),
            ] {
                let digest = layers
                    .entry((key.namespace.as_str(), scope))
                    .or_insert_with_key(|(ns, scope)| {
                        let mut h = Sha256::new();
                        if let Some(keys) = index.derived.layers.get(*ns).and_then(|m| m.get(scope))
                        {
                            put_digests(&mut h, &next.bindings, &keys.bindings);
                            put_digests(&mut h, &next.marketplaces, &keys.marketplaces);
                            put_digests(&mut h, &next.mcp_servers, &keys.mcp_servers);
                        }
                        h.finalize().into()
                    });
                put(&mut h, digest);
            }
            for b in index.blockers(&key.namespace, &inst.spec.agent_type, &key.name) {
                put(&mut h, b.to_string().as_bytes());
            }
            let ns = *secrets
                .entry(key.namespace.as_str())
                .or_insert_with(|| self.secrets.digest(&key.namespace));
            put(&mut h, &ns);
            out.insert(key.clone(), h.finalize().into());
        }
        *memo = next;
        out
    }
}

#[cfg(test)]
mod path_tests {
    use super::touches;

    #[test]
    fn touched_finds_exactly_what_touches_accepts() {
        let dirs: std::collections::BTreeMap<String, usize> = [
            "ns/a", "ns/ab", "ns/a/b", "ns", "other/a", "ns/a0", "ns/a.b",
        ]
        .iter()
        .enumerate()
        .map(|(i, d)| (d.to_string(), i))
        .collect();
        for rel in [
            "ns/a",
            "ns/a/settings.json",
            "ns",
            "ns/a/",
            "NS/A",
            "ns//a",
            "ns/ab",
            "x",
            "",
        ] {
            let mut got: Vec<usize> = super::touched(&dirs, rel).into_iter().copied().collect();
            got.sort();
            let want: Vec<usize> = dirs
                .iter()
                .filter(|(d, _)| touches(d, rel))
                .map(|(_, v)| *v)
                .collect();
            let mut want = want;
            want.sort();
            assert_eq!(got, want, "{rel:?}");
        }
    }

    #[test]
    fn a_change_touches_its_dir_what_is_in_it_and_what_holds_it() {
        assert!(touches("ns/a", "ns/a"));
        assert!(touches("ns/a", "ns/a/settings.json"));
        assert!(touches("ns/a", "ns"));
        assert!(touches("ns/a", "ns/a/"));
        assert!(!touches("ns/a", "ns/ab"));
        assert!(!touches("ns/ab", "ns/a"));
        assert!(!touches("ns/a", "other/a"));
        assert!(touches("ns/a", "ns//a/settings.json"));
        assert!(touches("ns/a", "NS/A"));
    }
}
