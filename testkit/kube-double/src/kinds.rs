//! The resource types served: a fixed table of built-in kinds plus one entry
//! per CRD given at start.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::core::cel::CompiledSchema;
use serde_json::Value;

/// One served resource type (all its versions).
pub(crate) struct Kind {
    pub group: String,
    /// Served versions, most preferred first.
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    /// Has a `/status` subresource: status is written only through it.
    pub status: bool,
    /// Pods' `eviction`, which is not a plain read/write subresource.
    pub eviction: bool,
    /// Extra field selectors beyond metadata.name/metadata.namespace.
    pub selectable_fields: Vec<String>,
    /// Per version, for CRDs only: built-in kinds are not schema-validated.
    pub schemas: BTreeMap<String, Arc<VersionSchema>>,
}

pub(crate) struct VersionSchema {
    pub openapi: Value,
    pub cel: CompiledSchema,
}

impl Kind {
    pub fn is_custom(&self) -> bool {
        !self.schemas.is_empty()
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }

    /// Real servers refuse a PUT without a resourceVersion for custom
    /// resources (no unconditional updates) but allow it for these built-ins.
    pub fn allows_unconditional_update(&self) -> bool {
        !self.is_custom()
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    short_names: &'static [&'static str],
    selectable_fields: &'static [&'static str],
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status: true,
        short_names: &["ns"],
        selectable_fields: &["status.phase"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        status: true,
        short_names: &["po"],
        selectable_fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status: false,
        short_names: &[],
        selectable_fields: &["type"],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        status: false,
        short_names: &["cm"],
        selectable_fields: &[],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        short_names: &["ev"],
        selectable_fields: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
    },
    Builtin {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        kind: "ServiceAccount",
        namespaced: true,
        status: false,
        short_names: &["sa"],
        selectable_fields: &[],
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "deployments",
        kind: "Deployment",
        namespaced: true,
        status: true,
        short_names: &["deploy"],
        selectable_fields: &[],
    },
    Builtin {
        group: "apps",
        version: "v1",
        plural: "statefulsets",
        kind: "StatefulSet",
        namespaced: true,
        status: true,
        short_names: &["sts"],
        selectable_fields: &[],
    },
    Builtin {
        group: "policy",
        version: "v1",
        plural: "poddisruptionbudgets",
        kind: "PodDisruptionBudget",
        namespaced: true,
        status: true,
        short_names: &["pdb"],
        selectable_fields: &[],
    },
    Builtin {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
        short_names: &[],
        selectable_fields: &[],
    },
    Builtin {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        short_names: &["ev"],
        selectable_fields: &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
    },
];

pub(crate) struct Registry {
    kinds: Vec<Arc<Kind>>,
}

impl Registry {
    pub fn new(crds: &[Value]) -> Result<Registry, String> {
        let mut kinds: Vec<Arc<Kind>> = BUILTINS
            .iter()
            .map(|b| {
                Arc::new(Kind {
                    group: b.group.to_owned(),
                    versions: vec![b.version.to_owned()],
                    plural: b.plural.to_owned(),
                    singular: b.kind.to_ascii_lowercase(),
                    kind: b.kind.to_owned(),
                    list_kind: format!("{}List", b.kind),
                    short_names: b.short_names.iter().map(|s| (*s).to_owned()).collect(),
                    categories: Vec::new(),
                    namespaced: b.namespaced,
                    status: b.status,
                    eviction: b.plural == "pods",
                    selectable_fields: b
                        .selectable_fields
                        .iter()
                        .map(|s| (*s).to_owned())
                        .collect(),
                    schemas: BTreeMap::new(),
                })
            })
            .collect();
        for crd in crds {
            let kind = parse_crd(crd)?;
            if kinds
                .iter()
                .any(|k| k.group == kind.group && k.plural == kind.plural)
            {
                return Err(format!("{}.{} is defined twice", kind.plural, kind.group));
            }
            kinds.push(Arc::new(kind));
        }
        Ok(Registry { kinds })
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&Arc<Kind>> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.plural == plural && k.serves(version))
    }

    /// Non-core groups with their versions, most preferred first, in the order
    /// groups were first seen (built-ins, then CRDs).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for k in self.kinds.iter().filter(|k| !k.group.is_empty()) {
            let entry = match out.iter_mut().position(|(g, _)| *g == k.group) {
                Some(i) => &mut out[i].1,
                None => {
                    out.push((k.group.clone(), Vec::new()));
                    &mut out.last_mut().expect("just pushed").1
                }
            };
            for v in &k.versions {
                if !entry.contains(v) {
                    entry.push(v.clone());
                }
            }
        }
        for (_, versions) in &mut out {
            versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        out
    }

    /// Kinds served at one group/version.
    pub fn at(&self, group: &str, version: &str) -> Vec<&Arc<Kind>> {
        self.kinds
            .iter()
            .filter(|k| k.group == group && k.serves(version))
            .collect()
    }
}

/// Orders versions as Kubernetes does: GA above beta above alpha, then by
/// number; anything unparseable sorts last.
pub(crate) fn version_priority(v: &str) -> (u8, u32, u32) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(major) = digits.parse::<u32>() else {
        return (0, 0, 0);
    };
    let tail = &rest[digits.len()..];
    let (stage, minor) = if tail.is_empty() {
        (3, 0)
    } else if let Some(n) = tail.strip_prefix("beta") {
        (2, n.parse().unwrap_or(0))
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n.parse().unwrap_or(0))
    } else {
        return (0, 0, 0);
    };
    (stage, major, minor)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn parse_crd(crd: &Value) -> Result<Kind, String> {
    let name = str_at(crd, &["metadata", "name"]).unwrap_or("<unnamed>");
    if crd.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
        return Err(format!("{name}: not a CustomResourceDefinition"));
    }
    let spec = crd.get("spec").ok_or_else(|| format!("{name}: no spec"))?;
    let group = str_at(spec, &["group"]).ok_or_else(|| format!("{name}: no spec.group"))?;
    let names = spec
        .get("names")
        .ok_or_else(|| format!("{name}: no spec.names"))?;
    let kind = str_at(names, &["kind"]).ok_or_else(|| format!("{name}: no spec.names.kind"))?;
    let plural =
        str_at(names, &["plural"]).ok_or_else(|| format!("{name}: no spec.names.plural"))?;
    if name != format!("{plural}.{group}") {
        return Err(format!(
            "{name}: metadata.name must be spec.names.plural + \".\" + spec.group"
        ));
    }
    let singular = str_at(names, &["singular"])
        .map(str::to_owned)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let list_kind = str_at(names, &["listKind"])
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{kind}List"));
    let namespaced = match str_at(spec, &["scope"]) {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        other => {
            return Err(format!(
                "{name}: spec.scope must be Namespaced or Cluster, not {other:?}"
            ));
        }
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{name}: no spec.versions"))?;

    let mut served = Vec::new();
    let mut schemas = BTreeMap::new();
    let mut status = None;
    let mut selectable = Vec::new();
    for v in versions {
        let vname = str_at(v, &["name"]).ok_or_else(|| format!("{name}: a version has no name"))?;
        if !v.get("served").and_then(Value::as_bool).unwrap_or(false) {
            continue;
        }
        let openapi = v
            .pointer("/schema/openAPIV3Schema")
            .cloned()
            .ok_or_else(|| format!("{name}: version {vname} has no schema.openAPIV3Schema"))?;
        let cel = kube::core::cel::compile_schema(&openapi);
        if cel.has_errors() {
            let errs: Vec<String> = cel
                .compilation_errors()
                .iter()
                .map(ToString::to_string)
                .collect();
            return Err(format!(
                "{name}: version {vname}: CEL rules do not compile: {}",
                errs.join("; ")
            ));
        }
        let has_status = v.pointer("/subresources/status").is_some();
        // One flag for the whole kind keeps the store version-agnostic; a CRD
        // whose versions disagree on it is unusual enough to refuse.
        match status {
            None => status = Some(has_status),
            Some(s) if s != has_status => {
                return Err(format!(
                    "{name}: versions disagree on the status subresource"
                ));
            }
            Some(_) => {}
        }
        for f in v
            .get("selectableFields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(p) = f.get("jsonPath").and_then(Value::as_str) {
                let p = p.trim_start_matches('.').to_owned();
                if !selectable.contains(&p) {
                    selectable.push(p);
                }
            }
        }
        served.push(vname.to_owned());
        schemas.insert(vname.to_owned(), Arc::new(VersionSchema { openapi, cel }));
    }
    if served.is_empty() {
        return Err(format!("{name}: no served version"));
    }
    served.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
    Ok(Kind {
        group: group.to_owned(),
        versions: served,
        plural: plural.to_owned(),
        singular,
        kind: kind.to_owned(),
        list_kind,
        short_names: strings(names.get("shortNames")),
        categories: strings(names.get("categories")),
        namespaced,
        status: status.unwrap_or(false),
        eviction: false,
        selectable_fields: selectable,
        schemas,
    })
}
