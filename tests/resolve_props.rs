//! Properties of layer resolution (DESIGN section 3) over generated layers:
//! the result matches the rules as stated there (a small model below),
//! does not depend on object order, is stable under merging again, and never
//! takes anything from another namespace.

use std::collections::{BTreeMap, BTreeSet};

use agent_env_operator::crd::{
    AgentInstance, AgentInstanceSpec, GithubSource, MarketplaceSource, McpServer, McpServerSpec,
    PluginBinding, PluginBindingSpec, PluginMarketplace, PluginMarketplaceSpec, PluginRef,
    RemoteServer, RuntimeInstalls, Scope, Target,
};
use agent_env_operator::engine::builtin::Builtin;
use agent_env_operator::engine::resolve::{self, Declared, Entries, Installed, Layer, Origin};
use agent_env_operator::engine::section::Section;
use agent_env_operator::engine::snapshot::{ObjectKey, Snapshot};
use proptest::prelude::*;
use serde_json::{Value, json};

// Small pools, so generated objects often name the same entries.
const PLUGINS: [&str; 4] = ["a@m", "b@m", "c@n", "d@n"];
const MARKETS: [&str; 3] = ["m", "n", "o"];
const SERVERS: [&str; 3] = ["s1", "s2", "s3"];
const OBJECTS: [&str; 5] = ["alpha", "bravo", "charlie", "delta", "echo"];
const REPOS: [&str; 2] = ["o/a", "o/b"];
const URLS: [&str; 2] = ["http://a", "http://b"];
const AGENT_TYPE: &str = "coder";

/// One scope's objects, as plain data so the same layer can be built in any
/// namespace, at any scope and in any order.
#[derive(Clone, Debug, Default)]
struct LayerSpec {
    /// Object index → (plugin index, enabled).
    bindings: BTreeMap<usize, Vec<(usize, bool)>>,
    /// Object index → (entry name: `spec.name` or, when `None`, the object
    /// name; repo index; enabled).
    marketplaces: BTreeMap<usize, (Option<usize>, usize, bool)>,
    /// Object index → (entry name as above, url index, enabled).
    servers: BTreeMap<usize, (Option<usize>, usize, bool)>,
}

fn layer_spec() -> impl Strategy<Value = LayerSpec> {
    let obj = 0..OBJECTS.len();
    let plugins = prop::collection::btree_map(0..PLUGINS.len(), any::<bool>(), 1..4)
        .prop_map(|m| m.into_iter().collect::<Vec<_>>())
        .prop_shuffle();
    let name = |n: usize| prop::option::weighted(0.85, 0..n);
    (
        prop::collection::btree_map(obj.clone(), plugins, 0..4),
        prop::collection::btree_map(
            obj.clone(),
            (
                name(MARKETS.len()),
                0..REPOS.len(),
                prop::bool::weighted(0.75),
            ),
            0..4,
        ),
        prop::collection::btree_map(
            obj,
            (
                name(SERVERS.len()),
                0..URLS.len(),
                prop::bool::weighted(0.75),
            ),
            0..4,
        ),
    )
        .prop_map(|(bindings, marketplaces, servers)| LayerSpec {
            bindings,
            marketplaces,
            servers,
        })
}

fn builtin() -> impl Strategy<Value = Builtin> {
    (
        prop::collection::btree_set(0..PLUGINS.len(), 0..3),
        prop::collection::btree_map(0..MARKETS.len(), 0..REPOS.len(), 0..3),
        prop::collection::btree_map(0..SERVERS.len(), 0..URLS.len(), 0..3),
    )
        .prop_map(|(plugins, markets, servers)| Builtin {
            types: BTreeMap::from([(
                AGENT_TYPE.to_owned(),
                plugins.into_iter().map(|p| PLUGINS[p].to_owned()).collect(),
            )]),
            marketplaces: markets
                .into_iter()
                .map(|(m, r)| (MARKETS[m].to_owned(), market_value(REPOS[r])))
                .collect(),
            mcp_servers: servers
                .into_iter()
                .map(|(s, u)| (SERVERS[s].to_owned(), server_value(URLS[u])))
                .collect(),
        })
}

fn installed() -> impl Strategy<Value = Installed> {
    let plugin = prop_oneof![any::<bool>().prop_map(Value::Bool), Just(json!(["1.0.0"]))];
    let market = prop_oneof![
        (0..REPOS.len()).prop_map(|r| market_value(&format!("{}-pinned", REPOS[r]))),
        Just(json!({})),
        Just(json!({"source": {}})),
    ];
    let server = (0..URLS.len()).prop_map(|u| server_value(&format!("{}/installed", URLS[u])));
    (
        prop::collection::btree_map(
            prop::sample::select(PLUGINS.to_vec()).prop_map(str::to_owned),
            plugin,
            0..3,
        ),
        prop::collection::btree_map(
            prop::sample::select(MARKETS.to_vec()).prop_map(str::to_owned),
            market,
            0..3,
        ),
        prop::collection::btree_map(
            prop::sample::select(SERVERS.to_vec()).prop_map(str::to_owned),
            server,
            0..3,
        ),
    )
        .prop_map(|(plugins, marketplaces, mcp_servers)| Installed {
            plugins,
            marketplaces,
            mcp_servers,
        })
}

fn market_value(repo: &str) -> Value {
    json!({"source": {"source": "github", "repo": repo}})
}

fn server_value(url: &str) -> Value {
    json!({"type": "http", "url": url})
}

/// The objects of one layer. `tag` marks every value, so values from
/// another namespace are recognisable; `prefix` keeps object names unique
/// per namespace when two scopes are built in one.
struct Objects {
    bindings: Vec<PluginBinding>,
    marketplaces: Vec<PluginMarketplace>,
    servers: Vec<McpServer>,
}

fn objects(spec: &LayerSpec, target: &Target, ns: &str, prefix: &str, tag: &str) -> Objects {
    let meta_name = |o: usize| format!("{prefix}{}", OBJECTS[o]);
    let with_ns = |mut m: kube::core::ObjectMeta| {
        m.namespace = Some(ns.to_owned());
        m
    };
    Objects {
        bindings: spec
            .bindings
            .iter()
            .map(|(&o, plugins)| {
                let mut b = PluginBinding::new(
                    &meta_name(o),
                    PluginBindingSpec {
                        target: target.clone(),
                        plugins: plugins
                            .iter()
                            .map(|&(p, enabled)| PluginRef {
                                name: format!("{}{tag}", PLUGINS[p]),
                                enabled,
                            })
                            .collect(),
                    },
                );
                b.metadata = with_ns(b.metadata);
                b
            })
            .collect(),
        marketplaces: spec
            .marketplaces
            .iter()
            .map(|(&o, &(name, repo, enabled))| {
                let mut m = PluginMarketplace::new(
                    &meta_name(o),
                    PluginMarketplaceSpec {
                        target: target.clone(),
                        name: name.map(|n| MARKETS[n].to_owned()),
                        source: MarketplaceSource {
                            github: Some(GithubSource {
                                repo: format!("{}{tag}", REPOS[repo]),
                                git_ref: None,
                                path: None,
                            }),
                            ..Default::default()
                        },
                        enabled,
                    },
                );
                m.metadata = with_ns(m.metadata);
                m
            })
            .collect(),
        servers: spec
            .servers
            .iter()
            .map(|(&o, &(name, url, enabled))| {
                let mut s = McpServer::new(
                    &meta_name(o),
                    McpServerSpec {
                        target: target.clone(),
                        name: name.map(|n| SERVERS[n].to_owned()),
                        stdio: None,
                        http: Some(RemoteServer {
                            url: format!("{}{tag}", URLS[url]),
                            headers: Default::default(),
                        }),
                        sse: None,
                        timeout: None,
                        enabled,
                    },
                );
                s.metadata = with_ns(s.metadata);
                s
            })
            .collect(),
    }
}

fn layer<'a>(o: &'a Objects, order: &[usize]) -> Layer<'a> {
    // `order` permutes objects; each list is permuted by the indices that fit it.
    let pick = |n: usize| order.iter().copied().filter(move |&i| i < n);
    Layer {
        bindings: pick(o.bindings.len()).map(|i| &o.bindings[i]).collect(),
        marketplaces: pick(o.marketplaces.len())
            .map(|i| &o.marketplaces[i])
            .collect(),
        mcp_servers: pick(o.servers.len()).map(|i| &o.servers[i]).collect(),
    }
}

fn type_target() -> Target {
    Target {
        agent_type: Some(AGENT_TYPE.into()),
        instance: None,
    }
}

fn instance_target(name: &str) -> Target {
    Target {
        agent_type: None,
        instance: Some(name.into()),
    }
}

// ---------------------------------------------------------------------------
// The rules of DESIGN section 3, written out plainly.

/// One object's say about one entry: `None` disables it.
type Say = (String, Option<Value>);

fn says(spec: &LayerSpec, section: Section) -> BTreeMap<String, Vec<Say>> {
    let mut out: BTreeMap<String, Vec<Say>> = BTreeMap::new();
    let entry_name = |o: usize, n: Option<usize>, pool: &[&str]| {
        n.map_or_else(|| OBJECTS[o].to_owned(), |n| pool[n].to_owned())
    };
    match section {
        Section::Plugins => {
            for (&o, plugins) in &spec.bindings {
                for &(p, enabled) in plugins {
                    out.entry(PLUGINS[p].to_owned())
                        .or_default()
                        .push((OBJECTS[o].to_owned(), Some(Value::Bool(enabled))));
                }
            }
        }
        Section::Marketplaces => {
            for (&o, &(n, repo, enabled)) in &spec.marketplaces {
                out.entry(entry_name(o, n, &MARKETS)).or_default().push((
                    OBJECTS[o].to_owned(),
                    enabled.then(|| market_value(REPOS[repo])),
                ));
            }
        }
        Section::McpServers => {
            for (&o, &(n, url, enabled)) in &spec.servers {
                out.entry(entry_name(o, n, &SERVERS)).or_default().push((
                    OBJECTS[o].to_owned(),
                    enabled.then(|| server_value(URLS[url])),
                ));
            }
        }
    }
    out
}

/// Same layer: `enabled: false` wins, else the object whose name sorts first.
fn decide(section: Section, says: &[Say]) -> &Say {
    let disables = |s: &&Say| match section {
        Section::Plugins => s.1 == Some(Value::Bool(false)),
        _ => s.1.is_none(),
    };
    let by_name = |a: &&Say, b: &&Say| a.0.cmp(&b.0);
    says.iter()
        .filter(disables)
        .min_by(by_name)
        .or_else(|| says.iter().min_by(by_name))
        .expect("an entry is named by some object")
}

/// Expected entries: name → (value, scope that decided).
fn model_entries(
    builtin: &Builtin,
    type_l: &LayerSpec,
    inst_l: &LayerSpec,
    section: Section,
) -> BTreeMap<String, (Value, &'static str)> {
    let mut out: BTreeMap<String, (Value, &'static str)> = match section {
        Section::Plugins => builtin
            .plugins_for(AGENT_TYPE)
            .iter()
            .map(|p| (p.clone(), (Value::Bool(true), "builtin")))
            .collect(),
        Section::Marketplaces => builtin
            .marketplaces
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), "builtin")))
            .collect(),
        Section::McpServers => builtin
            .mcp_servers
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), "builtin")))
            .collect(),
    };
    // Each higher layer overrides every entry it names.
    for (spec, scope) in [(type_l, "type"), (inst_l, "instance")] {
        for (name, s) in says(spec, section) {
            match &decide(section, &s).1 {
                Some(v) => {
                    out.insert(name, (v.clone(), scope));
                }
                None => {
                    out.remove(&name);
                }
            }
        }
    }
    out
}

/// Expected conflicts: (section, name, scope, winner, losers sorted).
fn model_conflicts(
    type_l: &LayerSpec,
    inst_l: &LayerSpec,
) -> BTreeSet<(Section, String, &'static str, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for (spec, scope) in [(type_l, "type"), (inst_l, "instance")] {
        for section in Section::ALL {
            for (name, s) in says(spec, section) {
                if s.iter().all(|x| x.1 == s[0].1) {
                    continue;
                }
                let winner = decide(section, &s).0.clone();
                let mut losers: Vec<String> = s
                    .iter()
                    .map(|x| x.0.clone())
                    .filter(|n| n != &winner)
                    .collect();
                losers.sort();
                out.insert((section, name, scope, winner, losers));
            }
        }
    }
    out
}

fn resolve_specs(
    builtin: &Builtin,
    type_l: &LayerSpec,
    inst_l: &LayerSpec,
    order: &[usize],
) -> Declared {
    let t = objects(type_l, &type_target(), "ns", "", "");
    let i = objects(inst_l, &instance_target("alice"), "ns", "", "");
    resolve::resolve_declared(builtin, AGENT_TYPE, &layer(&t, order), &layer(&i, order))
}

fn identity() -> Vec<usize> {
    (0..OBJECTS.len()).collect()
}

fn values(e: &Entries) -> BTreeMap<String, Value> {
    e.iter()
        .map(|(k, v)| (k.clone(), Value::clone(&v.value)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Precedence (instance > type > builtin) and the same-layer rule, as
    /// the design states them, with a conflict reported exactly where two
    /// objects of one layer disagree.
    #[test]
    fn layers_resolve_as_the_design_says(
        builtin in builtin(),
        type_l in layer_spec(),
        inst_l in layer_spec(),
    ) {
        let d = resolve_specs(&builtin, &type_l, &inst_l, &identity());
        for section in Section::ALL {
            let got: BTreeMap<String, (Value, &'static str)> = d.sections[section]
                .iter()
                .map(|(k, e)| (k.clone(), (Value::clone(&e.value), e.origin.scope())))
                .collect();
            prop_assert_eq!(got, model_entries(&builtin, &type_l, &inst_l, section), "{:?}", section);
        }
        let got: BTreeSet<_> = d
            .conflicts
            .iter()
            .map(|c| {
                let mut losers: Vec<String> = c.losers.iter().map(|o| o.name.clone()).collect();
                losers.sort();
                (c.section, c.name.clone(), c.scope, c.winner.name.clone(), losers)
            })
            .collect();
        prop_assert_eq!(got.len(), d.conflicts.len(), "a conflict reported twice");
        prop_assert_eq!(got, model_conflicts(&type_l, &inst_l));
    }

    /// The same objects in any order give the same result, conflicts included.
    #[test]
    fn order_of_objects_does_not_matter(
        builtin in builtin(),
        type_l in layer_spec(),
        inst_l in layer_spec(),
        order in Just(identity()).prop_shuffle(),
    ) {
        let a = resolve_specs(&builtin, &type_l, &inst_l, &identity());
        let b = resolve_specs(&builtin, &type_l, &inst_l, &order);
        prop_assert_eq!(a, b);
    }

    /// desired = declared ∪ installed, installed winning a collision except a
    /// marketplace with nothing to fetch; `Revert` renders declared only;
    /// merging the result with the installed set again changes nothing.
    #[test]
    fn installed_entries_unite_with_declared(
        builtin in builtin(),
        type_l in layer_spec(),
        inst_l in layer_spec(),
        installed in installed(),
    ) {
        let declared = resolve_specs(&builtin, &type_l, &inst_l, &identity());
        let preserve = resolve::desired(&declared.sections, &installed, RuntimeInstalls::Preserve);
        let revert = resolve::desired(&declared.sections, &installed, RuntimeInstalls::Revert);
        prop_assert_eq!(&revert, &declared.sections);
        for section in Section::ALL {
            let mut want: BTreeMap<String, (Value, bool)> = declared.sections[section]
                .iter()
                .map(|(k, e)| (k.clone(), (Value::clone(&e.value), false)))
                .collect();
            for (k, v) in &installed[section] {
                let nothing_to_fetch = section == Section::Marketplaces
                    && v.get("source").is_none_or(|s| s == &json!({}));
                if !nothing_to_fetch {
                    want.insert(k.clone(), (v.clone(), true));
                }
            }
            let got: BTreeMap<String, (Value, bool)> = preserve[section]
                .iter()
                .map(|(k, e)| (k.clone(), (Value::clone(&e.value), e.origin == Origin::Installed)))
                .collect();
            prop_assert_eq!(got, want, "{:?}", section);

            for (mode, once) in [(RuntimeInstalls::Preserve, &preserve), (RuntimeInstalls::Revert, &revert)] {
                let twice = resolve::desired_section(section, &once[section], &installed[section], mode);
                prop_assert_eq!(&twice, &once[section], "merging again changed {:?}", section);
            }
        }
    }

    /// An instance sees only its own namespace: objects with the same names
    /// and targets in another namespace change nothing, and none of their
    /// values or names reach it.
    #[test]
    fn other_namespaces_are_never_used(
        builtin in builtin(),
        a_type in layer_spec(),
        a_inst in layer_spec(),
        b_type in layer_spec(),
        b_inst in layer_spec(),
    ) {
        let mut both = Snapshot::default();
        fill_namespace(&mut both, "ns-a", &a_type, &a_inst, "");
        fill_namespace(&mut both, "ns-b", &b_type, &b_inst, NS_B_TAG);
        let mut alone = Snapshot::default();
        fill_namespace(&mut alone, "ns-a", &a_type, &a_inst, "");
        let (ix_both, ix_alone) = (both.index(), alone.index());
        for name in ["alice", "bob"] {
            let resolve_in = |ix: &agent_env_operator::engine::snapshot::ScopeIndex<'_>| {
                resolve::resolve_declared(
                    &builtin,
                    AGENT_TYPE,
                    &ix.layer("ns-a", &Scope::Type(AGENT_TYPE.into())),
                    &ix.layer("ns-a", &Scope::Instance(name.into())),
                )
            };
            let d = resolve_in(&ix_both);
            prop_assert_eq!(&d, &resolve_in(&ix_alone), "ns-b changed {}", name);
            for (section, entries) in d.sections.iter() {
                for (k, e) in entries {
                    let text = format!("{k} {}", e.value);
                    prop_assert!(!text.contains(NS_B_TAG), "{:?} {} came from ns-b", section, text);
                    if let Some(o) = e.origin.object() {
                        let key = ObjectKey::new("ns-a", &o.name);
                        let known = match o.kind {
                            "PluginBinding" => both.bindings.contains_key(&key),
                            "PluginMarketplace" => both.marketplaces.contains_key(&key),
                            _ => both.mcp_servers.contains_key(&key),
                        };
                        prop_assert!(known, "{} is no object of ns-a", o);
                    }
                }
            }
            if name == "bob" {
                // bob shares alice's type but not her instance-scope objects.
                prop_assert!(d.sections.iter().all(|(_, e)| e.values().all(|e| e.origin.scope() != "instance")));
            }
        }
        // And it is what ns-a's objects alone resolve to, built directly.
        let t = objects(&a_type, &type_target(), "ns-a", "t-", "");
        let i = objects(&a_inst, &instance_target("alice"), "ns-a", "i-", "");
        let direct = resolve::resolve_declared(&builtin, AGENT_TYPE, &layer(&t, &identity()), &layer(&i, &identity()));
        let via_index = resolve::resolve_declared(
            &builtin,
            AGENT_TYPE,
            &ix_both.layer("ns-a", &Scope::Type(AGENT_TYPE.into())),
            &ix_both.layer("ns-a", &Scope::Instance("alice".into())),
        );
        prop_assert_eq!(direct, via_index);
    }
}

/// Marks every value of the second namespace.
const NS_B_TAG: &str = "~from-ns-b";

fn fill_namespace(
    snap: &mut Snapshot,
    ns: &str,
    type_l: &LayerSpec,
    inst_l: &LayerSpec,
    tag: &str,
) {
    add(snap, &objects(type_l, &type_target(), ns, "t-", tag), ns);
    add(
        snap,
        &objects(inst_l, &instance_target("alice"), ns, "i-", tag),
        ns,
    );
    for name in ["alice", "bob"] {
        let mut inst = AgentInstance::new(
            name,
            AgentInstanceSpec {
                agent_type: AGENT_TYPE.into(),
                env_dir: None,
                workload: None,
                restart: None,
                runtime_installs: RuntimeInstalls::Preserve,
                suspend: false,
                delivery: None,
            },
        );
        inst.metadata.namespace = Some(ns.into());
        snap.instances.insert(ObjectKey::new(ns, name), inst.into());
    }
}

fn add(snap: &mut Snapshot, o: &Objects, ns: &str) {
    for b in &o.bindings {
        let key = ObjectKey::new(ns, b.metadata.name.clone().unwrap());
        snap.bindings.insert(key, b.clone().into());
    }
    for m in &o.marketplaces {
        let key = ObjectKey::new(ns, m.metadata.name.clone().unwrap());
        snap.marketplaces.insert(key, m.clone().into());
    }
    for s in &o.servers {
        let key = ObjectKey::new(ns, s.metadata.name.clone().unwrap());
        snap.mcp_servers.insert(key, s.clone().into());
    }
}

/// With no objects, the builtin layer is rendered as it is, and an agent
/// type's builtin plugins go to that type only.
#[test]
fn builtin_layer_alone_is_rendered_as_is() {
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&builtin(), |b| {
            let d = resolve::resolve_declared(&b, AGENT_TYPE, &Layer::default(), &Layer::default());
            let other =
                resolve::resolve_declared(&b, "other-type", &Layer::default(), &Layer::default());
            prop_assert!(d.conflicts.is_empty());
            prop_assert_eq!(
                d.sections.plugins.keys().cloned().collect::<Vec<_>>(),
                b.plugins_for(AGENT_TYPE).to_vec()
            );
            prop_assert!(
                other.sections.plugins.is_empty(),
                "builtin plugins of one type went to another"
            );
            prop_assert_eq!(values(&d.sections.marketplaces), b.marketplaces.clone());
            prop_assert_eq!(values(&d.sections.mcp_servers), b.mcp_servers.clone());
            prop_assert!(
                d.sections
                    .iter()
                    .all(|(_, e)| e.values().all(|e| e.origin == Origin::Builtin))
            );
            Ok(())
        })
        .unwrap();
}
