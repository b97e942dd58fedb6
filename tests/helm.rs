//! The Helm chart (`deploy/helm/agent-env-operator`) installs what the
//! kustomize base (`deploy/base`) installs: the same CRDs, the same
//! least-privilege grants, and, released as `agent-env` into
//! `agent-env-system` with default values, the same objects under the same
//! names. Its values are documented, value combinations that cannot work
//! fail the render with a message saying why, and it installs on a real API
//! server and uninstalls again.
//!
//! Needs `helm` (in `KUBEBUILDER_ASSETS`, else on `PATH`); the install tests
//! also need the envtest binaries and `kubectl`. Without them each test
//! prints `SKIPPED <test>: <why>` and passes.

#[path = "common/envtest.rs"]
mod envtest;
#[path = "common/rbac.rs"]
mod rbac;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use envtest::{ControlPlane, warnings};
use rbac::{
    Grant, OPERATOR_NAMESPACE, SERVICE_ACCOUNT, Scope, build, granted_in, name, namespace, repo,
    text,
};
use serde_json::{Value, json};

/// The chart, relative to the repository root.
const CHART: &str = "deploy/helm/agent-env-operator";

/// The release name that gives the chart's objects deploy/base's names.
const RELEASE: &str = "agent-env";

fn chart() -> PathBuf {
    repo().join(CHART)
}

/// Prints `SKIPPED <what>: <why>` past cargo's output capture, which would
/// otherwise hide that a test checked nothing.
fn skip(what: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {why}");
}

/// `name` from `KUBEBUILDER_ASSETS` if it is there, else from `PATH`.
fn tool(name: &str) -> Option<PathBuf> {
    let assets = std::env::var_os("KUBEBUILDER_ASSETS").filter(|v| !v.is_empty());
    let path = std::env::var_os("PATH").unwrap_or_default();
    assets
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn tool_or_skip(name: &str, what: &str) -> Option<PathBuf> {
    let found = tool(name);
    if found.is_none() {
        skip(
            what,
            &format!("no {name} in $KUBEBUILDER_ASSETS or on PATH; install it to run this test"),
        );
    }
    found
}

/// The helm binary, with its cache, config and data kept in a directory of
/// its own rather than the user's home.
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn find(what: &str) -> Option<Helm> {
        Some(Helm {
            bin: tool_or_skip("helm", what)?,
            home: tempfile::tempdir().unwrap(),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        let home = self.home.path();
        cmd.current_dir(repo())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env_remove("KUBECONFIG")
            .env_remove("HELM_NAMESPACE");
        cmd
    }

    /// `helm <args> -f <values>`, with `values` written to a file.
    fn run(&self, args: &[&str], values: &Value) -> Output {
        let file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile_in(self.home.path())
            .unwrap();
        // JSON is YAML.
        std::fs::write(file.path(), values.to_string()).unwrap();
        self.command()
            .args(args)
            .arg("-f")
            .arg(file.path())
            .output()
            .expect("helm runs")
    }

    /// The chart rendered as `release` into `ns`, or helm's error.
    fn template_as(&self, release: &str, ns: &str, values: &Value) -> Result<String, String> {
        let out = self.run(&["template", release, CHART, "--namespace", ns], values);
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The objects of the chart rendered as `agent-env` into
    /// `agent-env-system`; panics when it does not render.
    fn render(&self, values: &Value) -> Vec<Value> {
        let text = self
            .template_as(RELEASE, OPERATOR_NAMESPACE, values)
            .unwrap_or_else(|e| panic!("the chart does not render with {values}: {e}"));
        parse(&text)
    }
}

fn parse(text: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn defaults() -> Value {
    json!({})
}

/// One of [`value_sets`] by name.
fn values(set: &str) -> Value {
    value_sets()
        .into_iter()
        .find(|(what, _)| *what == set)
        .unwrap_or_else(|| panic!("no value set {set:?}"))
        .1
}

/// Value sets that must render: each a name and its values.
fn value_sets() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", defaults()),
        (
            "postgres with a master key",
            json!({
                "replicas": 3,
                "state": {"type": "postgres", "postgres": {"existingSecret": "agent-env-postgres"}},
                "masterKey": {"existingSecret": "agent-env-master-key", "previousSecret": "agent-env-old-key"},
            }),
        ),
        ("one watched namespace", json!({"watchNamespace": "team-a"})),
        (
            "service monitor and network policy",
            json!({
                "metrics": {"serviceMonitor": {"enabled": true, "interval": "30s", "labels": {"release": "prometheus"}}},
                "networkPolicy": {
                    "enabled": true,
                    "apiServerCidrs": ["10.0.0.1/32"],
                    "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                    "extraEgress": [{"ports": [{"port": 5432, "protocol": "TCP"}]}],
                },
            }),
        ),
        (
            "existing claims",
            json!({
                "envRoot": {"existingClaim": "shared-env-root"},
                "state": {"sqlite": {"existingClaim": "operator-state"}},
            }),
        ),
        (
            "everything else set",
            json!({
                "fullnameOverride": "ae",
                "image": {"tag": "0.2.0", "pullPolicy": "Always", "pullSecrets": ["regcred"]},
                "leaderElection": {"leaseName": "ae-leader", "leaseDuration": "20s"},
                "log": {"level": "debug", "format": "text"},
                "concurrency": 32,
                "resyncInterval": "10m",
                "envRoot": {"storageClass": "-", "volumeName": "agent-env-root", "size": "50Gi", "keepOnUninstall": false},
                "state": {"sqlite": {"storageClass": "local-ssd", "size": "2Gi", "keepOnUninstall": false}},
                "masterKey": {"existingSecret": "ae-key"},
                "builtin": {"name": "ae-layer", "files": {"mcp-builtin.json": null}},
                "serviceAccount": {"name": "ae-operator", "annotations": {"example.com/role": "operator"}},
                "metrics": {"port": 9090, "service": {"annotations": {"example.com/scrape": "true"}}},
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "operators", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
                "podAnnotations": {"example.com/team": "platform"},
                "podLabels": {"example.com/tier": "control"},
                "priorityClassName": "system-cluster-critical",
                "extraArgs": ["--no-fsync"],
                "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
                "extraVolumes": [{"name": "ca", "configMap": {"name": "ca-bundle"}}],
                "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/extra", "readOnly": true}],
            }),
        ),
    ]
}

// --- objects ------------------------------------------------------------------

fn find<'a>(docs: &'a [Value], kind: &str, n: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| text(d, "kind") == kind && name(d) == n)
}

fn get<'a>(docs: &'a [Value], kind: &str, n: &str) -> &'a Value {
    find(docs, kind, n).unwrap_or_else(|| panic!("no {kind} {n} among {:?}", keys(docs)))
}

fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| text(d, "kind") == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected among {:?}", keys(docs));
    found[0]
}

/// Kind, namespace and name of every object.
fn keys(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    docs.iter()
        .map(|d| {
            (
                text(d, "kind").to_owned(),
                namespace(d).to_owned(),
                name(d).to_owned(),
            )
        })
        .collect()
}

fn operator(docs: &[Value]) -> &Value {
    &only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args(docs: &[Value]) -> Vec<&str> {
    rbac::strings(&operator(docs)["args"])
}

fn env<'a>(docs: &'a [Value], n: &str) -> Option<&'a Value> {
    operator(docs)["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| text(e, "name") == n)
}

fn volume<'a>(docs: &'a [Value], n: &str) -> Option<&'a Value> {
    only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| text(v, "name") == n)
}

fn mount_path<'a>(docs: &'a [Value], volume: &str) -> Option<&'a str> {
    operator(docs)["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| text(m, "name") == volume)
        .map(|m| text(m, "mountPath"))
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a label selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

fn pod_labels(docs: &[Value]) -> &Value {
    &only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
}

// --- 1. lint and render -------------------------------------------------------

#[test]
fn chart_lints_strictly_with_every_value_set() {
    let Some(helm) = Helm::find("helm: lint") else {
        return;
    };
    for (what, values) in value_sets() {
        let out = helm.run(&["lint", "--strict", CHART], &values);
        assert!(
            out.status.success(),
            "helm lint --strict ({what}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_value_set_renders() {
    let Some(helm) = Helm::find("helm: value sets") else {
        return;
    };
    for (what, values) in value_sets() {
        let docs = helm.render(&values);
        assert!(!docs.is_empty(), "{what}: nothing rendered");
        for d in &docs {
            assert!(
                !text(d, "apiVersion").is_empty() && !name(d).is_empty(),
                "{what}: an object without apiVersion or name: {d}"
            );
        }
    }
}

#[test]
fn postgres_state_comes_from_a_secret_and_the_master_key_from_another() {
    let Some(helm) = Helm::find("helm: postgres") else {
        return;
    };
    let docs = helm.render(&values("postgres with a master key"));
    let deployment = only(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    // A standby is ready before it leads, so the new pod can come up first.
    assert_eq!(
        deployment["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    let a = args(&docs);
    assert!(
        !a.iter().any(|a| a.starts_with("--state")),
        "the URL comes from the Secret, not a flag: {a:?}"
    );
    assert_eq!(
        env(&docs, "AGENT_ENV_STATE").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "agent-env-postgres", "key": "url"})
    );
    let claims: Vec<&str> = docs
        .iter()
        .filter(|d| text(d, "kind") == "PersistentVolumeClaim")
        .map(name)
        .collect();
    assert_eq!(claims, ["agent-env-root"], "no state claim with PostgreSQL");
    assert!(volume(&docs, "state").is_none());
    for (flag, vol, secret) in [
        ("--master-key-file", "master-key", "agent-env-master-key"),
        (
            "--previous-master-key-file",
            "previous-master-key",
            "agent-env-old-key",
        ),
    ] {
        let file = a
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("no {flag} in {a:?}"));
        let v = volume(&docs, vol).unwrap();
        assert_eq!(v["secret"]["secretName"], secret);
        let at = mount_path(&docs, vol).unwrap();
        let item = text(&v["secret"]["items"][0], "path");
        assert_eq!(file, format!("{at}/{item}"), "{flag} names the mounted key");
    }
}

#[test]
fn a_watched_namespace_is_passed_to_the_operator() {
    let Some(helm) = Helm::find("helm: watchNamespace") else {
        return;
    };
    let docs = helm.render(&values("one watched namespace"));
    assert!(args(&docs).contains(&"--namespace=team-a"));
    assert!(
        !args(&helm.render(&defaults()))
            .iter()
            .any(|a| a.starts_with("--namespace"))
    );
}

#[test]
fn service_monitor_and_network_policy_are_off_unless_asked_for() {
    let Some(helm) = Helm::find("helm: ServiceMonitor and NetworkPolicy") else {
        return;
    };
    let plain = helm.render(&defaults());
    assert!(find(&plain, "ServiceMonitor", "agent-env-operator").is_none());
    assert!(find(&plain, "NetworkPolicy", "agent-env-operator").is_none());

    let docs = helm.render(&values("service monitor and network policy"));
    let service = only(&docs, "Service");
    let monitor = only(&docs, "ServiceMonitor");
    assert_eq!(text(monitor, "apiVersion"), "monitoring.coreos.com/v1");
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "30s");
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");

    let policy = only(&docs, "NetworkPolicy");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        pod_labels(&docs)
    ));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{
            "ports": [{"port": "metrics", "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }])
    );
    let egress = policy["spec"]["egress"].as_array().unwrap();
    let ports = |rule: &Value| -> BTreeSet<(i64, String)> {
        rule["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["port"].as_i64().unwrap(), text(p, "protocol").to_owned()))
            .collect()
    };
    assert!(
        egress.iter().any(|r| {
            r.get("to").is_none()
                && ports(r) == BTreeSet::from([(53, "UDP".into()), (53, "TCP".into())])
        }),
        "DNS: {egress:?}"
    );
    assert!(
        egress.iter().any(|r| {
            r["to"] == json!([{"ipBlock": {"cidr": "10.0.0.1/32"}}])
                && ports(r) == BTreeSet::from([(443, "TCP".into()), (6443, "TCP".into())])
        }),
        "the API server: {egress:?}"
    );
    assert!(egress.contains(&json!({"ports": [{"port": 5432, "protocol": "TCP"}]})));
    assert_eq!(egress.len(), 3, "nothing else goes out: {egress:?}");
}

#[test]
fn existing_claims_are_used_and_none_created() {
    let Some(helm) = Helm::find("helm: existing claims") else {
        return;
    };
    let docs = helm.render(&values("existing claims"));
    assert!(
        !docs
            .iter()
            .any(|d| text(d, "kind") == "PersistentVolumeClaim"),
        "{:?}",
        keys(&docs)
    );
    assert_eq!(
        volume(&docs, "env-root").unwrap()["persistentVolumeClaim"]["claimName"],
        "shared-env-root"
    );
    assert_eq!(
        volume(&docs, "state").unwrap()["persistentVolumeClaim"]["claimName"],
        "operator-state"
    );
}

#[test]
fn every_other_value_reaches_its_field() {
    let Some(helm) = Helm::find("helm: other values") else {
        return;
    };
    let docs = helm.render(&values("everything else set"));
    let a = args(&docs);
    for expected in [
        "--config-map=ae-layer",
        "--lease-name=ae-leader",
        "--lease-duration=20s",
        "--metrics-addr=0.0.0.0:9090",
        "--log-format=text",
        "--log=debug",
        "--concurrency=32",
        "--resync-interval=10m",
        "--master-key-file=/etc/agent-env/master-key/master.key",
        "--no-fsync",
    ] {
        assert!(a.contains(&expected), "{expected} missing from {a:?}");
    }
    let c = operator(&docs);
    assert_eq!(c["image"], "ghcr.io/agent-env/agent-env-operator:0.2.0");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(env(&docs, "RUST_BACKTRACE").unwrap()["value"], "1");
    assert_eq!(mount_path(&docs, "ca"), Some("/etc/ssl/extra"));
    let pod = &only(&docs, "Deployment")["spec"]["template"];
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
    assert_eq!(pod["spec"]["serviceAccountName"], "ae-operator");
    assert_eq!(pod["metadata"]["labels"]["example.com/tier"], "control");
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/team"],
        "platform"
    );
    assert_eq!(pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "dedicated");
    assert!(pod["spec"]["affinity"]["nodeAffinity"].is_object());
    assert_eq!(pod["spec"]["priorityClassName"], "system-cluster-critical");
    assert_eq!(
        volume(&docs, "ca").unwrap()["configMap"]["name"],
        "ca-bundle"
    );

    let builtin = get(&docs, "ConfigMap", "ae-layer")["data"]
        .as_object()
        .unwrap();
    assert!(builtin.contains_key("agents.json") && !builtin.contains_key("mcp-builtin.json"));
    let root = get(&docs, "PersistentVolumeClaim", "ae-root");
    assert_eq!(root["spec"]["storageClassName"], "");
    assert_eq!(root["spec"]["volumeName"], "agent-env-root");
    assert_eq!(root["spec"]["resources"]["requests"]["storage"], "50Gi");
    assert_eq!(root["metadata"]["annotations"], Value::Null, "not kept");
    let state = get(&docs, "PersistentVolumeClaim", "ae-state");
    assert_eq!(state["spec"]["storageClassName"], "local-ssd");
    assert_eq!(state["spec"]["resources"]["requests"]["storage"], "2Gi");
    let service = get(&docs, "Service", "ae-operator-metrics");
    assert_eq!(service["spec"]["ports"][0]["port"], 9090);
    assert_eq!(
        service["metadata"]["annotations"]["example.com/scrape"],
        "true"
    );
    let account = get(&docs, "ServiceAccount", "ae-operator");
    assert_eq!(
        account["metadata"]["annotations"]["example.com/role"],
        "operator"
    );
    for b in docs.iter().filter(|d| text(d, "kind").ends_with("Binding")) {
        assert_eq!(b["subjects"][0]["name"], "ae-operator", "{}", name(b));
    }
}

/// The `--flags` and `AGENT_ENV_*` variables `agent-env run --help` names.
fn run_help() -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "agent-env run --help failed");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
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
    (flags, envs)
}

#[test]
fn the_operator_gets_only_flags_and_variables_it_accepts() {
    let Some(helm) = Helm::find("helm: flags") else {
        return;
    };
    let (flags, envs) = run_help();
    for (what, values) in value_sets() {
        let docs = helm.render(&values);
        let a = args(&docs);
        assert_eq!(a[0], "run", "{what}");
        for f in a.iter().filter(|a| a.starts_with("--")) {
            let f = f.split('=').next().unwrap();
            assert!(flags.contains(f), "{what}: `agent-env run` has no {f}");
        }
        for e in operator(&docs)["env"].as_array().unwrap() {
            let n = text(e, "name");
            assert!(
                !n.starts_with("AGENT_ENV_") || envs.contains(n),
                "{what}: `agent-env run` reads no {n}"
            );
        }
    }
}

#[test]
fn value_combinations_that_cannot_work_fail_the_render_saying_why() {
    let Some(helm) = Helm::find("helm: bad values") else {
        return;
    };
    for (values, says) in [
        (
            json!({"replicas": 2}),
            "replicas is 2, but state.type sqlite allows one replica",
        ),
        (
            json!({"state": {"type": "postgres", "postgres": {"existingSecret": "pg"}}}),
            "state.type postgres needs masterKey.existingSecret",
        ),
        (
            json!({"state": {"type": "postgres"}, "masterKey": {"existingSecret": "key"}}),
            "state.type postgres needs state.postgres.existingSecret",
        ),
        (
            json!({"state": {"type": "postgresql"}}),
            "state.type must be sqlite or postgres",
        ),
        (
            json!({"envRoot": {"existingClaim": "shared"}, "state": {"sqlite": {"existingClaim": "shared"}}}),
            "state.sqlite.existingClaim is the env root's claim",
        ),
        (
            json!({"builtin": {"files": {"agent.json": "{}"}}}),
            "the builtin layer reads agents.json, marketplaces-builtin.json and mcp-builtin.json only",
        ),
        (
            json!({"serviceAccount": {"create": false}}),
            "serviceAccount.name is required",
        ),
    ] {
        match helm.template_as(RELEASE, OPERATOR_NAMESPACE, &values) {
            Ok(_) => panic!("{values} rendered"),
            Err(e) => assert!(e.contains(says), "{values}: expected {says:?}, got {e}"),
        }
    }
    // What the refusals guard against stays possible where it works.
    for values in [
        json!({"replicas": 2, "state": {"type": "postgres", "postgres": {"existingSecret": "pg"}}, "masterKey": {"existingSecret": "key"}}),
        json!({"masterKey": {"existingSecret": "key"}}),
    ] {
        if let Err(e) = helm.template_as(RELEASE, OPERATOR_NAMESPACE, &values) {
            panic!("{values}: {e}");
        }
    }
}

// --- 2. CRDs --------------------------------------------------------------------

#[test]
fn chart_crds_are_the_repository_crds() {
    let dir = chart().join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let chart_docs: Vec<Value> = files.iter().flat_map(|f| rbac::parse_all(f)).collect();
    let repo_docs = rbac::parse_all(&repo().join("crds/crds.yaml"));
    assert_eq!(
        chart_docs.len(),
        repo_docs.len(),
        "{}: copy crds/crds.yaml there after changing the CRDs",
        dir.display()
    );
    for (ours, theirs) in chart_docs.iter().zip(&repo_docs) {
        assert!(
            ours == theirs,
            "{} differs from crds/crds.yaml: copy crds/crds.yaml there after changing the CRDs",
            name(theirs)
        );
    }
}

// --- 3. RBAC --------------------------------------------------------------------

#[test]
fn rbac_grants_what_the_kustomize_base_grants() {
    let Some(helm) = Helm::find("helm: RBAC") else {
        return;
    };
    let base = rbac::granted();
    assert!(base.len() > 20, "{base:?}");
    assert_eq!(granted_in(&helm.render(&defaults())), base);
}

#[test]
fn a_watched_namespace_confines_the_cluster_grants_to_it() {
    let Some(helm) = Helm::find("helm: RBAC with watchNamespace") else {
        return;
    };
    let confined = granted_in(&helm.render(&json!({"watchNamespace": "team-a"})));
    let expected: BTreeSet<Grant> = rbac::granted()
        .into_iter()
        .map(|g| match g.scope {
            Scope::Cluster => Grant {
                scope: Scope::Namespace("team-a".into()),
                ..g
            },
            Scope::Namespace(_) => g,
        })
        .collect();
    assert_eq!(confined, expected);
    assert!(!confined.iter().any(|g| g.scope == Scope::Cluster));
    // The operator's own namespace keeps its configmaps and leases grants
    // beside the watched namespace's, also when the two are one.
    let same = granted_in(&helm.render(&json!({"watchNamespace": OPERATOR_NAMESPACE})));
    let scopes: BTreeSet<Scope> = same.iter().map(|g| g.scope.clone()).collect();
    assert_eq!(
        scopes,
        BTreeSet::from([Scope::Namespace(OPERATOR_NAMESPACE.into())])
    );
    assert!(same.contains(&Grant::new(
        "",
        "secrets",
        "watch",
        Scope::Namespace(OPERATOR_NAMESPACE.into())
    )));
    assert!(same.contains(&Grant::new(
        "coordination.k8s.io",
        "leases",
        "update",
        Scope::Namespace(OPERATOR_NAMESPACE.into())
    )));
}

// --- 4. the objects -------------------------------------------------------------

/// Fields that hold no difference in what runs: labels and annotations
/// (the chart adds the standard `app.kubernetes.io/*` set and Helm's
/// annotations), the selectors built from them (checked on their own), and
/// fields the chart states that equal what the API server fills in.
fn without_release_choices(mut doc: Value) -> Value {
    let meta = doc["metadata"].as_object_mut().unwrap();
    meta.remove("labels");
    meta.remove("annotations");
    match text(&doc, "kind") {
        "Deployment" => {
            let spec = &mut doc["spec"];
            spec.as_object_mut().unwrap().remove("selector");
            let template = spec["template"]["metadata"].as_object_mut().unwrap();
            template.remove("labels");
            let c = spec["template"]["spec"]["containers"][0]
                .as_object_mut()
                .unwrap();
            // The API's default for an image with a tag other than latest.
            if c.get("imagePullPolicy") == Some(&json!("IfNotPresent")) {
                c.remove("imagePullPolicy");
            }
        }
        "Service" => {
            let spec = doc["spec"].as_object_mut().unwrap();
            spec.remove("selector");
            if spec.get("type") == Some(&json!("ClusterIP")) {
                spec.remove("type");
            }
        }
        _ => {}
    }
    doc
}

/// What the kustomize base installs besides the namespace and the CRDs
/// (which the chart leaves to `--create-namespace` and its crds/).
fn base_templates() -> Vec<Value> {
    build(&repo().join("deploy/base"))
        .into_iter()
        .filter(|d| !["Namespace", "CustomResourceDefinition"].contains(&text(d, "kind")))
        .collect()
}

#[test]
fn default_values_render_the_kustomize_base() {
    let Some(helm) = Helm::find("helm: objects") else {
        return;
    };
    let ours = helm.render(&defaults());
    let base = base_templates();
    assert_eq!(
        keys(&ours),
        keys(&base),
        "the same objects, by kind, namespace and name"
    );
    for theirs in &base {
        let (kind, n) = (text(theirs, "kind"), name(theirs));
        let ours = get(&ours, kind, n);
        assert_eq!(
            without_release_choices(ours.clone()),
            without_release_choices(theirs.clone()),
            "{kind} {n} differs from deploy/base"
        );
        let labels = ours["metadata"]["labels"].as_object().unwrap();
        for (k, v) in theirs["metadata"]["labels"].as_object().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{kind} {n}: label {k}");
        }
        for k in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ] {
            assert!(labels.contains_key(k), "{kind} {n}: no label {k}");
        }
    }
    // The selectors find the operator's pods, and only this release's.
    let deployment = only(&ours, "Deployment");
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert!(selects(selector, pod_labels(&ours)));
    assert_eq!(selector["app.kubernetes.io/instance"], RELEASE);
    assert!(selects(
        &only(&ours, "Service")["spec"]["selector"],
        pod_labels(&ours)
    ));
    let base_deployment = only(&base, "Deployment");
    assert!(selects(
        &base_deployment["spec"]["selector"]["matchLabels"],
        pod_labels(&ours)
    ));
    // The operator finds its ConfigMap, Lease and state where they are.
    let a = args(&ours);
    assert!(a.contains(&"--config-map=agent-env-builtin"));
    assert!(a.contains(&"--state=sqlite:/var/lib/agent-env-state/state.db"));
    assert_eq!(mount_path(&ours, "state"), Some("/var/lib/agent-env-state"));
    assert_eq!(
        env(&ours, "AGENT_ENV_OPERATOR_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        get(&ours, "PersistentVolumeClaim", "agent-env-state")["spec"]["accessModes"],
        json!(["ReadWriteOnce"])
    );
    // Uninstalling must not take every env dir and the state with it.
    for claim in ["agent-env-root", "agent-env-state"] {
        assert_eq!(
            get(&ours, "PersistentVolumeClaim", claim)["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep",
            "{claim}"
        );
    }
}

#[test]
fn builtin_defaults_are_the_repository_config() {
    let values = rbac::parse_all(&chart().join("values.yaml")).remove(0);
    let files = values["builtin"]["files"].as_object().unwrap();
    let mut config: Vec<PathBuf> = std::fs::read_dir(repo().join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    config.sort();
    let names: Vec<String> = config
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files.keys().cloned().collect::<BTreeSet<_>>(),
        names.iter().cloned().collect::<BTreeSet<_>>()
    );
    for (file, n) in config.iter().zip(&names) {
        assert_eq!(
            files[n].as_str().unwrap(),
            std::fs::read_to_string(file).unwrap(),
            "builtin.files.{n} in values.yaml differs from config/{n}"
        );
    }
    let Some(helm) = Helm::find("helm: builtin ConfigMap") else {
        return;
    };
    let docs = helm.render(&defaults());
    let data = get(&docs, "ConfigMap", "agent-env-builtin")["data"]
        .as_object()
        .unwrap();
    assert_eq!(data, files);
}

// --- documentation --------------------------------------------------------------

/// The paths (`a.b.c`) of the leaves of `v`: scalars, lists and empty maps.
fn leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_object() {
        Some(m) if !m.is_empty() => {
            for (k, v) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &path, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

/// Every key of values.yaml by path, with whether a comment line stands
/// right above it.
fn commented_keys(text: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut block: Option<usize> = None;
    let mut previous_is_comment = false;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(at) = block {
            if trimmed.is_empty() || indent > at {
                continue;
            }
            block = None;
        }
        if trimmed.is_empty() {
            previous_is_comment = false;
            continue;
        }
        if trimmed.starts_with('#') {
            previous_is_comment = true;
            continue;
        }
        let key_and_value = trimmed
            .split_once(':')
            .filter(|_| !trimmed.starts_with('-'));
        let Some((key, rest)) = key_and_value else {
            previous_is_comment = false;
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_owned()));
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        out.insert(path.join("."), previous_is_comment);
        if rest.trim().starts_with('|') {
            block = Some(indent);
        }
        previous_is_comment = false;
    }
    out
}

#[test]
fn every_value_is_documented_in_values_yaml_and_the_readme() {
    let values_text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let values = rbac::parse_all(&chart().join("values.yaml")).remove(0);
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| l.split('`').next().unwrap())
        .collect();
    let documented: BTreeSet<&str> = table.iter().copied().collect();
    assert_eq!(documented.len(), table.len(), "a value is listed twice");
    let mut all = Vec::new();
    leaves(&values, "", &mut all);
    for leaf in &all {
        let covered = documented
            .iter()
            .any(|d| leaf == d || leaf.starts_with(&format!("{d}.")));
        assert!(covered, "{leaf} is not in the README's table of values");
    }
    let keys = commented_keys(&values_text);
    for d in &documented {
        match keys.get(*d) {
            None => panic!("README.md lists {d}, which values.yaml does not have"),
            Some(false) => panic!("values.yaml: no comment right above {d}"),
            Some(true) => {}
        }
    }
}

// --- 5. a real API server ---------------------------------------------------------

/// Runs a command, returning its output; panics unless it succeeds.
fn ok(mut cmd: Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Lines of helm's or kubectl's stderr that warn about anything.
fn warned(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("warn"))
        .map(str::to_owned)
        .collect()
}

/// `kubectl apply -f -` of `yaml`, as the control plane's admin.
fn kubectl_apply(cp: &ControlPlane, args: &[&str], yaml: &str) -> Output {
    let mut child = cp
        .kubectl()
        .args(["apply", "-f", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A namespace that enforces and warns about the restricted Pod Security
/// profile, as the README asks for the operator's: a pod template that
/// breaks it makes the API server warn.
fn restricted_namespace(cp: &ControlPlane, ns: &str) {
    let yaml = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
        }},
    });
    kubectl_apply(cp, &[], &yaml.to_string());
}

/// What `kubectl auth can-i` answers for `account` (`ns/name`);
/// `resource` may name a subresource (`pods/eviction`).
fn can(cp: &ControlPlane, account: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let (sa_ns, sa) = account.split_once('/').unwrap();
    let mut cmd = cp.kubectl();
    cmd.args(["auth", "can-i", verb, "-n", ns])
        .arg(format!("--as=system:serviceaccount:{sa_ns}:{sa}"));
    match resource.split_once('/') {
        Some((resource, sub)) => cmd.arg(resource).arg(format!("--subresource={sub}")),
        None => cmd.arg(resource),
    };
    let out = cmd.output().unwrap();
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {verb} {resource}: {other} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The control plane, helm and kubectl, or `None` after saying which is missing.
async fn cluster(what: &str) -> Option<(&'static ControlPlane, Helm)> {
    let helm = Helm::find(what)?;
    tool_or_skip("kubectl", what)?;
    let cp = ControlPlane::shared(what).await?;
    Some((cp, helm))
}

/// helm with the control plane's admin kubeconfig, copied to a file only
/// its owner reads: helm warns about any other.
fn helm_on(helm: &Helm, cp: &ControlPlane, args: &[&str], what: &str) -> Output {
    use std::os::unix::fs::PermissionsExt;
    let kubeconfig = helm.home.path().join("kubeconfig");
    std::fs::copy(cp.kubeconfig(), &kubeconfig).unwrap();
    std::fs::set_permissions(&kubeconfig, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = helm.command();
    cmd.args(args).arg("--kubeconfig").arg(&kubeconfig);
    ok(cmd, what)
}

/// Whether `kind/name` is on the server.
fn exists(cp: &ControlPlane, ns: Option<&str>, object: &str) -> bool {
    let mut cmd = cp.kubectl();
    cmd.args(["get", object, "--ignore-not-found", "-o", "name"]);
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = ok(cmd, &format!("kubectl get {object}"));
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[tokio::test]
async fn helm_install_and_uninstall_on_a_real_api_server() {
    let Some((cp, helm)) = cluster("helm: install on envtest").await else {
        return;
    };
    let ns = OPERATOR_NAMESPACE;
    restricted_namespace(cp, ns);
    let install = ["install", RELEASE, CHART, "-n", ns, "--create-namespace"];
    let out = helm_on(&helm, cp, &install, "helm install");
    assert_eq!(warned(&out), Vec::<String>::new(), "helm install warned");

    let namespaced = [
        "deployment/agent-env-operator",
        "serviceaccount/agent-env",
        "configmap/agent-env-builtin",
        "role/agent-env-operator",
        "rolebinding/agent-env-operator",
        "service/agent-env-operator-metrics",
        "persistentvolumeclaim/agent-env-root",
        "persistentvolumeclaim/agent-env-state",
    ];
    let cluster_wide = [
        "clusterrole/agent-env-operator",
        "clusterrolebinding/agent-env-operator",
    ];
    let crds = [
        "crd/agentinstances.agentenv.io",
        "crd/pluginbindings.agentenv.io",
        "crd/pluginmarketplaces.agentenv.io",
        "crd/mcpservers.agentenv.io",
    ];
    for o in namespaced {
        assert!(exists(cp, Some(ns), o), "{o} was not installed");
    }
    for o in cluster_wide.iter().chain(&crds) {
        assert!(exists(cp, None, o), "{o} was not installed");
    }

    let account = format!("{ns}/{SERVICE_ACCOUNT}");
    for (verb, resource, in_ns) in [
        ("list", "agentinstances.agentenv.io", "team-a"),
        ("patch", "agentinstances.agentenv.io", "team-b"),
        ("patch", "agentinstances.agentenv.io/status", "team-a"),
        ("watch", "mcpservers.agentenv.io", "team-a"),
        ("watch", "secrets", "team-a"),
        ("patch", "secrets", "team-a"),
        ("create", "roles.rbac.authorization.k8s.io", "team-a"),
        ("create", "pods/eviction", "team-a"),
        ("patch", "deployments.apps", "team-a"),
        ("create", "events.events.k8s.io", "team-a"),
        ("watch", "configmaps", ns),
        ("update", "leases.coordination.k8s.io", ns),
    ] {
        assert!(
            can(cp, &account, verb, resource, in_ns),
            "the operator cannot {verb} {resource} in {in_ns}"
        );
    }
    for (verb, resource, in_ns) in [
        ("get", "secrets", "team-a"),
        ("bind", "clusterroles.rbac.authorization.k8s.io", "team-a"),
        ("delete", "pods", "team-a"),
        ("create", "agentinstances.agentenv.io", "team-a"),
        ("update", "agentinstances.agentenv.io", "team-a"),
        ("list", "configmaps", "team-a"),
        ("update", "leases.coordination.k8s.io", "team-a"),
        ("delete", "leases.coordination.k8s.io", ns),
    ] {
        assert!(
            !can(cp, &account, verb, resource, in_ns),
            "the operator may {verb} {resource} in {in_ns}, which it never does"
        );
    }

    helm_on(
        &helm,
        cp,
        &["uninstall", RELEASE, "-n", ns],
        "helm uninstall",
    );
    for o in namespaced
        .iter()
        .filter(|o| !o.starts_with("persistentvolumeclaim/"))
    {
        assert!(!exists(cp, Some(ns), o), "{o} outlived helm uninstall");
    }
    for o in cluster_wide {
        assert!(!exists(cp, None, o), "{o} outlived helm uninstall");
    }
    // Helm never deletes what it installed from crds/; the claims hold the
    // env dirs and the state, and are kept on purpose.
    for o in crds {
        assert!(exists(cp, None, o), "helm uninstall deleted {o}");
    }
    for o in [
        "persistentvolumeclaim/agent-env-root",
        "persistentvolumeclaim/agent-env-state",
    ] {
        assert!(exists(cp, Some(ns), o), "helm uninstall deleted {o}");
    }
    // A new install takes the kept claims over.
    let out = helm_on(&helm, cp, &install, "helm install over kept claims");
    assert_eq!(warned(&out), Vec::<String>::new(), "helm install warned");
    assert!(exists(cp, Some(ns), "deployment/agent-env-operator"));

    // Moving the state to PostgreSQL and back changes the rollout strategy
    // both ways; the API server refuses a Recreate Deployment that still
    // carries the rollingUpdate parameters it filled in.
    let postgres = [
        "--set",
        "state.type=postgres",
        "--set",
        "state.postgres.existingSecret=agent-env-postgres",
        "--set",
        "masterKey.existingSecret=agent-env-master-key",
        "--set",
        "replicas=2",
    ];
    let strategy = || {
        let mut cmd = cp.kubectl();
        cmd.args(["get", "deployment/agent-env-operator", "-n", ns])
            .args(["-o", "jsonpath={.spec.strategy.type}/{.spec.replicas}"]);
        String::from_utf8(ok(cmd, "kubectl get deployment").stdout).unwrap()
    };
    let upgrade = ["upgrade", RELEASE, CHART, "-n", ns];
    let to_postgres: Vec<&str> = upgrade.iter().chain(&postgres).copied().collect();
    let out = helm_on(&helm, cp, &to_postgres, "helm upgrade to postgres");
    assert_eq!(warned(&out), Vec::<String>::new(), "helm upgrade warned");
    assert_eq!(strategy(), "RollingUpdate/2");
    // Without values, helm upgrade would reuse the previous ones.
    let to_sqlite: Vec<&str> = upgrade.iter().chain(&["--reset-values"]).copied().collect();
    let out = helm_on(&helm, cp, &to_sqlite, "helm upgrade back to sqlite");
    assert_eq!(warned(&out), Vec::<String>::new(), "helm upgrade warned");
    assert_eq!(strategy(), "Recreate/1");
}

#[tokio::test]
async fn a_release_confined_to_one_namespace_reads_only_there() {
    let Some((cp, helm)) = cluster("helm: watchNamespace on envtest").await else {
        return;
    };
    let (release, ns, watched) = ("confined", "confined-system", "team-c");
    restricted_namespace(cp, ns);
    kubectl_apply(
        cp,
        &[],
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": watched}})
            .to_string(),
    );
    let out = helm_on(
        &helm,
        cp,
        &[
            "install",
            release,
            CHART,
            "-n",
            ns,
            "--set",
            &format!("watchNamespace={watched}"),
            // The other install test brings the CRDs; RBAC needs none.
            "--skip-crds",
        ],
        "helm install with watchNamespace",
    );
    assert_eq!(warned(&out), Vec::<String>::new(), "helm install warned");
    let account = format!("{ns}/{release}");
    assert!(can(cp, &account, "watch", "secrets", watched));
    assert!(can(cp, &account, "create", "pods/eviction", watched));
    assert!(can(
        cp,
        &account,
        "update",
        "leases.coordination.k8s.io",
        ns
    ));
    assert!(!can(cp, &account, "watch", "secrets", "team-a"));
    assert!(!can(cp, &account, "create", "pods/eviction", "team-a"));
    assert!(!exists(cp, None, "clusterrolebinding/confined-operator"));
    helm_on(
        &helm,
        cp,
        &["uninstall", release, "-n", ns],
        "helm uninstall",
    );
    assert!(!can(cp, &account, "watch", "secrets", watched));
}

#[tokio::test]
async fn rendered_templates_pass_a_strict_server_dry_run() {
    let Some((cp, helm)) = cluster("helm: server dry run").await else {
        return;
    };
    let ns = "helm-dry-run";
    restricted_namespace(cp, ns);
    kubectl_apply(
        cp,
        &[],
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
            .to_string(),
    );
    for (i, (what, mut values)) in value_sets().into_iter().enumerate() {
        // No ServiceMonitor CRD on this server to validate one against.
        values["metrics"]["serviceMonitor"]["enabled"] = json!(false);
        // A release of its own per set: cluster-scoped names stay apart.
        let release = format!("dry-run-{i}");
        if values.get("fullnameOverride").is_some() {
            values["fullnameOverride"] = json!(release);
        }
        let yaml = helm
            .template_as(&release, ns, &values)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let out = kubectl_apply(
            cp,
            &["--server-side", "--dry-run=server", "--validate=strict"],
            &yaml,
        );
        assert_eq!(warnings(&out), Vec::<String>::new(), "{what}");
        let applied = String::from_utf8_lossy(&out.stdout).lines().count();
        assert_eq!(
            applied,
            parse(&yaml).len(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
