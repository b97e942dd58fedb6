//! What the committed RBAC manifests grant the operator's ServiceAccount, as
//! one [`Grant`] per (API group, resource, verb, scope), for comparing with
//! the API calls the operator makes; and [`build`], the objects a kustomize
//! build of the committed kustomizations emits, which the grants are read
//! from. Include with `#[path = "common/rbac.rs"] mod rbac;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Namespace the operator runs in.
pub const OPERATOR_NAMESPACE: &str = "agent-env-system";
/// The operator's ServiceAccount.
pub const SERVICE_ACCOUNT: &str = "agent-env";

/// Where a grant applies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every namespace (and cluster-scoped objects): a ClusterRoleBinding.
    Cluster,
    /// One namespace: a RoleBinding there.
    Namespace(String),
}

/// One permitted request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// API group; `""` for the core group.
    pub group: String,
    /// Resource, with its subresource if any: `pods` or `pods/eviction`.
    pub resource: String,
    /// Verb: `get`, `list`, `watch`, `create`, `update`, `patch`, ...
    pub verb: String,
    /// Where it applies.
    pub scope: Scope,
}

impl Grant {
    /// Shorthand for building expected grants.
    pub fn new(group: &str, resource: &str, verb: &str, scope: Scope) -> Grant {
        Grant {
            group: group.to_owned(),
            resource: resource.to_owned(),
            verb: verb.to_owned(),
            scope,
        }
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Everything the install (`deploy/base`) grants the operator's
/// ServiceAccount. Panics on a wildcard anywhere in a bound rule: least
/// privilege names every group, resource and verb.
pub fn granted() -> BTreeSet<Grant> {
    granted_in(&build(&repo().join("deploy/base")))
}

/// What `docs` grant the operator's ServiceAccount through their bindings.
pub fn granted_in(docs: &[Value]) -> BTreeSet<Grant> {
    let mut roles = BTreeMap::new();
    for d in docs {
        let kind = text(d, "kind");
        if kind == "Role" || kind == "ClusterRole" {
            assert!(
                d.get("aggregationRule").is_none(),
                "{kind} {}: aggregated roles are not modelled",
                name(d)
            );
            let ns = if kind == "Role" { namespace(d) } else { "" };
            roles.insert((kind, ns.to_owned(), name(d).to_owned()), d);
        }
    }
    let mut grants = BTreeSet::new();
    for b in docs {
        let kind = text(b, "kind");
        let scope = match kind {
            "ClusterRoleBinding" => Scope::Cluster,
            "RoleBinding" => Scope::Namespace(namespace(b).to_owned()),
            _ => continue,
        };
        if !binds_operator(b) {
            continue;
        }
        let role_kind = text(&b["roleRef"], "kind");
        let role_ns = if role_kind == "Role" {
            namespace(b)
        } else {
            ""
        };
        let role_name = text(&b["roleRef"], "name");
        let role = roles
            .get(&(role_kind, role_ns.to_owned(), role_name.to_owned()))
            .unwrap_or_else(|| {
                panic!(
                    "{kind} {} refers to {role_kind} {role_name}, which no manifest defines",
                    name(b)
                )
            });
        let rules = role["rules"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for rule in rules {
            let what = format!("{role_kind} {role_name}");
            expand(rule, &scope, &what, &mut grants);
        }
    }
    grants
}

/// Whether a binding's subjects include the operator's ServiceAccount,
/// directly or through the groups every ServiceAccount belongs to.
fn binds_operator(binding: &Value) -> bool {
    let user = format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{SERVICE_ACCOUNT}");
    let ns_group = format!("system:serviceaccounts:{OPERATOR_NAMESPACE}");
    let subjects = binding["subjects"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    subjects.iter().any(|s| match text(s, "kind") {
        "ServiceAccount" => {
            text(s, "name") == SERVICE_ACCOUNT && text(s, "namespace") == OPERATOR_NAMESPACE
        }
        "User" => text(s, "name") == user,
        "Group" => [
            "system:serviceaccounts",
            "system:authenticated",
            ns_group.as_str(),
        ]
        .contains(&text(s, "name")),
        other => panic!("binding {}: unknown subject kind {other:?}", name(binding)),
    })
}

/// Adds the product apiGroups × resources × verbs of one rule.
fn expand(rule: &Value, scope: &Scope, what: &str, out: &mut BTreeSet<Grant>) {
    for key in rule.as_object().expect("a rule is a mapping").keys() {
        assert!(
            ["apiGroups", "resources", "verbs"].contains(&key.as_str()),
            "{what}: `{key}` in a rule is not modelled by Grant"
        );
    }
    let list = |key: &str| -> Vec<&str> {
        let items: Vec<&str> = rule[key]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: a rule without {key}"))
            .iter()
            .map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("{what}: {key} holds {v}, not a string"))
            })
            .collect();
        assert!(!items.is_empty(), "{what}: empty {key}");
        for i in &items {
            assert!(
                !i.contains('*'),
                "{what}: wildcard {i:?} in {key}; grant exactly what the operator calls"
            );
        }
        items
    };
    for group in list("apiGroups") {
        for resource in list("resources") {
            for verb in list("verbs") {
                out.insert(Grant::new(group, resource, verb, scope.clone()));
            }
        }
    }
}

/// The objects `kustomize build <dir>` emits, for the features these
/// kustomizations use: `resources` (files and kustomization directories, in
/// order), `configMapGenerator` (with `disableNameSuffixHash`), `patches` with
/// a `path` to a strategic merge patch naming its target (applied as a JSON
/// merge: mappings merged, lists replaced) and `labels` on metadata only.
/// Anything else panics rather than being silently misread.
pub fn build(dir: &Path) -> Vec<Value> {
    let file = dir.join("kustomization.yaml");
    let k: Value = parse_one(&file);
    let here = file.display().to_string();
    for key in k.as_object().expect("a kustomization is a mapping").keys() {
        assert!(
            [
                "apiVersion",
                "kind",
                "resources",
                "configMapGenerator",
                "generatorOptions",
                "patches",
                "labels",
            ]
            .contains(&key.as_str()),
            "{here}: `{key}` is not modelled by tests/common/rbac.rs build()"
        );
    }
    assert_eq!(k["kind"], "Kustomization", "{here}");
    let mut docs = Vec::new();
    for r in strings(&k["resources"]) {
        let path = dir.join(r);
        if path.is_dir() {
            docs.extend(build(&path));
        } else {
            docs.extend(parse_all(&path));
        }
    }
    let no_hash = k["generatorOptions"]["disableNameSuffixHash"] == true;
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        let gname = text(g, "name");
        assert!(
            no_hash || g["options"]["disableNameSuffixHash"] == true,
            "{here}: ConfigMap {gname} would get a hashed name, which is not modelled"
        );
        let mut data = Map::new();
        for f in strings(&g["files"]) {
            let (key, path) = match f.split_once('=') {
                Some((key, path)) => (key.to_owned(), path),
                None => (
                    Path::new(f)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    f,
                ),
            };
            let content = std::fs::read_to_string(dir.join(path))
                .unwrap_or_else(|e| panic!("{here}: {path}: {e}"));
            data.insert(key, Value::String(content));
        }
        for l in strings(&g["literals"]) {
            let (key, value) = l.split_once('=').expect("literal key=value");
            data.insert(key.to_owned(), Value::String(value.to_owned()));
        }
        let mut meta = Map::new();
        meta.insert("name".into(), gname.into());
        if let Some(ns) = g["namespace"].as_str() {
            meta.insert("namespace".into(), ns.into());
        }
        docs.push(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data,
        }));
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        assert!(
            p.get("target").is_none() && p.get("patch").is_none(),
            "{here}: only `path` patches are modelled"
        );
        let path = text(p, "path");
        for patch in parse_all(&dir.join(path)) {
            let target = docs
                .iter_mut()
                .find(|d| {
                    text(d, "kind") == text(&patch, "kind")
                        && name(d) == name(&patch)
                        && namespace(d) == namespace(&patch)
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{here}: patch {path} targets {} {}, which is not among the resources",
                        text(&patch, "kind"),
                        name(&patch)
                    )
                });
            merge(target, &patch);
        }
    }
    for l in k["labels"].as_array().into_iter().flatten() {
        assert!(
            l["includeSelectors"] != true && l["includeTemplates"] != true,
            "{here}: labels on selectors or templates are not modelled"
        );
        for d in &mut docs {
            let labels = &mut d["metadata"]["labels"];
            if labels.is_null() {
                *labels = Value::Object(Map::new());
            }
            for (key, value) in l["pairs"].as_object().expect("labels.pairs") {
                labels[key] = value.clone();
            }
        }
    }
    docs
}

/// JSON merge patch (RFC 7396).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Every non-empty YAML document of a file.
pub fn parse_all(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn parse_one(path: &Path) -> Value {
    let mut docs = parse_all(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// A string field, `""` when absent.
pub fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// `metadata.name`, `""` when absent.
pub fn name(v: &Value) -> &str {
    text(&v["metadata"], "name")
}

/// `metadata.namespace`, `""` when absent (cluster-scoped objects).
pub fn namespace(v: &Value) -> &str {
    text(&v["metadata"], "namespace")
}

/// The strings of a YAML list, none when absent.
pub fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().expect("a string")).collect())
        .unwrap_or_default()
}
