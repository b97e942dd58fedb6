//! A consistent view of every declared object, indexed by the scope it
//! applies at, so resolving one instance touches only its own objects.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crd::{AgentInstance, McpServer, PluginBinding, PluginMarketplace, Scope};
use crate::resolve::Layer;
use crate::secrets::LabelledSecrets;

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
#[derive(Default, Debug, Clone)]
pub struct Snapshot {
    /// Valid AgentInstances.
    pub instances: BTreeMap<ObjectKey, AgentInstance>,
    /// Valid PluginBindings.
    pub bindings: BTreeMap<ObjectKey, PluginBinding>,
    /// Valid PluginMarketplaces.
    pub marketplaces: BTreeMap<ObjectKey, PluginMarketplace>,
    /// Valid McpServers.
    pub mcp_servers: BTreeMap<ObjectKey, McpServer>,
    /// Objects that failed validation.
    pub invalid: Vec<InvalidObject>,
    /// Labelled Secrets.
    pub secrets: LabelledSecrets,
}

/// The objects of a snapshot grouped by (namespace, scope).
#[derive(Default)]
pub struct ScopeIndex<'a> {
    layers: HashMap<&'a str, HashMap<Scope, Layer<'a>>>,
    invalid: HashMap<&'a str, HashMap<Scope, Vec<&'a InvalidObject>>>,
    invalid_unscoped: HashMap<&'a str, Vec<&'a InvalidObject>>,
}

static EMPTY: std::sync::LazyLock<Layer<'static>> = std::sync::LazyLock::new(Layer::default);

impl Snapshot {
    /// Indexes the objects by the scope they apply at.
    pub fn index(&self) -> ScopeIndex<'_> {
        let mut ix = ScopeIndex::default();
        for (k, b) in &self.bindings {
            if let Some(s) = b.spec.target.scope() {
                ix.layer_mut(&k.namespace, s).bindings.push(b);
            }
        }
        for (k, m) in &self.marketplaces {
            if let Some(s) = m.spec.target.scope() {
                ix.layer_mut(&k.namespace, s).marketplaces.push(m);
            }
        }
        for (k, m) in &self.mcp_servers {
            if let Some(s) = m.spec.target.scope() {
                ix.layer_mut(&k.namespace, s).mcp_servers.push(m);
            }
        }
        for inv in &self.invalid {
            if inv.scope.is_empty() {
                ix.invalid_unscoped
                    .entry(&inv.key.namespace)
                    .or_default()
                    .push(inv);
            }
            for s in &inv.scope {
                ix.invalid
                    .entry(&inv.key.namespace)
                    .or_default()
                    .entry(s.clone())
                    .or_default()
                    .push(inv);
            }
        }
        ix
    }
}

impl<'a> ScopeIndex<'a> {
    fn layer_mut(&mut self, ns: &'a str, scope: Scope) -> &mut Layer<'a> {
        self.layers.entry(ns).or_default().entry(scope).or_default()
    }

    /// The objects of `namespace` at `scope`.
    pub fn layer(&self, namespace: &str, scope: &Scope) -> &Layer<'a> {
        self.layers
            .get(namespace)
            .and_then(|m| m.get(scope))
            .unwrap_or(&EMPTY)
    }

    /// Invalid objects that hold an instance back.
    pub fn blockers(
        &self,
        namespace: &str,
        agent_type: &str,
        name: &str,
    ) -> Vec<&'a InvalidObject> {
        let mut out: Vec<&InvalidObject> = Vec::new();
        if let Some(by_scope) = self.invalid.get(namespace) {
            for scope in [
                Scope::Type(agent_type.to_owned()),
                Scope::Instance(name.to_owned()),
            ] {
                out.extend(by_scope.get(&scope).into_iter().flatten());
            }
        }
        if let Some(objs) = self.invalid_unscoped.get(namespace) {
            out.extend(objs);
        }
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
