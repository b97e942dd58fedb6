//! Local validation against the real API server (`KUBEBUILDER_ASSETS`;
//! skipped without): mutations of valid objects of every kind, generated
//! from the CRD schemas (types, enums, patterns and CEL rules, bounds,
//! required fields, nulls, unknown fields) and written by hand for the rules
//! that span fields, each sent to the server as a strict dry-run create
//! (what `kubectl apply` does) and loaded by `reconcile --strict`'s loader.
//! The verdicts must agree; where the operator refuses more than the server,
//! the rule is named in [`LOCAL_ONLY`].

#[path = "common/envtest.rs"]
mod envtest;

use std::fmt::Write as _;

use agent_env_operator::host::manifest::{FieldValidation, Loader, Source};
use envtest::{ControlPlane, repo};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

const NS: &str = "parity";

/// Rules the operator adds to the CRDs', each for a reason the schema cannot
/// carry: a message fragment of the local refusal and why.
const LOCAL_ONLY: &[(&str, &str)] = &[
    (
        "must lie under parity/",
        "an env dir outside its namespace's part of the root (CEL cannot see metadata.namespace)",
    ),
    (
        "malformed secret placeholder",
        "a malformed ${SECRET:...} placeholder would reach the agent unfilled",
    ),
];

/// Valid objects covering every field of every kind.
fn bases() -> Vec<Value> {
    let obj = |kind: &str, name: &str, spec: Value| {
        json!({
            "apiVersion": "agentenv.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": NS, "labels": {"team": "a"}, "annotations": {"note": "x"}},
            "spec": spec,
        })
    };
    vec![
        obj(
            "AgentInstance",
            "alice",
            json!({
                "agentType": "coder",
                "envDir": {"path": "parity/alice", "uid": 1000, "gid": 1000, "deletionPolicy": "Delete"},
                "workload": {"kind": "Deployment", "name": "alice"},
                "restart": {"onChange": true, "onDrift": true, "strategy": "RolloutRestart", "minInterval": "30s"},
                "runtimeInstalls": "Revert",
                "suspend": false,
            }),
        ),
        obj(
            "PluginBinding",
            "coders",
            json!({
                "target": {"agentType": "coder"},
                "plugins": [{"name": "lint@tools", "enabled": true}, {"name": "fmt@tools", "enabled": false}],
            }),
        ),
        obj(
            "PluginMarketplace",
            "tools",
            json!({"target": {"instance": "alice"}, "name": "tools", "enabled": true,
                   "source": {"github": {"repo": "acme/tools", "ref": "v1", "path": "plugins"}}}),
        ),
        obj(
            "PluginMarketplace",
            "tools-git",
            json!({"target": {"agentType": "coder"},
                   "source": {"git": {"url": "https://git.example/tools.git", "ref": "main", "path": "x"}}}),
        ),
        obj(
            "PluginMarketplace",
            "tools-url",
            json!({"target": {"agentType": "coder"},
                   "source": {"url": {"url": "https://example.com/marketplace.json", "headers": {"Authorization": "Bearer x"}}}}),
        ),
        obj(
            "PluginMarketplace",
            "tools-dir",
            json!({"target": {"agentType": "coder"}, "source": {"directory": {"path": "/opt/tools"}}}),
        ),
        obj(
            "PluginMarketplace",
            "tools-file",
            json!({"target": {"agentType": "coder"}, "source": {"file": {"path": "/opt/tools/marketplace.json"}}}),
        ),
        obj(
            "McpServer",
            "forgejo",
            json!({"target": {"agentType": "coder"}, "name": "forgejo", "enabled": true, "timeout": 30000,
                   "stdio": {"command": "forgejo-mcp", "args": ["--token", "${SECRET:FORGEJO_TOKEN}"], "env": {"HOME": "/tmp"}}}),
        ),
        obj(
            "McpServer",
            "docs",
            json!({"target": {"instance": "alice"},
                   "http": {"url": "https://docs.example/mcp", "headers": {"Authorization": "Bearer ${SECRET:tokens/docs}"}}}),
        ),
        obj(
            "McpServer",
            "events",
            json!({"target": {"instance": "alice"}, "sse": {"url": "https://events.example/sse", "headers": {"X": "y"}}}),
        ),
    ]
}

/// Mutations spanning fields, which the schema walk cannot make.
fn hand_written() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let b = bases();
    let by = |name: &str| {
        b.iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap()
            .clone()
    };
    let mut add = |what: &str, mut doc: Value, f: &dyn Fn(&mut Value)| {
        f(&mut doc);
        out.push((what.to_owned(), doc));
    };
    add("binding with both targets", by("coders"), &|d| {
        d["spec"]["target"]["instance"] = json!("alice")
    });
    add("binding with no target", by("coders"), &|d| {
        d["spec"]["target"] = json!({})
    });
    add("binding listing a plugin twice", by("coders"), &|d| {
        d["spec"]["plugins"][1]["name"] = json!("lint@tools")
    });
    add("marketplace with two sources", by("tools"), &|d| {
        d["spec"]["source"]["directory"] = json!({"path": "/x"})
    });
    add("marketplace with no source", by("tools"), &|d| {
        d["spec"]["source"] = json!({})
    });
    add("MCP server with stdio and http", by("forgejo"), &|d| {
        d["spec"]["http"] = json!({"url": "https://x"})
    });
    add("MCP server of no kind", by("forgejo"), &|d| {
        d["spec"].as_object_mut().unwrap().remove("stdio");
    });
    add("MCP server named workspace", by("forgejo"), &|d| {
        d["spec"]["name"] = json!("workspace")
    });
    add("a secret placeholder in command", by("forgejo"), &|d| {
        d["spec"]["stdio"]["command"] = json!("${SECRET:X}")
    });
    add("an env dir in another namespace", by("alice"), &|d| {
        d["spec"]["envDir"]["path"] = json!("other/alice")
    });
    add("an env dir at its namespace's root", by("alice"), &|d| {
        d["spec"]["envDir"]["path"] = json!("parity")
    });
    for (what, name) in [
        ("an upper-case name", json!("Alice")),
        ("a name with a slash", json!("a/b")),
        ("a name of 254 characters", json!("a".repeat(254))),
        ("a name with dots", json!("a.b")),
    ] {
        add(what, by("coders"), &|d| {
            d["metadata"]["name"] = name.clone()
        });
    }
    for (what, labels) in [
        ("a label key with a space", json!({"a b": "x"})),
        (
            "a label value of 64 characters",
            json!({"a": "v".repeat(64)}),
        ),
        ("a label value with a slash", json!({"a": "x/y"})),
        ("a prefixed label key", json!({"agentenv.io/x": "y"})),
    ] {
        add(what, by("coders"), &|d| {
            d["metadata"]["labels"] = labels.clone()
        });
    }
    add("an annotation key with a space", by("coders"), &|d| {
        d["metadata"]["annotations"] = json!({"a b": "x"})
    });
    add("an unknown metadata field", by("coders"), &|d| {
        d["metadata"]["colour"] = json!("red")
    });
    add("an unknown top-level field", by("coders"), &|d| {
        d["colour"] = json!("red")
    });
    out
}

/// Strings that break patterns and CEL rules, or come close.
const TRICKY: &[&str] = &[
    "",
    " ",
    "a b",
    "@",
    "a@b",
    "a@b@c",
    "/abs",
    "rel",
    "../x",
    "parity/../x",
    "parity/./x",
    ".agent-env/x",
    "parity/x/",
    "${SECRET:X}",
    "${SECRET:}",
    "o/r",
    "o/r/s",
    "10s5m",
    "1d",
    "ünïcode",
];

/// Mutations of `v` (at `path`, under `schema`), generated from the schema.
fn walk(schema: &Value, v: &Value, path: &str, out: &mut Vec<(String, Value, Value)>) {
    let mut put = |what: String, new: Value| out.push((path.to_owned(), json!(what), new));
    let ty = schema["type"].as_str().unwrap_or_default();
    put("null".into(), Value::Null);
    match ty {
        "string" => {
            put("a number for a string".into(), json!(7));
            if let Some(e) = schema["enum"].as_array() {
                put("a value outside the enum".into(), json!("Sometimes"));
                put(
                    format!("the enum's {} in lower case", e[0]),
                    json!(e[0].as_str().unwrap().to_lowercase()),
                );
            }
            if let Some(max) = schema["maxLength"].as_u64() {
                put(
                    format!("{} characters", max + 1),
                    json!("a".repeat(max as usize + 1)),
                );
                put(format!("{max} characters"), json!("a".repeat(max as usize)));
                put(
                    format!("{} multibyte characters", max),
                    json!("é".repeat(max as usize)),
                );
            }
            for t in TRICKY {
                put(format!("{t:?}"), json!(t));
            }
        }
        "integer" => {
            put("a string for an integer".into(), json!("12"));
            put("a fraction".into(), json!(1.5));
            for bound in ["minimum", "maximum"] {
                if let Some(b) = schema[bound].as_f64() {
                    let b = b as i64;
                    put(bound.to_string(), json!(b));
                    let past = if bound == "minimum" { b - 1 } else { b + 1 };
                    put(format!("past the {bound}"), json!(past));
                }
            }
            put("-1".into(), json!(-1));
            put("0".into(), json!(0));
        }
        "boolean" => put("a string for a boolean".into(), json!("yes")),
        "array" => {
            put("a string for a list".into(), json!("x"));
            put("an empty list".into(), json!([]));
            if let (Some(max), Some(first)) = (schema["maxItems"].as_u64(), v.get(0)) {
                let key = schema["x-kubernetes-list-map-keys"][0].as_str();
                let many = |n: u64| -> Value {
                    (0..n)
                        .map(|i| {
                            let mut item = first.clone();
                            if let Some(k) = key {
                                item[k] = json!(format!("p{i}@m"));
                            }
                            item
                        })
                        .collect()
                };
                put(format!("{} items", max + 1), many(max + 1));
                put(format!("{max} items"), many(max));
            }
            if let Some(items) = v.as_array() {
                for (i, x) in items.iter().enumerate() {
                    walk(&schema["items"], x, &format!("{path}/{i}"), out);
                }
            }
        }
        "object" => {
            put("a string for an object".into(), json!("x"));
            put("an empty object".into(), json!({}));
            let Some(m) = v.as_object() else { return };
            if let Some(props) = schema["properties"].as_object() {
                let mut unknown = m.clone();
                unknown.insert("zColour".into(), json!("red"));
                put("an unknown field".into(), Value::Object(unknown));
                for r in schema["required"].as_array().into_iter().flatten() {
                    let mut less = m.clone();
                    less.remove(r.as_str().unwrap());
                    put(format!("without {r}"), Value::Object(less));
                }
                for (k, x) in m {
                    if let Some(sub) = props.get(k) {
                        walk(sub, x, &format!("{path}/{k}"), out);
                    }
                }
            } else if let Some(sub) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                if let Some(max) = schema["maxProperties"].as_u64() {
                    let many: serde_json::Map<String, Value> =
                        (0..=max).map(|i| (format!("K{i}"), json!("v"))).collect();
                    put(format!("{} entries", max + 1), Value::Object(many));
                }
                let mut odd = m.clone();
                odd.insert("a key with spaces".into(), json!("v"));
                put("a key with spaces".into(), Value::Object(odd));
                for (k, x) in m {
                    walk(sub, x, &format!("{path}/{k}"), out);
                }
            }
        }
        _ => {}
    }
}

fn schemas() -> Vec<(String, Value)> {
    let crds = kube_envtest::apply::documents(
        &std::fs::read_to_string(repo().join("crds/crds.yaml")).unwrap(),
    );
    crds.into_iter()
        .map(|c| {
            (
                c["spec"]["names"]["kind"].as_str().unwrap().to_owned(),
                c["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
            )
        })
        .collect()
}

/// Every case: a label and the document.
fn cases() -> Vec<(String, Value)> {
    let schemas = schemas();
    let mut out = Vec::new();
    for base in bases() {
        let kind = base["kind"].as_str().unwrap();
        let schema = &schemas.iter().find(|(k, _)| k == kind).unwrap().1;
        out.push((
            format!("{kind} {} as written", base["metadata"]["name"]),
            base.clone(),
        ));
        let mut muts = Vec::new();
        walk(
            &schema["properties"]["spec"],
            &base["spec"],
            "/spec",
            &mut muts,
        );
        for (path, what, new) in muts {
            let mut doc = base.clone();
            *doc.pointer_mut(&path).unwrap() = new;
            out.push((
                format!(
                    "{kind} {}: {path} = {}",
                    base["metadata"]["name"],
                    what.as_str().unwrap()
                ),
                doc,
            ));
        }
    }
    out.extend(hand_written());
    out
}

/// The local verdict: `Ok` or the refusal.
fn local(doc: &Value) -> Result<(), String> {
    let mut loader = Loader::default().with_field_validation(FieldValidation::Strict);
    let source = Source {
        file: std::path::Path::new("parity.yaml").into(),
        document: 1,
        line: 1,
    };
    loader
        .add_document(doc.clone(), source)
        .map_err(|e| e.to_string())?;
    match loader.finish().invalid.first() {
        Some(inv) => Err(inv.to_string()),
        None => Ok(()),
    }
}

/// The server's verdict on a strict dry-run create (what `kubectl apply`
/// sends for a new object).
async fn server(client: &kube::Client, doc: &Value) -> Result<(), String> {
    let plural = format!("{}s", doc["kind"].as_str().unwrap().to_lowercase());
    let path = format!("/apis/agentenv.io/v1alpha1/namespaces/{NS}/{plural}");
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let mut req = kube::core::Request::new(path)
        .create(&params, serde_json::to_vec(doc).unwrap())
        .unwrap();
    // PostParams cannot ask for strictness; kubectl does by default.
    let uri = format!("{}&fieldValidation=Strict", req.uri());
    *req.uri_mut() = uri.parse().unwrap();
    match client.request::<Value>(req).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 422) => Err(s.message),
        Err(e) => panic!("{}: {e}", doc["metadata"]["name"]),
    }
}

#[tokio::test]
async fn local_validation_refuses_what_the_api_server_refuses() {
    let Some(cp) = ControlPlane::shared("validation parity").await else {
        return;
    };
    let admin = cp.client().await;
    kube_envtest::apply::apply_yaml(
        &admin,
        &std::fs::read_to_string(repo().join("crds/crds.yaml")).unwrap(),
        "agent-env-tests",
    )
    .await
    .unwrap();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    match Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("{e}"),
    }

    let cases = cases();
    let (mut refused, mut mismatches, mut local_only) = (0, String::new(), 0);
    for (what, doc) in &cases {
        let (ours, theirs) = (local(doc), server(&admin, doc).await);
        match (&ours, &theirs) {
            (Ok(()), Ok(())) => {}
            (Err(_), Err(theirs)) => {
                refused += 1;
                // An unknown field is named as the server names it.
                let unknown = agent_env_operator::host::manifest::unknown_fields(
                    doc["kind"].as_str().unwrap(),
                    doc,
                );
                for f in unknown {
                    if !theirs.contains(&format!("unknown field \"{f}\"")) {
                        writeln!(
                            mismatches,
                            "{what}: the server does not name {f:?}: {theirs}"
                        )
                        .unwrap();
                    }
                }
            }
            (Err(ours), Ok(())) if LOCAL_ONLY.iter().any(|(m, _)| ours.contains(m)) => {
                local_only += 1;
            }
            (Err(ours), Ok(())) => {
                writeln!(mismatches, "{what}: refused only here: {ours}").unwrap();
            }
            (Ok(()), Err(theirs)) => {
                writeln!(mismatches, "{what}: refused only by the server: {theirs}").unwrap();
            }
        }
    }
    assert!(mismatches.is_empty(), "verdicts differ:\n{mismatches}");
    // The walk is not vacuous: most mutations are refusals, some are not.
    eprintln!(
        "{} cases: {refused} refused by both, {local_only} refused here by a local-only rule",
        cases.len()
    );
    assert!(
        cases.len() > 300 && refused > 150 && refused < cases.len() - 50,
        "{} cases, {refused} refused",
        cases.len()
    );
}
