//! Layer resolution (DESIGN section 3): a pure function from the declared
//! layers and the installed set to the desired owned keys, with the origin of
//! every entry. No IO, no secrets: placeholders stay as written.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::crd::{McpServer, PluginBinding, PluginMarketplace, RuntimeInstalls};
use crate::engine::builtin::Builtin;
use crate::engine::section::{PerSection, Section};
use crate::engine::shape;

/// An object that decided or contested an entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    /// `PluginBinding`, `PluginMarketplace` or `McpServer`.
    pub kind: &'static str,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl ObjectId {
    /// `<kind>/<name>`, as shown; made directly (every entry of every
    /// instance's report names its object).
    pub fn label(&self) -> String {
        let mut s = String::with_capacity(self.kind.len() + 1 + self.name.len());
        s.push_str(self.kind);
        s.push('/');
        s.push_str(&self.name);
        s
    }
}

/// Which layer an entry came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The builtin config.
    Builtin,
    /// An object targeting the agent type.
    Type(ObjectId),
    /// An object targeting this instance.
    Instance(ObjectId),
    /// A runtime install adopted into the installed set.
    Installed,
}

impl Origin {
    /// `builtin`, `type`, `instance` or `installed`.
    pub fn scope(&self) -> &'static str {
        match self {
            Origin::Builtin => "builtin",
            Origin::Type(_) => "type",
            Origin::Instance(_) => "instance",
            Origin::Installed => "installed",
        }
    }

    /// The deciding object, for the two object scopes.
    pub fn object(&self) -> Option<&ObjectId> {
        match self {
            Origin::Type(o) | Origin::Instance(o) => Some(o),
            Origin::Builtin | Origin::Installed => None,
        }
    }

    /// Whether the entry was declared (any scope but the installed set).
    pub fn is_declared(&self) -> bool {
        !matches!(self, Origin::Installed)
    }
}

/// One rendered entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The value in Claude Code's shape.
    /// Shared: every instance of a type starts from a copy of its base.
    pub value: Arc<Value>,
    /// Where it came from.
    pub origin: Origin,
}

/// Entries of one owned key, sorted by name so output is deterministic.
pub type Entries = BTreeMap<String, Entry>;

/// Two objects at the same layer disagreed about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The owned key.
    pub section: Section,
    /// The entry's name.
    pub name: String,
    /// `type` or `instance`.
    pub scope: &'static str,
    /// The object whose value was used.
    pub winner: ObjectId,
    /// The objects overruled.
    pub losers: Vec<ObjectId>,
    /// Why the winner won.
    pub rule: &'static str,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let losers: Vec<String> = self.losers.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} {:?} at {} scope: {} wins over {} ({})",
            self.section,
            self.name,
            self.scope,
            self.winner,
            losers.join(", "),
            self.rule
        )
    }
}

/// The objects of one scope (type or instance) that apply to an instance.
#[derive(Default, Clone, Debug)]
pub struct Layer<'a> {
    /// PluginBindings.
    pub bindings: Vec<&'a PluginBinding>,
    /// PluginMarketplaces.
    pub marketplaces: Vec<&'a PluginMarketplace>,
    /// McpServers.
    pub mcp_servers: Vec<&'a McpServer>,
}

/// The declared result, before the installed set is united with it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Declared {
    /// Entries per owned key.
    pub sections: PerSection<Entries>,
    /// Same-layer conflicts seen on the way.
    pub conflicts: Vec<Conflict>,
}

/// One object's say about one entry.
struct Candidate {
    object: ObjectId,
    /// `None` means the object disables the entry.
    value: Option<Value>,
}

/// Resolves the three declared layers for an instance of `agent_type`.
pub fn resolve_declared(
    builtin: &Builtin,
    agent_type: &str,
    type_layer: &Layer<'_>,
    instance_layer: &Layer<'_>,
) -> Declared {
    with_instance_layer(
        resolve_type(builtin, agent_type, type_layer),
        instance_layer,
    )
}

/// The builtin and type layers: what every instance of `agent_type` in a
/// namespace starts from, so a pass resolves them once per type.
pub fn resolve_type(builtin: &Builtin, agent_type: &str, type_layer: &Layer<'_>) -> Declared {
    let mut out = Declared::default();

    for id in builtin.plugins_for(agent_type) {
        out.sections.plugins.insert(
            id.clone(),
            Entry {
                value: Arc::new(Value::Bool(true)),
                origin: Origin::Builtin,
            },
        );
    }
    for (name, v) in &builtin.marketplaces {
        out.sections.marketplaces.insert(
            name.clone(),
            Entry {
                value: Arc::new(v.clone()),
                origin: Origin::Builtin,
            },
        );
    }
    for (name, v) in &builtin.mcp_servers {
        out.sections.mcp_servers.insert(
            name.clone(),
            Entry {
                value: Arc::new(v.clone()),
                origin: Origin::Builtin,
            },
        );
    }

    add_layer(&mut out, type_layer, "type");
    out
}

/// `base` ([`resolve_type`]) with an instance's own layer put over it.
pub fn with_instance_layer(mut base: Declared, instance_layer: &Layer<'_>) -> Declared {
    add_layer(&mut base, instance_layer, "instance");
    base
}

fn add_layer(out: &mut Declared, layer: &Layer<'_>, scope: &'static str) {
    for section in Section::ALL {
        let candidates = candidates(layer, section);
        apply_layer(out, section, scope, candidates);
    }
}

fn candidates(layer: &Layer<'_>, section: Section) -> BTreeMap<String, Vec<Candidate>> {
    let mut by_name: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    let mut push = |name: String, object: ObjectId, value: Option<Value>| {
        by_name
            .entry(name)
            .or_default()
            .push(Candidate { object, value });
    };
    match section {
        Section::Plugins => {
            for b in &layer.bindings {
                for p in &b.spec.plugins {
                    // A plugin's deciding value is always rendered, `false` included.
                    push(
                        p.name.clone(),
                        object_id("PluginBinding", &b.metadata),
                        Some(Value::Bool(p.enabled)),
                    );
                }
            }
        }
        Section::Marketplaces => {
            for m in &layer.marketplaces {
                let value = m
                    .spec
                    .enabled
                    .then(|| shape::marketplace_entry(&m.spec.source));
                push(
                    marketplace_name(m),
                    object_id("PluginMarketplace", &m.metadata),
                    value,
                );
            }
        }
        Section::McpServers => {
            for s in &layer.mcp_servers {
                let value = s.spec.enabled.then(|| shape::mcp_entry(&s.spec));
                push(mcp_name(s), object_id("McpServer", &s.metadata), value);
            }
        }
    }
    by_name
}

/// The name an object's entry is rendered under.
pub fn marketplace_name(m: &PluginMarketplace) -> String {
    m.spec
        .name
        .clone()
        .unwrap_or_else(|| m.metadata.name.clone().unwrap_or_default())
}

/// The name an object's entry is rendered under.
pub fn mcp_name(s: &McpServer) -> String {
    s.spec
        .name
        .clone()
        .unwrap_or_else(|| s.metadata.name.clone().unwrap_or_default())
}

fn object_id(kind: &'static str, meta: &ObjectMeta) -> ObjectId {
    ObjectId {
        kind,
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Whether a disabled value wins: for plugins `false` is itself a value.
fn is_disable(section: Section, value: &Option<Value>) -> bool {
    match section {
        Section::Plugins => value == &Some(Value::Bool(false)),
        _ => value.is_none(),
    }
}

fn apply_layer(
    out: &mut Declared,
    section: Section,
    scope: &'static str,
    candidates: BTreeMap<String, Vec<Candidate>>,
) {
    for (name, mut cands) in candidates {
        // Sorting by object name makes "first" mean "sorts first", whatever the input order.
        cands.sort_by(|a, b| a.object.cmp(&b.object));
        let winner_idx = cands
            .iter()
            .position(|c| is_disable(section, &c.value))
            .unwrap_or(0);
        let disagree = cands.iter().any(|c| c.value != cands[winner_idx].value);
        let winner = cands.swap_remove(winner_idx);
        if disagree {
            cands.sort_by(|a, b| a.object.cmp(&b.object));
            out.conflicts.push(Conflict {
                section,
                name: name.clone(),
                scope,
                winner: winner.object.clone(),
                losers: cands.into_iter().map(|c| c.object).collect(),
                rule: if is_disable(section, &winner.value) {
                    "enabled: false wins"
                } else {
                    "the name that sorts first wins"
                },
            });
        }
        let origin = if scope == "type" {
            Origin::Type(winner.object)
        } else {
            Origin::Instance(winner.object)
        };
        match winner.value {
            Some(value) => {
                let value = Arc::new(value);
                out.sections[section].insert(name, Entry { value, origin });
            }
            None => {
                out.sections[section].remove(&name);
            }
        }
    }
}

/// What users installed at runtime, per owned key, in Claude Code's shape.
pub type Installed = PerSection<BTreeMap<String, Value>>;

/// desired = declared ∪ installed (installed wins on a collision), or just
/// declared under `Revert`. A marketplace with nothing to fetch is never
/// rendered from the installed set.
pub fn desired(
    declared: &PerSection<Entries>,
    installed: &Installed,
    mode: RuntimeInstalls,
) -> PerSection<Entries> {
    PerSection::from_fn(|s| desired_section(s, &declared[s], &installed[s], mode))
}

/// Whether [`desired`] is the declared entries as they are: nothing
/// installed is united with them.
pub fn desired_is_declared(installed: &Installed, mode: RuntimeInstalls) -> bool {
    mode == RuntimeInstalls::Revert || installed.iter().all(|(_, m)| m.is_empty())
}

/// [`desired`] for one owned key.
pub fn desired_section(
    section: Section,
    declared: &Entries,
    installed: &BTreeMap<String, Value>,
    mode: RuntimeInstalls,
) -> Entries {
    let mut out = declared.clone();
    if mode == RuntimeInstalls::Revert {
        return out;
    }
    for (name, value) in installed {
        if section == Section::Marketplaces && shape::marketplace_source_is_empty(value) {
            continue;
        }
        out.insert(
            name.clone(),
            Entry {
                value: Arc::new(value.clone()),
                origin: Origin::Installed,
            },
        );
    }
    out
}

/// A small render for tests: a plugin a type binding enables and a
/// builtin MCP server.
#[cfg(test)]
pub(crate) fn sample_render() -> PerSection<Entries> {
    let mut render = PerSection::<Entries>::default();
    render.plugins.insert(
        "lint@tools".into(),
        Entry {
            value: Arc::new(Value::Bool(true)),
            origin: Origin::Type(ObjectId {
                kind: "PluginBinding",
                name: "coders".into(),
            }),
        },
    );
    let server = serde_json::json!({"type": "http", "url": "https://docs.example"});
    render.mcp_servers.insert(
        "docs".into(),
        Entry {
            value: Arc::new(server),
            origin: Origin::Builtin,
        },
    );
    render
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::*;
    use serde_json::json;

    #[test]
    fn an_objects_label_is_how_it_is_shown() {
        let id = ObjectId {
            kind: "McpServer",
            name: "team-db".into(),
        };
        assert_eq!(id.label(), id.to_string());
        assert_eq!(id.label(), "McpServer/team-db");
    }

    fn binding(name: &str, plugins: &[(&str, bool)]) -> PluginBinding {
        PluginBinding::new(
            name,
            PluginBindingSpec {
                target: Target::default(),
                plugins: plugins
                    .iter()
                    .map(|(n, e)| PluginRef {
                        name: n.to_string(),
                        enabled: *e,
                    })
                    .collect(),
            },
        )
    }

    fn server(name: &str, url: &str, enabled: bool) -> McpServer {
        McpServer::new(
            name,
            McpServerSpec {
                target: Target::default(),
                name: Some("srv".into()),
                stdio: None,
                http: Some(RemoteServer {
                    url: url.into(),
                    headers: Default::default(),
                }),
                sse: None,
                timeout: None,
                enabled,
            },
        )
    }

    fn builtin() -> Builtin {
        Builtin {
            types: BTreeMap::from([("coder".into(), vec!["base@m".into(), "fmt@m".into()])]),
            ..Default::default()
        }
    }

    fn plugins(d: &Declared) -> BTreeMap<&str, &Value> {
        d.sections
            .plugins
            .iter()
            .map(|(k, e)| (k.as_str(), &*e.value))
            .collect()
    }

    #[test]
    fn higher_layer_decides_and_false_is_rendered() {
        let t = binding("type-b", &[("lint@m", true)]);
        let i = binding("inst-b", &[("fmt@m", false), ("extra@m", true)]);
        let d = resolve_declared(
            &builtin(),
            "coder",
            &Layer {
                bindings: vec![&t],
                ..Default::default()
            },
            &Layer {
                bindings: vec![&i],
                ..Default::default()
            },
        );
        assert_eq!(
            plugins(&d),
            BTreeMap::from([
                ("base@m", &json!(true)),
                ("extra@m", &json!(true)),
                ("fmt@m", &json!(false)),
                ("lint@m", &json!(true)),
            ])
        );
        assert_eq!(d.sections.plugins["base@m"].origin, Origin::Builtin);
        assert_eq!(d.sections.plugins["fmt@m"].origin.scope(), "instance");
        assert!(d.conflicts.is_empty());
    }

    #[test]
    fn same_layer_false_wins_and_both_are_named() {
        let a = binding("a", &[("p@m", true)]);
        let b = binding("b", &[("p@m", false)]);
        let layer = Layer {
            bindings: vec![&a, &b],
            ..Default::default()
        };
        let d = resolve_declared(&Builtin::default(), "t", &layer, &Layer::default());
        assert_eq!(*d.sections.plugins["p@m"].value, json!(false));
        assert_eq!(d.conflicts.len(), 1);
        assert_eq!(d.conflicts[0].winner.name, "b");
        assert_eq!(d.conflicts[0].losers[0].name, "a");
    }

    #[test]
    fn same_layer_specs_first_name_wins_regardless_of_order() {
        let z = server("z", "http://z", true);
        let a = server("a", "http://a", true);
        for order in [vec![&z, &a], vec![&a, &z]] {
            let layer = Layer {
                mcp_servers: order,
                ..Default::default()
            };
            let d = resolve_declared(&Builtin::default(), "t", &Layer::default(), &layer);
            assert_eq!(d.sections.mcp_servers["srv"].value["url"], "http://a");
            assert_eq!(d.conflicts[0].rule, "the name that sorts first wins");
        }
    }

    #[test]
    fn agreeing_objects_are_no_conflict_and_disabled_servers_are_absent() {
        let a = server("a", "http://x", true);
        let b = server("b", "http://x", true);
        let off = server("off", "http://x", false);
        let d = resolve_declared(
            &Builtin::default(),
            "t",
            &Layer {
                mcp_servers: vec![&a, &b],
                ..Default::default()
            },
            &Layer {
                mcp_servers: vec![&off],
                ..Default::default()
            },
        );
        assert!(d.conflicts.is_empty());
        assert!(d.sections.mcp_servers.is_empty());
    }

    #[test]
    fn installed_wins_collisions_except_empty_marketplaces() {
        let mut declared = Declared::default();
        declared.sections.marketplaces.insert(
            "m".into(),
            Entry {
                value: json!({"source": {"source": "github", "repo": "o/a"}}).into(),
                origin: Origin::Builtin,
            },
        );
        declared.sections.marketplaces.insert(
            "n".into(),
            Entry {
                value: json!({"source": {"source": "github", "repo": "o/n"}}).into(),
                origin: Origin::Builtin,
            },
        );
        let mut installed = Installed::default();
        installed.marketplaces.insert(
            "m".into(),
            json!({"source": {"source": "github", "repo": "o/pinned"}}),
        );
        installed
            .marketplaces
            .insert("n".into(), json!({"source": {}}));
        installed.marketplaces.insert("e".into(), json!({}));
        installed.plugins.insert("u@m".into(), json!(true));

        let d = desired(&declared.sections, &installed, RuntimeInstalls::Preserve);
        assert_eq!(d.marketplaces["m"].value["source"]["repo"], "o/pinned");
        assert_eq!(d.marketplaces["m"].origin, Origin::Installed);
        assert_eq!(d.marketplaces["n"].value["source"]["repo"], "o/n");
        assert!(!d.marketplaces.contains_key("e"));
        assert!(d.plugins.contains_key("u@m"));

        let r = desired(&declared.sections, &installed, RuntimeInstalls::Revert);
        assert_eq!(r, declared.sections);
    }
}
