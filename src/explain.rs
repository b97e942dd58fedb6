//! `agent-env explain`: why an instance renders what it renders, entry by
//! entry, and why an entry is absent.
//!
//! Pure: the caller hands in the snapshot a pass uses, the builtin layer, the
//! instance's installed set and how each `${SECRET:...}` reference resolves
//! (never a value). The final answer for every entry is taken from
//! [`resolve::resolve_declared`] and [`resolve::desired_section`], the same
//! functions a pass calls, so an explanation cannot disagree with a pass; the
//! story beside it (every candidate of every layer and what became of it) is
//! derived here.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::crd::{AgentInstance, RuntimeInstalls, Scope};
use crate::engine::builtin::Builtin;
use crate::engine::resolve::{self, Conflict, Declared, Installed, Layer, ObjectId, Origin};
use crate::engine::secrets::{self, SecretRef};
use crate::engine::section::Section;
use crate::engine::shape;
use crate::engine::snapshot::{ObjectKey, ScopeIndex, Snapshot};

/// How one `${SECRET:...}` reference resolves in the instance's namespace,
/// as the pass's secret providers answer it. Holds no value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum SecretState {
    /// Defined exactly once.
    Found,
    /// Defined by no labelled Secret and not in the encrypted store.
    Missing,
    /// A bare name defined by more than one labelled Secret.
    Conflict {
        /// The Secrets defining it.
        secrets: Vec<String>,
    },
    /// Its value contains `${`, which Claude Code would expand again.
    Unsafe,
    /// A provider failed to answer (the encrypted store could not be read).
    Failed {
        /// What failed; names rows and keys, never values.
        error: String,
    },
}

/// Everything an explanation is built from.
pub struct Inputs<'a> {
    /// The objects a pass would see.
    pub snapshot: &'a Snapshot,
    /// The builtin layer.
    pub builtin: &'a Builtin,
    /// The instance's adopted runtime installs.
    pub installed: &'a Installed,
    /// How each reference [`secrets_to_check`] named resolves.
    pub secrets: &'a BTreeMap<SecretRef, SecretState>,
}

/// The instance cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// No AgentInstance of that name.
    #[error("no AgentInstance {key} in the manifests{}", near_names(.near))]
    Unknown {
        /// namespace/name asked for.
        key: ObjectKey,
        /// Instances with a close name.
        near: Vec<String>,
    },
    /// The AgentInstance breaks its schema or rules: a pass renders nothing for it.
    #[error("AgentInstance {key} is invalid ({source_doc}): {message}")]
    Invalid {
        /// namespace/name.
        key: ObjectKey,
        /// Where it was read from.
        source_doc: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

fn near_names(near: &[String]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", near.join(", "))
    }
}

/// An object that took part in deciding an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// Kind.
    pub kind: String,
    /// `metadata.name` (the namespace is the instance's).
    pub name: String,
    /// Manifest `file:line`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)?;
        if let Some(s) = &self.source {
            write!(f, " ({s})")?;
        }
        Ok(())
    }
}

/// Why a pass writes nothing for the instance (or, `Suspended`, leaves it alone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocker {
    /// The reason a pass reports (`InvalidObject`, `MissingSecret`, ...).
    pub reason: &'static str,
    /// The object responsible, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
    /// What a human should know.
    pub message: String,
}

/// What became of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EntryStatus {
    /// In the owned key with its value.
    Rendered,
    /// Turned off by `enabled: false`: a plugin is written as `false`, a
    /// marketplace or MCP server is left out.
    Disabled,
    /// Known (installed at runtime) but not rendered.
    Absent,
    /// Mentioned nowhere for this instance.
    Undeclared,
}

/// What became of one candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StepOutcome {
    /// Its value is the answer.
    Decides,
    /// Same layer as the decider, same value.
    Agrees,
    /// Same layer as the decider, different value: lost the conflict.
    LostConflict,
    /// A higher layer decided.
    Overridden,
    /// The declared decider, replaced by a runtime install.
    ReplacedByInstall,
    /// A runtime install that is not rendered.
    Ignored,
}

/// One layer's say about an entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// `builtin`, `type`, `instance` or `installed`.
    pub scope: &'static str,
    /// The object, for the two object scopes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
    /// Whether it enables the entry (for plugins: whether its value is not `false`).
    pub enabled: bool,
    /// The value it gives, placeholders as written; left out when disabled or
    /// withheld (see [`EntryExplanation::value_withheld`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// What became of it.
    pub outcome: StepOutcome,
    /// The same in words.
    pub note: String,
}

/// A secret an entry's declared value refers to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretUse {
    /// The reference as written inside `${SECRET:...}`.
    pub name: String,
    /// How it resolves.
    #[serde(flatten)]
    pub state: SecretState,
}

/// One entry of one owned key.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryExplanation {
    /// The owned key (`enabledPlugins`, `extraKnownMarketplaces`, `mcpServers`).
    pub key: Section,
    /// `plugin`, `marketplace` or `mcp`.
    pub kind: &'static str,
    /// Entry name as in the file.
    pub name: String,
    /// What became of it.
    pub status: EntryStatus,
    /// Whether a pass writes it now: in the owned key (a plugin's `false`
    /// included) and the instance not held back.
    pub written: bool,
    /// The value a pass gives it, placeholders as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// The value is a runtime install's, not shown: it may hold a token
    /// (runtime installs are sealed in the state store for that reason).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub value_withheld: bool,
    /// The deciding scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<&'static str>,
    /// The deciding object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
    /// Objects of the deciding layer it won a conflict over.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub won_over: Vec<ObjectRef>,
    /// Why it won that conflict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'static str>,
    /// Candidates of lower layers (or the declared decider, for a runtime
    /// install) whose value it replaced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overrode: Vec<Step>,
    /// Secrets the declared value refers to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretUse>,
    /// The answer in sentences.
    pub reasons: Vec<String>,
    /// Every candidate, lowest layer first.
    pub story: Vec<Step>,
    /// Objects declaring this name that do not apply to the instance.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub elsewhere: Vec<String>,
    /// Close names that are declared for the instance.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub did_you_mean: Vec<String>,
}

impl EntryExplanation {
    /// Whether the entry is in its owned key (a plugin disabled is: it is
    /// written as `false`).
    pub fn in_key(&self) -> bool {
        self.status == EntryStatus::Rendered
            || (self.status == EntryStatus::Disabled && self.key == Section::Plugins)
    }
}

/// The explanation of one instance.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.agentType`.
    pub agent_type: String,
    /// The AgentInstance's manifest `file:line`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `spec.runtimeInstalls`.
    pub runtime_installs: RuntimeInstalls,
    /// Why a pass writes nothing for the instance; empty when it writes.
    pub blocked: Vec<Blocker>,
    /// Every entry (or the one asked about).
    pub entries: Vec<EntryExplanation>,
    /// What a dry-run pass over the instance reports now, when one was run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<PassVerdict>,
}

/// The outcome of a dry-run pass over the instance, secrets masked: the same
/// verdict `reconcile` would reach now, including what only the env dir
/// shows (runtime installs not yet adopted, drift, unsafe paths).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassVerdict {
    /// Ready condition.
    pub ready: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Its message.
    pub message: String,
    /// Runtime installs on disk that the pass would adopt, as `<key>.<name>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adopted: Vec<String>,
    /// Declared entries the pass would put back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
}

/// The word for an owned key on the command line and in output.
pub fn kind_word(section: Section) -> &'static str {
    match section {
        Section::Plugins => "plugin",
        Section::Marketplaces => "marketplace",
        Section::McpServers => "mcp",
    }
}

/// The manifest location of an object: `file:line`, or the file and
/// document where lines point nowhere a user edits (kustomize output).
fn source_of(snapshot: &Snapshot, kind: &str, key: &ObjectKey) -> Option<String> {
    let s = snapshot.sources.get(&(kind.to_owned(), key.clone()))?;
    Some(match s.line {
        0 => s.to_string(),
        line => format!("{}:{line}", s.file.display()),
    })
}

fn object_ref(snapshot: &Snapshot, namespace: &str, id: &ObjectId) -> ObjectRef {
    ObjectRef {
        kind: id.kind.to_owned(),
        name: id.name.clone(),
        source: source_of(snapshot, id.kind, &ObjectKey::new(namespace, &id.name)),
    }
}

/// The instance, or why it cannot be explained.
fn find<'s>(snapshot: &'s Snapshot, key: &ObjectKey) -> Result<&'s AgentInstance, ExplainError> {
    if let Some(i) = snapshot.instances.get(key) {
        return Ok(i);
    }
    if let Some(inv) = snapshot
        .invalid
        .iter()
        .find(|i| i.kind == "AgentInstance" && &i.key == key)
    {
        return Err(ExplainError::Invalid {
            key: key.clone(),
            source_doc: source_of(snapshot, "AgentInstance", key)
                .unwrap_or_else(|| inv.source.clone()),
            message: inv.message.clone(),
        });
    }
    let all = snapshot.instances.keys().map(ToString::to_string);
    Err(ExplainError::Unknown {
        key: key.clone(),
        near: close_names(&key.to_string(), all),
    })
}

/// Every `${SECRET:...}` reference a declared MCP server of the instance
/// makes, at any layer (a lower layer's too: its story says what it needs).
pub fn secrets_to_check(
    snapshot: &Snapshot,
    builtin: &Builtin,
    key: &ObjectKey,
) -> Result<BTreeSet<SecretRef>, ExplainError> {
    let inst = find(snapshot, key)?;
    let index = snapshot.index();
    let mut out = BTreeSet::new();
    let mut add = |v: &Value| out.extend(refs_of(v));
    builtin.mcp_servers.values().for_each(&mut add);
    for layer in layers(&index, key, inst) {
        for s in &layer.mcp_servers {
            add(&shape::mcp_entry(&s.spec));
        }
    }
    Ok(out)
}

fn refs_of(value: &Value) -> Vec<SecretRef> {
    let mut out = Vec::new();
    let mut copy = value.clone();
    secrets::for_each_secret_field(&mut copy, |_, text| {
        // Malformed placeholders are refused when objects load; none get here.
        out.extend(secrets::references(text).unwrap_or_default());
    });
    out
}

fn layers<'a>(index: &ScopeIndex<'a>, key: &ObjectKey, inst: &AgentInstance) -> [Layer<'a>; 2] {
    [
        index.layer(&key.namespace, &Scope::Type(inst.spec.agent_type.clone())),
        index.layer(&key.namespace, &Scope::Instance(key.name.clone())),
    ]
}

/// One object's (or the builtin layer's) say about one entry.
#[derive(Clone)]
struct Candidate {
    object: Option<ObjectId>,
    /// `None`: a marketplace or MCP server with `enabled: false`.
    value: Option<Value>,
}

/// Candidates per entry name of one declared layer, sorted by object as
/// resolve sorts them.
type LayerCandidates = BTreeMap<String, Vec<Candidate>>;

fn layer_candidates(layer: &Layer<'_>, section: Section) -> LayerCandidates {
    let mut out: LayerCandidates = BTreeMap::new();
    let id = |kind: &'static str, name: &Option<String>| ObjectId {
        kind,
        name: name.clone().unwrap_or_default(),
    };
    match section {
        Section::Plugins => {
            for b in &layer.bindings {
                for p in &b.spec.plugins {
                    out.entry(p.name.clone()).or_default().push(Candidate {
                        object: Some(id("PluginBinding", &b.metadata.name)),
                        value: Some(Value::Bool(p.enabled)),
                    });
                }
            }
        }
        Section::Marketplaces => {
            for m in &layer.marketplaces {
                out.entry(resolve::marketplace_name(m))
                    .or_default()
                    .push(Candidate {
                        object: Some(id("PluginMarketplace", &m.metadata.name)),
                        value: m
                            .spec
                            .enabled
                            .then(|| shape::marketplace_entry(&m.spec.source)),
                    });
            }
        }
        Section::McpServers => {
            for s in &layer.mcp_servers {
                out.entry(resolve::mcp_name(s))
                    .or_default()
                    .push(Candidate {
                        object: Some(id("McpServer", &s.metadata.name)),
                        value: s.spec.enabled.then(|| shape::mcp_entry(&s.spec)),
                    });
            }
        }
    }
    for cands in out.values_mut() {
        cands.sort_by(|a, b| a.object.cmp(&b.object));
    }
    out
}

fn builtin_candidates(builtin: &Builtin, agent_type: &str, section: Section) -> LayerCandidates {
    let one = |v: Value| {
        vec![Candidate {
            object: None,
            value: Some(v),
        }]
    };
    match section {
        Section::Plugins => builtin
            .plugins_for(agent_type)
            .iter()
            .map(|p| (p.clone(), one(Value::Bool(true))))
            .collect(),
        Section::Marketplaces => builtin
            .marketplaces
            .iter()
            .map(|(n, v)| (n.clone(), one(v.clone())))
            .collect(),
        Section::McpServers => builtin
            .mcp_servers
            .iter()
            .map(|(n, v)| (n.clone(), one(v.clone())))
            .collect(),
    }
}

fn disables(section: Section, value: &Option<Value>) -> bool {
    match section {
        Section::Plugins => value == &Some(Value::Bool(false)),
        _ => value.is_none(),
    }
}

/// Builds the explanation of `key`, of every entry or of one.
pub fn explain(
    inputs: &Inputs<'_>,
    key: &ObjectKey,
    entry: Option<(Section, &str)>,
) -> Result<Explanation, ExplainError> {
    let snapshot = inputs.snapshot;
    let inst = find(snapshot, key)?;
    let spec = &inst.spec;
    let index = snapshot.index();
    let [type_layer, instance_layer] = layers(&index, key, inst);
    let declared = resolve::resolve_declared(
        inputs.builtin,
        &spec.agent_type,
        &type_layer,
        &instance_layer,
    );
    let blocked = blockers(inputs, &index, key, inst, &declared);

    let mut cx = EntryContext {
        inputs,
        key,
        agent_type: &spec.agent_type,
        mode: spec.runtime_installs,
        declared: &declared,
        blocked: &blocked,
        layers: Default::default(),
        desired: Default::default(),
    };
    let mut entries = Vec::new();
    for section in Section::ALL {
        if entry.is_some_and(|(s, _)| s != section) {
            continue;
        }
        cx.layers = [
            builtin_candidates(inputs.builtin, &spec.agent_type, section),
            layer_candidates(&type_layer, section),
            layer_candidates(&instance_layer, section),
        ];
        cx.desired = resolve::desired_section(
            section,
            &declared.sections[section],
            &inputs.installed[section],
            spec.runtime_installs,
        );
        let names: BTreeSet<&String> = match entry {
            Some(_) => BTreeSet::new(),
            None => cx
                .layers
                .iter()
                .flat_map(BTreeMap::keys)
                .chain(inputs.installed[section].keys())
                .collect(),
        };
        let mut names: Vec<String> = names.into_iter().cloned().collect();
        if let Some((_, name)) = entry {
            names.push(name.to_owned());
        }
        for name in names {
            entries.push(cx.entry(section, &name));
        }
    }
    Ok(Explanation {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        agent_type: spec.agent_type.clone(),
        source: source_of(snapshot, "AgentInstance", key),
        runtime_installs: spec.runtime_installs,
        blocked,
        entries,
        pass: None,
    })
}

/// Why a pass writes nothing for the instance, in the order the pass checks.
fn blockers(
    inputs: &Inputs<'_>,
    index: &ScopeIndex<'_>,
    key: &ObjectKey,
    inst: &AgentInstance,
    declared: &Declared,
) -> Vec<Blocker> {
    let snapshot = inputs.snapshot;
    let mut out = Vec::new();
    if inst.spec.suspend {
        out.push(Blocker {
            reason: "Suspended",
            object: None,
            message: "spec.suspend is set; the env dir is left as it is".into(),
        });
    }
    if let Some(clash) = snapshot.clashes().get(key) {
        out.push(Blocker {
            reason: "InvalidObject",
            object: None,
            message: format!(
                "field spec.envDir.path: env dir {} {clash}",
                crate::engine::snapshot::env_path(key, inst)
            ),
        });
    }
    for inv in index.blockers(&key.namespace, &inst.spec.agent_type, &key.name) {
        let source = source_of(snapshot, &inv.kind, &inv.key).unwrap_or_else(|| inv.source.clone());
        let why = if inv.key.namespace == key.namespace && inv.scope.is_empty() {
            "it names no valid target and so holds back its whole namespace".to_owned()
        } else {
            "it targets this instance's type or the instance itself".to_owned()
        };
        out.push(Blocker {
            reason: "InvalidObject",
            object: Some(ObjectRef {
                kind: inv.kind.clone(),
                name: inv.key.name.clone(),
                source: Some(source),
            }),
            message: format!(
                "invalid: {}; {why}, so nothing is written and the last good render is kept",
                inv.message
            ),
        });
    }
    // The pass fills the declared MCP servers (a runtime install replacing
    // one does not spare its secrets) and stops at the first conflicting or
    // unsafe reference in name order, otherwise names every missing one.
    let wanted: BTreeSet<SecretRef> = declared
        .sections
        .mcp_servers
        .values()
        .flat_map(|e| refs_of(&e.value))
        .collect();
    let mut missing = Vec::new();
    let mut stop = None;
    for r in &wanted {
        match inputs.secrets.get(r).unwrap_or(&SecretState::Missing) {
            SecretState::Found => {}
            SecretState::Missing => missing.push(r.to_string()),
            SecretState::Conflict { secrets } => {
                stop = Some(Blocker {
                    reason: "SecretConflict",
                    object: None,
                    message: format!(
                        "secret {r} is defined by more than one labelled Secret: {}",
                        secrets.join(", ")
                    ),
                });
                break;
            }
            SecretState::Unsafe => {
                stop = Some(Blocker {
                    reason: "UnsafeSecretValue",
                    object: None,
                    message: format!(
                        "secret {r} has a value containing '${{', which Claude Code would expand again"
                    ),
                });
                break;
            }
            SecretState::Failed { error } => {
                stop = Some(Blocker {
                    reason: "SecretProviderFailed",
                    object: None,
                    message: format!("secret {r} could not be looked up: {error}"),
                });
                break;
            }
        }
    }
    match stop {
        Some(b) => out.push(b),
        None if !missing.is_empty() => out.push(Blocker {
            reason: "MissingSecret",
            object: None,
            message: format!(
                "missing secrets: {} (no Secret labelled agentenv.io/secrets: \"true\" in namespace {} defines them and the encrypted store does not hold them); nothing is written, the last good render is kept",
                missing.join(", "),
                key.namespace
            ),
        }),
        None => {}
    }
    out
}

struct EntryContext<'a> {
    inputs: &'a Inputs<'a>,
    key: &'a ObjectKey,
    agent_type: &'a str,
    mode: RuntimeInstalls,
    declared: &'a Declared,
    blocked: &'a [Blocker],
    /// builtin, type, instance candidates of the section at hand.
    layers: [LayerCandidates; 3],
    /// What a pass renders into the section at hand, from resolve.
    desired: resolve::Entries,
}

const SCOPES: [&str; 3] = ["builtin", "type", "instance"];

/// Whether an entry's value from `scope` is left out of the output: runtime
/// installs of marketplaces and MCP servers may carry tokens.
fn withheld(section: Section, scope: &str) -> bool {
    scope == "installed" && section != Section::Plugins
}

/// What [`EntryContext::story`] found.
#[derive(Default)]
struct Story {
    steps: Vec<Step>,
    overrode: Vec<Step>,
    won_over: Vec<ObjectRef>,
    rule: Option<&'static str>,
}

impl EntryContext<'_> {
    fn obj(&self, id: &Option<ObjectId>) -> Option<ObjectRef> {
        id.as_ref()
            .map(|id| object_ref(self.inputs.snapshot, &self.key.namespace, id))
    }

    /// The conflict resolve reported for this entry at `scope`.
    fn conflict(&self, section: Section, name: &str, scope: &str) -> Option<&Conflict> {
        self.declared
            .conflicts
            .iter()
            .find(|c| c.section == section && c.name == name && c.scope == scope)
    }

    /// Where the layer's decider is among its candidates: the conflict's
    /// winner when there was one, otherwise resolve's rule (first disabling
    /// one, else the first), which for agreeing candidates is the same value.
    fn decider_at(&self, section: Section, name: &str, layer: usize) -> Option<usize> {
        let cands = self.layers[layer].get(name)?;
        if let Some(c) = self.conflict(section, name, SCOPES[layer]) {
            return cands
                .iter()
                .position(|x| x.object.as_ref() == Some(&c.winner));
        }
        Some(
            cands
                .iter()
                .position(|c| disables(section, &c.value))
                .unwrap_or(0),
        )
    }

    /// Who said something: `PluginBinding/x (file:line) at type scope`, the
    /// builtin layer (naming its file) or the installed set.
    fn who(&self, scope: &str, obj: &Option<ObjectRef>, section: Section) -> String {
        match (scope, obj) {
            (_, Some(o)) => format!("{o} at {scope} scope"),
            ("builtin", None) => format!(
                "the builtin layer ({})",
                match section {
                    Section::Plugins => format!(
                        "{} for type {}",
                        crate::engine::builtin::AGENTS_FILE,
                        self.agent_type
                    ),
                    Section::Marketplaces => crate::engine::builtin::MARKETPLACES_FILE.to_owned(),
                    Section::McpServers => crate::engine::builtin::MCP_FILE.to_owned(),
                }
            ),
            _ => "the installed set (a runtime install adopted by an earlier pass)".to_owned(),
        }
    }

    fn entry(&self, section: Section, name: &str) -> EntryExplanation {
        let installed_value = self.inputs.installed[section].get(name);
        let top = (0..3).rev().find(|l| self.layers[*l].contains_key(name));
        let top_decider = top.and_then(|l| self.decider_at(section, name, l).map(|i| (l, i)));
        let fin = self.desired.get(name);
        let install_wins = fin.is_some_and(|e| e.origin == Origin::Installed);
        let story = self.story(section, name, top_decider, install_wins);
        let decider_ref = top_decider.map(|(l, i)| {
            let c = &self.layers[l][name][i];
            (SCOPES[l], self.obj(&c.object))
        });

        // The final answer is resolve's; the decider's story only names it.
        let (status, scope, object, value) = match (fin, &decider_ref) {
            (Some(e), _) => {
                let status = if section == Section::Plugins
                    && *e.value == Value::Bool(false)
                    && e.origin.is_declared()
                {
                    EntryStatus::Disabled
                } else {
                    EntryStatus::Rendered
                };
                let object = e
                    .origin
                    .object()
                    .map(|id| object_ref(self.inputs.snapshot, &self.key.namespace, id));
                (
                    status,
                    Some(e.origin.scope()),
                    object,
                    Some(Value::clone(&e.value)),
                )
            }
            (None, Some((s, o))) => (EntryStatus::Disabled, Some(*s), o.clone(), None),
            (None, None) if installed_value.is_some() => (EntryStatus::Absent, None, None, None),
            (None, None) => (EntryStatus::Undeclared, None, None, None),
        };
        let value_withheld = scope.is_some_and(|s| withheld(section, s));
        let value = if value_withheld { None } else { value };
        // Secrets of the declared value: a pass fills it even when a runtime
        // install replaces it.
        let secret_value = match (fin, top_decider) {
            (Some(e), _) if e.origin.is_declared() => Some(Value::clone(&e.value)),
            (_, Some((l, i))) => self.layers[l][name][i].value.clone(),
            _ => None,
        };
        let secrets: Vec<SecretUse> = secret_value
            .map(|v| refs_of(&v))
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|r| SecretUse {
                state: self
                    .inputs
                    .secrets
                    .get(&r)
                    .cloned()
                    .unwrap_or(SecretState::Missing),
                name: r.to_string(),
            })
            .collect();

        let mut x = EntryExplanation {
            key: section,
            kind: kind_word(section),
            name: name.to_owned(),
            status,
            written: fin.is_some() && self.blocked.is_empty(),
            value,
            value_withheld,
            scope,
            object,
            won_over: story.won_over,
            rule: story.rule,
            overrode: story.overrode,
            secrets,
            reasons: Vec::new(),
            story: story.steps,
            elsewhere: Vec::new(),
            did_you_mean: Vec::new(),
        };
        debug_assert_eq!(x.in_key(), fin.is_some());
        x.reasons = self.reasons(&x);
        if !x.in_key() {
            x.elsewhere = self.elsewhere(section, name);
            x.did_you_mean = self.near(section, name);
        }
        x
    }

    /// Every candidate of every layer and what became of it.
    fn story(
        &self,
        section: Section,
        name: &str,
        top_decider: Option<(usize, usize)>,
        install_wins: bool,
    ) -> Story {
        let mut out = Story::default();
        let decider_ref = top_decider.map(|(l, i)| {
            let c = &self.layers[l][name][i];
            (SCOPES[l], self.obj(&c.object))
        });
        for (l, scope) in SCOPES.into_iter().enumerate() {
            let Some(cands) = self.layers[l].get(name) else {
                continue;
            };
            for (i, c) in cands.iter().enumerate() {
                let (outcome, note) = match top_decider {
                    Some((tl, ti)) if tl == l && ti == i => {
                        if install_wins {
                            (
                                StepOutcome::ReplacedByInstall,
                                "decides the declared value; a runtime install of the same name replaces it".to_owned(),
                            )
                        } else {
                            let why = match self.conflict(section, name, scope) {
                                Some(conf) => {
                                    format!("wins the conflict at this layer ({})", conf.rule)
                                }
                                None => "the highest layer that names it".to_owned(),
                            };
                            (StepOutcome::Decides, format!("decides: {why}"))
                        }
                    }
                    Some((tl, ti)) if tl == l => {
                        let winner = &self.layers[l][name][ti];
                        let w = self
                            .obj(&winner.object)
                            .map(|o| o.to_string())
                            .unwrap_or_default();
                        match self.conflict(section, name, scope) {
                            Some(conf) => (
                                StepOutcome::LostConflict,
                                format!("loses to {w} ({})", conf.rule),
                            ),
                            None => (StepOutcome::Agrees, format!("agrees with {w}")),
                        }
                    }
                    _ => {
                        let (ds, dobj) = decider_ref.clone().expect("a higher layer decided");
                        (
                            StepOutcome::Overridden,
                            format!("overridden by {}", self.who(ds, &dobj, section)),
                        )
                    }
                };
                let step = Step {
                    scope,
                    object: self.obj(&c.object),
                    enabled: !disables(section, &c.value),
                    value: c.value.clone(),
                    outcome,
                    note,
                };
                match outcome {
                    StepOutcome::Overridden | StepOutcome::ReplacedByInstall => {
                        out.overrode.push(step.clone())
                    }
                    StepOutcome::LostConflict if !install_wins => {
                        out.won_over.extend(step.object.clone());
                    }
                    _ => {}
                }
                out.steps.push(step);
            }
        }
        if let Some(v) = self.inputs.installed[section].get(name) {
            let (outcome, note) = if install_wins {
                (
                    StepOutcome::Decides,
                    "a runtime install adopted into the installed set; on a name collision it wins, as it is what the agent runs".to_owned(),
                )
            } else if self.mode == RuntimeInstalls::Revert {
                (
                    StepOutcome::Ignored,
                    "a runtime install kept in the state store, not rendered: spec.runtimeInstalls is Revert".to_owned(),
                )
            } else {
                (
                    StepOutcome::Ignored,
                    "a runtime install with an empty source: nothing to fetch, never rendered"
                        .to_owned(),
                )
            };
            out.steps.push(Step {
                scope: "installed",
                object: None,
                enabled: !disables(section, &Some(v.clone())),
                value: (!withheld(section, "installed")).then(|| v.clone()),
                outcome,
                note,
            });
        }
        if let Some((tl, _)) = top_decider
            && !install_wins
            && let Some(c) = self.conflict(section, name, SCOPES[tl])
        {
            out.rule = Some(c.rule);
        }
        out
    }

    /// The answer in sentences, the deciding one first.
    fn reasons(&self, x: &EntryExplanation) -> Vec<String> {
        let section = x.key;
        let mut reasons = Vec::new();
        match x.status {
            EntryStatus::Rendered => {
                let from = x.scope.map(|s| self.who(s, &x.object, section));
                reasons.push(format!("rendered from {}", from.unwrap_or_default()));
            }
            EntryStatus::Disabled => {
                let how = if section == Section::Plugins {
                    "written as false"
                } else {
                    "left out"
                };
                let by = x
                    .object
                    .as_ref()
                    .map(|o| format!(" by {o}"))
                    .unwrap_or_default();
                reasons.push(format!(
                    "{how}: disabled at {} scope{by} with enabled: false",
                    x.scope.unwrap_or_default()
                ));
            }
            EntryStatus::Absent => reasons.push(
                x.story
                    .last()
                    .map(|s| format!("not rendered: {}", s.note))
                    .unwrap_or_default(),
            ),
            EntryStatus::Undeclared => {
                reasons.push(format!(
                    "not declared for this instance: not in the builtin layer, named by no object targeting agentType {} or instance {} in namespace {}, and not installed at runtime",
                    self.agent_type, self.key.name, self.key.namespace
                ));
                // An invalid object is not read past its error: it may be the
                // one meant to declare this entry.
                let invalid: Vec<String> = self
                    .blocked
                    .iter()
                    .filter(|b| b.reason == "InvalidObject")
                    .filter_map(|b| b.object.as_ref().map(ToString::to_string))
                    .collect();
                if !invalid.is_empty() {
                    reasons.push(format!(
                        "what invalid objects declare is not known; they hold the instance back: {}",
                        invalid.join(", ")
                    ));
                }
            }
        }
        if let Some(rule) = x.rule {
            let losers: Vec<String> = x.won_over.iter().map(ToString::to_string).collect();
            reasons.push(format!(
                "won a conflict over {} ({rule}); both are reported as a Conflict warning",
                losers.join(", ")
            ));
        }
        for s in &x.overrode {
            let who = self.who(s.scope, &s.object, section);
            let what = match (&s.value, s.enabled) {
                (Some(v), _) if section == Section::Plugins => format!("value {v}"),
                (_, false) => "enabled: false".to_owned(),
                _ => "its value".to_owned(),
            };
            reasons.push(format!("overrode {who} ({what})"));
        }
        for s in &x.secrets {
            let state = match &s.state {
                SecretState::Found => continue,
                SecretState::Missing => "is missing".to_owned(),
                SecretState::Conflict { secrets } => {
                    format!(
                        "is defined by more than one labelled Secret: {}",
                        secrets.join(", ")
                    )
                }
                SecretState::Unsafe => "has a value containing '${', refused".to_owned(),
                SecretState::Failed { error } => format!("could not be looked up: {error}"),
            };
            reasons.push(format!("needs secret {}, which {state}", s.name));
        }
        if x.in_key() && !x.written {
            let holding: Vec<String> = self
                .blocked
                .iter()
                .filter(|b| b.reason != "Suspended")
                .map(|b| match &b.object {
                    Some(o) => format!("{} {o}", b.reason),
                    None => b.reason.to_owned(),
                })
                .collect();
            if holding.is_empty() {
                reasons.push("not written now: the instance is suspended".to_owned());
            } else {
                reasons.push(format!(
                    "not written now: the instance is held back ({}); its files keep the last good render",
                    holding.join(", ")
                ));
            }
        }
        reasons
    }

    /// Objects naming this entry that do not apply to the instance: another
    /// type or instance, another namespace, the builtin list of another type.
    fn elsewhere(&self, section: Section, name: &str) -> Vec<String> {
        const MAX: usize = 10;
        let snap = self.inputs.snapshot;
        let ns = &self.key.namespace;
        let mut out = Vec::new();
        let mut note = |k: &ObjectKey, kind: &str, target: Option<Scope>| {
            let src = source_of(snap, kind, k)
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            let why = if &k.namespace != ns {
                format!(
                    "is in namespace {}: objects apply only in their own namespace",
                    k.namespace
                )
            } else {
                match target {
                    Some(Scope::Type(t)) => format!("targets agentType {t}"),
                    Some(Scope::Instance(i)) => format!("targets instance {i}"),
                    None => "names no valid target".to_owned(),
                }
            };
            out.push(format!("{kind} {k}{src} declares it but {why}"));
        };
        let applies = |k: &ObjectKey, t: &Option<Scope>| {
            &k.namespace == ns
                && match t {
                    Some(Scope::Type(t)) => t == self.agent_type,
                    Some(Scope::Instance(i)) => i == &self.key.name,
                    None => false,
                }
        };
        match section {
            Section::Plugins => {
                for (k, b) in &snap.bindings {
                    let t = b.spec.target.scope();
                    if b.spec.plugins.iter().any(|p| p.name == name) && !applies(k, &t) {
                        note(k, "PluginBinding", t);
                    }
                }
            }
            Section::Marketplaces => {
                for (k, m) in &snap.marketplaces {
                    let t = m.spec.target.scope();
                    if resolve::marketplace_name(m) == name && !applies(k, &t) {
                        note(k, "PluginMarketplace", t);
                    }
                }
            }
            Section::McpServers => {
                for (k, s) in &snap.mcp_servers {
                    let t = s.spec.target.scope();
                    if resolve::mcp_name(s) == name && !applies(k, &t) {
                        note(k, "McpServer", t);
                    }
                }
            }
        }
        if section == Section::Plugins {
            for (t, plugins) in &self.inputs.builtin.types {
                if t != self.agent_type && plugins.iter().any(|p| p == name) {
                    out.push(format!(
                        "the builtin layer ({}) lists it for agentType {t}",
                        crate::engine::builtin::AGENTS_FILE
                    ));
                }
            }
        }
        if out.len() > MAX {
            let more = out.len() - MAX;
            out.truncate(MAX);
            out.push(format!("and {more} more"));
        }
        out
    }

    /// Close names among what is declared or installed for the instance.
    fn near(&self, section: Section, name: &str) -> Vec<String> {
        let known = self
            .layers
            .iter()
            .flat_map(BTreeMap::keys)
            .chain(self.inputs.installed[section].keys())
            .filter(|n| n.as_str() != name)
            .cloned();
        close_names(name, known)
    }
}

/// Up to three of `candidates` close to `name`: a small edit distance, or
/// one containing the other (`lint` for `lint@tools`).
fn close_names(name: &str, candidates: impl IntoIterator<Item = String>) -> Vec<String> {
    let limit = (name.chars().count() / 3).max(1);
    let mut scored: Vec<(usize, String)> = candidates
        .into_iter()
        .filter_map(|c| {
            let d = edit_distance(name, &c);
            let contains = name.len() >= 3 && (c.contains(name) || name.contains(c.as_str()));
            (d <= limit || contains).then_some((d, c))
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    // Only the closest: names of one marketplace share a long suffix, so
    // every name there is within a few edits of every other.
    let best = scored.first().map_or(0, |(d, _)| *d);
    scored
        .into_iter()
        .filter(|(d, c)| *d == best || c.contains(name) || name.contains(c.as_str()))
        .take(3)
        .map(|(_, c)| c)
        .collect()
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::snapshot::InvalidObject;
    use serde_json::json;

    fn obj<T: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: Value) -> T {
        serde_json::from_value(json!({
            "apiVersion": "agentenv.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": "dev"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn k(name: &str) -> ObjectKey {
        ObjectKey::new("dev", name)
    }

    /// Each object's `file:line` is its line in one imaginary file.
    fn locate(s: &mut Snapshot, kind: &str, name: &str, line: usize) {
        s.sources.insert(
            (kind.to_owned(), k(name)),
            crate::host::manifest::Source {
                file: std::path::Path::new("fleet.yaml").into(),
                document: line,
                line,
            },
        );
    }

    /// alice (coder): builtin base@m and fmt@m; type binding `coders` enables
    /// lint@m; instance binding `alice-off` disables it.
    fn fleet() -> (Snapshot, Builtin) {
        let mut s = Snapshot::default();
        s.instances.insert(
            k("alice"),
            obj("AgentInstance", "alice", json!({"agentType": "coder"})),
        );
        s.bindings.insert(
            k("coders"),
            obj(
                "PluginBinding",
                "coders",
                json!({"target": {"agentType": "coder"}, "plugins": [{"name": "lint@m", "enabled": true}]}),
            ),
        );
        s.bindings.insert(
            k("alice-off"),
            obj(
                "PluginBinding",
                "alice-off",
                json!({"target": {"instance": "alice"}, "plugins": [{"name": "lint@m", "enabled": false}]}),
            ),
        );
        s.bindings.insert(
            k("reviewers"),
            obj(
                "PluginBinding",
                "reviewers",
                json!({"target": {"agentType": "reviewer"}, "plugins": [{"name": "review@m", "enabled": true}]}),
            ),
        );
        locate(&mut s, "AgentInstance", "alice", 1);
        locate(&mut s, "PluginBinding", "coders", 7);
        locate(&mut s, "PluginBinding", "alice-off", 17);
        locate(&mut s, "PluginBinding", "reviewers", 27);
        let builtin = Builtin {
            types: BTreeMap::from([("coder".into(), vec!["base@m".into(), "fmt@m".into()])]),
            ..Default::default()
        };
        (s, builtin)
    }

    fn run(
        s: &Snapshot,
        b: &Builtin,
        installed: &Installed,
        secrets: &BTreeMap<SecretRef, SecretState>,
        entry: Option<(Section, &str)>,
    ) -> Explanation {
        explain(
            &Inputs {
                snapshot: s,
                builtin: b,
                installed,
                secrets,
            },
            &k("alice"),
            entry,
        )
        .unwrap()
    }

    fn one(e: &Explanation) -> &EntryExplanation {
        assert_eq!(e.entries.len(), 1, "{:?}", e.entries);
        &e.entries[0]
    }

    #[test]
    fn an_instance_disabling_a_type_plugin_names_the_object_and_what_it_overrode() {
        let (s, b) = fleet();
        let e = run(
            &s,
            &b,
            &Installed::default(),
            &BTreeMap::new(),
            Some((Section::Plugins, "lint@m")),
        );
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Disabled);
        assert!(x.written);
        assert_eq!(x.value, Some(json!(false)));
        assert_eq!(x.scope, Some("instance"));
        let o = x.object.as_ref().unwrap();
        assert_eq!(
            (o.kind.as_str(), o.name.as_str()),
            ("PluginBinding", "alice-off")
        );
        assert_eq!(o.source.as_deref(), Some("fleet.yaml:17"));
        assert_eq!(x.overrode.len(), 1);
        assert_eq!(x.overrode[0].scope, "type");
        assert_eq!(x.overrode[0].object.as_ref().unwrap().name, "coders");
        assert_eq!(x.overrode[0].value, Some(json!(true)));
        assert!(
            x.reasons[0]
                .contains("disabled at instance scope by PluginBinding/alice-off (fleet.yaml:17)"),
            "{:?}",
            x.reasons
        );
        let outcomes: Vec<StepOutcome> = x.story.iter().map(|s| s.outcome).collect();
        assert_eq!(outcomes, [StepOutcome::Overridden, StepOutcome::Decides]);
        assert!(e.blocked.is_empty());
    }

    #[test]
    fn every_entry_agrees_with_what_a_pass_resolves() {
        let (s, b) = fleet();
        let mut installed = Installed::default();
        installed.plugins.insert("user@m".into(), json!(true));
        let e = run(&s, &b, &installed, &BTreeMap::new(), None);
        let index = s.index();
        let declared = resolve::resolve_declared(
            &b,
            "coder",
            &index.layer("dev", &Scope::Type("coder".into())),
            &index.layer("dev", &Scope::Instance("alice".into())),
        );
        let desired = resolve::desired(&declared.sections, &installed, RuntimeInstalls::Preserve);
        let mut seen = 0;
        for x in &e.entries {
            match desired[x.key].get(&x.name) {
                Some(d) => {
                    seen += 1;
                    assert_eq!(x.value.as_ref(), Some(&*d.value), "{}", x.name);
                    assert_eq!(x.scope, Some(d.origin.scope()), "{}", x.name);
                }
                None => assert!(
                    matches!(x.status, EntryStatus::Disabled | EntryStatus::Absent),
                    "{}",
                    x.name
                ),
            }
        }
        let total: usize = desired.iter().map(|(_, m)| m.len()).sum();
        assert_eq!(seen, total, "every rendered entry is explained");
        // The reviewer binding applies to another type: not an entry of alice.
        assert!(e.entries.iter().all(|x| x.name != "review@m"));
    }

    #[test]
    fn a_missing_secret_is_named_and_holds_the_instance_back() {
        let (mut s, b) = fleet();
        s.mcp_servers.insert(
            k("forgejo"),
            obj(
                "McpServer",
                "forgejo",
                json!({"target": {"agentType": "coder"}, "stdio": {"command": "forgejo-mcp", "env": {"TOKEN": "${SECRET:FORGEJO_TOKEN}"}}}),
            ),
        );
        let refs = secrets_to_check(&s, &b, &k("alice")).unwrap();
        assert_eq!(
            refs,
            BTreeSet::from([SecretRef::Bare("FORGEJO_TOKEN".into())])
        );
        let missing = BTreeMap::from([(
            SecretRef::Bare("FORGEJO_TOKEN".into()),
            SecretState::Missing,
        )]);
        let e = run(
            &s,
            &b,
            &Installed::default(),
            &missing,
            Some((Section::McpServers, "forgejo")),
        );
        assert_eq!(e.blocked.len(), 1);
        assert_eq!(e.blocked[0].reason, "MissingSecret");
        assert!(e.blocked[0].message.contains("FORGEJO_TOKEN"));
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Rendered);
        assert!(!x.written);
        assert_eq!(x.secrets[0].name, "FORGEJO_TOKEN");
        assert_eq!(x.secrets[0].state, SecretState::Missing);
        // The value is shown as declared: the placeholder, not a value.
        assert_eq!(
            x.value.as_ref().unwrap()["env"]["TOKEN"],
            "${SECRET:FORGEJO_TOKEN}"
        );
        assert!(
            x.reasons
                .iter()
                .any(|r| r.contains("needs secret FORGEJO_TOKEN, which is missing"))
        );

        let found = BTreeMap::from([(SecretRef::Bare("FORGEJO_TOKEN".into()), SecretState::Found)]);
        let e = run(
            &s,
            &b,
            &Installed::default(),
            &found,
            Some((Section::McpServers, "forgejo")),
        );
        assert!(e.blocked.is_empty());
        assert!(one(&e).written);
    }

    #[test]
    fn an_invalid_object_holds_back_with_its_message_and_location() {
        let (mut s, b) = fleet();
        s.invalid.push(InvalidObject {
            kind: "PluginBinding".into(),
            key: k("bad"),
            source: "fleet.yaml (document 9)".into(),
            message: "field spec.plugins[0].name: must match ^[^@\\s]+@[^@\\s]+$".into(),
            scope: vec![Scope::Instance("alice".into())],
        });
        locate(&mut s, "PluginBinding", "bad", 40);
        let e = run(
            &s,
            &b,
            &Installed::default(),
            &BTreeMap::new(),
            Some((Section::Plugins, "base@m")),
        );
        assert_eq!(e.blocked.len(), 1);
        let blk = &e.blocked[0];
        assert_eq!(blk.reason, "InvalidObject");
        assert_eq!(
            blk.object.as_ref().unwrap().source.as_deref(),
            Some("fleet.yaml:40")
        );
        assert!(blk.message.contains("spec.plugins[0].name"));
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Rendered);
        assert!(!x.written);
        assert!(
            x.reasons
                .iter()
                .any(|r| r.contains("held back (InvalidObject PluginBinding/bad (fleet.yaml:40))")),
            "{:?}",
            x.reasons
        );
    }

    #[test]
    fn a_same_layer_conflict_names_winner_loser_and_rule() {
        let (mut s, b) = fleet();
        for (name, url) in [("zeta", "http://z"), ("alpha", "http://a")] {
            s.mcp_servers.insert(
                k(name),
                obj(
                    "McpServer",
                    name,
                    json!({"target": {"agentType": "coder"}, "name": "docs", "http": {"url": url}}),
                ),
            );
        }
        locate(&mut s, "McpServer", "zeta", 50);
        let e = run(
            &s,
            &b,
            &Installed::default(),
            &BTreeMap::new(),
            Some((Section::McpServers, "docs")),
        );
        let x = one(&e);
        assert_eq!(x.object.as_ref().unwrap().name, "alpha");
        assert_eq!(x.value.as_ref().unwrap()["url"], "http://a");
        assert_eq!(x.won_over.len(), 1);
        assert_eq!(x.won_over[0].name, "zeta");
        assert_eq!(x.won_over[0].source.as_deref(), Some("fleet.yaml:50"));
        assert_eq!(x.rule, Some("the name that sorts first wins"));
        assert_eq!(x.story[1].outcome, StepOutcome::LostConflict);
    }

    #[test]
    fn a_disabled_server_is_absent_and_says_who_disabled_it() {
        let (mut s, b) = fleet();
        s.mcp_servers.insert(
            k("docs"),
            obj(
                "McpServer",
                "docs",
                json!({"target": {"agentType": "coder"}, "http": {"url": "http://d"}}),
            ),
        );
        s.mcp_servers.insert(
            k("docs-off"),
            obj(
                "McpServer",
                "docs-off",
                json!({"target": {"instance": "alice"}, "name": "docs", "enabled": false, "http": {"url": "http://d"}}),
            ),
        );
        locate(&mut s, "McpServer", "docs-off", 60);
        let e = run(
            &s,
            &b,
            &Installed::default(),
            &BTreeMap::new(),
            Some((Section::McpServers, "docs")),
        );
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Disabled);
        assert!(!x.written);
        assert_eq!(x.value, None);
        assert!(
            x.reasons[0].starts_with(
                "left out: disabled at instance scope by McpServer/docs-off (fleet.yaml:60)"
            ),
            "{:?}",
            x.reasons
        );
    }

    #[test]
    fn a_runtime_install_wins_and_its_value_is_withheld() {
        let (mut s, b) = fleet();
        s.marketplaces.insert(
            k("tools"),
            obj("PluginMarketplace", "tools", json!({"target": {"agentType": "coder"}, "source": {"github": {"repo": "org/tools"}}})),
        );
        let mut installed = Installed::default();
        installed.marketplaces.insert(
            "tools".into(),
            json!({"source": {"source": "url", "url": "https://x", "headers": {"Authorization": "Bearer t0k"}}}),
        );
        let e = run(
            &s,
            &b,
            &installed,
            &BTreeMap::new(),
            Some((Section::Marketplaces, "tools")),
        );
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Rendered);
        assert_eq!(x.scope, Some("installed"));
        assert!(x.value_withheld && x.value.is_none());
        assert_eq!(x.overrode.len(), 1);
        assert_eq!(x.overrode[0].outcome, StepOutcome::ReplacedByInstall);
        assert_eq!(x.overrode[0].object.as_ref().unwrap().name, "tools");
        assert!(!serde_json::to_string(&e).unwrap().contains("t0k"));
    }

    #[test]
    fn revert_leaves_a_runtime_install_out() {
        let (mut s, b) = fleet();
        s.instances.insert(
            k("alice"),
            obj(
                "AgentInstance",
                "alice",
                json!({"agentType": "coder", "runtimeInstalls": "Revert"}),
            ),
        );
        let mut installed = Installed::default();
        installed.plugins.insert("user@m".into(), json!(true));
        let e = run(
            &s,
            &b,
            &installed,
            &BTreeMap::new(),
            Some((Section::Plugins, "user@m")),
        );
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Absent);
        assert!(x.reasons[0].contains("Revert"), "{:?}", x.reasons);
        assert_eq!(x.story[0].outcome, StepOutcome::Ignored);
    }

    #[test]
    fn an_undeclared_entry_says_so_with_close_names_and_where_it_is_declared() {
        let (s, b) = fleet();
        let e = run(
            &s,
            &b,
            &Installed::default(),
            &BTreeMap::new(),
            Some((Section::Plugins, "lnt@m")),
        );
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Undeclared);
        assert!(x.story.is_empty());
        assert_eq!(x.did_you_mean, ["lint@m"]);

        let e = run(
            &s,
            &b,
            &Installed::default(),
            &BTreeMap::new(),
            Some((Section::Plugins, "review@m")),
        );
        let x = one(&e);
        assert_eq!(x.status, EntryStatus::Undeclared);
        assert_eq!(x.elsewhere.len(), 1);
        assert!(
            x.elsewhere[0].contains("PluginBinding dev/reviewers (fleet.yaml:27) declares it but targets agentType reviewer"),
            "{:?}",
            x.elsewhere
        );
    }

    #[test]
    fn unknown_and_invalid_instances_are_errors_naming_them() {
        let (mut s, b) = fleet();
        let none = BTreeMap::new();
        let installed = Installed::default();
        let inputs = Inputs {
            snapshot: &s,
            builtin: &b,
            installed: &installed,
            secrets: &none,
        };
        let err = explain(&inputs, &k("alicia"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no AgentInstance dev/alicia in the manifests (did you mean dev/alice?)"
        );
        s.invalid.push(InvalidObject {
            kind: "AgentInstance".into(),
            key: k("bob"),
            source: "fleet.yaml (document 3)".into(),
            message: "field spec.agentType: required".into(),
            scope: vec![],
        });
        let err = secrets_to_check(&s, &b, &k("bob")).unwrap_err();
        assert!(matches!(err, ExplainError::Invalid { .. }));
        assert!(err.to_string().contains("dev/bob") && err.to_string().contains("spec.agentType"));
    }

    /// The secret blocker is the reason `secrets::fill`, which a pass calls,
    /// gives for the same lookups: a conflict or an unsafe value stops it at
    /// the first such reference in name order, otherwise every missing name.
    #[tokio::test]
    async fn secret_blockers_give_the_reason_the_pass_gives() {
        use crate::engine::secrets::{LabelledSecrets, Lookup, SecretProvider, SecretValue};
        let mut labelled = LabelledSecrets::default();
        let v = |x: &str| SecretValue::new(x.into());
        labelled.insert("dev", "a", BTreeMap::from([("DUP".into(), v("1"))]));
        labelled.insert("dev", "b", BTreeMap::from([("DUP".into(), v("2"))]));
        labelled.insert("dev", "c", BTreeMap::from([("LOOP".into(), v("${HOME}"))]));
        labelled.insert("dev", "d", BTreeMap::from([("OK".into(), v("fine"))]));
        for env in [
            json!({"A": "${SECRET:ZZ_MISSING}", "B": "${SECRET:DUP}"}),
            json!({"A": "${SECRET:AA_MISSING}", "B": "${SECRET:LOOP}"}),
            json!({"A": "${SECRET:AA_MISSING}", "B": "${SECRET:BB_MISSING}", "C": "${SECRET:OK}"}),
            json!({"A": "${SECRET:OK}"}),
        ] {
            let (mut s, b) = fleet();
            s.mcp_servers.insert(
                k("srv"),
                obj(
                    "McpServer",
                    "srv",
                    json!({"target": {"instance": "alice"}, "stdio": {"command": "x", "env": env}}),
                ),
            );
            let mut states = BTreeMap::new();
            for r in secrets_to_check(&s, &b, &k("alice")).unwrap() {
                let state = match labelled.lookup("dev", &r).await.unwrap() {
                    Lookup::Found(v) if v.expose().contains("${") => SecretState::Unsafe,
                    Lookup::Found(_) => SecretState::Found,
                    Lookup::Missing => SecretState::Missing,
                    Lookup::Conflict(secrets) => SecretState::Conflict { secrets },
                };
                states.insert(r, state);
            }
            let e = run(&s, &b, &Installed::default(), &states, None);
            let ours: Vec<&str> = e.blocked.iter().map(|b| b.reason).collect();
            let mut value = shape::mcp_entry(&s.mcp_servers[&k("srv")].spec);
            let theirs = match secrets::fill("dev", [&mut value], &labelled).await {
                Ok(_) => vec![],
                Err(err) => vec![err.reason()],
            };
            assert_eq!(ours, theirs, "{env}");
            if let Err(err) = secrets::fill("dev", [&mut value], &labelled).await {
                assert!(
                    e.blocked[0].message.starts_with(&err.to_string()),
                    "{env}: {}",
                    e.blocked[0].message
                );
            }
        }
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("lint@m", "lint@m"), 0);
        assert_eq!(edit_distance("lnt@m", "lint@m"), 1);
        assert_eq!(edit_distance("abc", "xyz"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
