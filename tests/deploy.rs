//! The install manifests (deploy/), the CRD kustomization (crds/) and the
//! Kubernetes example (examples/kubernetes/) hang together: files exist,
//! names agree, flags exist, the Argo CD health check maps conditions as
//! documented and the RBAC stays least privilege. No cluster needed.

#[path = "common/rbac.rs"]
mod rbac;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use mlua::{Lua, LuaOptions, StdLib};
use serde_json::{Value, json};

use rbac::{Grant, OPERATOR_NAMESPACE, Scope, build, name, namespace, repo, strings, text};

/// Trees holding manifests.
const TREES: [&str; 3] = ["deploy", "crds", "examples/kubernetes"];

/// Kinds without a namespace among those the manifests use.
const CLUSTER_SCOPED: [&str; 5] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
];

/// Every file under `dir`, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn yaml_files() -> Vec<PathBuf> {
    TREES
        .iter()
        .flat_map(|t| files(&repo().join(t)))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        // The chart's templates are not manifests; tests/helm.rs renders them.
        .filter(|p| !p.starts_with(repo().join("deploy/helm")))
        .collect()
}

fn is_kustomization(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "kustomization.yaml")
}

fn find<'a>(docs: &'a [Value], kind: &str, ns: &str, n: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| text(d, "kind") == kind && namespace(d) == ns && name(d) == n)
}

fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| text(d, "kind") == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected, found {}", found.len());
    found[0]
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(workload: &'a Value, list: &str, n: &str) -> &'a Value {
    pod_spec(workload)[list]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| text(c, "name") == n)
        .unwrap_or_else(|| panic!("{} has no {list} entry {n}", name(workload)))
}

/// The value of `--flag` in an argument list, as `--flag=value` or `--flag value`.
fn arg<'a>(args: &'a [&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            Some(v)
        } else if *a == flag {
            args.get(i + 1).copied()
        } else {
            None
        }
    })
}

/// The names of the `--flags` in an argument list.
fn flags<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap())
        .collect()
}

/// The literal value of an environment variable, or its downward API field.
fn env<'a>(c: &'a Value, n: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| text(e, "name") == n)
}

fn env_field<'a>(c: &'a Value, n: &str) -> Option<&'a str> {
    env(c, n).and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a label selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

fn mount<'a>(c: &'a Value, volume: &str) -> Vec<&'a Value> {
    c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| text(m, "name") == volume)
        .collect()
}

/// The volumes of a pod spec backed by a PVC, with the claims' names.
fn claim_volumes(workload: &Value) -> Vec<(&str, &str)> {
    let volumes = pod_spec(workload)["volumes"].as_array().unwrap();
    volumes
        .iter()
        .filter_map(|v| {
            Some((
                text(v, "name"),
                v["persistentVolumeClaim"]["claimName"].as_str()?,
            ))
        })
        .collect()
}

/// The one volume of an agent's pod spec backed by a PVC, with the claim's name.
fn claim_volume(workload: &Value) -> (&str, &str) {
    let found = claim_volumes(workload);
    assert_eq!(
        found.len(),
        1,
        "{}: one PVC volume expected",
        name(workload)
    );
    found[0]
}

/// The PVC volume (and claim) of the operator's container mounted where
/// `path` lies.
fn operator_volume<'a>(operator: &'a Value, path: &str) -> (&'a str, &'a str) {
    let c = container(operator, "containers", "operator");
    claim_volumes(operator)
        .into_iter()
        .find(|(volume, _)| {
            mount(c, volume).iter().any(|m| {
                let at = text(m, "mountPath");
                path == at || path.starts_with(&format!("{at}/"))
            })
        })
        .unwrap_or_else(|| panic!("no PVC is mounted where {path} lies"))
}

/// The env root's volume and claim of the operator.
fn env_root_volume(operator: &Value) -> (&str, &str) {
    let a = args(container(operator, "containers", "operator"));
    operator_volume(operator, arg(&a, "--env-root").expect("--env-root"))
}

fn operator_deployment(docs: &[Value]) -> &Value {
    find(docs, "Deployment", OPERATOR_NAMESPACE, "agent-env-operator")
        .expect("the operator Deployment")
}

fn args(c: &Value) -> Vec<&str> {
    strings(&c["args"])
}

// --- (a) files exist, manifests parse, names agree -------------------------

/// Every kustomization names files that exist inside its own root (kustomize
/// refuses others) and directories that are kustomizations, and builds.
#[test]
fn kustomizations_reference_existing_files_inside_their_root() {
    let kustomizations: Vec<PathBuf> = yaml_files()
        .into_iter()
        .filter(|p| is_kustomization(p))
        .collect();
    assert!(kustomizations.len() >= 5, "{kustomizations:?}");
    for k in kustomizations {
        let dir = k.parent().unwrap();
        let root = dir.canonicalize().unwrap();
        let spec = &rbac::parse_all(&k)[0];
        let mut referenced: Vec<&str> = strings(&spec["resources"]);
        for g in spec["configMapGenerator"].as_array().into_iter().flatten() {
            referenced.extend(
                strings(&g["files"])
                    .iter()
                    .map(|f| match f.split_once('=') {
                        Some((_, path)) => path,
                        None => f,
                    }),
            );
        }
        for p in spec["patches"].as_array().into_iter().flatten() {
            referenced.push(text(p, "path"));
        }
        for r in referenced {
            let p = dir.join(r);
            assert!(p.exists(), "{}: {r} does not exist", k.display());
            if p.is_dir() {
                assert!(
                    p.join("kustomization.yaml").is_file(),
                    "{}: {r} is a directory without a kustomization.yaml",
                    k.display()
                );
            } else {
                assert!(
                    p.canonicalize().unwrap().starts_with(&root),
                    "{}: {r} is outside the kustomization's root, which kustomize refuses",
                    k.display()
                );
            }
        }
        assert!(!build(dir).is_empty(), "{} builds nothing", k.display());
    }
}

#[test]
fn every_manifest_parses_and_names_its_object() {
    let mut count = 0;
    for p in yaml_files().into_iter().filter(|p| !is_kustomization(p)) {
        for d in rbac::parse_all(&p) {
            for field in ["apiVersion", "kind"] {
                assert!(
                    !text(&d, field).is_empty(),
                    "{}: a document without {field}",
                    p.display()
                );
            }
            assert!(
                !name(&d).is_empty(),
                "{}: a {} without metadata.name",
                p.display(),
                text(&d, "kind")
            );
            count += 1;
        }
    }
    assert!(count > 20, "only {count} manifests found");
}

/// Checks that hold for any build: namespaces, bindings, selectors, claims.
fn check_references(docs: &[Value], what: &str) {
    let namespaces: BTreeSet<&str> = docs
        .iter()
        .filter(|d| text(d, "kind") == "Namespace")
        .map(name)
        .collect();
    let mut seen = BTreeSet::new();
    for d in docs {
        let (kind, ns) = (text(d, "kind"), namespace(d));
        assert!(
            seen.insert((kind, ns, name(d))),
            "{what}: {kind} {ns}/{} is defined twice",
            name(d)
        );
        if CLUSTER_SCOPED.contains(&kind) {
            assert!(
                ns.is_empty(),
                "{what}: cluster-scoped {kind} {} has a namespace",
                name(d)
            );
        } else {
            // Without one, `kubectl apply` would use whatever namespace the
            // applying context happens to be in.
            assert!(
                !ns.is_empty(),
                "{what}: {kind} {} names no namespace",
                name(d)
            );
            assert!(
                namespaces.contains(ns),
                "{what}: {kind} {} is in namespace {ns}, which the build does not create",
                name(d)
            );
        }
    }
    for b in docs
        .iter()
        .filter(|d| text(d, "kind").ends_with("RoleBinding"))
    {
        let role = &b["roleRef"];
        let role_ns = if text(role, "kind") == "Role" {
            namespace(b)
        } else {
            ""
        };
        assert!(
            find(docs, text(role, "kind"), role_ns, text(role, "name")).is_some(),
            "{what}: {} {} refers to the missing {} {}",
            text(b, "kind"),
            name(b),
            text(role, "kind"),
            text(role, "name")
        );
        for s in b["subjects"].as_array().unwrap() {
            assert_eq!(text(s, "kind"), "ServiceAccount", "{what}: {}", name(b));
            assert!(
                find(
                    docs,
                    "ServiceAccount",
                    text(s, "namespace"),
                    text(s, "name")
                )
                .is_some(),
                "{what}: {} binds the missing ServiceAccount {}/{}",
                name(b),
                text(s, "namespace"),
                text(s, "name")
            );
        }
    }
    for r in docs.iter().filter(|d| text(d, "kind").ends_with("Role")) {
        let bound = docs.iter().any(|b| {
            text(b, "kind").ends_with("RoleBinding")
                && text(&b["roleRef"], "kind") == text(r, "kind")
                && text(&b["roleRef"], "name") == name(r)
        });
        assert!(
            bound,
            "{what}: {} {} is bound by nothing",
            text(r, "kind"),
            name(r)
        );
    }
    for w in docs.iter().filter(|d| text(d, "kind") == "Deployment") {
        let labels = &w["spec"]["template"]["metadata"]["labels"];
        assert!(
            labels_match(&w["spec"]["selector"]["matchLabels"], labels),
            "{what}: Deployment {}'s selector does not match its pods",
            name(w)
        );
        let sa = pod_spec(w)["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        assert!(
            sa == "default" || find(docs, "ServiceAccount", namespace(w), sa).is_some(),
            "{what}: Deployment {} runs as the missing ServiceAccount {sa}",
            name(w)
        );
        for (_, claim) in claim_volumes(w) {
            assert!(
                find(docs, "PersistentVolumeClaim", namespace(w), claim).is_some(),
                "{what}: Deployment {} mounts the missing PVC {claim}",
                name(w)
            );
        }
        let (_, env_root) = if name(w) == "agent-env-operator" {
            env_root_volume(w)
        } else {
            claim_volume(w)
        };
        let pvc = find(docs, "PersistentVolumeClaim", namespace(w), env_root).unwrap();
        assert!(
            strings(&pvc["spec"]["accessModes"]).contains(&"ReadWriteMany"),
            "{what}: PVC {env_root} must be ReadWriteMany: agent pods on other nodes share it"
        );
    }
}

#[test]
fn base_objects_refer_to_each_other_correctly() {
    let docs = build(&repo().join("deploy/base"));
    check_references(&docs, "deploy/base");
    assert_eq!(
        docs,
        build(&repo().join("deploy")),
        "deploy/ must build exactly what deploy/base builds"
    );
    let kinds: BTreeSet<&str> = docs.iter().map(|d| text(d, "kind")).collect();
    for k in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "ConfigMap",
    ] {
        assert!(kinds.contains(k), "deploy/base has no {k}");
    }

    let deploy = operator_deployment(&docs);
    let spec = &deploy["spec"];
    assert_eq!(spec["replicas"], 1);
    assert_eq!(
        spec["strategy"]["type"], "Recreate",
        "SQLite state takes one writer: old and new pods must not overlap"
    );
    let pod = pod_spec(deploy);
    assert_eq!(pod["serviceAccountName"], rbac::SERVICE_ACCOUNT);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = container(deploy, "containers", "operator");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let a = args(c);
    assert_eq!(a.first(), Some(&"run"));
    assert_eq!(arg(&a, "--log-format"), Some("json"));
    assert_eq!(
        env_field(c, "AGENT_ENV_OPERATOR_NAMESPACE"),
        Some("metadata.namespace")
    );
    assert_eq!(env_field(c, "AGENT_ENV_IDENTITY"), Some("metadata.name"));

    // The env root flag points at the claim's mount.
    let (volume, env_root_claim) = env_root_volume(deploy);
    let mounts = mount(c, volume);
    assert_eq!(mounts.len(), 1);
    assert_eq!(arg(&a, "--env-root"), mounts[0]["mountPath"].as_str());

    // SQLite state on a volume of its own, which only this pod mounts: never
    // the shared env root, where SQLite's locks are not safe.
    let state = arg(&a, "--state").expect("--state");
    let db = state.strip_prefix("sqlite:").expect("SQLite state");
    let (_, state_claim) = operator_volume(deploy, db);
    assert_ne!(state_claim, env_root_claim);
    let pvc = find(
        &docs,
        "PersistentVolumeClaim",
        OPERATOR_NAMESPACE,
        state_claim,
    )
    .unwrap();
    assert_eq!(strings(&pvc["spec"]["accessModes"]), ["ReadWriteOnce"]);

    // The builtin layer: the generated ConfigMap is the one the operator reads.
    let cm_name = arg(&a, "--config-map")
        .or_else(|| env(c, "AGENT_ENV_CONFIG_MAP").and_then(|e| e["value"].as_str()))
        .unwrap_or("agent-env-builtin");
    let cm = find(&docs, "ConfigMap", namespace(deploy), cm_name)
        .unwrap_or_else(|| panic!("the operator reads ConfigMap {cm_name}, which the build lacks"));
    let keys: Vec<&String> = cm["data"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "agents.json",
            "marketplaces-builtin.json",
            "mcp-builtin.json"
        ]
    );

    // Metrics: the flag's port is the named container port the probes and
    // the Service use.
    let port = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a container port named metrics");
    let addr = arg(&a, "--metrics-addr").expect("--metrics-addr");
    assert_eq!(
        addr.rsplit(':').next().unwrap(),
        port["containerPort"].to_string()
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let svc = only(&docs, "Service");
    assert_eq!(namespace(svc), namespace(deploy));
    assert!(
        labels_match(
            &svc["spec"]["selector"],
            &deploy["spec"]["template"]["metadata"]["labels"]
        ),
        "the metrics Service selects no operator pod"
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], port["containerPort"]);
}

// --- (b) the builtin layer's copies -----------------------------------------

#[test]
fn base_config_copies_equal_config() {
    let names = |dir: &str| -> BTreeMap<String, Vec<u8>> {
        files(&repo().join(dir))
            .into_iter()
            .map(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                (n, std::fs::read(&p).unwrap())
            })
            .collect()
    };
    let (ours, theirs) = (names("deploy/base/config"), names("config"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "deploy/base/config must hold the files of config/"
    );
    for (n, bytes) in &theirs {
        assert!(
            &ours[n] == bytes,
            "deploy/base/config/{n} differs from config/{n}: cp config/*.json deploy/base/config/"
        );
    }
}

// --- (c) the flags exist ----------------------------------------------------

/// The `--flags` and `AGENT_ENV_*` variables `agent-env <command> --help`
/// documents, or `None` when there is no such command.
fn documented(command: &str) -> Option<(BTreeSet<String>, BTreeSet<String>)> {
    let out = Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .args([command, "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unrecognized subcommand"),
            "`{command} --help` failed: {err}"
        );
        return None;
    }
    let word = |s: &str, ok: fn(char) -> bool| s.chars().take_while(|c| ok(*c)).collect::<String>();
    let flags = help
        .match_indices("--")
        .map(|(i, _)| {
            format!(
                "--{}",
                word(&help[i + 2..], |c| c.is_ascii_alphanumeric() || c == '-')
            )
        })
        .collect();
    let envs = help
        .match_indices("env: ")
        .map(|(i, _)| word(&help[i + 5..], |c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    Some((flags, envs))
}

/// Checks a container's command line and `AGENT_ENV_*` variables against the help.
fn check_flags(c: &Value, what: &str) {
    let a = args(c);
    let command = a[0];
    let Some((known, envs)) = documented(command) else {
        eprintln!("SKIPPED {what}: agent-env has no `{command}` command yet");
        return;
    };
    for f in flags(&a) {
        assert!(
            known.contains(f),
            "{what}: `agent-env {command}` has no {f}; it has {known:?}"
        );
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let n = text(e, "name");
        if n.starts_with("AGENT_ENV_") {
            assert!(
                envs.contains(n),
                "{what}: `agent-env {command}` reads no {n}; it reads {envs:?}"
            );
        }
    }
}

#[test]
fn containers_use_only_flags_the_binary_accepts() {
    let base = build(&repo().join("deploy/base"));
    let operator = container(operator_deployment(&base), "containers", "operator");
    check_flags(operator, "deploy/base operator");
    let team = build(&repo().join("examples/kubernetes/team-a"));
    let agent = find(&team, "Deployment", "team-a", "agent-alice").unwrap();
    let wait = container(agent, "initContainers", "wait-for-env");
    check_flags(wait, "examples/kubernetes agent-alice init container");
    let sidecar = build(&repo().join("examples/kubernetes/sidecar"));
    let agent = find(&sidecar, "Deployment", "team-b", "agent-bob").unwrap();
    let container = container(agent, "initContainers", "agent-env");
    assert_eq!(container["restartPolicy"], "Always", "a native sidecar");
    check_flags(container, "examples/kubernetes/sidecar agent-bob sidecar");
}

// --- (d) the Argo CD health check -------------------------------------------

fn health_lua() -> String {
    std::fs::read_to_string(repo().join("deploy/argocd/health.lua")).unwrap()
}

fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<mlua::Value> {
    Ok(match v {
        Value::Null => mlua::Value::Nil,
        Value::Bool(b) => mlua::Value::Boolean(*b),
        Value::Number(n) => mlua::Value::Number(n.as_f64().unwrap()),
        Value::String(s) => mlua::Value::String(lua.create_string(s)?),
        Value::Array(a) => {
            let t = lua.create_table()?;
            for (i, x) in a.iter().enumerate() {
                t.set(i + 1, to_lua(lua, x)?)?;
            }
            mlua::Value::Table(t)
        }
        Value::Object(o) => {
            let t = lua.create_table()?;
            for (k, x) in o {
                t.set(k.as_str(), to_lua(lua, x)?)?;
            }
            mlua::Value::Table(t)
        }
    })
}

/// Runs the health script as Argo CD does: Lua 5.1 with only the base,
/// table and package libraries, the object as the global `obj`.
fn health(obj: &Value) -> (String, String) {
    let lua = Lua::new_with(StdLib::TABLE | StdLib::PACKAGE, LuaOptions::new()).unwrap();
    lua.globals()
        .set("obj", to_lua(&lua, obj).unwrap())
        .unwrap();
    let hs: mlua::Table = lua
        .load(health_lua())
        .set_name("health.lua")
        .eval()
        .unwrap_or_else(|e| panic!("health.lua on {obj}: {e}"));
    (hs.get("status").unwrap(), hs.get("message").unwrap())
}

fn object(kind: &str, generation: i64, status: Option<Value>) -> Value {
    let mut o = json!({
        "apiVersion": "agentenv.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "alice", "namespace": "team-a", "generation": generation},
        "spec": {},
    });
    if let Some(s) = status {
        o["status"] = s;
    }
    o
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 2})
}

fn status(conditions: Vec<Value>) -> Option<Value> {
    Some(json!({"observedGeneration": 2, "conditions": conditions}))
}

#[test]
fn argocd_health_follows_the_conditions() {
    let ready = condition("Ready", "True", "Rendered", "rendered 3 plugins");
    let not_ready = condition(
        "Ready",
        "False",
        "MissingSecret",
        "missing secret FORGEJO_TOKEN",
    );
    let calm = [
        condition("Reconciling", "False", "Reconciled", ""),
        condition("Stalled", "False", "Reconciled", ""),
    ];
    let cases: Vec<(&str, Value, (&str, &str))> = vec![
        (
            "no status",
            object("AgentInstance", 1, None),
            ("Progressing", "waiting for the operator"),
        ),
        (
            "an old generation",
            object("AgentInstance", 3, status(vec![ready.clone()])),
            (
                "Progressing",
                "waiting for the operator to observe generation 3",
            ),
        ),
        (
            "Stalled",
            object(
                "McpServer",
                2,
                status(vec![
                    not_ready.clone(),
                    condition(
                        "Stalled",
                        "True",
                        "MissingSecret",
                        "missing secret FORGEJO_TOKEN",
                    ),
                ]),
            ),
            ("Degraded", "missing secret FORGEJO_TOKEN"),
        ),
        (
            "Reconciling",
            object(
                "PluginBinding",
                2,
                status(vec![
                    condition("Ready", "Unknown", "Reconciling", ""),
                    condition("Reconciling", "True", "Rendering", "rendering 2 instances"),
                ]),
            ),
            ("Progressing", "rendering 2 instances"),
        ),
        (
            "Ready",
            object(
                "PluginMarketplace",
                2,
                status([vec![ready.clone()], calm.to_vec()].concat()),
            ),
            ("Healthy", "rendered 3 plugins"),
        ),
        (
            "not Ready",
            object(
                "AgentInstance",
                2,
                status([vec![not_ready], calm.to_vec()].concat()),
            ),
            ("Degraded", "missing secret FORGEJO_TOKEN"),
        ),
        (
            "a reason without a message",
            object(
                "AgentInstance",
                2,
                status(vec![condition("Ready", "True", "UpToDate", "")]),
            ),
            ("Healthy", "UpToDate"),
        ),
        (
            "no conditions yet",
            object("AgentInstance", 2, status(vec![])),
            ("Progressing", "waiting for the operator"),
        ),
        (
            "an empty status",
            object("AgentInstance", 1, Some(json!({}))),
            (
                "Progressing",
                "waiting for the operator to observe generation 1",
            ),
        ),
    ];
    for (what, obj, (want_status, want_message)) in cases {
        let (got_status, got_message) = health(&obj);
        assert_eq!(
            (got_status.as_str(), got_message.as_str()),
            (want_status, want_message),
            "{what}"
        );
    }
}

#[test]
fn argocd_cm_patch_carries_health_lua_for_every_kind() {
    let script = health_lua();
    let crds = rbac::parse_all(&repo().join("crds/crds.yaml"));
    let keys: BTreeSet<String> = crds
        .iter()
        .map(|c| {
            format!(
                "resource.customizations.health.{}_{}",
                text(&c["spec"], "group"),
                text(&c["spec"]["names"], "kind")
            )
        })
        .collect();
    assert_eq!(keys.len(), 4);
    let patch = &rbac::parse_all(&repo().join("deploy/argocd/argocd-cm-patch.yaml"))[0];
    assert_eq!(
        (text(patch, "kind"), name(patch)),
        ("ConfigMap", "argocd-cm")
    );
    let data = patch["data"].as_object().unwrap();
    assert_eq!(data.keys().cloned().collect::<BTreeSet<_>>(), keys);
    for (k, v) in data {
        assert!(
            v.as_str() == Some(script.as_str()),
            "{k} differs from deploy/argocd/health.lua"
        );
    }
}

// --- (e) RBAC ---------------------------------------------------------------

#[test]
fn rbac_is_least_privilege() {
    let grants = rbac::granted();
    assert!(grants.len() > 10, "{grants:#?}");
    let operator_ns = Scope::Namespace(OPERATOR_NAMESPACE.to_owned());
    for g in &grants {
        assert!(
            !(g.group.contains('*') || g.resource.contains('*') || g.verb.contains('*')),
            "{g:?}"
        );
        if g.resource == "secrets" {
            assert!(
                ["list", "watch", "create", "patch", "delete"].contains(&g.verb.as_str()),
                "{g:?}: Secrets are read through watches, and only the sidecar \
                 render and report Secrets are written (by server-side apply)"
            );
        }
        if g.group == "rbac.authorization.k8s.io" {
            assert!(
                ["roles", "rolebindings"].contains(&g.resource.as_str())
                    && ["create", "patch", "delete"].contains(&g.verb.as_str()),
                "{g:?}: only the per-instance sidecar grants are written"
            );
        }
        if ["leases", "configmaps"].contains(&g.resource.as_str()) {
            assert_eq!(
                g.scope, operator_ns,
                "{g:?} must stay in the operator's namespace"
            );
        }
        if g.group == "agentenv.io" && g.verb == "patch" && !g.resource.ends_with("/status") {
            assert_eq!(
                g.resource, "agentinstances",
                "{g:?}: only instances carry a finalizer"
            );
        }
    }
    for (group, resource, verb, scope) in [
        ("coordination.k8s.io", "leases", "update", &operator_ns),
        ("", "configmaps", "watch", &operator_ns),
        ("agentenv.io", "agentinstances", "watch", &Scope::Cluster),
        (
            "agentenv.io",
            "agentinstances/status",
            "patch",
            &Scope::Cluster,
        ),
        ("", "pods/eviction", "create", &Scope::Cluster),
    ] {
        let g = Grant::new(group, resource, verb, scope.clone());
        assert!(grants.contains(&g), "missing {g:?}");
    }
}

#[test]
fn rbac_parser_refuses_wildcards() {
    let role = |rule: Value| {
        vec![
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "r"}, "rules": [rule]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "r"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "r"},
                   "subjects": [{"kind": "ServiceAccount", "name": rbac::SERVICE_ACCOUNT,
                                 "namespace": OPERATOR_NAMESPACE}]}),
        ]
    };
    let fine = rbac::granted_in(&role(
        json!({"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]}),
    ));
    assert_eq!(fine.len(), 4);
    assert!(fine.contains(&Grant::new("", "pods/log", "list", Scope::Cluster)));
    for bad in [
        json!({"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]}),
        json!({"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}),
        json!({"apiGroups": [""], "resources": ["pods/*"], "verbs": ["get"]}),
        json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}),
        json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": ["a"]}),
    ] {
        let docs = role(bad.clone());
        let refused = std::panic::catch_unwind(|| rbac::granted_in(&docs)).is_err();
        assert!(refused, "accepted {bad}");
    }
}

// --- the Kubernetes example -------------------------------------------------

/// The PersistentVolume a claim is bound to, checked to be bound to it alone.
fn bound_volume<'a>(docs: &'a [Value], claim: &Value) -> &'a Value {
    let pv_name = text(&claim["spec"], "volumeName");
    let pv = find(docs, "PersistentVolume", "", pv_name)
        .unwrap_or_else(|| panic!("PVC {} names the missing volume {pv_name}", name(claim)));
    let claim_ref = &pv["spec"]["claimRef"];
    assert_eq!(
        (text(claim_ref, "namespace"), text(claim_ref, "name")),
        (namespace(claim), name(claim)),
        "PV {pv_name} is reserved for another claim"
    );
    assert_eq!(
        pv["spec"]["storageClassName"], claim["spec"]["storageClassName"],
        "PV {pv_name} and its claim differ in storage class, so they would not bind"
    );
    for mode in strings(&claim["spec"]["accessModes"]) {
        assert!(
            strings(&pv["spec"]["accessModes"]).contains(&mode),
            "PV {pv_name} lacks {mode}"
        );
    }
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
    pv
}

#[test]
fn example_agent_is_wired_to_its_instance_and_env_dir() {
    let operator_docs = build(&repo().join("examples/kubernetes/operator"));
    check_references(&operator_docs, "examples/kubernetes/operator");
    let docs = build(&repo().join("examples/kubernetes/team-a"));
    let mut all = operator_docs.clone();
    all.extend(docs.iter().cloned());
    check_references(&all, "examples/kubernetes");

    let operator = operator_deployment(&operator_docs);
    let operator_c = container(operator, "containers", "operator");
    let operator_claim = find(
        &operator_docs,
        "PersistentVolumeClaim",
        OPERATOR_NAMESPACE,
        env_root_volume(operator).1,
    )
    .unwrap();
    let operator_pv = bound_volume(&operator_docs, operator_claim);

    let instances: Vec<&Value> = docs
        .iter()
        .filter(|d| text(d, "kind") == "AgentInstance")
        .collect();
    assert!(!instances.is_empty());
    for inst in instances {
        let (ns, inst_name) = (namespace(inst), name(inst));
        let spec = &inst["spec"];
        assert_eq!(spec["workload"]["kind"], "Deployment");
        let workload = find(&docs, "Deployment", ns, text(&spec["workload"], "name"))
            .unwrap_or_else(|| panic!("{inst_name}'s workload is not in the example"));
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert_eq!(
            labels["agentenv.io/instance"], inst_name,
            "the operator finds {inst_name}'s pods by this label"
        );
        assert_eq!(workload["spec"]["replicas"], 1);
        assert_eq!(workload["spec"]["strategy"]["type"], "Recreate");
        for pdb in docs
            .iter()
            .filter(|d| text(d, "kind") == "PodDisruptionBudget")
        {
            assert!(
                labels_match(&pdb["spec"]["selector"]["matchLabels"], labels),
                "PDB {}",
                name(pdb)
            );
            assert!(
                pdb["spec"]["minAvailable"].is_null() && pdb["spec"]["maxUnavailable"] != 0,
                "PDB {} would block every Evict restart of a single replica",
                name(pdb)
            );
        }

        // Files: the operator writes them as its own user, 0600.
        let pod = pod_spec(workload);
        assert_eq!(
            pod["securityContext"]["runAsUser"],
            pod_spec(operator)["securityContext"]["runAsUser"],
            "the agent must run as the operator's uid to read the files it writes"
        );

        // The env dir: the operator's <env root>/<envDir.path> is the agent's subPath.
        let (volume, claim_name) = claim_volume(workload);
        let claim = find(&docs, "PersistentVolumeClaim", ns, claim_name).unwrap();
        let pv = bound_volume(&docs, claim);
        assert_eq!(
            pv["spec"]["nfs"]["server"],
            operator_pv["spec"]["nfs"]["server"]
        );
        let agent = container(workload, "containers", "claude-code");
        let mounts = mount(agent, volume);
        assert_eq!(mounts.len(), 1);
        let (mount_path, sub_path) = (text(mounts[0], "mountPath"), text(mounts[0], "subPath"));
        let env_dir = spec["envDir"]["path"]
            .as_str()
            .map_or_else(|| format!("{ns}/{inst_name}"), str::to_owned);
        assert_eq!(
            format!("{}/{env_dir}", text(&operator_pv["spec"]["nfs"], "path")),
            format!("{}/{sub_path}", text(&pv["spec"]["nfs"], "path")),
            "{inst_name} mounts another directory than the operator renders into"
        );
        assert_eq!(
            env(agent, "CLAUDE_CONFIG_DIR").and_then(|e| e["value"].as_str()),
            Some(mount_path)
        );

        // The init container waits on that same directory for this pod.
        let wait = container(workload, "initContainers", "wait-for-env");
        assert_eq!(
            wait["image"], operator_c["image"],
            "wait and run come from one release"
        );
        let wait_args = args(wait);
        assert_eq!(wait_args.first(), Some(&"wait"));
        assert_eq!(env_field(wait, "AGENT_ENV_POD_UID"), Some("metadata.uid"));
        let wait_mounts = mount(wait, volume);
        assert_eq!(wait_mounts.len(), 1);
        assert!(
            wait_mounts[0]["subPath"].is_null(),
            "the kubelet would create a missing subPath as root before the operator could"
        );
        assert_eq!(
            arg(&wait_args, "--env-dir").map(str::to_owned),
            Some(format!("{}/{sub_path}", text(wait_mounts[0], "mountPath")))
        );
    }

    // Declarations reach an instance, and their secrets exist.
    let types: BTreeSet<&str> = docs
        .iter()
        .filter(|d| text(d, "kind") == "AgentInstance")
        .map(|d| text(&d["spec"], "agentType"))
        .collect();
    let secrets: BTreeSet<String> = docs
        .iter()
        .filter(|d| text(d, "kind") == "Secret")
        .inspect(|s| {
            assert_eq!(
                s["metadata"]["labels"]["agentenv.io/secrets"],
                "true",
                "{}",
                name(s)
            );
            for v in s["stringData"].as_object().unwrap().values() {
                assert!(
                    v.as_str().unwrap().contains("example"),
                    "{}: not marked as an example",
                    name(s)
                );
            }
        })
        .flat_map(|s| s["stringData"].as_object().unwrap().keys().cloned())
        .collect();
    for d in docs
        .iter()
        .filter(|d| text(d, "apiVersion") == "agentenv.io/v1alpha1")
    {
        if let Some(t) = d["spec"]["target"]["agentType"].as_str() {
            assert!(
                types.contains(t),
                "{} targets type {t}, which no instance has",
                name(d)
            );
        }
        let text = d["spec"].to_string();
        for (i, _) in text.match_indices("${SECRET:") {
            let rest = &text[i + 9..];
            let secret = &rest[..rest.find('}').unwrap()];
            assert!(
                secrets.contains(secret),
                "{} uses ${{SECRET:{secret}}}, which no labelled Secret holds",
                name(d)
            );
        }
    }
}

/// The example's agentenv.io objects and Secrets, rendered by the local
/// engine with the install's builtin layer, make alice ready.
#[test]
fn example_objects_render_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let manifests = tmp.path().join("objects.yaml");
    let docs = build(&repo().join("examples/kubernetes/team-a"));
    let mut out = String::new();
    for d in docs.iter().filter(|d| {
        text(d, "apiVersion") == "agentenv.io/v1alpha1"
            || (text(d, "apiVersion"), text(d, "kind")) == ("v1", "Secret")
    }) {
        // JSON is YAML.
        out.push_str(&format!("---\n{d}\n"));
    }
    std::fs::write(&manifests, out).unwrap();
    let root = tmp.path().join("root");
    let run = Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .args(["reconcile", "--once", "-o", "json", "--no-fsync", "-f"])
        .arg(&manifests)
        .arg("--config")
        .arg(repo().join("deploy/base/config"))
        .arg("--env-root")
        .arg(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    let rows: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.len(), 1, "{stdout}");
    let alice = &rows[0];
    assert_eq!(
        (alice["namespace"].as_str(), alice["name"].as_str()),
        (Some("team-a"), Some("alice"))
    );
    assert_eq!(alice["ready"], true, "{alice}");
    assert_eq!(alice["envDir"], "team-a/alice");
    assert!(
        strings(&alice["mcpServers"]).contains(&"forgejo"),
        "{alice}"
    );
    assert!(
        strings(&alice["plugins"]).contains(&"security-review@acme-tools"),
        "{alice}"
    );
    let claude = std::fs::read_to_string(root.join("team-a/alice/.claude.json")).unwrap();
    assert!(
        claude.contains("example-dummy-token-replace-me"),
        "the Secret's value was not filled in"
    );
}

#[test]
fn sidecar_example_is_wired_to_its_instance_account_and_env_dir() {
    // Not `check_references`: that follows an agent's PVC to the
    // operator's volume, and a sidecar agent has neither.
    let docs = build(&repo().join("examples/kubernetes/sidecar"));
    let inst = find(&docs, "AgentInstance", "team-b", "bob").unwrap();
    assert_eq!(inst["spec"]["delivery"]["mode"], "Sidecar");
    let account = text(&inst["spec"]["delivery"], "serviceAccountName");
    assert!(find(&docs, "ServiceAccount", "team-b", account).is_some());
    let agent = find(&docs, "Deployment", "team-b", "agent-bob").unwrap();
    let pod = &agent["spec"]["template"];
    assert_eq!(text(&pod["spec"], "serviceAccountName"), account);
    assert_eq!(pod["metadata"]["labels"]["agentenv.io/instance"], "bob");
    let sidecar = container(agent, "initContainers", "agent-env");
    let env = |name: &str| {
        sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("the sidecar sets no {name}"))
            .clone()
    };
    assert_eq!(
        env("AGENT_ENV_INSTANCE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['agentenv.io/instance']"
    );
    assert_eq!(
        env("AGENT_ENV_POD_UID")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.uid"
    );
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    let root = text(&env("AGENT_ENV_ROOT"), "value").to_owned();
    let env_dir = text(&env("AGENT_ENV_ENV_DIR"), "value").to_owned();
    let volume = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == root.as_str())
        .expect("the sidecar mounts its env root")["name"]
        .clone();
    let claude = container(agent, "containers", "claude-code");
    let config_dir = claude["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "CLAUDE_CONFIG_DIR")
        .unwrap()["value"]
        .clone();
    let mount = claude["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == config_dir)
        .expect("the agent mounts its CLAUDE_CONFIG_DIR");
    assert_eq!(
        mount["name"], volume,
        "the agent mounts the sidecar's volume"
    );
    assert_eq!(
        mount["subPath"],
        env_dir.as_str(),
        "at the sidecar's env dir"
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let v = volumes.iter().find(|v| v["name"] == volume).unwrap();
    assert!(v.get("emptyDir").is_some(), "a pod-local volume: {v}");
}
